"""Classifier-free guidance (Ho & Salimans 2021, eq. 6): ε̂ = ε̂_uncond + s·(ε̂_cond − ε̂_uncond), and guidance
rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4, eq. 15-16).

Notation (<variable name> -> <name in paper>)
- eps_uncond -> ε_θ(z_t), the prediction for the empty / negative prompt
- eps_cond -> ε_θ(z_t, c) (Lin et al.: x_pos)
- guidance_scale -> s (the paper's w + 1), one per row
- guided -> x_cfg (Lin et al. eq. 15's output of guidance)
- guidance_rescale -> φ, one per row; rescaled -> x_rescaled = x_cfg·std(x_pos)/std(x_cfg) (eq. 15),
  mixed back as φ·x_rescaled + (1 − φ)·x_cfg (eq. 16). std is over all of a row's values (C, h, w),
  with Bessel's correction, as torch.std and diffusers' rescale_noise_cfg.

The model output may be ε or v: both are linear in the guidance mix, and diffusers rescales whichever
the UNet predicts. s = 1 is the plain conditional prediction and s = 0 the unconditional one, so a row
that only has one of the two predictions passes it as both and gets it back exactly.
"""

from __future__ import annotations

import torch


def classifier_free_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: torch.Tensor | float
) -> torch.Tensor:
    """(R, C, h, w) x2, s (R,) or float -> guided (R, C, h, w). Same expression as diffusers' pipeline."""
    s = torch.as_tensor(guidance_scale, dtype=eps_cond.dtype, device=eps_cond.device)
    if s.ndim == 1:
        s = s.reshape(-1, *([1] * (eps_cond.ndim - 1)))
    return eps_uncond + s * (eps_cond - eps_uncond)


def rescale_guidance(
    guided: torch.Tensor, eps_cond: torch.Tensor, guidance_rescale: torch.Tensor | float
) -> torch.Tensor:
    """x_cfg (R, C, h, w), x_pos (R, C, h, w), φ (R,) or float -> φ·x_cfg·std(x_pos)/std(x_cfg) + (1 − φ)·x_cfg.
    Rows with φ = 0 come back exactly (even where std(x_cfg) = 0)."""
    phi = torch.as_tensor(guidance_rescale, dtype=guided.dtype, device=guided.device)
    if phi.ndim == 1:
        phi = phi.reshape(-1, *([1] * (guided.ndim - 1)))
    dims = list(range(1, guided.ndim))
    # 1. eq. 15: match the guided output's std to the conditional output's, per row
    rescaled = guided * (eps_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    # 2. eq. 16: mix with the plain guided output by φ
    mixed = phi * rescaled + (1 - phi) * guided
    return torch.where(phi > 0, mixed, guided)
