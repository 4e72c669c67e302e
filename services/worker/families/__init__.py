"""Model families behind one seam (base.py): which diffusers pipeline a model folder is, and everything that
varies with it. A folder's model_index.json `_class_name` picks the family; anything else is refused.

| pipeline | family | module |
| --- | --- | --- |
| StableDiffusionPipeline | sd | stable_diffusion.py |
| StableDiffusionInpaintPipeline | sd | stable_diffusion.py |
| StableDiffusionXLPipeline | sdxl | stable_diffusion.py |
| StableDiffusion3Pipeline | sd3 | flow.py |
| FluxPipeline | flux | flow.py |
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.worker.families.base import Conditioning, Family, LatentScaling, ModelFacts, ModelLoadError, Rows
from services.worker.families.flow import Flux, StableDiffusion3
from services.worker.families.stable_diffusion import StableDiffusion, StableDiffusionInpaint, StableDiffusionXL

FAMILIES: dict[str, Family] = {
    family.pipeline: family
    for family in (StableDiffusion(), StableDiffusionInpaint(), StableDiffusionXL(), StableDiffusion3(), Flux())
}
SUPPORTED_PIPELINES = tuple(FAMILIES)


def family_for(folder: Path, index: Mapping[str, Any]) -> Family:
    """The family of the pipeline model_index.json names; ModelLoadError naming it and the supported ones."""
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ModelLoadError(
            f"model folder {folder}: pipeline {name!r} (model_index.json _class_name) is not supported; "
            f"latentd serves {', '.join(SUPPORTED_PIPELINES)}"
        )
    return FAMILIES[name]


__all__ = [
    "FAMILIES",
    "SUPPORTED_PIPELINES",
    "Conditioning",
    "Family",
    "LatentScaling",
    "ModelFacts",
    "ModelLoadError",
    "Rows",
    "family_for",
]
