"""One call of a two-call, second-order step on the probability-flow ODE in σ, vectorised over rows: Heun's method
(Karras et al. 2022, Algorithm 1 without churn), DPM-Solver-2 (Lu et al. 2022, in σ as Karras et al.'s
Algorithm 2 and k-diffusion's `sample_dpm_2`) and its ancestral form (k-diffusion's `sample_dpm_2_ancestral`). As
diffusers' HeunDiscreteScheduler, KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler, which these follow
call for call.

A step from σ_i to σ_{i+1} takes two model calls (the last step one, an Euler step to σ = 0):
    first call, at (x_i, σ_i):   d_i = (x_i − D_θ(x_i; σ_i))/σ_i,  x' = x_i + (σ' − σ_i)·d_i
    second call, at (x', σ'):    d' = (x' − D_θ(x'; σ'))/σ'
    Heun (σ' = σ_{i+1}, the trapezoid):          x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d')/2
    DPM-Solver-2 (σ' = √(σ_i·σ_{i+1}), the midpoint in log σ):   x_{i+1} = x_i + (σ_{i+1} − σ_i)·d'
    DPM-Solver-2 ancestral: the ODE only down to σ↓ (σ' = √(σ_i·σ↓), the midpoint toward it), then fresh noise z
    back up to σ_{i+1} (Ho et al. 2020's ancestral step, as Euler ancestral):
        σ↑ = √(σ_{i+1}²·(σ_i² − σ_{i+1}²)/σ_i²),  σ↓ = √(σ_{i+1}² − σ↑²)
        x_{i+1} = x_i + (σ↓ − σ_i)·d' + σ↑·z
so a request of n steps makes 2n − 1 calls, and its plan lists them with the σ of the sample each call sees (σ_i,
then σ'). Rows at their first and at their second call share one update.

Notation (<variable name> -> <name in paper>)
- x -> the sample the call sees (x_i or x'); x_start -> x_i, kept from the first call for the second
- sigma -> the σ of that sample (σ_i or σ'); dt -> σ' − σ_i at a first call, σ_{i+1} − σ_i at a second
- slope_prev -> d_i at the second call (Heun's mean takes it)
- sigma_up, noise -> σ↑ and z of the ancestral form (σ↑ = 0 at a first call, and for the ODE forms)
- x0_pred -> D_θ at the call's sample, clamped to [−clip_sample_range, clip_sample_range] where Heun's config says
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.diffusion.euler import denoised
from services.worker.diffusion.thresholding import limit_x0


@dataclass
class SecondOrderOutput:
    x_next: torch.Tensor  # (R, C, h, w)
    x0_pred: torch.Tensor  # (R, C, h, w)
    slope: torch.Tensor  # (R, C, h, w) float64: d at this call's sample (d_i at a first call, kept for the second)


def second_order_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    dt: torch.Tensor,
    second: torch.Tensor,
    x_start: torch.Tensor,
    slope_prev: torch.Tensor,
    mean_slopes: bool,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    sigma_up: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> SecondOrderOutput:
    """model_output and x (R, C, h, w); σ and dt (R,) float64; second (R,) bool, the rows at a step's second call;
    x_start and slope_prev (R, C, h, w), read on those rows only; mean_slopes: Heun (True) or DPM-Solver-2 (False);
    sigma_up (R,) float64 and noise (R, C, h, w): the ancestral form's σ↑ and z (dt then ends the ODE part at σ↓)
    -> the call's next sample, D_θ and d."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    x, model_output = x.double(), model_output.double()  # float64 and rounded once, as euler.py
    sigma, dt, second = sigma.double().reshape(shape), dt.double().reshape(shape), second.reshape(shape)
    # 1. the denoiser's estimate and the ODE's slope at the call's sample
    x0_pred = limit_x0(denoised(model_output, x, sigma, prediction_type), None, clip_range)
    slope = (x - x0_pred) / sigma
    # 2. first call: an Euler step from x_i; second: the whole step again from x_i, with the slopes' mean (Heun) or
    # the second slope (DPM-Solver-2)
    base = torch.where(second, x_start.double(), x)
    step_slope = torch.where(second, (slope_prev.double() + slope) / 2, slope) if mean_slopes else slope
    x_next = base + step_slope * dt
    if sigma_up is not None:  # 3. ancestral: fresh noise back up from σ↓ to σ_{i+1}
        x_next = x_next + sigma_up.double().reshape(shape) * noise.double()
    return SecondOrderOutput(x_next=x_next.to(out_dtype), x0_pred=x0_pred.to(out_dtype), slope=slope)
