"""One linear multistep (LMS) step of the probability-flow ODE in σ (Karras et al. 2022, eq. 4; the multistep
method of k-diffusion's `sample_lms`, "K-LMS"), vectorised over rows. As diffusers' LMSDiscreteScheduler (order 4),
which this follows step for step.

The ODE dx/dσ = d(x, σ) = (x − D_θ(x; σ))/σ is integrated from σ_i to σ_{i+1} with d interpolated by the
polynomial through the slopes of the last m steps (Adams–Bashforth on the non-uniform σ grid):
    x_{i+1} = x_i + Σ_{j<m} c_j·d_{i−j},   c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ,
    ℓ_j(τ) = Π_{k<m, k≠j} (τ − σ_{i−k}) / (σ_{i−j} − σ_{i−k})   (the Lagrange basis through σ_i, ..., σ_{i−m+1})
with m = min(the request's updates so far + 1, 4): Euler at its first update. diffusers integrates ℓ_j with
scipy's quad; a polynomial of degree m − 1 ≤ 3 integrates exactly, so latentd does it in closed form (ℓ_j's power
coefficients and their antiderivative, float64).

Notation (<variable name> -> <name in paper>)
- x -> x_i on the variance-exploding scale (euler.py); x_next -> x_{i+1}
- derivatives -> d_i, d_{i−1}, ... (newest first), d = (x − D_θ)/σ
- coefficients -> c_0, c_1, ... per row
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.worker.diffusion.euler import denoised

MAX_ORDER = 4  # LMSDiscreteScheduler.step's default order, the pipelines'


@dataclass
class LMSOutput:
    x_next: torch.Tensor  # (R, C, h, w)
    x0_pred: torch.Tensor  # (R, C, h, w)
    derivative: torch.Tensor  # (R, C, h, w) float64: d_i, for the request's history


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> tuple[float, ...]:
    """c_0..c_{m−1} of the step from sigmas[i] to sigmas[i + 1] over the slopes at sigmas[i], ..., sigmas[i − m + 1]."""
    return _coefficients(tuple(sigmas[i - k] for k in range(order)), sigmas[i], sigmas[i + 1])


@functools.lru_cache(maxsize=4096)
def _coefficients(nodes: tuple[float, ...], lower: float, upper: float) -> tuple[float, ...]:
    """∫ ℓ_j from `lower` to `upper` for the Lagrange basis ℓ_j through `nodes`, exactly (pure Python: it runs per
    request per step, and requests of one plan share its values)."""
    coefficients = []
    for j, node in enumerate(nodes):
        others = [s for k, s in enumerate(nodes) if k != j]
        # ℓ_j's power coefficients, lowest first: Π (τ − s_k) expanded, over Π (σ_j − s_k)
        poly = [1.0]
        for root in others:
            poly = [a - root * b for a, b in zip([0.0, *poly], [*poly, 0.0])]
        denominator = math.prod(node - root for root in others)
        integral = sum(a * (upper ** (p + 1) - lower ** (p + 1)) / (p + 1) for p, a in enumerate(poly))
        coefficients.append(integral / denominator)
    return tuple(coefficients)


def lms_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    history: torch.Tensor | None,
    coefficients: torch.Tensor,
    prediction_type: str = "epsilon",
) -> LMSOutput:
    """model_output and x (R, C, h, w); σ_i (R,) float64; history (R, K, C, h, w) float64, the rows' earlier slopes
    newest first (zeros where a row has fewer; None: none has any); coefficients (R, 1 + K) float64, zero where a
    row's order is lower -> x_{i+1}, D_θ(x_i; σ_i) and d_i."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    x, model_output = x.double(), model_output.double()  # float64 and rounded once, as euler.py
    sigma = sigma.double().reshape(shape)
    # 1. the denoiser's estimate and the ODE's slope at (x_i, σ_i)
    x0_pred = denoised(model_output, x, sigma, prediction_type)
    derivative = (x - x0_pred) / sigma
    # 2. x_{i+1} = x_i + Σ_j c_j·d_{i−j}
    slopes = derivative[:, None] if history is None else torch.cat([derivative[:, None], history], 1)
    weights = coefficients.double()[:, : slopes.shape[1]]
    x_next = x + torch.einsum("rk,rk...->r...", weights, slopes)
    return LMSOutput(x_next=x_next.to(out_dtype), x0_pred=x0_pred.to(out_dtype), derivative=derivative)
