"""One DPM-Solver++(2M) update (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2), or its SDE counterpart, vectorised over rows.

Each row carries its own noise levels and its own previous data prediction, so rows of different
requests, at different steps of different schedules, share one call. As diffusers'
DPMSolverMultistepScheduler (algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint"),
which this follows step for step; with `noise`, as algorithm_type "sde-dpmsolver++" (k-diffusion's
sample_dpmpp_2m_sde, midpoint): the same data-prediction solver applied to the reverse-time SDE instead of
the probability-flow ODE. Its linear part is solved exactly there too, and contracts the sample by e^{−2h}
instead of e^{−h} (the SDE's drift is twice the ODE's score term); the variance the drift removes comes back
as fresh Gaussian noise z, one draw per step:
    x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·e^{−h_i}·x̃ + α_{t_i}(1 − e^{−2h_i})·D_i + σ_{t_i}·√(1 − e^{−2h_i})·z
with D_i = x_θ(x̃_{t_{i−1}}, t_{i−1}) at first order and x_θ + D1/2 (below) at second.

Notation (<variable name> -> <name in paper>)
- x -> x̃_{t_{i−1}}, the current sample (variance-preserving scale: x = α_t·x0 + σ_t·ε)
- sigma, sigma_next, sigma_prev -> the noise levels σ̂ = σ_t/α_t at t_{i−1}, t_i and t_{i−2}
  (σ̂ = √((1 − ᾱ)/ᾱ), schedules.py); α_t = 1/√(σ̂² + 1), σ_t = σ̂·α_t (eq. 2's α_t, σ_t)
- λ -> λ_t = log(α_t/σ_t) = −log σ̂ (half log-SNR); h -> h_i = λ_{t_i} − λ_{t_{i−1}} = log(σ̂/σ̂_next)
- x0_pred -> x_θ(x̃_{t_{i−1}}, t_{i−1}), the data prediction (eq. 4: from ε or v)
- x0_prev -> x_θ(x̃_{t_{i−2}}, t_{i−2}), the previous step's data prediction (the "multistep" history)
- r -> r_i = h_{i−1}/h_i
- order -> 1: DPM-Solver++1 (= DDIM with eta 0), for the first step and, as diffusers, the last
  (`lower_order_final`: σ̂_next = 0 makes h infinite); 2: the 2M update
- noise -> z ~ N(0, I) of the SDE variant (None: the ODE solver)

x0_pred is dynamically thresholded (thresholding.py) where the scheduler config asks for it (`thresholding`), as
diffusers' convert_model_output does: the thresholded x_θ is what enters the update and the next step's history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.diffusion.thresholding import Thresholding, dynamic_threshold

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DPMSolverOutput:
    x_next: torch.Tensor  # (R, C, h, w)
    x0_pred: torch.Tensor  # (R, C, h, w) float64: the next step's x0_prev


def data_prediction(
    model_output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x_θ from the model output: ε (x0 = (x − σ_t·ε)/α_t) or v (x0 = α_t·x − σ_t·v, Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return (x - sigma_t * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma_t * model_output
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def dpm_solver_2m_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_prev: torch.Tensor,
    x0_prev: torch.Tensor | None,
    order: torch.Tensor,
    prediction_type: str = "epsilon",
    thresholding: Thresholding | None = None,
    noise: torch.Tensor | None = None,
) -> DPMSolverOutput:
    """model_output and x (R, C, h, w); σ̂, σ̂_next, σ̂_prev (R,) float64 (σ̂_prev unused where order is 1);
    x0_prev (R, C, h, w) or None (every row first order); order (R,) long in {1, 2}; thresholding (None: off);
    noise (R, C, h, w) or None (the ODE solver) -> x̃_{t_i} and x_θ."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    # float64 throughout, rounded once: at t = T the cosine schedule has α_t ≈ 5e-5, and an ε model's x0 divides by it
    x, model_output = x.double(), model_output.double()
    sigma, sigma_next, sigma_prev = (s.double().reshape(shape) for s in (sigma, sigma_next, sigma_prev))

    # 1. α_t and σ_t at t_{i−1} and t_i from σ̂ (eq. 2)
    alpha, alpha_next = 1 / (sigma**2 + 1).sqrt(), 1 / (sigma_next**2 + 1).sqrt()
    sigma_t, sigma_t_next = sigma * alpha, sigma_next * alpha_next

    # 2. the data prediction x_θ(x̃_{t_{i−1}}, t_{i−1})
    x0_pred = data_prediction(model_output, x, alpha, sigma_t, prediction_type)
    if thresholding is not None:
        x0_pred = dynamic_threshold(x0_pred, thresholding)  # per row, before the update and the history

    # 3. DPM-Solver++1 (Algorithm 2, i = 1; eq. 8 with k = 1): x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·x̃ − α_{t_i}(e^{−h_i} − 1)·x_θ,
    #    with e^{−h_i} = σ̂_next/σ̂ (exact at σ̂_next = 0, where h_i is infinite)
    e_h = sigma_next / sigma  # e^{−h_i}
    decay = sigma_t_next / sigma_t  # σ_{t_i}/σ_{t_{i−1}}
    gain = alpha_next * (1 - e_h)  # −α_{t_i}(e^{−h_i} − 1)
    fresh = 0.0
    if noise is not None:  # the SDE variant (module docstring): e^{−h_i} -> e^{−2h_i} in the linear part, plus noise
        decay, gain = decay * e_h, alpha_next * (1 - e_h**2)
        fresh = sigma_t_next * (1 - e_h**2).sqrt() * noise.double()  # σ_{t_i}·√(1 − e^{−2h_i})·z
    x_next = decay * x + gain * x0_pred + fresh

    # 4. DPM-Solver++(2M) (Algorithm 2, i ≥ 2): D_i = (1 + 1/(2r_i))·x_θ(t_{i−1}) − 1/(2r_i)·x_θ(t_{i−2}),
    #    r_i = h_{i−1}/h_i; diffusers' midpoint form D0 + D1/2 with D1 = (x_θ(t_{i−1}) − x_θ(t_{i−2}))/r_i is the same
    if x0_prev is not None:
        h = torch.log(sigma / sigma_next)
        h_prev = torch.log(sigma_prev / sigma)
        r = h_prev / h
        derivative = (x0_pred - x0_prev.double()) / r  # D1
        second = decay * x + gain * (x0_pred + 0.5 * derivative) + fresh
        x_next = torch.where(order.reshape(shape) == 2, second, x_next)
    return DPMSolverOutput(x_next=x_next.to(out_dtype), x0_pred=x0_pred)
