"""One Euler-ancestral step (k-diffusion's sample_euler_ancestral, Crowson 2022; the ancestral step of
Song et al. 2021's reverse SDE written on Karras et al. 2022's σ scale), vectorised over rows.

Each step goes deterministically down to σ_down with the Euler slope, then adds fresh noise of std
σ_up, so that the result has noise level σ_next: σ_down² + σ_up² = σ_next². As diffusers'
EulerAncestralDiscreteScheduler (eta 1), which this follows step for step; the noise z comes from
the request's own generator, one draw per step (the last step too: σ_up = 0 there), as diffusers draws it.

Notation (<variable name> -> <name in paper / k-diffusion>)
- x -> x_i on the variance-exploding scale x = x0 + σ·ε; x_next -> x_{i+1}
- sigma, sigma_next -> σ_i, σ_{i+1} (σ_N = 0)
- x0_pred -> D_θ(x_i; σ_i) (euler.denoised); derivative -> d_i = (x_i − D_θ)/σ_i
- sigma_up -> σ_up = √(σ_{i+1}²·(σ_i² − σ_{i+1}²)/σ_i²); sigma_down -> σ_down = √(σ_{i+1}² − σ_up²)
- noise -> z ~ N(0, I)
"""

from __future__ import annotations

import torch

from services.worker.diffusion.euler import EulerOutput, denoised


def euler_ancestral_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise: torch.Tensor,
    prediction_type: str = "epsilon",
) -> EulerOutput:
    """model_output, x and z (R, C, h, w); σ_i, σ_{i+1} (R,) float64 -> x_{i+1} and D_θ(x_i; σ_i)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    x, model_output, noise = x.double(), model_output.double(), noise.double()
    sigma, sigma_next = sigma.double().reshape(shape), sigma_next.double().reshape(shape)
    # 1. the denoiser's estimate and the ODE slope, as in the Euler step
    x0_pred = denoised(model_output, x, sigma, prediction_type)
    derivative = (x - x0_pred) / sigma
    # 2. split σ_{i+1} into the part reached deterministically and the part re-injected as noise
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()  # ≥ 0 exactly; the clamp keeps rounding from a NaN
    # 3. Euler down to σ_down, then fresh noise up to σ_{i+1}
    x_next = x + derivative * (sigma_down - sigma) + noise * sigma_up
    return EulerOutput(x_next=x_next.to(out_dtype), x0_pred=x0_pred.to(out_dtype))
