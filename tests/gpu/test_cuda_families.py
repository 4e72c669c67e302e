"""SDXL, SD3 and Flux on CUDA in bfloat16: the engine against each family's diffusers pipeline in the same dtype,
and alone against batched. On the tiny folders of tests/fixtures/tiny_families.py, built here (this package runs
with --noconftest). Skipped without a GPU; on one:

    python -m pytest tests/gpu -s --noconftest

Each test prints what it measured. Where the engine and the pipeline part in bfloat16: the engine keeps every
request's latents in float32 between steps and decodes with a float32 VAE, where the pipelines round the latents
to bfloat16 after every step and decode in bfloat16; so the bound here is looser than the CPU's bit-for-bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.worker.engine.engine import Engine
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT = "a red circle on a white background"
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
MIN_PSNR_DB = 30.0  # against the pipeline in bfloat16 (see the module's docstring)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.fixtures.tiny_families import build_tiny_families

    return build_tiny_families(tmp_path_factory.mktemp("families"))


def levels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def psnr(a, b) -> float:
    mse = float(np.mean(((levels(a) - levels(b)) / 255.0) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def run(model, requests: list[GenerationRequest]):
    engine = Engine(model).start()
    try:
        handles = [engine.submit(request) for request in requests]
        return [handle.result(300).images for handle in handles]
    finally:
        engine.stop()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_bf16_engine_matches_the_pipeline_in_bf16(folders, name):
    import diffusers

    model = load_model(folders[name], device="cuda", dtype=torch.bfloat16)
    request = GenerationRequest(request_id="r", prompt=PROMPT, seed=7, num_inference_steps=12, num_images=2)
    (ours,) = run(model, [request])
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(folders[name], dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {} if name == "sdxl" else {"max_sequence_length": model.max_prompt_tokens}
    if name == "flux":
        kwargs |= {"width": model.native_width, "height": model.native_height}
    theirs = pipe(
        PROMPT,
        num_inference_steps=12,
        guidance_scale=model.default_guidance_scale,
        num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(7),
        **kwargs,
    ).images
    measured = psnr(ours, theirs)
    print(f"\n[{torch.cuda.get_device_name()}] {name}: engine bf16 vs {PIPELINES[name]} bf16: PSNR {measured:.1f} dB")
    assert measured >= MIN_PSNR_DB


@pytest.mark.parametrize("name", list(PIPELINES))
def test_bf16_batched_is_alone(folders, name):
    """Requests with different seeds, steps, guidance and image counts in one call on CUDA, each against itself
    alone on the same card and dtype."""
    model = load_model(folders[name], device="cuda", dtype=torch.bfloat16)
    requests = [
        GenerationRequest(
            request_id=f"b{i}", prompt=PROMPT, seed=i, num_inference_steps=6 + i, guidance_scale=g, num_images=1 + i % 2
        )
        for i, g in enumerate((1.0, 3.0, 5.0, 7.0))
    ]
    alone = [run(model, [request])[0] for request in requests]
    together = run(model, requests)
    worst = max(int(np.abs(levels(a) - levels(b)).max()) for a, b in zip(alone, together))
    lowest = min(psnr(a, b) for a, b in zip(alone, together))
    print(
        f"\n[{torch.cuda.get_device_name()}] {name} bf16 batched vs alone: max {worst} levels, PSNR >= {lowest:.1f} dB"
    )
    assert lowest >= 40


@pytest.mark.parametrize(
    "name,mode",
    # not SD3's inpainting: its pipeline decodes without the VAE's shift_factor (diffusers issue #13611)
    [("sdxl", "img2img"), ("sdxl", "inpaint"), ("sd3", "img2img"), ("flux", "img2img"), ("flux", "inpaint")],
)
def test_bf16_from_a_picture_matches_the_familys_image_pipelines(folders, name, mode):
    """Image to image at strength 0.6 and inpainting (a mask over the middle) against the family's own pipelines
    (`Family.image_pipelines`) in bfloat16, from a picture the model made."""
    import diffusers
    from PIL import Image

    model = load_model(folders[name], device="cuda", dtype=torch.bfloat16)
    (source,) = run(model, [GenerationRequest(request_id="source", prompt=PROMPT, seed=3, num_inference_steps=8)])
    picture = source[0]
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (picture.width // 4, picture.height // 4, 3 * picture.width // 4, 3 * picture.height // 4))
    extra = {"mask": mask} if mode == "inpaint" else {}
    request = GenerationRequest(
        request_id="r", prompt="a blue square", seed=7, num_inference_steps=12, image=picture, strength=0.6, **extra
    )
    (ours,) = run(model, [request])
    class_name = model.family.image_pipelines[mode == "inpaint"]
    pipe = getattr(diffusers, class_name).from_pretrained(folders[name], dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {} if name == "sdxl" else {"max_sequence_length": model.max_prompt_tokens}
    if name == "flux":
        kwargs |= {"width": model.native_width, "height": model.native_height}
    if mode == "inpaint":
        kwargs["mask_image"] = mask
    theirs = pipe(
        "a blue square",
        image=picture,
        strength=0.6,
        num_inference_steps=12,
        guidance_scale=model.default_guidance_scale,
        generator=torch.Generator("cpu").manual_seed(7),
        **kwargs,
    ).images
    measured = psnr(ours, theirs)
    print(f"\n[{torch.cuda.get_device_name()}] {name} {mode}: engine bf16 vs {class_name} bf16: PSNR {measured:.1f} dB")
    assert measured >= MIN_PSNR_DB
