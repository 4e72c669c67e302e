"""One DDIM update (Song et al. 2021, "Denoising Diffusion Implicit Models"), vectorised over rows.

Each row carries its own t, t_prev and eta, so rows of different requests at different steps
and with different step counts share one call.

Notation (<variable name> -> <name in paper>)
- x_t -> x_t, the current sample
- model_output -> ε_θ(x_t) (epsilon) or v (v_prediction, Salimans & Ho 2022)
- alpha_bar_t, alpha_bar_prev -> α_t, α_{t−1} in the paper (its α is ᾱ of Ho et al.)
- x0_pred -> f_θ(x_t), the predicted x_0 (eq. 9)
- std_dev_t -> σ_t (eq. 16), scaled by eta
- x_prev -> x_{t−1}

x0_pred is dynamically thresholded (thresholding.py) where the scheduler config asks for it (`thresholding`), as
DDIMScheduler does, before it enters x_{t−1}; ε̂ stays the model's (diffusers' use_clipped_model_output False, the
pipeline's default); or, where the config says `clip_sample` instead, clamped to [−clip_sample_range,
clip_sample_range] as DDIMScheduler does (thresholding.clip_range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.diffusion.schedules import gather
from services.worker.diffusion.thresholding import Thresholding, limit_x0

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DDIMOutput:
    x_prev: torch.Tensor  # (R, C, h, w)
    x0_pred: torch.Tensor  # (R, C, h, w)


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float,
    eta: torch.Tensor | float = 0.0,
    variance_noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    thresholding: Thresholding | None = None,
    clip_range: float | None = None,
) -> DDIMOutput:
    """x_t (R, C, h, w), t and t_prev (R,) long (t_prev = −1: after the last step), eta (R,) or float,
    variance_noise (R, C, h, w) or None (needed where eta > 0), thresholding (None: off), clip_range (None: no
    clipping) -> x_{t−1} and x̂0."""
    ndim = x_t.ndim
    out_dtype = x_t.dtype
    # The update runs in float64 and rounds once at the end: near t = T (cosine ᾱ ~ 1e-9) x̂0 cancels
    # catastrophically, and latents are small next to the UNet call, so the cost is nil.
    dtype = torch.float64
    x_t, model_output = x_t.to(dtype), model_output.to(dtype)
    if variance_noise is not None:
        variance_noise = variance_noise.to(dtype)
    # 1. per-row ᾱ_t and ᾱ_{t−1}, gathered from the float64 table
    alpha_bar_t = gather(alphas_cumprod, timesteps, final_alpha_cumprod, ndim)  # (R, 1, 1, 1) float64
    alpha_bar_prev = gather(alphas_cumprod, prev_timesteps, final_alpha_cumprod, ndim)  # (R, 1, 1, 1) float64
    sqrt_alpha_bar_t = alpha_bar_t.sqrt().to(dtype)
    sqrt_one_minus_alpha_bar_t = (1 - alpha_bar_t).sqrt().to(dtype)

    # 2. predicted x_0 and ε (eq. 12's "predicted x_0"; v = √ᾱ·ε − √(1−ᾱ)·x0 for v_prediction)
    if prediction_type == "epsilon":
        x0_pred = (x_t - sqrt_one_minus_alpha_bar_t * model_output) / sqrt_alpha_bar_t
        eps_pred = model_output
    elif prediction_type == "v_prediction":
        x0_pred = sqrt_alpha_bar_t * x_t - sqrt_one_minus_alpha_bar_t * model_output
        eps_pred = sqrt_alpha_bar_t * model_output + sqrt_one_minus_alpha_bar_t * x_t
    else:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    x0_pred = limit_x0(x0_pred, thresholding, clip_range)  # per row; ε̂ is left as predicted

    # 3. σ_t(η) (eq. 16): η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1})
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    eta = torch.as_tensor(eta, dtype=torch.float64, device=x_t.device)
    if eta.ndim == 1:
        eta = eta.reshape(-1, *([1] * (ndim - 1)))
    std_dev_t = eta * variance.sqrt()

    # 4. "direction pointing to x_t" and x_{t−1} (eq. 12). 1 − ᾱ_{t−1} − σ² ≥ 0 in exact arithmetic; the clamp
    # keeps rounding near ᾱ ≈ 0 from making it a NaN.
    direction = (1 - alpha_bar_prev - std_dev_t**2).clamp(min=0).sqrt().to(dtype) * eps_pred
    x_prev = alpha_bar_prev.sqrt().to(dtype) * x0_pred + direction
    if variance_noise is not None:
        x_prev = x_prev + std_dev_t.to(dtype) * variance_noise
    return DDIMOutput(x_prev=x_prev.to(out_dtype), x0_pred=x0_pred.to(out_dtype))
