"""The family seam: everything that differs between Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux lives behind
one `Family` object per pipeline class, so the engine's loop, scheduling, events, cancellation and batching
stay one piece of code for all of them.

A family says, for one diffusers pipeline class:
- what a model folder holds and how its parts load (`components`, `load`), and the facts the service needs
  (native size, size multiple, latent channels, prompt token limit: `describe`);
- how prompts become conditioning (`encode_prompts`, `uncond_conditioning`): a dict of tensors per prompt,
  e.g. SDXL's two CLIP encoders' penultimate states side by side plus the pooled embedding;
- what each row adds to it (`row_conditioning`: SDXL's six time ids, Flux-dev's guidance value);
- which rows a request needs and what scale mixes them (`rows`: CFG above 1 only, Flux's true CFG, ...);
- the backbone call on a batch of rows (`forward`: Flux packs latents 2x2 around its transformer only);
- the sampler math it takes (`sampler_options`, `flow`) and the picture's token count for Flux's shift μ;
- the VAE's scaling and shift (`scaling`: `LoadedModel.encode_images` / `decode_latents` go through it).

Conditioning is a dict of tensors: for one prompt without a batch dimension, for a batch of rows with one
(R, ...). The engine concatenates rows key by key; only the family knows what the keys mean.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from services.common import rules
from services.worker.transfer import to_device

if TYPE_CHECKING:
    from services.worker.loading import LoadedModel

Conditioning = dict[str, torch.Tensor]
# a 9-channel inpainting UNet's extra input, per row (1 + C, h, w): the mask (1 = repaint) and the masked picture's
# latents, concatenated to x on the channel axis (StableDiffusionInpaintPipeline)
INPAINT_CHANNELS = "inpaint_channels"
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class ModelLoadError(Exception):
    """The folder is missing, incomplete, malformed, of an unsupported pipeline, or holds only pickled weights."""


class Rows(NamedTuple):
    """The UNet/transformer rows a request needs per image, and the scale that mixes them (unconditional
    first: x_uncond + scale·(x_cond − x_uncond)); a request with one kind of row gets it back exactly."""

    cond: bool
    uncond: bool
    scale: float


@dataclass(frozen=True)
class LatentScaling:
    """How the VAE's latents z relate to the latents the backbone denoises: x = (z − shift)·scaling_factor
    (SD3, Flux: shift_factor), or x = (z − mean)·scaling_factor/std per channel (an SDXL-pipeline VAE with
    latents_mean and latents_std), or x = z·scaling_factor (SD 1.x/2.x, SDXL)."""

    scaling_factor: float
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def _channels(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)

    def from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w) -> the backbone's latents."""
        if self.latents_mean is not None and self.latents_std is not None:
            mean, std = self._channels(self.latents_mean, z), self._channels(self.latents_std, z)
            return (z - mean) * self.scaling_factor / std
        if self.shift_factor:
            return (z - self.shift_factor) * self.scaling_factor
        return z * self.scaling_factor

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """The backbone's latents (B, C, h, w) -> what the VAE decodes, the pipelines' expressions."""
        if self.latents_mean is not None and self.latents_std is not None:
            mean, std = self._channels(self.latents_mean, latents), self._channels(self.latents_std, latents)
            return latents * std / self.scaling_factor + mean
        if self.shift_factor:
            return latents / self.scaling_factor + self.shift_factor
        return latents / self.scaling_factor


@dataclass(frozen=True)
class ModelFacts:
    """What the service needs to know about a loaded model, from its configs (and latentd.json)."""

    native_width: int
    native_height: int
    latent_channels: int
    vae_scale_factor: int
    size_multiple: int
    max_prompt_tokens: int
    scaling: LatentScaling
    tokenizer: str  # the component whose token count is checked against max_prompt_tokens
    tokenizer_class: str  # its transformers class, for the gateway's own count
    params: tuple[str, ...]  # the request fields this model reads
    guidance_form: str  # cfg | distilled | none
    inpaint_unet: bool = False  # a 9-channel inpainting UNet (latent channels + mask + masked picture's latents)


