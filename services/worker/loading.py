"""Load a latent diffusion model from a local diffusers-format folder: Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux.

The folder's model_index.json names its pipeline (`_class_name`); the family of that pipeline
(services/worker/families/) says which parts it must hold and how they load, and anything else is refused
with a message naming the class and the supported ones. Weights must be safetensors: pickled weights
(.bin, .ckpt, .pt, .pth) can run code on load and are refused.
An optional latentd.json next to model_index.json holds the model's recommended request defaults
(`default_sampler`, `default_guidance_rescale`, `default_guidance_start`, `default_guidance_stop`,
`default_guidance_scale`, `default_num_inference_steps`, `default_strength`, `default_inpaint_strength`) and,
for the families that read them, `max_sequence_length` (SD3, Flux: T5's tokens) and `native_width` /
`native_height` (Flux); diffusers ignores the file.
On CPU everything is float32; on CUDA the backbone and text encoders run in the family's half precision
(float16 for SD and SDXL, bfloat16 for SD3 and Flux; LATENTD_WORKER_DTYPE overrides) while the VAE stays
float32, because SD's VAE decoder overflows to NaN in float16.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.common.errors import InvalidInput
from services.common.rules import (
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_SAMPLER,
    DEFAULT_STRENGTH,
    MAX_GUIDANCE,
    MAX_GUIDANCE_FRACTION,
    MAX_GUIDANCE_RESCALE,
    MAX_STEPS,
    MAX_STRENGTH,
    MIN_GUIDANCE_FRACTION,
    MIN_GUIDANCE_RESCALE,
    SAMPLERS,
    check_guidance_interval,
)
from services.worker.diffusion.samplers import sampler_for_scheduler, unsupported_samplers
from services.worker.diffusion.schedules import alphas_cumprod_from_config
from services.worker.families import Conditioning, Family, LatentScaling, ModelFacts, ModelLoadError, family_for
from services.worker.families.base import PICKLED_SUFFIXES, read_json

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # LATENTD_WORKER_DTYPE
DEFAULTS_FILE = "latentd.json"  # the model's recommended request defaults, read by latentd only
DEFAULTS_KEYS = (
    "default_sampler",
    "default_guidance_rescale",
    "default_guidance_start",
    "default_guidance_stop",
    "default_guidance_scale",
    "default_num_inference_steps",
    "default_strength",
    "default_inpaint_strength",
)

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "resolve_dtype", "to_pil"]


def resolve_dtype(name: str) -> torch.dtype | None:
    """LATENTD_WORKER_DTYPE -> the backbone's dtype: float16, bfloat16 or float32; "" -> None (the family's own on
    CUDA, float32 on the CPU). ValueError naming the choices otherwise."""
    if not name:
        return None
    if name not in DTYPES:
        raise ValueError(f"LATENTD_WORKER_DTYPE must be one of {', '.join(DTYPES)} or empty, got {name!r}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype  # the backbone's and text encoders'; the VAE is float32
    family: Family  # everything that varies with the pipeline class (services/worker/families/)
    components: dict[str, Any]  # the loaded parts by folder name: unet or transformer, vae, text encoders, ...
    index: dict  # model_index.json
    scheduler_config: dict
    facts: ModelFacts
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None  # float64 (T,) for DDPM-family schedules; None for flow matching
    default_sampler: str = DEFAULT_SAMPLER  # a request with sampler None gets this (latentd.json)
    default_guidance_rescale: float = 0.0  # a request with guidance_rescale None gets this (latentd.json)
    default_guidance_start: float = MIN_GUIDANCE_FRACTION  # ... with guidance_start None (latentd.json)
    default_guidance_stop: float = MAX_GUIDANCE_FRACTION  # ... with guidance_stop None (latentd.json)
    default_guidance_scale: float = 7.5  # a request with guidance_scale None (the family's pipeline default)
    default_num_inference_steps: int = 50  # a request with num_inference_steps None
    default_strength: float = DEFAULT_STRENGTH  # a request with an image and strength None (the family's pipeline's)
    default_inpaint_strength: float = DEFAULT_INPAINT_STRENGTH  # ... and a mask
    options: dict = field(default_factory=dict)  # latentd.json as given
    # a second copy of the limit's tokenizer, for counting on callers' threads: a tokenizer call sets the Rust
    # tokenizer's padding and truncation, so counting on the one the engine thread encodes with races it
    counting_tokenizer: Any = None
    _counting_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---- facts (from the family's reading of the configs) ----
    @property
    def native_width(self) -> int:
        return self.facts.native_width

    @property
    def native_height(self) -> int:
        return self.facts.native_height

    @property
    def latent_channels(self) -> int:
        return self.facts.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.facts.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this (the VAE's factor times the backbone's downsampling or patch)."""
        return self.facts.size_multiple

    @property
    def max_prompt_tokens(self) -> int:
        return self.facts.max_prompt_tokens

    @property
    def scaling(self) -> LatentScaling:
        return self.facts.scaling

    @property
    def scaling_factor(self) -> float:
        return self.facts.scaling.scaling_factor

    @property
    def inpaint_unet(self) -> bool:
        """A 9-channel inpainting UNet: x, the mask and the masked picture's latents side by side."""
        return self.facts.inpaint_unet

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction (DDPM family), flow (the velocity ε − x0 of rectified flow)."""
        return "flow" if self.family.flow else self.scheduler_config.get("prediction_type", "epsilon")

    # ---- parts ----
    @property
    def backbone(self):
        return self.components[self.family.backbone]

    @property
    def unet(self):
        return self.components.get("unet")

    @property
    def vae(self):
        return self.components["vae"]

    @property
    def text_encoder(self):
        return self.components.get("text_encoder")

    @property
    def tokenizer(self):
        return self.components.get("tokenizer")

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(C, h, w) of a picture of width x height pixels."""
        f = self.vae_scale_factor
        return (self.latent_channels, height // f, width // f)

    # ---- what the engine calls (each the family's) ----
    def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes in the tokenizer the limit is for (compare with max_prompt_tokens); any thread."""
        tokenizer = self.counting_tokenizer or self.components[self.facts.tokenizer]
        with self._counting_lock:
            return len(tokenizer(prompt, truncation=False).input_ids)

    def encode_prompts(self, prompts: list[str]) -> list[Conditioning]:
        """Prompts -> one conditioning dict per prompt (tensors without a batch dimension), as the family's
        diffusers pipeline encodes them."""
        return self.family.encode_prompts(self, prompts)

    def uncond_conditioning(self, negative_prompt: str, encoded: Conditioning) -> Conditioning:
        return self.family.uncond_conditioning(self, negative_prompt, encoded)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The backbone on a batch of rows (R, C, h, w) -> its prediction (R, C, h, w)."""
        return self.family.forward(self, latents, timesteps, cond)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> the backbone's latents (B, C, H/f, W/f), float32: the posterior
        mean, scaled (and shifted) as the family's pipeline does."""
        posterior = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return self.scaling.from_vae(posterior.mean)

    @torch.no_grad()
    def sample_latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> the backbone's latents from a sample of the VAE's posterior,
        z = μ + σ·ξ with ξ drawn from `generator` on the CPU in the model dtype (the pipelines' VAE runs in it;
        latentd's in float32), scaled as the family's pipeline does: the image-to-image and inpainting
        pipelines' retrieve_latents(..., generator)."""
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        xi = torch.randn(posterior.mean.shape, generator=generator, dtype=self.dtype).to(self.device)
        return self.scaling.from_vae(posterior.mean + posterior.std * xi.to(posterior.mean.dtype))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The backbone's latents (B, C, h, w) -> pixels in [0, 1] (B, 3, H, W), float32; decoded in float32."""
        pixels = self.vae.decode(self.scaling.to_vae(latents.to(self.device, torch.float32))).sample
        return (pixels / 2 + 0.5).clamp(0, 1)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels in [0, 1] (B, 3, H, W) -> PIL images, rounded as diffusers' numpy_to_pil does."""
    array = pixels.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in array]


def _check_folder(folder: Path) -> tuple[dict, Family]:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist or is not a folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(f"model folder {folder} has no model_index.json (not a diffusers-format folder)")
    index = read_json(folder, "model_index.json")
    family = family_for(folder, index)
    family.check_index(folder, index)
    missing = [name for name in family.components if not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(f"model folder {folder} is missing {', '.join(f'{name}/' for name in missing)}")
    for name in family.weight_components:
        files = [p for p in (folder / name).iterdir() if p.is_file()]
        if not (folder / name / "config.json").is_file():
            raise ModelLoadError(f"model folder {folder}: {name}/config.json is missing")
        if any(p.suffix == ".safetensors" for p in files):
            continue
        pickled = [p.name for p in files if p.suffix in PICKLED_SUFFIXES]
        if pickled:
            raise ModelLoadError(
                f"model folder {folder}: {name}/ holds only pickled weights ({', '.join(pickled)}); "
                "latentd loads safetensors only (convert with save_pretrained(safe_serialization=True))"
            )
        raise ModelLoadError(f"model folder {folder}: {name}/ has no .safetensors weights")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise ModelLoadError(f"model folder {folder}: scheduler/scheduler_config.json is missing")
    return index, family


def read_scheduler_config(folder: Path, index: dict) -> dict:
    """The scheduler's config as the pipeline builds it: scheduler/scheduler_config.json, with the class that
    model_index.json names (from_pretrained builds that class from the file; the file's own _class_name is not
    read, and a folder whose scheduler was swapped and saved may have only one of the two updated)."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    named = index.get("scheduler")
    if isinstance(named, list) and len(named) == 2 and isinstance(named[1], str):
        config["_class_name"] = named[1]
    return config


def read_options(folder: Path) -> dict:
    """latentd.json as given ({} where there is none), checked to be a JSON object."""
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return {}
    given = read_json(folder, DEFAULTS_FILE)
    if not isinstance(given, dict):
        raise ModelLoadError(f"model folder {folder}: {DEFAULTS_FILE} must be a JSON object")
    return given


def read_defaults(folder: Path, scheduler_config: dict, family: Family | None = None) -> dict:
    """The model's request defaults: the family's pipeline's, then latentd.json's, checked."""
    from services.worker.families import FAMILIES

    family = family or FAMILIES["StableDiffusionPipeline"]
    given = read_options(folder)
    allowed = (*DEFAULTS_KEYS, *family.options)
    if set(given) - set(allowed):
        raise ModelLoadError(f"model folder {folder}: {DEFAULTS_FILE} may hold only {', '.join(allowed)}")
    ruled_out = unsupported_samplers(scheduler_config)
    supported = [n for n in SAMPLERS if n not in ruled_out]
    # a request without a sampler gets what the folder's pipeline samples with when called plainly, where latentd
    # has that sampler (one the config allows); else ddim (or the only one the model takes)
    fallback = DEFAULT_SAMPLER if DEFAULT_SAMPLER in supported else (supported or [DEFAULT_SAMPLER])[0]
    defaults = {
        "default_sampler": sampler_for_scheduler(scheduler_config) or fallback,
        "default_guidance_rescale": 0.0,
        "default_guidance_start": MIN_GUIDANCE_FRACTION,
        "default_guidance_stop": MAX_GUIDANCE_FRACTION,
        "default_guidance_scale": float(family.default_guidance_scale),
        "default_num_inference_steps": int(family.default_num_inference_steps),
        "default_strength": float(family.default_strength),
        "default_inpaint_strength": float(family.default_inpaint_strength),
    }
    defaults.update({k: v for k, v in given.items() if k in DEFAULTS_KEYS})
    sampler, rescale = defaults["default_sampler"], defaults["default_guidance_rescale"]
    if sampler not in supported:
        raise ModelLoadError(
            f"model folder {folder}: {DEFAULTS_FILE} default_sampler must be one of "
            f"{', '.join(supported)}, got {sampler!r}"
        )
    if not isinstance(rescale, (int, float)) or not MIN_GUIDANCE_RESCALE <= rescale <= MAX_GUIDANCE_RESCALE:
        raise ModelLoadError(
            f"model folder {folder}: {DEFAULTS_FILE} default_guidance_rescale must be between "
            f"{MIN_GUIDANCE_RESCALE:g} and {MAX_GUIDANCE_RESCALE:g}, got {rescale!r}"
        )
    if rescale and "guidance_rescale" not in family.params:
        raise ModelLoadError(
            f"model folder {folder}: {DEFAULTS_FILE} default_guidance_rescale does not apply to {family.label}"
        )
    scale, steps = defaults["default_guidance_scale"], defaults["default_num_inference_steps"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= MAX_GUIDANCE:
        raise ModelLoadError(
            f"model folder {folder}: {DEFAULTS_FILE} default_guidance_scale must be between 0 and {MAX_GUIDANCE:g}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ModelLoadError(
            f"model folder {folder}: {DEFAULTS_FILE} default_num_inference_steps must be an integer 1..{MAX_STEPS}"
        )
    try:
        interval = check_guidance_interval(defaults["default_guidance_start"], defaults["default_guidance_stop"])
    except InvalidInput as error:
        raise ModelLoadError(f"model folder {folder}: {DEFAULTS_FILE} default_{error.message}") from None
    defaults["default_guidance_start"], defaults["default_guidance_stop"] = interval
    for key in ("default_strength", "default_inpaint_strength"):
        value = defaults[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_STRENGTH:
            raise ModelLoadError(
                f"model folder {folder}: {DEFAULTS_FILE} {key} must be a number above 0 and at most "
                f"{MAX_STRENGTH:g}, got {value!r}"
            )
        defaults[key] = float(value)
    for key in ("native_width", "native_height"):
        value = given.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8):
            raise ModelLoadError(f"model folder {folder}: {DEFAULTS_FILE} {key} must be an integer of at least 8")
    defaults["default_guidance_rescale"] = float(rescale)
    defaults["default_guidance_scale"] = float(scale)
    return defaults


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load the model at `path`. dtype defaults to float32 on CPU and to the family's on CUDA (float16 for SD and
    SDXL, bfloat16 for SD3 and Flux)."""
    folder = Path(path).resolve()
    index, family = _check_folder(folder)
    device_ = torch.device(device)
    if dtype is None:
        dtype = family.cuda_dtype if device_.type == "cuda" else torch.float32
    if device_.type == "cpu" and dtype != torch.float32:
        raise ModelLoadError(f"model folder {folder}: dtype {dtype} is not supported on CPU; use float32")
    try:
        scheduler_config = read_scheduler_config(folder, index)
        defaults = read_defaults(folder, scheduler_config, family)
        options = read_options(folder)
        components = family.load(folder, index, device_, dtype)
        facts = family.describe(index, components, options)
        counting_tokenizer = type(components[facts.tokenizer]).from_pretrained(folder / facts.tokenizer)
        alphas_cumprod = None if family.flow else alphas_cumprod_from_config(scheduler_config)
    except ModelLoadError as error:
        if str(folder) in str(error):
            raise
        raise ModelLoadError(f"model folder {folder}: {error}") from error
    except Exception as error:
        raise ModelLoadError(f"model folder {folder} could not be loaded: {type(error).__name__}: {error}") from error
    if family.flow != (scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"):
        raise ModelLoadError(
            f"model folder {folder}: a {family.label} model needs "
            f"{'a flow-matching' if family.flow else 'a DDPM-family'} scheduler, "
            f"got {scheduler_config.get('_class_name')!r}"
        )
    return LoadedModel(
        name=folder.name,
        path=folder,
        device=device_,
        dtype=dtype,
        family=family,
        components=components,
        index=index,
        scheduler_config=dict(scheduler_config),
        facts=facts,
        num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        alphas_cumprod=alphas_cumprod,
        options=options,
        counting_tokenizer=counting_tokenizer,
        **defaults,
    )
