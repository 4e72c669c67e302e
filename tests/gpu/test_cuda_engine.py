"""The engine on CUDA in half precision: against diffusers' pipeline in the same dtype, against
float32 by what the pictures show, and alone vs batched. Skipped without a GPU; on one:

    python -m pytest tests/gpu -s --noconftest

Each test prints the PSNR it measured, so a run on a new card leaves figures, not just a verdict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.rules import GUIDED_AT_EVERY_STEP
from services.worker.engine.engine import Engine
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import load_model
from tests.fixtures.pictures import pixels, psnr
from training.evaluate import SPOT_CHECK_CAPTIONS

MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-ldm"
PROMPT = "a large red circle on a white background"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def request(request_id: str, **overrides) -> GenerationRequest:
    # guided at every step, as the pipelines compared against (the model recommends an interval: docs/model.md)
    fields = dict(prompt=PROMPT, seed=1234, num_inference_steps=50, guidance_scale=7.5, num_images=2)
    fields.update(GUIDED_AT_EVERY_STEP)
    fields.update(overrides)
    return GenerationRequest(request_id=request_id, **fields)


def generate(model, req: GenerationRequest, max_batch_rows: int = 64):
    engine = Engine(model, max_batch_rows=max_batch_rows).start()
    try:
        return engine.submit(req).result(120).images
    finally:
        engine.stop()


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_cuda_engine_matches_diffusers_pipeline_in_the_same_dtype(dtype_name):
    from diffusers import StableDiffusionPipeline

    dtype = DTYPES[dtype_name]
    ours = pixels(generate(load_model(MODEL, device="cuda", dtype=dtype), request(dtype_name)))
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, dtype=dtype, safety_checker=None).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    theirs = pixels(
        pipe(
            PROMPT,
            num_inference_steps=50,
            guidance_scale=7.5,
            num_images_per_prompt=2,
            generator=torch.Generator("cpu").manual_seed(1234),
        ).images
    )
    measured = psnr(ours, theirs)
    print(
        f"\n[{torch.cuda.get_device_name()}] engine {dtype_name} vs StableDiffusionPipeline {dtype_name}: PSNR {measured:.1f} dB"
    )
    assert np.isfinite(ours).all()
    assert measured >= 40


@pytest.mark.parametrize(
    "sampler,dtype_name",
    [("dpmpp_2m_sde", "float16"), ("unipc", "float16"), ("euler_ancestral", "float16"), ("plms", "float16")]
    + [("dpmpp_sde", "float32")],
)
def test_cuda_samplers_match_their_schedulers(sampler, dtype_name):
    """The samplers that draw noise per step (the SDE solver draws in float32 whatever the model's dtype, Euler
    ancestral in the model's) or keep a corrector's state or a multistep's outputs (PLMS), in float16 at 20 steps and the model's guidance
    interval, against StableDiffusionPipeline with the scheduler swapped as a user would
    (samplers.diffusers_scheduler) and guided where diffusers' guider says (tests/fixtures/guidance.py).
    (Guided at every step, a strongly guided SDE trajectory amplifies rounding step by step, so half precision
    against half precision is compared at the interval the model recommends.) DPM++ SDE in float32: its noise is
    a Brownian path seeded by the request's seed, which the pipeline builds in its latents' dtype (float16 in a
    float16 pipeline: the same law, other numbers) and the engine in float32 always."""
    from diffusers import StableDiffusionPipeline

    from services.worker.diffusion.samplers import diffusers_scheduler
    from tests.fixtures.guidance import pipeline_images_with_interval

    dtype = DTYPES.get(dtype_name, torch.float32)
    model = load_model(MODEL, device="cuda", dtype=dtype)
    interval = dict(guidance_start=model.default_guidance_start, guidance_stop=model.default_guidance_stop)
    ours = pixels(generate(model, request(sampler, sampler=sampler, num_inference_steps=20, num_images=1, **interval)))
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, dtype=dtype, safety_checker=None).to("cuda")
    pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pixels(
        pipeline_images_with_interval(
            pipe,
            PROMPT,
            steps=20,
            seed=1234,
            guidance_scale=7.5,
            start=interval["guidance_start"],
            stop=interval["guidance_stop"],
        )
    )
    measured = psnr(ours, theirs)
    print(
        f"\n[{torch.cuda.get_device_name()}] engine {dtype_name} {sampler} 20 vs its pipeline: PSNR {measured:.1f} dB"
    )
    assert np.isfinite(ours).all()
    assert measured >= 40


def scene() -> Image.Image:
    """A shapes-world picture of the model's native size: a red square on a white background."""
    array = np.full((64, 64, 3), 255, np.uint8)
    array[16:48, 16:48] = [220, 30, 30]
    return Image.fromarray(array)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_cuda_image_to_image_matches_diffusers_pipeline_in_float16(mode):
    """Image to image (strength 0.6) and inpainting (strength 0.8, the middle repainted) in float16 against
    StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline in float16 (latentd's VAE stays float32)."""
    import diffusers

    image = scene()
    mask = None
    if mode == "inpaint":
        array = np.zeros((64, 64), np.uint8)
        array[8:56, 8:56] = 255
        mask = Image.fromarray(array)
    strength = 0.6 if mode == "img2img" else 0.8
    model = load_model(MODEL, device="cuda", dtype=torch.float16)
    ours = pixels(generate(model, request(mode, image=image, mask=mask, strength=strength)))
    name = "StableDiffusionImg2ImgPipeline" if mode == "img2img" else "StableDiffusionInpaintPipeline"
    pipe = getattr(diffusers, name).from_pretrained(MODEL, dtype=torch.float16, safety_checker=None).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    extra = {"mask_image": mask} if mask is not None else {}
    theirs = pixels(
        pipe(
            PROMPT,
            image=image,
            strength=strength,
            num_inference_steps=50,
            guidance_scale=7.5,
            num_images_per_prompt=2,
            generator=torch.Generator("cpu").manual_seed(1234),
            **extra,
        ).images
    )
    measured = psnr(ours, theirs)
    print(f"\n[{torch.cuda.get_device_name()}] engine float16 {mode} vs {name} float16: PSNR {measured:.1f} dB")
    assert np.isfinite(ours).all()
    assert measured >= 40


def generate_captions(model) -> np.ndarray:
    engine = Engine(model).start()
    try:
        handles = [
            engine.submit(request(f"c{i}", prompt=caption, seed=i)) for i, caption in enumerate(SPOT_CHECK_CAPTIONS)
        ]
        return np.stack([np.asarray(image) for handle in handles for image in handle.result(120).images])
    finally:
        engine.stop()


def right_count(pictures: np.ndarray) -> int:
    """Pictures whose read-back (training/readback.py) matches their caption in all three attributes."""
    from training.readback import read_back
    from training.shapes import parse_caption

    wanted = [parse_caption(caption) for caption in SPOT_CHECK_CAPTIONS for _ in range(2)]
    return sum(
        all(read_back(picture).matches(w["colour"], w["shape"], w["background"]).values())
        for picture, w in zip(pictures, wanted)
    )


@pytest.fixture(scope="module")
def float32_pictures():
    """CUDA float32 (TF32 convolutions, PyTorch's default) and, for the record, CPU float32."""
    cuda = generate_captions(load_model(MODEL, device="cuda", dtype=torch.float32))
    cpu = generate_captions(load_model(MODEL))
    print(
        f"\n[{torch.cuda.get_device_name()}] float32 CUDA vs float32 CPU: PSNR {psnr(cuda / 255, cpu / 255):.1f} dB, "
        f"right {right_count(cuda)}/{len(cuda)} (CUDA) and {right_count(cpu)}/{len(cpu)} (CPU)"
    )
    return cuda


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_cuda_half_precision_draws_what_float32_draws(dtype_name, float32_pictures):
    """DDIM at eta 0 is deterministic but not contractive: rounding can move a shape, so pictures in
    half precision are compared with float32 by what they show (read-back), and by PSNR for the record."""
    half = generate_captions(load_model(MODEL, device="cuda", dtype=DTYPES[dtype_name]))
    right_half, right_full = right_count(half), right_count(float32_pictures)
    print(
        f"\n[{torch.cuda.get_device_name()}] engine {dtype_name} vs float32 on CUDA: "
        f"PSNR {psnr(half / 255, float32_pictures / 255):.1f} dB; right {right_half}/{len(half)} vs {right_full}/{len(half)}"
    )
    assert right_half >= right_full - 1


def test_cuda_batch_invariance():
    """A request alone and among others with other settings: half-precision kernels change with the
    batch shape, so the bar is a PSNR, not the CPU tests' 1/255."""
    model = load_model(MODEL, device="cuda", dtype=torch.float16)
    target = request("target", seed=7)
    alone = pixels(generate(model, target))
    engine = Engine(model, max_batch_rows=12).start()
    try:
        others = [
            engine.submit(
                request(
                    f"other-{i}",
                    prompt=f"a small {colour} square on a gray background",
                    seed=100 + i,
                    num_inference_steps=steps,
                    guidance_scale=scale,
                )
            )
            for i, (colour, steps, scale) in enumerate(
                [("blue", 20, 1.0), ("green", 35, 3.0), ("yellow", 50, 15.0), ("purple", 10, 0.0)]
            )
        ]
        batched = pixels(engine.submit(target).result(120).images)
        for handle in others:
            handle.result(120)
    finally:
        engine.stop()
    measured = psnr(alone, batched)
    print(f"\n[{torch.cuda.get_device_name()}] float16 alone vs batched among 4 others: PSNR {measured:.1f} dB")
    assert measured >= 35


def test_cuda_out_of_memory_lowers_the_caps_and_loses_no_request():
    """A real CUDA OutOfMemoryError: the allocator capped (set_per_process_memory_fraction) a quarter of the way
    from what one 2-row request needs to what 32 of them in one call need; the 32 again: none fails, the backbone's
    row cap or the decode's comes down, and a request's pictures are the ones it got before (PSNR, as batch
    invariance in half precision)."""
    import threading

    model = load_model(MODEL, device="cuda", dtype=torch.float16)
    engine = Engine(model, max_batch_rows=64).start()
    requests = [request(f"m{i}", seed=i, num_images=1, num_inference_steps=4) for i in range(32)]  # 2 rows each

    def all_at_once():
        gate = threading.Event()
        engine.call(lambda _: gate.wait(30))  # every request joins the first call: 64 rows
        handles = [engine.submit(r) for r in requests]
        gate.set()
        return [pixels(handle.result(120).images) for handle in handles]

    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        engine.submit(request("one", num_images=1, num_inference_steps=4)).result(120)
        one = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        before = all_at_once()
        many = torch.cuda.max_memory_allocated()
        assert engine.row_cap.rows == 64 and many > one
        torch.cuda.empty_cache()
        limit = one + (many - one) // 4
        torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
        after = all_at_once()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        engine.stop()
    measured = min(psnr(a, b) for a, b in zip(before, after))
    print(
        f"\n[{torch.cuda.get_device_name()}] CUDA OOM: {one / 2**20:.0f} MiB for one request, {many / 2**20:.0f} MiB for "
        f"32 in one call, capped at {limit / 2**20:.0f} MiB: rows per call {engine.row_cap.rows}, images per decode "
        f"{engine.decode_cap.rows}; 32 of 32 succeeded, min PSNR vs uncapped {measured:.1f} dB"
    )
    assert engine.row_cap.rows < 64 or engine.decode_cap.rows < 16
    assert measured >= 35
