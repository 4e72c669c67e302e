"""One step of multistep consistency sampling for a latent consistency model (Luo et al. 2023, "Latent
Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference", Algorithm 1; Song et al. 2023,
"Consistency Models", Algorithm 1), vectorised over rows. As diffusers' LCMScheduler, which this follows step
for step.

The consistency function maps a noisy sample straight to the data, with the boundary condition f(x, 0) = x
built in (Song et al. 2023, eq. 5, σ_data = 0.5, the timestep scaled by `timestep_scaling`):
    f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0(x_t, t),
    c_skip(t) = σ_data² / ((s·t)² + σ_data²),  c_out(t) = s·t / √((s·t)² + σ_data²)
A step evaluates f at the request's current timestep and, unless it is the last, noises the result forward to
the next timestep of the schedule with fresh noise z (the DDPM forward process q(x_{t'} | x0)):
    x_{t'} = √ᾱ_{t'}·f(x_t, t) + √(1 − ᾱ_{t'})·z
The last step returns f itself.

Notation (<variable name> -> <name in paper>)
- x -> x_t, the current sample; model_output -> ε_θ or v (epsilon or v_prediction)
- alpha_bar, alpha_bar_next -> ᾱ_t, ᾱ_{t'} (t' the schedule's next timestep)
- c_skip, c_out -> the boundary-condition scalings at t
- denoised -> f(x_t, t)
- last -> the row's step is the schedule's last (no noise, x_{t'} = f)

x̂0 is dynamically thresholded, or clipped, where the scheduler config asks for it (thresholding.py), before f.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.diffusion.dpm_solver import data_prediction
from services.worker.diffusion.thresholding import Thresholding, limit_x0

SIGMA_DATA = 0.5


@dataclass
class LCMOutput:
    x_next: torch.Tensor  # (R, C, h, w)
    denoised: torch.Tensor  # (R, C, h, w): f(x_t, t), the step's estimate of the data


def boundary_scalings(timestep: float, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip(t), c_out(t)) of the consistency function at timestep t (module docstring)."""
    scaled = timestep * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def lcm_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    alpha_bar: torch.Tensor,
    alpha_bar_next: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    last: torch.Tensor,
    noise: torch.Tensor | None,
    prediction_type: str = "epsilon",
    thresholding: Thresholding | None = None,
    clip_range: float | None = None,
) -> LCMOutput:
    """model_output and x (R, C, h, w); ᾱ_t, ᾱ_{t'}, c_skip, c_out (R,) float64; last (R,) bool; noise (R, C, h, w)
    (unused on rows at their last step; None where every row is) -> x_{t'} and f(x_t, t)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    x, model_output = x.double(), model_output.double()
    alpha_bar, alpha_bar_next, c_skip, c_out = (
        v.double().reshape(shape) for v in (alpha_bar, alpha_bar_next, c_skip, c_out)
    )

    # 1. x̂0 from the model output (ε or v) at t, thresholded or clipped where the config says
    x0_pred = data_prediction(model_output, x, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), prediction_type)
    x0_pred = limit_x0(x0_pred, thresholding, clip_range)

    # 2. the consistency function with its boundary condition
    denoised = c_out * x0_pred + c_skip * x

    # 3. forward to the next timestep with fresh noise, except at the last step
    x_next = denoised
    if noise is not None:
        renoised = alpha_bar_next.sqrt() * denoised + (1 - alpha_bar_next).sqrt() * noise.double()
        x_next = torch.where(last.reshape(shape), denoised, renoised)
    return LCMOutput(x_next=x_next.to(out_dtype), denoised=denoised.to(out_dtype))
