"""Noise schedules: the ᾱ_t table and the inference timesteps, from a diffusers scheduler config.

Notation (<variable name> -> <name in paper>)
- betas -> β_t, the variance added at training step t (Ho et al. 2020, eq. 2)
- alphas_cumprod -> ᾱ_t = ∏_{s≤t} (1 − β_s) (Ho et al. 2020, eq. 4)
- num_train_timesteps -> T

Indices follow diffusers: alphas_cumprod[t] is ᾱ for the t-th training timestep, t in [0, T−1].
Tables are computed once, in float64, as pure functions of the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """ᾱ_t for t in [0, T−1], float64 (T,)."""
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr is not supported; use a scheduler config without it")
    return torch.cumprod(1.0 - betas_from_config(config), dim=0)


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
        steps = torch.linspace(0, T - 1, num_inference_steps, dtype=torch.float64).round().flip(0)
    elif spacing == "leading":
        step_ratio = T // num_inference_steps
        steps = (torch.arange(num_inference_steps, dtype=torch.float64) * step_ratio).round().flip(0)
        steps = steps + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        step_ratio = T / num_inference_steps
        steps = torch.round(torch.arange(T, 0, -step_ratio, dtype=torch.float64)) - 1
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
