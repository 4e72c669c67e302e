"""PLMS, the pseudo linear multistep method (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds", PNDM, §3.3 and Algorithm 2 with its pseudo improved Euler start), vectorised over rows. As diffusers'
PNDMScheduler with skip_prk_steps (SD 1.x's scheduler: `StableDiffusionPipeline`'s default), which this follows
call for call.

PNDM splits a numerical step into a gradient part, the noise estimate ε', and a transfer part φ that moves the
sample along the data manifold with it (eq. 11):
    x_{t−δ} = φ(x_t, ε', t, t − δ)
            = √(ᾱ_{t−δ}/ᾱ_t)·x_t − (ᾱ_{t−δ} − ᾱ_t) / (ᾱ_t·√(1 − ᾱ_{t−δ}) + √(ᾱ_t(1 − ᾱ_t)ᾱ_{t−δ}))·ε'
which is DDIM's update (η = 0) with ε' for ε_θ, so the transfer is ddim.py's. The gradient part is a linear
multistep (Adams–Bashforth) combination of the model's last outputs e_k (newest e_0), of the order the history
allows (Algorithm 2, with diffusers' start for skip_prk_steps):
    first call:   ε' = e_0, from x_t to x_{t−δ}                (an Euler step; x_t is kept)
    second call:  ε' = (e_0 + e_1)/2, at x_{t−δ} from the kept x_t again to x_{t−δ}   (pseudo improved Euler)
    then:         ε' = (3e_0 − e_1)/2,  (23e_0 − 16e_1 + 5e_2)/12,  (55e_0 − 59e_1 + 37e_2 − 9e_3)/24
where the second call's output does not enter the history (e_1 of the third call is the first call's output).
So n steps make n + 1 model calls (one for a single step), as the pipeline's timesteps list them.

For v_prediction the combination is taken over the raw outputs and turned into ε' at the sample and timestep the
update starts from, as diffusers does.

Notation (<variable name> -> <name in paper>)
- outputs -> e_0, e_1, ... (newest first; the model's raw outputs), order -> how many enter ε'
- model_output -> ε' (or its v_prediction form)
- COEFFICIENTS[k] -> the weights of the order-k combination
"""

from __future__ import annotations

import torch

# the Adams–Bashforth weights of e_0, e_1, ... by order (the second call's pseudo improved Euler is order 2 over
# e_0 and the first call's output, with its own weights: AVERAGE)
COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
AVERAGE = (1 / 2, 1 / 2)
MAX_HISTORY = max(COEFFICIENTS) - 1  # earlier outputs a request keeps


def combine(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ε' per row: outputs (R, K, C, h, w) newest first (zeros where a row has fewer), weights (R, K) -> (R, C, h, w)."""
    return torch.einsum("rk,rk...->r...", weights.to(outputs.dtype), outputs)


def weights_for(calls_done: int, history: int) -> tuple[float, ...]:
    """The weights of a request's call after `calls_done` calls, with `history` earlier outputs kept: Euler, the
    pseudo improved Euler's average, then Adams–Bashforth of the order the history allows."""
    if calls_done == 1:
        return AVERAGE
    return COEFFICIENTS[min(history + 1, max(COEFFICIENTS))]