class Family:
    """Base: the facts every family shares. Methods take the LoadedModel (components, dtype, device)."""

    name = ""  # rules.FAMILIES
    pipeline = ""  # model_index.json's _class_name
    # the diffusers pipelines whose image to image and inpainting latentd follows (engine/sources.py), for parity
    image_pipelines: tuple[str, str] = ("", "")
    label = ""  # for people
    backbone = "unet"  # the denoiser's component
    # the parts a model folder must have, each loaded with this class (whatever model_index.json names: a folder
    # never chooses what code runs); "scheduler" is read as its config only
    component_classes: Mapping[str, str] = {}
    flow = False  # flow matching (σ, velocity) rather than DDPM (ᾱ, ε or v)
    guidance_form = "cfg"  # cfg | distilled (a guidance embedding) | none
    cfg_below_one = False  # whether 0 ≤ s ≤ 1 still mixes rows (latentd's SD family); else s ≤ 1 is cond only
    true_cfg = False  # Flux: classifier-free guidance by true_cfg_scale with the negative prompt
    params: tuple[str, ...] = rules.COMMON_PARAMS  # the request fields this family reads
    default_num_inference_steps = rules.DEFAULT_NUM_INFERENCE_STEPS  # the pipeline's defaults
    default_guidance_scale = rules.DEFAULT_GUIDANCE_SCALE
    default_strength = rules.DEFAULT_STRENGTH  # image_pipelines' defaults: image to image, inpainting
    default_inpaint_strength = rules.DEFAULT_INPAINT_STRENGTH
    options: tuple[str, ...] = ()  # latentd.json keys this family reads beyond the common ones
    batch_prompts = False  # encode all of an iteration's prompts in one call (see encode_prompts)
    cuda_dtype = torch.float16  # the backbone's and text encoders' dtype on CUDA unless the worker says otherwise

    # ---- loading ----

    @property
    def components(self) -> tuple[str, ...]:
        return (*self.component_classes, "scheduler")

    @property
    def weight_components(self) -> tuple[str, ...]:
        """The parts with weights (safetensors only)."""
        return tuple(name for name in self.component_classes if not name.startswith("tokenizer"))

    def check_index(self, folder: Path, index: Mapping[str, Any]) -> None:
        """Refuse a folder whose model_index.json leaves out a part this family needs (e.g. SD3 without T5)."""
        for name in self.components:
            entry = index.get(name)
            if isinstance(entry, list) and entry[:1] == [None]:
                raise ModelLoadError(f"model folder {folder}: model_index.json has no {name} ({self.label} needs it)")

    def load(self, folder: Path, index: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict:
        """The components, loaded from safetensors, on `device`, in eval mode, without gradients. The backbone
        and text encoders in `dtype`, the VAE in float32 (SD's VAE decoder overflows to NaN in float16)."""
        components = self._load(folder, index, dtype)
        for part in components.values():
            if isinstance(part, torch.nn.Module):
                part.to(device).eval().requires_grad_(False)
        return components

    def _load(self, folder: Path, index: Mapping[str, Any], dtype: torch.dtype) -> dict:
        import diffusers
        import transformers

        components = {}
        for name, class_name in self.component_classes.items():
            cls = getattr(diffusers, class_name, None) or getattr(transformers, class_name)
            if name.startswith("tokenizer"):
                components[name] = cls.from_pretrained(folder / name)
            else:
                part_dtype = torch.float32 if name == "vae" else dtype
                components[name] = cls.from_pretrained(folder / name, use_safetensors=True, dtype=part_dtype)
        return components

    def describe(self, model_index: Mapping[str, Any], components: Mapping[str, Any], options: Mapping) -> ModelFacts:
        raise NotImplementedError

    def vae_scale_factor(self, components: Mapping[str, Any]) -> int:
        return 2 ** (len(components["vae"].config.block_out_channels) - 1)

    def native_size(self, sample_size: int | Sequence[int], factor: int, options: Mapping) -> tuple[int, int]:
        """(width, height): latentd.json's native_width/native_height, else the backbone's sample size."""
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        return int(options.get("native_width", w * factor)), int(options.get("native_height", h * factor))

    # ---- text ----

    def encode_prompts(self, model: LoadedModel, prompts: list[str]) -> list[Conditioning]:
        """One conditioning dict per prompt. All prompts in one text-encoder call where `batch_prompts`; else one
        call per prompt, as the pipeline makes them: a batch of one and a batch of several round differently in
        the last bit (a GEMV against a GEMM), and one bit in the pooled projection is enough for a request alone
        to miss the pipeline's latents bit for bit."""
        if self.batch_prompts:
            return self._encode(model, prompts)
        return [encoded for prompt in prompts for encoded in self._encode(model, [prompt])]

    def _encode(self, model: LoadedModel, prompts: list[str]) -> list[Conditioning]:
        raise NotImplementedError

    def uncond_conditioning(self, model: LoadedModel, negative_prompt: str, encoded: Conditioning) -> Conditioning:
        """The unconditional rows' conditioning from the negative prompt's encoding (SDXL: zeros for "")."""
        return encoded

    # ---- rows ----

    def rows(self, guidance_scale: float, true_cfg_scale: float | None) -> Rows:
        """CFG as the SDXL and SD3 pipelines do it: both rows only where s > 1; s ≤ 1 is the conditional
        prediction alone."""
        return Rows(cond=True, uncond=guidance_scale > 1, scale=guidance_scale)

    def row_conditioning(self, model: LoadedModel, request: Any, resolved: rules.Resolved) -> Conditioning:
        """Conditioning that is the request's own, not its prompt's (one row, no batch dimension); `resolved`
        holds its size and guidance scale with the model's defaults filled in."""
        return {}

    # ---- the backbone ----

    def forward(
        self, model: LoadedModel, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The backbone on R rows: latents (R, C, h, w) in the model dtype, timesteps (R,) float32 (the plan's
        t), conditioning (R, ...) -> the prediction (R, C, h, w)."""
        raise NotImplementedError

    def image_seq_len(self, model: LoadedModel, latent_shape: tuple[int, int, int]) -> int | None:
        """Tokens the backbone sees for one picture of this latent shape (Flux's shift μ depends on it)."""
        return None

    def sampler_options(self) -> dict[str, dict[str, Any]]:
        """Keyword arguments per sampler name: how this family's pipeline drives its scheduler."""
        return {}


def read_json(folder: Path, name: str) -> dict:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"model folder {folder}: {name} is not valid JSON ({error})") from None


def clip_hidden_states(
    tokenizer, text_encoder, prompts: list[str], device: torch.device, max_length: int | None = None
):
    """A CLIP text encoder's output on prompts padded (and truncated) to the tokenizer's limit, as the SDXL,
    SD3 and Flux pipelines call it (with every hidden state)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(to_device(tokens.input_ids, device), output_hidden_states=True)


def t5_hidden_states(tokenizer, text_encoder, prompts: list[str], max_length: int, device: torch.device):
    """T5's last hidden state on prompts padded and truncated to max_sequence_length, as SD3 and Flux."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return text_encoder(to_device(tokens.input_ids, device))[0]


def split(conditioning: Conditioning, count: int) -> list[Conditioning]:
    """A batch's conditioning (B, ...) -> one dict per prompt (...)."""
    return [{key: value[i] for key, value in conditioning.items()} for i in range(count)]
