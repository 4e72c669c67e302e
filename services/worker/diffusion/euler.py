"""One Euler step of the probability-flow ODE in σ (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", eq. 4 and Algorithm 1 without churn), vectorised over rows.

As diffusers' EulerDiscreteScheduler (s_churn 0, so no noise), which this follows step for step.
The sample lives on the variance-exploding scale x = x0 + σ·ε (= the DDPM x_t times √(σ² + 1)): the
request starts from ε·σ_max, and the UNet, trained on DDPM's x_t, sees x/√(σ² + 1).

Notation (<variable name> -> <name in paper>)
- x -> x_i, the current sample; x_next -> x_{i+1}
- sigma, sigma_next -> σ_i = σ(t_i), σ_{i+1} (σ = √((1 − ᾱ)/ᾱ), schedules.py; σ_N = 0)
- x0_pred -> D_θ(x_i; σ_i), the denoiser: from ε, x − σ·ε; from v, x/(σ² + 1) − σ/√(σ² + 1)·v
- derivative -> d_i = (x_i − D_θ(x_i; σ_i))/σ_i = dx/dσ (eq. 4 with σ(t) = t)

No clipping of x0_pred: latents are not bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class EulerOutput:
    x_next: torch.Tensor  # (R, C, h, w)
    x0_pred: torch.Tensor  # (R, C, h, w)


def denoised(model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """D_θ(x; σ) on the variance-exploding scale, from ε (x − σ·ε) or v (x/(σ² + 1) − σ/√(σ² + 1)·v)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return x / (sigma**2 + 1) - sigma / (sigma**2 + 1).sqrt() * model_output
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def euler_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction_type: str = "epsilon",
) -> EulerOutput:
    """model_output and x (R, C, h, w); σ_i, σ_{i+1} (R,) float64 -> x_{i+1} and D_θ(x_i; σ_i)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    # float64, rounded once: with the cosine schedule σ_0 ≈ 2·10⁴, and x_{i+1} = x_i + d_i·(σ_{i+1} − σ_i) cancels
    x, model_output = x.double(), model_output.double()
    sigma, sigma_next = sigma.double().reshape(shape), sigma_next.double().reshape(shape)
    # 1. the denoiser's estimate D_θ(x_i; σ_i)
    x0_pred = denoised(model_output, x, sigma, prediction_type)
    # 2. the ODE's slope dx/dσ = (x − D)/σ (eq. 4 with s(t) = 1, σ(t) = t)
    derivative = (x - x0_pred) / sigma
    # 3. one Euler step from σ_i to σ_{i+1} (Algorithm 1, line 5 with γ_i = 0)
    x_next = x + derivative * (sigma_next - sigma)
    return EulerOutput(x_next=x_next.to(out_dtype), x0_pred=x0_pred.to(out_dtype))
