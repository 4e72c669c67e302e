"""Noise schedules: the ᾱ_t table, the σ table, and each sampler's inference timesteps, from a diffusers
scheduler config.

Notation (<variable name> -> <name in paper>)
- betas -> β_t, the variance added at training step t (Ho et al. 2020, eq. 2)
- alphas_cumprod -> ᾱ_t = ∏_{s≤t} (1 − β_s) (Ho et al. 2020, eq. 4)
- num_train_timesteps -> T
- sigmas -> σ_t = √((1 − ᾱ_t)/ᾱ_t), the noise level of the same x_t written as x0 + σ·ε, i.e. the
  variance-exploding scale of Karras et al. 2022 (x_VE = x_VP·√(σ² + 1)); λ_t = −log σ_t is the
  half log-SNR of DPM-Solver (Lu et al. 2022, sec. 3)
- karras_sigmas -> σ_i of Karras et al. 2022, eq. 5, with ρ = 7

Indices follow diffusers: alphas_cumprod[t] is ᾱ for the t-th training timestep, t in [0, T−1].
Tables are computed once, in float64, as pure functions of the config. Each sampler picks its
timesteps as its diffusers scheduler's set_timesteps does (DDIM, Euler and DPM-Solver differ in how
they space them), checked against diffusers in tests/worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17: keeps β_t from being tiny near t = 0
MAX_BETA = 0.999  # ibid.: caps β_t near t = T, where ᾱ_t → 0 would make β_t → 1


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """β_1..β_T as float64 (T,)."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    schedule = config.get("beta_schedule", "linear")
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        # Stable Diffusion: linear in √β
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(T)
    raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {schedule!r}")


