"""Bounds on the predicted x0: dynamic thresholding (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models
with Deep Language Understanding" (Imagen), sec. 2.3), per row, as diffusers' schedulers do it
(`_threshold_sample` of DDIMScheduler and DPMSolverMultistepScheduler, where the scheduler config says
`thresholding: true`), and DDIMScheduler's plain clipping (`clip_sample`) where thresholding is off.

"At each sampling step we set s to a certain percentile absolute pixel value in x̂0, and if s > 1, then we
threshold x̂0 to the range [−s, s] and then divide by s."

Notation (<variable name> -> <name in paper / diffusers config>)
- x0_pred -> x̂0_t, the data prediction of one step, one picture per row
- ratio -> the percentile p (`dynamic_thresholding_ratio`, 0.995)
- max_value -> the cap on s (`sample_max_value`, 1.0); s is clamped to [1, max_value] as diffusers does
  (torch.clamp: where max_value < 1, s = max_value)
- s -> the per-row threshold

The result always lies in [−1, 1] (the range of pixel-space data), whatever max_value: diffusers documents the
option as unsuitable for latent-space models, whose latents are not bounded by 1. It is honoured because a model's
scheduler config may ask for it, and `dpmpp_2m` and `ddim` promise the diffusers scheduler configured from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Thresholding:
    """The scheduler config's dynamic thresholding settings."""

    ratio: float = 0.995  # dynamic_thresholding_ratio
    max_value: float = 1.0  # sample_max_value

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Thresholding | None:
        """The settings where the config turns thresholding on (diffusers' defaults for keys it leaves out), else None."""
        if not config.get("thresholding", False):
            return None
        return cls(
            ratio=float(config.get("dynamic_thresholding_ratio", cls.ratio)),
            max_value=float(config.get("sample_max_value", cls.max_value)),
        )


def dynamic_threshold(x0_pred: torch.Tensor, thresholding: Thresholding) -> torch.Tensor:
    """x̂0 (R, C, h, w) -> x̂0 thresholded per row: s = clamp(quantile_p(|x̂0|), 1, max_value), clamp(x̂0, −s, s)/s."""
    rows = x0_pred.reshape(x0_pred.shape[0], -1)  # (R, C·h·w): one picture per row
    s = torch.quantile(rows.abs(), thresholding.ratio, dim=1)  # (R,) the p-th percentile of |x̂0|, interpolated
    s = torch.clamp(s, min=1, max=thresholding.max_value).unsqueeze(1)  # (R, 1)
    return (torch.clamp(rows, -s, s) / s).reshape(x0_pred.shape)


def clip_range(config: Mapping[str, Any], clip_by_default: bool = True) -> float | None:
    """A scheduler's sample clipping: x̂0 clamped to [−r, r], r = `clip_sample_range` (1.0), where the config says
    `clip_sample` (where the key is missing, the scheduler's own default: True for DDIMScheduler, whose
    from_config would clip, False for LCMScheduler) and thresholding is off (diffusers thresholds or clips, never
    both). None: no clipping. SD, SDXL and the shapes model ship `clip_sample: false`: latents are not bounded by 1."""
    if config.get("thresholding", False) or not config.get("clip_sample", clip_by_default):
        return None
    return float(config.get("clip_sample_range", 1.0))


def limit_x0(x0_pred: torch.Tensor, thresholding: Thresholding | None, clip: float | None) -> torch.Tensor:
    """x̂0 dynamically thresholded where `thresholding` is given, else clamped to [−clip, clip] where `clip` is."""
    if thresholding is not None:
        return dynamic_threshold(x0_pred, thresholding)
    if clip is not None:
        return x0_pred.clamp(-clip, clip)
    return x0_pred
