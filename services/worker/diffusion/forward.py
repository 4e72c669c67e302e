"""The forward process q(x_t | x0) (Ho et al. 2020, eq. 4): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.

Notation (<variable name> -> <name in paper>)
- x0 -> x_0, the clean sample (pixels in [-1, 1] or scaled latents)
- alpha_bar_t -> ᾱ_t
- noise -> ε ~ N(0, I)

`forward_trajectory` uses the paper's t in [0, T]: t = 0 is x0 itself (ᾱ_0 = 1) and t ≥ 1 is
diffusers' training timestep t − 1 (alphas_cumprod[t − 1]). One ε, fixed by the seed, serves all t,
so the frames show the same noise growing.
"""

from __future__ import annotations

import torch


def q_sample(x0: torch.Tensor, alpha_bar_t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; alpha_bar_t broadcasts against x0 (a float or (R, 1, ..., 1))."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64, device=x0.device)
    x_t = alpha_bar_t.sqrt() * x0.double() + (1 - alpha_bar_t).sqrt() * noise.double()
    return x_t.to(x0.dtype)


def alpha_bars_paper(alphas_cumprod: torch.Tensor, timesteps: list[int] | torch.Tensor) -> torch.Tensor:
    """ᾱ_t for the paper's t in [0, T] (ᾱ_0 = 1), float64 (len(t),)."""
    t = torch.as_tensor(timesteps, dtype=torch.long)
    T = alphas_cumprod.shape[0]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > T):
        raise ValueError(f"timesteps must be between 0 and {T}, got {t.tolist()}")
    with_clean = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.double()])
    return with_clean[t]


def forward_trajectory(
    x0: torch.Tensor, timesteps: list[int] | torch.Tensor, alphas_cumprod: torch.Tensor, noise_seed: int
) -> torch.Tensor:
    """x_t for every t (paper's t in [0, T]) from one ε: x0 (C, H, W) or (1, C, H, W) -> (len(t), C, H, W)."""
    x0 = x0.reshape(1, *x0.shape[-3:])  # (1, C, H, W)
    generator = torch.Generator("cpu").manual_seed(noise_seed)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)  # (1, C, H, W)
    alpha_bar_t = alpha_bars_paper(alphas_cumprod, timesteps).reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return q_sample(x0.expand(alpha_bar_t.shape[0], -1, -1, -1), alpha_bar_t.to(x0.device), noise)