def cosine_betas(T: int, s: float = COSINE_S, max_beta: float = MAX_BETA) -> torch.Tensor:
    """Improved DDPM: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T)+s)/(1+s)·π/2); β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta)."""

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    t = torch.arange(T, dtype=torch.float64)
    return torch.clamp(1 - f(t + 1) / f(t), max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1: √ᾱ_t shifted
    so that √ᾱ_{T−1} = 0 (zero terminal SNR: the last training timestep is pure noise, as sampling starts from) and
    scaled so that √ᾱ_0 is kept; the β that make it. What `rescale_betas_zero_snr` does in diffusers."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    alphas_cumprod = ((root - last) * first / (first - last)) ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """ᾱ_t for t in [0, T−1], float64 (T,); with `rescale_betas_zero_snr`, ᾱ_{T−1} = 0. Raises ValueError for a
    config whose model could not be sampled (zero terminal SNR with ε-prediction)."""
    betas = betas_from_config(config)
    if config.get("rescale_betas_zero_snr"):
        if config.get("prediction_type", "epsilon") == "epsilon":
            raise ValueError(
                "rescale_betas_zero_snr needs prediction_type v_prediction: at zero terminal SNR (ᾱ = 0) an "
                "ε-prediction says nothing of x0, so sampling from pure noise would divide by √ᾱ = 0"
            )
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


# What the σ̂-based schedulers (Euler, Euler ancestral, DPM-Solver++, UniPC) put at ᾱ_{T−1} under zero terminal SNR:
# "close to 0 without being 0 so first sigma is not inf", σ̂ = √((1 − 2⁻²⁴)/2⁻²⁴) ≈ 4096 (diffusers)
ZERO_SNR_ALPHA_BAR = 2.0**-24


def final_alpha_cumprod(config: Mapping[str, Any], alphas_cumprod: torch.Tensor) -> float:
    """ᾱ used after the last step: 1 (a clean picture) with set_alpha_to_one, else ᾱ_0, as diffusers."""
    return 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])


def max_inference_steps(config: Mapping[str, Any]) -> int:
    """The most DDIM steps the scheduler config allows: T, less where leading spacing's offset would pass T."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("timestep_spacing", "leading") != "leading":
        return T
    offset = int(config.get("steps_offset", 0))
    return max(n for n in range(1, T + 1) if (n - 1) * (T // n) + offset < T)


def inference_timesteps(config: Mapping[str, Any], num_inference_steps: int) -> list[int]:
    """The timesteps to denoise from, high to low, as diffusers' DDIMScheduler.set_timesteps picks them."""
    T = int(config.get("num_train_timesteps", 1000))
    if not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be between 1 and {T}, got {num_inference_steps}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        # numpy's linspace, as diffusers: torch's rounds differently in the last bit, and round() breaks .5 ties
        # by it (61 steps: t = 166.5 is one or the other)
        steps = np.linspace(0, T - 1, num_inference_steps).round()[::-1]
    elif spacing == "leading":
        step_ratio = T // num_inference_steps
        steps = (np.arange(num_inference_steps, dtype=np.float64) * step_ratio).round()[::-1]
        steps = steps + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        steps = trailing_timesteps(T, T, num_inference_steps)
    else:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    timesteps = [int(t) for t in steps.tolist()]
    if timesteps[0] >= T:
        # leading spacing with steps_offset > 0 runs past T at high step counts; diffusers would index out of range
        limit = max_inference_steps(config)
        raise ValueError(
            f"num_inference_steps must be between 1 and {limit} for this model's scheduler "
            f"({spacing} spacing, steps_offset {config.get('steps_offset', 0)}), got {num_inference_steps}"
        )
    return timesteps


def previous_timesteps(config: Mapping[str, Any], timesteps: list[int]) -> list[int]:
    """t_prev for each t of `timesteps`; −1 means "after the last step" (ᾱ_prev = final_alpha_cumprod).

    `leading` is uniform, so t − T//steps (diffusers' rule) is the true previous timestep; it can
    reach t = 0 when steps_offset > 0, as in diffusers. For `trailing` and `linspace` we step to the
    true previous timestep of the sequence. diffusers takes t − T//steps there too, which for
    `linspace` (and `trailing` when T is not a multiple of the step count) is not a timestep of the
    sequence; a known diffusers issue. Our update is tested against the closed form in that case.
    """
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "leading":
        step_ratio = T // len(timesteps)
        return [t - step_ratio if t - step_ratio >= 0 else -1 for t in timesteps]
    return [*timesteps[1:], -1]


def gather(table: torch.Tensor, timesteps: torch.Tensor, final: float, ndim: int) -> torch.Tensor:
    """Per-row table[t] (table in float64) with t = −1 -> `final`, shaped (R, 1, ..., 1) for broadcasting."""
    values = torch.where(timesteps >= 0, table.to(timesteps.device)[timesteps.clamp(min=0)], final)
    return values.reshape(-1, *([1] * (ndim - 1)))


def trailing_timesteps(T: int, last: int, num_inference_steps: int) -> np.ndarray:
    """`trailing` spacing: round(last − k·T/steps) − 1 for k = 0..steps−1, float64 (steps,).

    diffusers writes np.arange(last, 0, −T/steps).round() − 1, which for 62 step counts up to 1000
    (61, 103, 121, ...) yields one element more, ≈ 0, i.e. a step at t = −1 that indexes ᾱ from the
    end of the table; the first `steps` elements are these."""
    return np.round(last - np.arange(num_inference_steps, dtype=np.float64) * (T / num_inference_steps)) - 1


def sigma_table(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t in [0, T−1], float64 (T,); infinite where ᾱ_t = 0 (zero terminal SNR)."""
    ac = alphas_cumprod.double().cpu().numpy()
    with np.errstate(divide="ignore"):
        return np.sqrt((1 - ac) / ac)


def interpolate_sigmas(table: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """σ at (possibly fractional) timesteps, linear between table entries, as np.interp (clamped at the ends)."""
    return np.interp(timesteps, np.arange(len(table), dtype=np.float64), table)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..N−1."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The fractional timestep of each σ: linear in log σ between the two table entries around it (diffusers'
    _sigma_to_t, clamped to [0, T−1])."""
    log_table = np.log(table)  # (T,) increasing in t
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # (N,)
    low = np.cumsum(log_sigma[None, :] - log_table[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def euler_timesteps(config: Mapping[str, Any], num_inference_steps: int, dtype=np.float32) -> np.ndarray:
    """The timesteps of EulerDiscreteScheduler / EulerAncestralDiscreteScheduler.set_timesteps, high to low,
    float64 holding float32 values (the UNet is called with them; `linspace` gives fractional ones); `dtype`
    float64 for the schedulers that keep them so (DPMSolverSDEScheduler)."""
    T = int(config.get("num_train_timesteps", 1000))
    n = num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be between 1 and {T}, got {n}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, n, dtype=dtype)[::-1]
    elif spacing == "leading":
        steps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        steps = trailing_timesteps(T, T, n).astype(np.float32)
    else:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    if steps[0] > T - 1:
        raise ValueError(_too_many_steps(config, max_inference_steps(config), n))
    return steps.astype(np.float64)


def dpm_solver_timesteps(config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """The timesteps of DPMSolverMultistepScheduler.set_timesteps (no λ clipping), high to low, int64. Its
    `linspace` and `leading` spacings divide [0, T) into steps + 1 parts and drop t = 0, unlike DDIM's."""
    T = int(config.get("num_train_timesteps", 1000))
    n = num_inference_steps
    limit = max_dpm_solver_steps(config)
    if not 1 <= n <= limit:
        raise ValueError(
            _too_many_steps(config, limit, n)
            if n > 0
            else f"num_inference_steps must be between 1 and {limit}, got {n}"
        )
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        steps = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        steps = trailing_timesteps(T, T, n)
    else:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    return steps.astype(np.int64)


def lcm_original_steps(config: Mapping[str, Any]) -> int:
    """LCMScheduler's `original_inference_steps`: the distillation schedule's length (50 unless the config says)."""
    return int(config.get("original_inference_steps", 50) or 50)


def lcm_timesteps(config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """The timesteps of LCMScheduler.set_timesteps(n): the distillation schedule k·j − 1 (j = 1..N, k = T // N,
    N = original_inference_steps), high to low, at n evenly spaced indices (floored), int64."""
    T = int(config.get("num_train_timesteps", 1000))
    N = lcm_original_steps(config)
    n = num_inference_steps
    if not 1 <= n <= min(N, T):
        raise ValueError(
            f"num_inference_steps must be between 1 and {min(N, T)} for this model's scheduler "
            f"(LCM: at most its original_inference_steps, {N}), got {n}"
        )
    origin = (np.arange(1, N + 1) * (T // N) - 1)[::-1]
    return origin[np.floor(np.linspace(0, N, num=n, endpoint=False)).astype(np.int64)].astype(np.int64)


def max_dpm_solver_steps(config: Mapping[str, Any]) -> int:
    """The most DPM-Solver steps whose timesteps are distinct (h ≠ 0) and inside the table."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "trailing":
        return T
    if spacing == "linspace":
        return T - 1  # steps + 1 rounded points on [0, T − 1] are distinct up to steps + 1 = T
    offset = int(config.get("steps_offset", 0))
    return max(n for n in range(1, T) if T // (n + 1) >= 1 and n * (T // (n + 1)) + offset < T)


def _too_many_steps(config: Mapping[str, Any], limit: int, n: int) -> str:
    return (
        f"num_inference_steps must be between 1 and {limit} for this model's scheduler "
        f"({config.get('timestep_spacing', 'leading')} spacing, steps_offset {config.get('steps_offset', 0)}), got {n}"
    )
