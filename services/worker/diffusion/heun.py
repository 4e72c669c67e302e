"""One call of Heun's second-order method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 1 without
churn), vectorised over rows. As diffusers' HeunDiscreteScheduler, which this follows call for call.

A step from σ_i to σ_{i+1} takes two model calls (the last step one, an Euler step to σ = 0):
    first call, at (x_i, σ_i):          d_i = (x_i − D_θ(x_i; σ_i))/σ_i,   x' = x_i + (σ_{i+1} − σ_i)·d_i
    second call, at (x', σ_{i+1}):      d' = (x' − D_θ(x'; σ_{i+1}))/σ_{i+1},
                                        x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d')/2
so a request of n steps makes 2n − 1 calls, and its plan lists them: the timesteps and σ of every step after the
first twice, as the scheduler's do. Rows at their first and at their second call share one update.

Notation (<variable name> -> <name in paper>)
- x -> the sample the call sees (x_i or x'); x_start -> x_i, kept from the first call for the second
- sigma -> the σ of the sample the call sees (σ_i or σ_{i+1}); dt -> σ_{i+1} − σ_i
- slope_prev -> d_i at the second call
- x0_pred -> D_θ at the call's sample, clamped to [−clip_sample_range, clip_sample_range] where the config says
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.diffusion.euler import denoised
from services.worker.diffusion.thresholding import limit_x0


@dataclass
class HeunOutput:
    x_next: torch.Tensor  # (R, C, h, w)
    x0_pred: torch.Tensor  # (R, C, h, w)
    slope: torch.Tensor  # (R, C, h, w) float64: d at this call's sample (d_i at a first call, kept for the second)


def heun_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    dt: torch.Tensor,
    second: torch.Tensor,
    x_start: torch.Tensor,
    slope_prev: torch.Tensor,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
) -> HeunOutput:
    """model_output and x (R, C, h, w); σ and dt (R,) float64; second (R,) bool, the rows at a step's second call;
    x_start and slope_prev (R, C, h, w), read on those rows only -> the call's next sample, D_θ and d."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    x, model_output = x.double(), model_output.double()  # float64 and rounded once, as euler.py
    sigma, dt, second = sigma.double().reshape(shape), dt.double().reshape(shape), second.reshape(shape)
    # 1. the denoiser's estimate and the ODE's slope at the call's sample
    x0_pred = limit_x0(denoised(model_output, x, sigma, prediction_type), None, clip_range)
    slope = (x - x0_pred) / sigma
    # 2. first call: an Euler step from x_i; second: the step again from x_i, with the two slopes' mean
    base = torch.where(second, x_start.double(), x)
    step_slope = torch.where(second, (slope_prev.double() + slope) / 2, slope)
    x_next = base + step_slope * dt
    return HeunOutput(x_next=x_next.to(out_dtype), x0_pred=x0_pred.to(out_dtype), slope=slope)
