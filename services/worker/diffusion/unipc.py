"""One UniPC step (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), in its data-prediction form, vectorised over rows. As diffusers' UniPCMultistepScheduler
(predict_x0, solver_order 2, solver_type "bh2" or "bh1"), which this follows step for step.

Notation (<variable name> -> <name in paper>), on the variance-preserving scale x = α_t·x0 + σ_t·ε as in
dpm_solver.py:
- sigma_* -> the noise levels σ̂ = σ_t/α_t of the points involved; α_t = 1/√(σ̂² + 1), σ_t = σ̂·α_t
- λ -> λ_t = log(α_t/σ_t) = −log σ̂; h -> the step's λ_{t_i} − λ_{t_{i−1}} = log(σ̂_{i−1}/σ̂_i)
- m -> the data predictions x_θ at the request's points (m0 the newest the step builds on)
- B(h) -> e^{−h} − 1 for "bh2" (the default; B₂(h) in the paper), −h for "bh1" (B₁(h))

One step at t_{i−1} has two parts:

1. UniC, the corrector (from a request's second update on). The sample x̃_{t_{i−1}} the UNet has just seen
   came from the last predictor, run from x̃^c_{t_{i−2}} with data predictions up to m_{i−2}. The new
   m_{i−1} = x_θ(x̃_{t_{i−1}}) is one more point of the same integral: the last update is redone with it, one
   order higher, at no extra UNet call (the UNet is not run on the corrected sample; the next predictor
   starts from it):
       x̃^c_{t_{i−1}} = (σ_{t_{i−1}}/σ_{t_{i−2}})·x̃^c_{t_{i−2}} − α_{t_{i−1}}·(e^{−h} − 1)·m_{i−2}
                       − α_{t_{i−1}}·B(h)·(ρ^c_1·D_1 + ρ^c_p·(m_{i−1} − m_{i−2}))
   with h the last step's, p that predictor's order; for p = 1, ρ^c_p = 1/2 and no D_1; for p = 2,
   D_1 = (m_{i−3} − m_{i−2})/r_1, r_1 = (λ_{t_{i−3}} − λ_{t_{i−2}})/h, and ρ^c solving R·ρ = b with
   R = [[1, 1], [r_1, 1]], b_k = k!·(−h)·φ_{k+1}(−h)/B(h) (φ_1(x) = (e^x − 1)/x, φ_{k+1}(x) = (φ_k(x) − 1/k!)/x).
2. UniP, the predictor, from the corrected sample: order 1 at a request's first update and at the last
   (diffusers' lower_order_final), 2 elsewhere:
       x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·x̃^c_{t_{i−1}} − α_{t_i}·(e^{−h_i} − 1)·m_{i−1} − α_{t_i}·B(h_i)·ρ^p·D_1
   with ρ^p = 1/2 and D_1 = (m_{i−2} − m_{i−1})/r_1, r_1 = (λ_{t_{i−2}} − λ_{t_{i−1}})/h_i at order 2 (with
   B = e^{−h} − 1 this is DPM-Solver++(2M)). e^{−h_i} = σ̂_i/σ̂_{i−1} is exact at σ̂_i = 0 (h_i infinite).

Every row carries its own points, predictions and orders, so requests at different steps of different
schedules share one call. float64 throughout, rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from services.worker.diffusion.dpm_solver import data_prediction
from services.worker.diffusion.thresholding import Thresholding, dynamic_threshold


@dataclass
class UniPCOutput:
    x_next: torch.Tensor  # (R, C, h, w): the predictor's x̃_{t_i}
    x_corrected: torch.Tensor  # (R, C, h, w) float64: x̃^c_{t_{i−1}}, the next corrector's starting sample
    x0_pred: torch.Tensor  # (R, C, h, w) float64: m_{i−1}, the next step's m0


class History(NamedTuple):
    """What the corrector needs of the rows' last step, per row (rows without one hold zeros there)."""

    x_last: torch.Tensor  # (R, C, h, w) float64: x̃^c_{t_{i−2}}, the last predictor's starting sample
    m_prev: torch.Tensor  # (R, C, h, w) float64: m_{i−2}
    m_prev2: torch.Tensor | None  # (R, C, h, w) float64: m_{i−3}, or None where no row has one
    has: torch.Tensor  # (R,) bool: the row made an update before (else it is not corrected)
    last_order: torch.Tensor  # (R,) long: the last predictor's order


