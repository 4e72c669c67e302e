"""Load a latent diffusion model from a local diffusers-format folder (Stable Diffusion 1.x/2.x family).

The folder holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/, with the
weights as safetensors: pickled weights (.bin, .ckpt, .pt, .pth) can run code on load and are refused.
An optional latentd.json next to model_index.json holds the model's recommended request defaults
(`default_sampler`, `default_guidance_rescale`); diffusers ignores it.
On CPU everything is float32; on CUDA the UNet and text encoder run in float16 (or bfloat16) while
the VAE stays float32, because SD's VAE decoder overflows to NaN in float16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.common.rules import (
    DEFAULT_SAMPLER,
    MAX_GUIDANCE_RESCALE,
    MIN_GUIDANCE_RESCALE,
    SAMPLERS,
)
from services.worker.diffusion.samplers import unsupported_samplers
from services.worker.diffusion.schedules import alphas_cumprod_from_config

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DEFAULTS_FILE = "latentd.json"  # the model's recommended request defaults, read by latentd only
DEFAULTS_KEYS = ("default_sampler", "default_guidance_rescale")


class ModelLoadError(Exception):
    """The folder is missing, incomplete, malformed, or holds only pickled weights."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype  # the UNet's and text encoder's; the VAE is float32
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    native_width: int
    native_height: int
    latent_channels: int
    vae_scale_factor: int
    max_prompt_tokens: int
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor  # float64 (T,)
    default_sampler: str = DEFAULT_SAMPLER  # a request with sampler None gets this (latentd.json)
    default_guidance_rescale: float = 0.0  # a request with guidance_rescale None gets this (latentd.json)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes, BOS and EOS included (compare with max_prompt_tokens)."""
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings (B, L, D) in the model dtype, as diffusers' pipeline makes them:
        padded to max_length, truncated, last hidden state (the empty negative prompt goes through too)."""
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_prompt_tokens, truncation=True, return_tensors="pt"
        )
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=attention_mask)[0]
        return hidden.to(self.dtype)  # (B, L, D)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, H/f, W/f), float32 (the posterior mean)."""
        posterior = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return posterior.mean * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> pixels in [0, 1] (B, 3, H, W), float32; decoded in float32."""
        pixels = self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor).sample
        return (pixels / 2 + 0.5).clamp(0, 1)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels in [0, 1] (B, 3, H, W) -> PIL images, rounded as diffusers' numpy_to_pil does."""
    array = pixels.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in array]


def _check_folder(folder: Path) -> dict:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist or is not a folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(f"model folder {folder} has no model_index.json (not a diffusers-format folder)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"model folder {folder}: model_index.json is not valid JSON ({error})") from None
    missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(f"model folder {folder} is missing {', '.join(f'{name}/' for name in missing)}")
    for name in WEIGHT_COMPONENTS:
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
    return index


def read_defaults(folder: Path, scheduler_config: dict) -> dict:
    """The model's latentd.json, checked: {"default_sampler": name, "default_guidance_rescale": φ}, both optional."""
    path = folder / DEFAULTS_FILE
    defaults = {"default_sampler": DEFAULT_SAMPLER, "default_guidance_rescale": 0.0}
    if not path.is_file():
        return defaults
    try:
        given = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"model folder {folder}: {DEFAULTS_FILE} is not valid JSON ({error})") from None
    if not isinstance(given, dict) or set(given) - set(DEFAULTS_KEYS):
        raise ModelLoadError(f"model folder {folder}: {DEFAULTS_FILE} may hold only {', '.join(DEFAULTS_KEYS)}")
    defaults.update(given)
    sampler, rescale = defaults["default_sampler"], defaults["default_guidance_rescale"]
    ruled_out = unsupported_samplers(scheduler_config)
    if sampler not in SAMPLERS or sampler in ruled_out:
        raise ModelLoadError(
            f"model folder {folder}: {DEFAULTS_FILE} default_sampler must be one of "
            f"{', '.join(n for n in SAMPLERS if n not in ruled_out)}, got {sampler!r}"
        )
    if not isinstance(rescale, (int, float)) or not MIN_GUIDANCE_RESCALE <= rescale <= MAX_GUIDANCE_RESCALE:
        raise ModelLoadError(
            f"model folder {folder}: {DEFAULTS_FILE} default_guidance_rescale must be between "
            f"{MIN_GUIDANCE_RESCALE:g} and {MAX_GUIDANCE_RESCALE:g}, got {rescale!r}"
        )
    defaults["default_guidance_rescale"] = float(rescale)
    return defaults


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load the model at `path`. dtype defaults to float32 on CPU and float16 on CUDA."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(path).resolve()
    _check_folder(folder)
    device_ = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device_.type == "cuda" else torch.float32
    if device_.type == "cpu" and dtype != torch.float32:
        raise ModelLoadError(f"model folder {folder}: dtype {dtype} is not supported on CPU; use float32")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
        defaults = read_defaults(folder, scheduler_config)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"model folder {folder} could not be loaded: {type(error).__name__}: {error}") from error
    for module in (unet, vae, text_encoder):
        module.to(device_).eval().requires_grad_(False)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    latent_h, latent_w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    return LoadedModel(
        name=folder.name,
        path=folder,
        device=device_,
        dtype=dtype,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(scheduler_config),
        native_width=latent_w * vae_scale_factor,
        native_height=latent_h * vae_scale_factor,
        latent_channels=unet.config.in_channels,
        vae_scale_factor=vae_scale_factor,
        max_prompt_tokens=int(tokenizer.model_max_length),
        num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        alphas_cumprod=alphas_cumprod,
        **defaults,
    )
