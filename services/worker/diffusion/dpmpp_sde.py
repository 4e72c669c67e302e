"""One call of DPM-Solver++ SDE ("DPM++ SDE": k-diffusion's `sample_dpmpp_sde` with r = 1/2, η = 1; Lu et al. 2022,
"DPM-Solver++", as a two-stage stochastic sampler), vectorised over rows. As diffusers' DPMSolverSDEScheduler, which
this follows call for call.

A step from σ_i to σ_{i+1} makes two model calls (the last step, to σ = 0, one: x_next = D). Each call is an
ancestral first-order data-prediction step from the step's start x_i over part of the interval, then fresh noise:
    first call, at (x_i, σ_i):    D = D_θ(x_i; σ_i),   to σ_to = σ' = √(σ_i·σ_{i+1})  (halfway in λ = −log σ)
    second call, at (x', σ'):     D = D_θ(x'; σ'),     to σ_to = σ_{i+1}, again from x_i
    each:  σ↑ = min(σ_to, √(σ_to²·(σ_i² − σ_to²)/σ_i²)),   σ↓ = √(σ_to² − σ↑²)
           x_next = D + (σ↓/σ_i)·(x_i − D) + σ↑·z,   z = (W(σ_to) − W(σ_i))/√|σ_to − σ_i|
where W is one Brownian path in σ per request (`BrownianNoise`: torchsde's BrownianInterval over [σ_min, σ_max] of
its schedule, seeded by the request's seed), so the two calls' noises are increments of the same path.

Notation (<variable name> -> <name in paper>)
- x -> the sample the call sees (x_i or x'); x_start -> x_i, kept from the first call for the second
- sigma -> the σ of that sample; sigma_from -> σ_i; sigma_to -> σ' or σ_{i+1} (0 at the last step)
- x0_pred -> D, the denoiser's estimate at the call's sample (euler.denoised); noise -> z
"""

from __future__ import annotations

import numpy as np
import torch

from services.worker.diffusion.euler import EulerOutput, denoised


def dpmpp_sde_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    second: torch.Tensor,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    prediction_type: str = "epsilon",
) -> EulerOutput:
    """model_output, x, x_start and noise (R, C, h, w); sigma, sigma_from, sigma_to (R,) float64; second (R,) bool, the
    rows at a step's second call (x_start read on those only) -> the call's next sample and D."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    x, model_output = x.double(), model_output.double()
    sigma, sigma_from, sigma_to = (s.double().reshape(shape) for s in (sigma, sigma_from, sigma_to))
    # 1. the denoiser's estimate at the call's sample
    x0_pred = denoised(model_output, x, sigma, prediction_type)
    # 2. the ancestral split of the move from σ_i to σ_to, taken from the step's start
    base = torch.where(second.reshape(shape), x_start.double(), x)
    sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt())
    sigma_down = (sigma_to**2 - sigma_up**2).sqrt()
    x_next = x0_pred + (sigma_down / sigma_from) * (base - x0_pred) + sigma_up * noise.double()
    # 3. the last step, to σ = 0: D itself (Euler to 0)
    x_next = torch.where(sigma_to == 0, x0_pred, x_next)
    return EulerOutput(x_next=x_next.to(out_dtype), x0_pred=x0_pred.to(out_dtype))  # (the same two tensors)


# torchsde keeps the path's ends and queries to the digits of its tolerance, 1e-6
TOLERANCE, TOLERANCE_DIGITS = 1e-6, 6
# Intervals of the path torchsde keeps (its default 45): a request's 2n − 1 queries each walk the tree down from the
# last interval they meet in this cache, so more of it is fewer nodes drawn again. The values do not change (each
# node's draw comes from its own seed); the time does, per path of n steps (`python -m benchmarks.bench_samplers
# --brownian`): 1.4-1.6 times less at 100 for 10 to 50 steps on 16×16 and 64×64 latents.
CACHE_SIZE = 100


class BrownianNoise:
    """One request's Brownian path W in σ over [σ_min, σ_max] of its schedule, as diffusers' BrownianTreeNoiseSampler
    (torchsde's BrownianInterval, tol 1e-6, pool 24, halfway tree; the request's seed as its entropy). A path is
    rough (W moves by √δ over δ), so it is queried exactly where the scheduler queries it: at σ through λ = −log σ
    and back in float32, as it holds them."""

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seed: int, cache_size: int = CACHE_SIZE):
        import torchsde  # the worker's requirement for this sampler only

        # the ends as torchsde holds them (float32, then its rounding), so a query is clamped here, not warned of
        self.t0, self.t1 = (round(float(np.float32(s)), TOLERANCE_DIGITS) for s in (sigma_min, sigma_max))
        self.path = torchsde.BrownianInterval(
            t0=self.t0,
            t1=self.t1,
            size=like.shape,
            dtype=like.dtype,
            device=like.device,
            entropy=seed,
            tol=TOLERANCE,
            pool_size=24,
            cache_size=cache_size,
            halfway_tree=True,
        )

    def step_noise(self, sigma: float, sigma_next: float, halfway: bool) -> torch.Tensor:
        """z of a call of the step from σ_i to σ_{i+1}: (W(σ_to) − W(σ_i))/√|σ_to − σ_i|, σ_to the midpoint in λ
        (`halfway`, the first call) or σ_{i+1} (the second)."""
        lam, lam_next = (-torch.tensor(s, dtype=torch.float32).log() for s in (sigma, sigma_next))
        lam_to = lam + (lam_next - lam) * 0.5 if halfway else lam_next
        a, b = float((-lam).exp()), float((-lam_to).exp())
        low, high, sign = (b, a, -1.0) if b < a else (a, b, 1.0)
        low, high = max(low, self.t0), min(high, self.t1)  # an ulp outside: torchsde clamps too, with a warning
        return self.path(low, high) * sign / abs(b - a) ** 0.5
