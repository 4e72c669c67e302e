"""Classifier-free guidance (Ho & Salimans 2021, eq. 6): ε̂ = ε̂_uncond + s·(ε̂_cond − ε̂_uncond).

Notation (<variable name> -> <name in paper>)
- eps_uncond -> ε_θ(z_t), the prediction for the empty / negative prompt
- eps_cond -> ε_θ(z_t, c)
- guidance_scale -> s (the paper's w + 1), one per row

s = 1 is the plain conditional prediction and s = 0 the unconditional one, so a row that only has
one of the two predictions passes it as both and gets it back exactly.
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