def _alpha_sigma(sigma_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = 1 / (sigma_hat**2 + 1).sqrt()
    return alpha, sigma_hat * alpha


def _b_of_h(h: torch.Tensor, bh1: bool) -> torch.Tensor:
    """B(h) of the data-prediction form: −h ("bh1") or e^{−h} − 1 ("bh2")."""
    return -h if bh1 else torch.expm1(-h)


def corrector(
    x_last: torch.Tensor,
    m_prev: torch.Tensor,
    m_prev2: torch.Tensor | None,
    m_now: torch.Tensor,
    sigma_now: torch.Tensor,
    sigma_last: torch.Tensor,
    sigma_last2: torch.Tensor,
    order: torch.Tensor,
    bh1: bool,
) -> torch.Tensor:
    """UniC (part 1 of the module docstring): x̃^c_{t_{i−1}} from x̃^c_{t_{i−2}} (x_last), m_{i−2} (m_prev), m_{i−3}
    (m_prev2; unused where order is 1), m_{i−1} (m_now), σ̂ at t_{i−1}, t_{i−2}, t_{i−3}, per row (R,) float64;
    order (R,): the last predictor's, 1 or 2. All float64."""
    shape = (-1, *([1] * (x_last.ndim - 1)))
    sigma_now, sigma_last, sigma_last2 = (s.reshape(shape) for s in (sigma_now, sigma_last, sigma_last2))
    alpha_t, sigma_t = _alpha_sigma(sigma_now)
    _, sigma_s = _alpha_sigma(sigma_last)
    h = torch.log(sigma_last / sigma_now)
    b_h = _b_of_h(h, bh1)
    base = (sigma_t / sigma_s) * x_last - alpha_t * torch.expm1(-h) * m_prev
    d_t = m_now - m_prev
    first = base - alpha_t * b_h * 0.5 * d_t  # p = 1: ρ^c = 1/2
    if m_prev2 is None:
        return first
    # p = 2: b_k = k!·x·φ_{k+1}(x)/B(h) at x = −h, by diffusers' recursion on x·φ_k(x); ρ from R·ρ = b
    hh = -h
    phi = torch.expm1(hh) / hh - 1  # x·φ_2(x) = φ_1(x) − 1
    b1 = phi / b_h
    phi = phi / hh - 0.5  # x·φ_3(x) = φ_2(x) − 1/2!
    b2 = phi * 2 / b_h
    r1 = torch.log(sigma_last / sigma_last2) / h  # (λ_{t_{i−3}} − λ_{t_{i−2}})/h
    rho_1 = (b1 - b2) / (1 - r1)
    rho_2 = b1 - rho_1
    d_1 = (m_prev2 - m_prev) / r1
    second = base - alpha_t * b_h * (rho_1 * d_1 + rho_2 * d_t)
    return torch.where(order.reshape(shape) == 2, second, first)


def predictor(
    x: torch.Tensor,
    m_now: torch.Tensor,
    m_prev: torch.Tensor | None,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_prev: torch.Tensor,
    order: torch.Tensor,
    bh1: bool,
) -> torch.Tensor:
    """UniP (part 2): x̃_{t_i} from x̃^c_{t_{i−1}} (x), m_{i−1} (m_now), m_{i−2} (m_prev; unused where order is 1),
    σ̂ at t_{i−1}, t_i, t_{i−2} per row (R,); order (R,) 1 or 2. All float64."""
    shape = (-1, *([1] * (x.ndim - 1)))
    sigma, sigma_next, sigma_prev = (s.reshape(shape) for s in (sigma, sigma_next, sigma_prev))
    alpha_t, sigma_t = _alpha_sigma(sigma_next)
    _, sigma_s = _alpha_sigma(sigma)
    e_h = sigma_next / sigma  # e^{−h_i}
    first = (sigma_t / sigma_s) * x - alpha_t * (e_h - 1) * m_now
    if m_prev is None:
        return first
    h = torch.log(sigma / sigma_next)
    r1 = torch.log(sigma / sigma_prev) / h  # (λ_{t_{i−2}} − λ_{t_{i−1}})/h_i
    d_1 = (m_prev - m_now) / r1
    second = first - alpha_t * _b_of_h(h, bh1) * 0.5 * d_1
    return torch.where(order.reshape(shape) == 2, second, first)


def unipc_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_prev: torch.Tensor,
    sigma_prev2: torch.Tensor,
    history: History | None,
    order: torch.Tensor,
    prediction_type: str = "epsilon",
    thresholding: Thresholding | None = None,
    bh1: bool = False,
) -> UniPCOutput:
    """model_output and x (R, C, h, w): the UNet's output at x̃_{t_{i−1}} and that sample; σ̂ at t_{i−1}, t_i,
    t_{i−2}, t_{i−3} (R,) float64 (the last two unused where there is no history); history None where every row
    is at its first update; order (R,): this predictor's -> x̃_{t_i}, x̃^c_{t_{i−1}}, m_{i−1}."""
    shape = (-1, *([1] * (x.ndim - 1)))
    out_dtype = x.dtype
    x, model_output = x.double(), model_output.double()
    sigma, sigma_next, sigma_prev, sigma_prev2 = (s.double() for s in (sigma, sigma_next, sigma_prev, sigma_prev2))
    alpha, sigma_t = _alpha_sigma(sigma.reshape(shape))
    m_now = data_prediction(model_output, x, alpha, sigma_t, prediction_type)  # at the sample the UNet saw
    if thresholding is not None:
        m_now = dynamic_threshold(m_now, thresholding)
    m_prev = None
    if history is not None:
        m_prev = history.m_prev
        corrected = corrector(
            history.x_last, m_prev, history.m_prev2, m_now, sigma, sigma_prev, sigma_prev2, history.last_order, bh1
        )
        x = torch.where(history.has.reshape(shape), corrected, x)
    x_next = predictor(x, m_now, m_prev, sigma, sigma_next, sigma_prev, order, bh1)
    return UniPCOutput(x_next=x_next.to(out_dtype), x_corrected=x, x0_pred=m_now)
