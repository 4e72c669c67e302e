"""The rectified-flow families: Stable Diffusion 3 and Flux. A transformer predicts the velocity v = ε − x0 on
the straight path x_σ = (1 − σ)·x0 + σ·ε, sampled with flow matching's Euler step (`flow_euler`, the only sampler
they take) on a shifted σ schedule; the VAE's latents carry a shift as well as a scale.

SD3 (`StableDiffusion3Pipeline`, Esser et al. 2024): CLIP-L and CLIP-G penultimate states side by side, zero-padded
to T5's width and followed by T5's states along the sequence; the two CLIP pooled projections side by side; an
MMDiT on patches; shift 3 (SD3-medium); classifier-free guidance where s > 1.

Flux (`FluxPipeline`, Black Forest Labs 2024): CLIP's pooled output and T5's states; a transformer on latents packed
2x2 into tokens (packed only around the call: the engine keeps latents (C, h, w) like every family), with RoPE
position ids per call (one latent shape per call); σ = linspace(1, 1/n, n) shifted by μ from the picture's token
count (Flux-dev's use_dynamic_shifting). Flux-dev's transformer embeds the guidance scale (distilled guidance: one
row per image, each row its own scale); Flux-schnell's has no guidance embedding and ignores guidance_scale, as
its pipeline does. True CFG (true_cfg_scale > 1) adds an unconditional row from the negative prompt.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from services.common import rules
from services.worker.families.base import (
    Conditioning,
    Family,
    LatentScaling,
    ModelFacts,
    ModelLoadError,
    Rows,
    clip_hidden_states,
    split,
    t5_hidden_states,
)
from services.worker.transfer import to_device

MAX_SEQUENCE_LENGTH = 512  # the pipelines refuse longer T5 sequences


class FlowFamily(Family):
    backbone = "transformer"
    flow = True
    cuda_dtype = torch.bfloat16  # as their model cards run them: their activations overflow float16
    params = (*rules.COMMON_PARAMS, *rules.IMAGE_PARAMS)  # image to image, inpainting with a 16-channel backbone
    default_strength = default_inpaint_strength = 0.6  # the Img2Img and Inpaint pipelines' of SD3 and Flux
    options = ("max_sequence_length",)
    default_max_sequence_length = 512
    t5_tokenizer = ""

    def max_sequence_length(self, options) -> int:
        value = options.get("max_sequence_length", self.default_max_sequence_length)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQUENCE_LENGTH:
            raise ModelLoadError(f"latentd.json max_sequence_length must be an integer 1..{MAX_SEQUENCE_LENGTH}")
        return value

    def scaling(self, vae_config) -> LatentScaling:
        return LatentScaling(float(vae_config.scaling_factor), float(getattr(vae_config, "shift_factor", 0.0) or 0.0))


class StableDiffusion3(FlowFamily):
    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    image_pipelines = ("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    label = "Stable Diffusion 3"
    component_classes = {
        "transformer": "SD3Transformer2DModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "tokenizer_3": "T5TokenizerFast",
    }
    default_num_inference_steps = 28
    default_guidance_scale = 7.0
    default_max_sequence_length = 256
    t5_tokenizer = "tokenizer_3"

    def describe(self, index, components, options) -> ModelFacts:
        transformer = components["transformer"]
        channels, latent = int(transformer.config.in_channels), int(components["vae"].config.latent_channels)
        if channels != latent:
            raise ModelLoadError(
                f"the transformer takes {channels} input channels and the VAE makes {latent} latent channels; a "
                f"StableDiffusion3Pipeline model takes the VAE's (an SD3 inpainting transformer, with the mask and "
                f"the masked picture's latents, is not supported)"
            )
        f = self.vae_scale_factor(components)
        width, height = self.native_size(transformer.config.sample_size, f, options)
        return ModelFacts(
            native_width=width,
            native_height=height,
            latent_channels=latent,
            vae_scale_factor=f,
            size_multiple=f * int(transformer.config.patch_size),
            max_prompt_tokens=self.max_sequence_length(options),
            scaling=self.scaling(components["vae"].config),
            tokenizer=self.t5_tokenizer,
            tokenizer_class="T5TokenizerFast",
            params=self.params,
            guidance_form="cfg",
        )

    @torch.no_grad()
    def _encode(self, model, prompts: list[str]) -> list[Conditioning]:
        """StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate states (B, 77, 2·D_clip) padded
        to T5's width and followed by T5's (B, L, D_t5) along the sequence; pooled: both projections (B, 2·P)."""
        c = model.components
        max_length = c["tokenizer"].model_max_length
        states, pooled = [], []
        for tokenizer, text_encoder in ((c["tokenizer"], c["text_encoder"]), (c["tokenizer_2"], c["text_encoder_2"])):
            out = clip_hidden_states(tokenizer, text_encoder, prompts, model.device, max_length)
            pooled.append(out[0])
            states.append(out.hidden_states[-2].to(c["text_encoder"].dtype))
        clip = torch.cat(states, dim=-1)
        t5 = t5_hidden_states(c["tokenizer_3"], c["text_encoder_3"], prompts, model.max_prompt_tokens, model.device)
        t5 = t5.to(c["text_encoder_3"].dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return split(
            {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)},
            len(prompts),
        )

    def forward(self, model, latents, timesteps, cond):
        return model.components["transformer"](
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
        ).sample

    def image_seq_len(self, model, latent_shape) -> int:
        p = model.components["transformer"].config.patch_size
        return (latent_shape[1] // p) * (latent_shape[2] // p)

    def sampler_options(self) -> dict[str, dict[str, Any]]:
        return {"flow_euler": {"pipeline_sigmas": False, "default_max_shift": 1.16}}


class Flux(FlowFamily):
    name = "flux"
    pipeline = "FluxPipeline"
    image_pipelines = ("FluxImg2ImgPipeline", "FluxInpaintPipeline")
    label = "Flux"
    component_classes = {
        "transformer": "FluxTransformer2DModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "T5TokenizerFast",
    }
    true_cfg = True
    default_num_inference_steps = 28
    default_guidance_scale = 3.5
    default_sample_size = 128  # FluxPipeline.default_sample_size: 1024 px with the 8x VAE
    options = ("max_sequence_length", "native_width", "native_height")
    t5_tokenizer = "tokenizer_2"

    def describe(self, index, components, options) -> ModelFacts:
        transformer = components["transformer"]
        f = self.vae_scale_factor(components)
        width, height = self.native_size(self.default_sample_size, f, options)
        embeds = bool(transformer.config.guidance_embeds)
        params = (*self.params, "true_cfg_scale")
        if not embeds:  # Flux-schnell: the pipeline ignores guidance_scale
            params = tuple(p for p in params if p != "guidance_scale")
        return ModelFacts(
            native_width=width,
            native_height=height,
            latent_channels=int(transformer.config.in_channels) // 4,
            vae_scale_factor=f,
            size_multiple=f * 2,
            max_prompt_tokens=self.max_sequence_length(options),
            scaling=self.scaling(components["vae"].config),
            tokenizer=self.t5_tokenizer,
            tokenizer_class="T5TokenizerFast",
            params=params,
            guidance_form="distilled" if embeds else "none",
        )

    def rows(self, guidance_scale: float, true_cfg_scale: float | None) -> Rows:
        """One conditional row per image; true CFG (true_cfg_scale > 1) adds the negative prompt's row."""
        scale = 1.0 if true_cfg_scale is None else float(true_cfg_scale)
        return Rows(cond=True, uncond=scale > 1, scale=scale)

    @torch.no_grad()
    def _encode(self, model, prompts: list[str]) -> list[Conditioning]:
        """FluxPipeline.encode_prompt: CLIP's pooled output (B, P) and T5's last hidden state (B, L, D)."""
        c = model.components
        tokens = c["tokenizer"](
            prompts,
            padding="max_length",
            max_length=c["tokenizer"].model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        pooled = c["text_encoder"](to_device(tokens.input_ids, model.device), output_hidden_states=False).pooler_output
        t5 = t5_hidden_states(c["tokenizer_2"], c["text_encoder_2"], prompts, model.max_prompt_tokens, model.device)
        return split(
            {
                "encoder_hidden_states": t5.to(c["text_encoder_2"].dtype),
                "pooled_projections": pooled.to(c["text_encoder"].dtype),
            },
            len(prompts),
        )

    def row_conditioning(self, model, request: Any, resolved: rules.Resolved) -> Conditioning:
        """Flux-dev's distilled guidance: the guidance scale, one value per row, into the transformer (float32)."""
        if not model.components["transformer"].config.guidance_embeds:
            return {}
        return {"guidance": to_device(torch.tensor(resolved.guidance_scale, dtype=torch.float32), model.device)}

    def forward(self, model, latents, timesteps, cond):
        """Pack the latents 2x2 into tokens, call the transformer with this call's position ids, unpack."""
        transformer = model.components["transformer"]
        R, C, h, w = latents.shape
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=latents.device, dtype=model.dtype)
        out = transformer(
            hidden_states=pack_latents(latents),
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=text_ids,
            img_ids=latent_image_ids(h // 2, w // 2, latents.device, model.dtype),
        ).sample
        return unpack_latents(out, h, w)

    def image_seq_len(self, model, latent_shape) -> int:
        return (latent_shape[1] // 2) * (latent_shape[2] // 2)

    def sampler_options(self) -> dict[str, dict[str, Any]]:
        return {"flow_euler": {"pipeline_sigmas": True, "default_max_shift": 1.15}}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, 4C): each 2x2 patch one token, as FluxPipeline._pack_latents."""
    B, C, h, w = latents.shape
    patches = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) -> (B, C, h, w), the inverse of pack_latents (FluxPipeline._unpack_latents)."""
    B, _, channels = tokens.shape
    patches = tokens.view(B, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(B, channels // 4, h, w)


@functools.lru_cache(maxsize=32)
def latent_image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """The RoPE position of each token (h2·w2, 3): (0, row, column), as FluxPipeline._prepare_latent_image_ids.
    Made once per size and device (a constant: a copy per backbone call would wait for the GPU every step)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)
