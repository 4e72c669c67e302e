"""Where a request's denoising starts: pure noise (text to image), or a picture noised forward (image to
image), with a mask for inpainting. Runs on the engine thread when a request is admitted; every random draw
comes from the request's own generator in the order diffusers' pipelines draw:

- text to image (StableDiffusionPipeline): ε (n, C, h, w); x = ε·init_noise_sigma.
- image to image (StableDiffusionImg2ImgPipeline): the picture's VAE posterior sample (1, C, h, w), then ε;
  x = the picture's latents noised to the start step (diffusion/img2img.noised).
- inpainting (StableDiffusionInpaintPipeline): with an ordinary UNet, the picture's posterior sample, then ε;
  x = ε·init_noise_sigma at strength 1, else the picture noised to the start step; then the masked picture's
  posterior sample (the pipeline encodes it whatever its UNet: the draw keeps the generator in step). With a
  9-channel UNet, the picture is encoded only below strength 1; the masked picture's latents and the mask
  become the UNet's extra input channels. A 9-channel model's text-to-image request is its pipeline with a
  white mask (all repainted: the masked picture is all zeros).

Pictures become pixels as diffusers' VaeImageProcessor makes them: RGB / 255 · 2 − 1 (float32); masks as its
mask processor: grayscale / 255, binarised at 0.5 (1 = repaint).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from services.worker.diffusion.img2img import KnownRegion, latent_mask, noised
from services.worker.diffusion.samplers import SamplerState
from services.worker.families import Conditioning
from services.worker.families.base import INPAINT_CHANNELS
from services.worker.loading import LoadedModel
from services.worker.transfer import to_device


def pixels_of(image: Image.Image) -> torch.Tensor:
    """A picture -> (1, 3, H, W) float32 in [-1, 1], laid out channels-last in memory as VaeImageProcessor leaves
    it (a transposed NumPy array): the VAE's convolutions round by layout, so the encoder gives the pipelines'
    latents bit for bit only from the same layout."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(2.0 * array - 1.0).unsqueeze(0).permute(0, 3, 1, 2)  # (1, H, W, 3) -> (1, 3, H, W)


def mask_of(image: Image.Image) -> torch.Tensor:
    """A mask picture (white = repaint) -> (1, 1, H, W) float32, 0 or 1."""
    array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32)).reshape(1, 1, *array.shape)


@dataclass
class Start:
    latents: torch.Tensor  # (n, C, h, w) float32 on the model's device, on the sampler's scale
    conditioning: Conditioning  # extra per-request conditioning (a 9-channel UNet's mask and masked latents)


def _noise(model: LoadedModel, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """ε as the pipelines draw it: randn on the CPU generator in the model dtype, then to the device, float32."""
    return to_device(torch.randn(shape, generator=generator, dtype=model.dtype), model.device).float()


def start(
    model: LoadedModel,
    state: SamplerState,
    generator: torch.Generator,
    num_images: int,
    latent_shape: tuple[int, int, int],
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
    strength: float | None = None,
) -> Start:
    """The request's first x (and extra conditioning); sets state.known for inpainting with an ordinary UNet."""
    n, plan = num_images, state.plan
    shape = (n, *latent_shape)
    inpaint_unet = model.inpaint_unet
    if image is None and not inpaint_unet:
        return Start(_noise(model, shape, generator) * plan.init_noise_sigma, {})
    f = model.vae_scale_factor
    pixels = pixels_of(image) if image is not None else torch.zeros((1, 3, latent_shape[1] * f, latent_shape[2] * f))
    full_strength = strength is None or strength == 1.0
    x0 = None
    if not inpaint_unet or not full_strength:  # a 9-channel UNet's pipeline skips the picture at strength 1
        x0 = model.sample_latents(pixels, generator).float().expand(*shape).contiguous()  # (n, C, h, w)
    noise = _noise(model, shape, generator)
    if mask is None and not inpaint_unet:  # image to image: always noised to the start (even at strength 1)
        return Start(noised(x0, noise, plan, state.start_index), {})
    latents = noise * plan.init_noise_sigma if full_strength else noised(x0, noise, plan, state.start_index)
    pixel_mask = mask_of(mask) if mask is not None else torch.ones((1, 1, *pixels.shape[-2:]))
    masked_pixels = pixels * (pixel_mask < 0.5)
    masked_latents = model.sample_latents(masked_pixels, generator).float()  # (1, C, h, w)
    keep_or_repaint = latent_mask(pixel_mask, latent_shape[-2:]).to(model.device)  # (1, 1, h, w): 1 = repaint
    if not inpaint_unet:
        state.known = KnownRegion(x0=x0, noise=noise, keep=(1 - keep_or_repaint).expand(n, 1, *latent_shape[-2:]))
        return Start(latents, {})
    extra = torch.cat([keep_or_repaint, masked_latents], dim=1)[0].to(model.dtype)  # (1 + C, h, w)
    return Start(latents, {INPAINT_CHANNELS: extra})
