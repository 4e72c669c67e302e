"""Stable Diffusion 1.x/2.x and SDXL: a UNet2DConditionModel denoising VAE latents, DDPM-family samplers.

SD 1.x/2.x (`StableDiffusionPipeline`): one CLIP text encoder's last hidden state; latentd's classifier-free
guidance mixes rows at every scale (s = 0 is the unconditional prediction, s = 1 the conditional one), as it
always has for this family.

SDXL (`StableDiffusionXLPipeline`, Podell et al. 2023): two CLIP text encoders, their penultimate hidden states
side by side, and the second one's pooled projection; six "time ids" per row (original size, crop top-left,
target size: the micro-conditioning of sec. 2.2) next to it in the UNet's added conditioning; an empty negative
prompt is zeros (force_zeros_for_empty_prompt); guidance only where s > 1.
"""

from __future__ import annotations

from typing import Any

import torch

from services.common import rules
from services.worker.families.base import (
    INPAINT_CHANNELS,
    Conditioning,
    Family,
    LatentScaling,
    ModelFacts,
    ModelLoadError,
    Rows,
    clip_hidden_states,
    split,
)
from services.worker.transfer import to_device


class StableDiffusion(Family):
    name = "sd"
    pipeline = "StableDiffusionPipeline"
    image_pipelines = ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    label = "Stable Diffusion 1.x/2.x"
    component_classes = {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
    }
    cfg_below_one = True
    params = (*rules.DEFAULT_PARAMS, *rules.IMAGE_PARAMS)
    inpainting = False  # a StableDiffusionInpaintPipeline folder (a 9-channel UNet is allowed)
    batch_prompts = True  # as latentd always has for this family (pictures within PSNR 40 dB of the pipeline's)

    def describe(self, index, components, options) -> ModelFacts:
        unet, vae = components["unet"], components["vae"]
        if unet.config.get("time_cond_proj_dim") is not None:
            raise ModelLoadError(
                "the UNet embeds the guidance scale (time_cond_proj_dim, e.g. an LCM-distilled model); "
                "latentd guides with classifier-free guidance only"
            )
        f = self.vae_scale_factor(components)
        width, height = self.native_size(unet.config.sample_size, f, options)
        channels, latent = int(unet.config.in_channels), int(vae.config.latent_channels)
        inpaint_unet = channels == 2 * latent + 1  # x, the mask, the masked picture's latents
        if channels != latent and not inpaint_unet:
            raise ModelLoadError(
                f"the UNet takes {channels} input channels; the VAE's latents have {latent} (an ordinary UNet) "
                f"and an inpainting UNet takes {2 * latent + 1} (latents, mask, masked picture's latents)"
            )
        if inpaint_unet and not self.inpainting:
            raise ModelLoadError(
                f"a {channels}-channel inpainting UNet belongs in a StableDiffusionInpaintPipeline folder "
                f"(model_index.json _class_name), not a {self.pipeline} one"
            )
        return ModelFacts(
            native_width=width,
            native_height=height,
            latent_channels=latent,
            vae_scale_factor=f,
            size_multiple=f * 2 ** (len(unet.config.block_out_channels) - 1),
            max_prompt_tokens=int(components["tokenizer"].model_max_length),
            scaling=self.scaling(vae.config),
            tokenizer="tokenizer",
            tokenizer_class="CLIPTokenizer",
            params=self.params,
            guidance_form=self.guidance_form,
            inpaint_unet=inpaint_unet,
        )

    def scaling(self, vae_config) -> LatentScaling:
        return LatentScaling(float(getattr(vae_config, "scaling_factor", 0.18215) or 0.18215))

    def rows(self, guidance_scale: float, true_cfg_scale: float | None) -> Rows:
        """latentd's SD rows: unconditional where s ≠ 1, conditional where s ≠ 0, the formula in between."""
        return Rows(cond=guidance_scale != 0.0, uncond=guidance_scale != 1.0, scale=guidance_scale)

    @torch.no_grad()
    def _encode(self, model, prompts: list[str]) -> list[Conditioning]:
        """The pipeline's encoding: padded to max_length, truncated, the last hidden state (B, L, D)."""
        tokenizer, text_encoder = model.components["tokenizer"], model.components["text_encoder"]
        tokens = tokenizer(
            prompts, padding="max_length", max_length=model.max_prompt_tokens, truncation=True, return_tensors="pt"
        )
        attention_mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            attention_mask = to_device(tokens.attention_mask, model.device)
        hidden = text_encoder(to_device(tokens.input_ids, model.device), attention_mask=attention_mask)[0]
        return split({"encoder_hidden_states": hidden.to(model.dtype)}, len(prompts))

    def forward(self, model, latents, timesteps, cond):
        if INPAINT_CHANNELS in cond:  # a 9-channel UNet: [x, mask, masked picture's latents]
            latents = torch.cat([latents, cond[INPAINT_CHANNELS]], dim=1)
        return model.components["unet"](latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample


class StableDiffusionInpaint(StableDiffusion):
    """StableDiffusionInpaintPipeline folders: SD 1.x/2.x with, usually, a 9-channel inpainting UNet (its input:
    x, the mask, the masked picture's latents). Requests without a mask repaint everything (a white mask)."""

    pipeline = "StableDiffusionInpaintPipeline"
    label = "Stable Diffusion 1.x/2.x inpainting"
    inpainting = True


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    image_pipelines = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    default_strength, default_inpaint_strength = 0.3, 0.9999  # their defaults (0.9999: 49 of 50 steps)
    label = "Stable Diffusion XL"
    component_classes = {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
    }
    cfg_below_one = False
    batch_prompts = False
    params = (*rules.DEFAULT_PARAMS, *rules.SIZE_CONDITIONING_PARAMS, *rules.IMAGE_PARAMS)
    default_guidance_scale = 5.0

    def describe(self, index, components, options) -> ModelFacts:
        facts = super().describe(index, components, options)
        unet, text_encoder_2 = components["unet"], components["text_encoder_2"]
        if unet.config.get("addition_embed_type") != "text_time":
            raise ModelLoadError("an SDXL UNet takes addition_embed_type 'text_time' (pooled text and time ids)")
        expected = unet.add_embedding.linear_1.in_features
        given = unet.config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
        if expected != given:
            raise ModelLoadError(
                f"the UNet's added conditioning takes {expected} values, 6 time ids and the pooled text give "
                f"{given} (an SDXL refiner, with an aesthetic score, is not a StableDiffusionXLPipeline model)"
            )
        return facts

    def scaling(self, vae_config) -> LatentScaling:
        mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
        return LatentScaling(
            float(vae_config.scaling_factor),
            latents_mean=tuple(mean) if mean is not None and std is not None else None,
            latents_std=tuple(std) if mean is not None and std is not None else None,
        )

    def rows(self, guidance_scale: float, true_cfg_scale: float | None) -> Rows:
        return Family.rows(self, guidance_scale, true_cfg_scale)

    @torch.no_grad()
    def _encode(self, model, prompts: list[str]) -> list[Conditioning]:
        """Both encoders on prompts padded to 77: the penultimate hidden states side by side (B, 77, D1 + D2),
        and the second encoder's pooled projection (B, P), as StableDiffusionXLPipeline.encode_prompt."""
        c = model.components
        states, pooled = [], None
        for tokenizer, text_encoder in ((c["tokenizer"], c["text_encoder"]), (c["tokenizer_2"], c["text_encoder_2"])):
            out = clip_hidden_states(tokenizer, text_encoder, prompts, model.device)
            if out[0].ndim == 2:  # the projection's output: the pooled embedding (the last encoder's)
                pooled = out[0]
            states.append(out.hidden_states[-2])
        dtype = c["text_encoder_2"].dtype
        return split(
            {"encoder_hidden_states": torch.cat(states, dim=-1).to(dtype), "text_embeds": pooled.to(dtype)},
            len(prompts),
        )

    def uncond_conditioning(self, model, negative_prompt: str, encoded: Conditioning) -> Conditioning:
        """No negative prompt is zeros, not the encoding of "" (the pipeline's force_zeros_for_empty_prompt)."""
        if negative_prompt == "" and model.index.get("force_zeros_for_empty_prompt", True):
            return {key: torch.zeros_like(value) for key, value in encoded.items()}
        return encoded

    def row_conditioning(self, model, request: Any, resolved: rules.Resolved) -> Conditioning:
        """The six time ids (original height and width, crop top and left, target height and width), in
        pixels; original and target default to the generated size, the crop to (0, 0), as the pipeline."""
        width, height = resolved.width, resolved.height
        ids = [
            request.original_height or height,
            request.original_width or width,
            request.crop_top or 0,
            request.crop_left or 0,
            request.target_height or height,
            request.target_width or width,
        ]
        return {"time_ids": to_device(torch.tensor(ids, dtype=model.dtype), model.device)}

    def forward(self, model, latents, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return model.components["unet"](
            latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
