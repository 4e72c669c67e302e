"""Image to image and inpainting through the engine, against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (4-channel and 9-channel UNets) with the scheduler swapped as a pipeline user
would: alone, and batched with text-to-image requests in the same UNet calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from services.common import rules
from services.worker.diffusion.samplers import diffusers_scheduler
from services.worker.engine.engine import Engine
from services.worker.engine.errors import InvalidRequestError
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import load_model
from services.worker.runtime import model_info
from tests.fixtures.pictures import pixels, psnr
from tests.fixtures.tiny_model import NATIVE_SIZE, build_tiny_model

PROMPT = "a red circle"
STEPS = 10
# deterministic, multistep, drawing noise (in the model's dtype, in float32), a corrector, consistency sampling,
# two calls per step (the trapezoid, the midpoint)
SAMPLERS = ("ddim", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "unipc", "lcm", "heun", "dpm2", "dpm2_ancestral")
INPAINT_SAMPLERS = tuple(s for s in SAMPLERS if s != "dpm2")  # dpm2: test_dpm2_inpainting_blends_at_the_midpoint


def picture(seed: int = 0, size: int = NATIVE_SIZE) -> Image.Image:
    """A picture with structure: a gradient, a square of another colour, some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    array = np.stack([x, y, 1 - x], axis=-1) * 200
    array[size // 4 : size // 2, size // 3 : 3 * size // 4] = [230, 40, 30]
    array += rng.normal(0, 10, array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def square_mask(size: int = NATIVE_SIZE) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 8 : size // 2] = 255
    return Image.fromarray(mask)


def request(request_id: str, **overrides) -> GenerationRequest:
    fields = dict(prompt=PROMPT, seed=1234, num_inference_steps=STEPS, guidance_scale=7.5)
    fields.update(overrides)
    return GenerationRequest(request_id=request_id, **fields)


def pipeline(cls, folder, sampler: str):
    pipe = cls.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs(pipe, seed=1234, steps=STEPS, **kwargs):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, generator=generator, **kwargs).images


def run_batched(model, targets: list[GenerationRequest]) -> dict[str, list[Image.Image]]:
    """The targets submitted together with text-to-image requests of other samplers, steps and guidance, all
    admitted in the same iteration, so they share every UNet call while they run."""
    others = [
        request("t2i-0", prompt="a blue square", seed=5, sampler="ddim", num_inference_steps=12, num_images=2),
        request("t2i-1", prompt="green", seed=6, sampler="euler_ancestral", num_inference_steps=7, guidance_scale=1.0),
        request("t2i-2", prompt="", seed=7, sampler="dpmpp_2m", num_inference_steps=9, guidance_scale=3.0),
    ]
    engine = Engine(model)
    handles = [engine.submit(r) for r in [others[0], *targets, *others[1:]]]
    engine.start()
    try:
        results = [h.result(120) for h in handles]
    finally:
        engine.stop()
    return {r.request_id: r.images for r in results}


@pytest.fixture(scope="module")
def inpaint_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-inpaint", seed=4, inpainting=True)


@pytest.fixture(scope="module")
def inpaint_model(inpaint_model_path):
    return load_model(inpaint_model_path)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_image_to_image_parity(make_engine, tiny_model, tiny_model_path, sampler):
    """Same seed, same picture as StableDiffusionImg2ImgPipeline (2 images, strength 0.6), alone and batched
    with text-to-image requests; a wrong strength or seed does not match (the comparison can fail)."""
    pipe = pipeline(StableDiffusionImg2ImgPipeline, tiny_model_path, sampler)
    image = picture()
    expected = theirs(pipe, image=image, strength=0.6, num_images_per_prompt=2)
    target = request("i2i", sampler=sampler, image=image, strength=0.6, num_images=2)
    alone = make_engine().submit(target).result(60).images
    assert psnr(alone, expected) >= 40
    batched = run_batched(tiny_model, [target])["i2i"]
    assert psnr(batched, expected) >= 40
    assert psnr(alone, theirs(pipe, image=image, strength=0.9, num_images_per_prompt=2)) < 30
    assert psnr(alone, theirs(pipe, seed=99, image=image, strength=0.6, num_images_per_prompt=2)) < 30


@pytest.mark.parametrize("strength", [0.25, 1.0])
def test_image_to_image_strengths(make_engine, tiny_model_path, strength):
    """The ends: a few steps from a lightly noised picture, and strength 1 (all steps, from the picture noised
    to the first timestep, as the pipeline: not pure noise)."""
    pipe = pipeline(StableDiffusionImg2ImgPipeline, tiny_model_path, "ddim")
    image = picture(3)
    ours = make_engine().submit(request("i2i", image=image, strength=strength, seed=8)).result(60)
    assert psnr(ours.images, theirs(pipe, seed=8, image=image, strength=strength)) >= 40


@pytest.mark.parametrize("sampler", INPAINT_SAMPLERS)
def test_inpainting_parity_ordinary_unet(make_engine, tiny_model, tiny_model_path, sampler):
    """A 4-channel UNet: the kept part blended back in after every step, as StableDiffusionInpaintPipeline;
    at strength 0.7 and 1 (pure noise start), alone and batched; outside the mask the picture is kept."""
    pipe = pipeline(StableDiffusionInpaintPipeline, tiny_model_path, sampler)
    image, mask = picture(1), square_mask()
    for strength in (0.7, 1.0):
        expected = theirs(pipe, image=image, mask_image=mask, strength=strength, num_images_per_prompt=2)
        target = request("inpaint", sampler=sampler, image=image, mask=mask, strength=strength, num_images=2)
        alone = make_engine().submit(target).result(60).images
        assert psnr(alone, expected) >= 40, strength
        assert psnr(run_batched(tiny_model, [target])["inpaint"], expected) >= 40, strength
    # without the blend (plain image to image) the picture is far from the pipeline's
    plain = make_engine().submit(request("i2i", sampler=sampler, image=image, strength=1.0, num_images=2)).result(60)
    assert psnr(plain.images, expected) < 30


def from_its_own_start(pipe, start: int):
    """PLMS: the pipeline with PNDM started as latentd starts it at step `start`: its get_timesteps gives the calls of
    a text-to-image run from there (step start + 1 twice) instead of PNDM's n + 1 timesteps cut at `start`. (diffusers'
    cut has no doubled step from start ≥ 2, and its ratio arithmetic then steps a sample one timestep behind the one
    it names.)"""

    def get_timesteps(num_inference_steps, strength, device):
        listed = pipe.scheduler.timesteps.tolist()  # t_0, t_1, t_1, t_2, ...: the distinct ones are these
        distinct = [listed[0], *listed[2:]]
        calls = distinct[start : start + 1] + distinct[start + 1 :][:1] + distinct[start + 1 :]
        return torch.tensor(calls, device=device), len(calls)

    pipe.get_timesteps = get_timesteps
    return pipe


def order_from_its_own_updates(pipe, start: int):
    """LMS: the pipeline with LMSDiscreteScheduler's order counted from the slopes it has (one more), as latentd
    counts it, instead of from its step index (which the img2img pipelines start at `start`, their begin index: from
    start ≥ 3 it weighs its first slope as a fourth-order step's)."""
    scheduler, original = pipe.scheduler, pipe.scheduler.step

    def step(model_output, timestep, sample, order=4, **kwargs):
        return original(model_output, timestep, sample, order=min(len(scheduler.derivatives) + 1, order), **kwargs)

    scheduler.step = step
    return pipe


@pytest.mark.parametrize("cls", [StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline])
@pytest.mark.parametrize(
    "sampler,as_latentd_starts", [("plms", from_its_own_start), ("lms", order_from_its_own_updates)]
)
def test_multistep_image_to_image_starts_as_text_to_image_would(
    make_engine, tiny_model, tiny_model_path, cls, sampler, as_latentd_starts
):
    """A request starting at step k runs as text to image runs from step 0 (PLMS doubles its step k + 1, LMS starts at
    first order), where diffusers' img2img and inpaint pipelines do not (as_latentd_starts says how): the pipeline
    changed to start as latentd does is the reference, alone and batched, and the closer by far; at strength 1 the
    two agree and the plain pipeline is matched."""
    image, mask = picture(6), square_mask()
    inputs = dict(image=image) | (dict(mask_image=mask) if cls is StableDiffusionInpaintPipeline else {})
    fields = dict(image=image) | (dict(mask=mask) if cls is StableDiffusionInpaintPipeline else {})
    start = rules.start_step(STEPS, 0.6, sampler)
    expected = theirs(as_latentd_starts(pipeline(cls, tiny_model_path, sampler), start), strength=0.6, **inputs)
    target = request("target", sampler=sampler, strength=0.6, **fields)
    alone = make_engine().submit(target).result(60).images
    assert psnr(alone, expected) >= 40
    assert psnr(run_batched(tiny_model, [target])["target"], expected) >= 40
    plain = theirs(pipeline(cls, tiny_model_path, sampler), strength=0.6, **inputs)
    matched, unmatched = psnr(alone, expected), psnr(alone, plain)
    print(f"\n{cls.__name__} {sampler} at 0.6: {matched:.1f} dB to the reference, {unmatched:.1f} to the plain one")
    assert matched >= unmatched + 10
    full = make_engine().submit(request("full", sampler=sampler, strength=1.0, **fields)).result(60).images
    assert psnr(full, theirs(pipeline(cls, tiny_model_path, sampler), strength=1.0, **inputs)) >= 40


def test_dpm2_inpainting_blends_at_the_midpoint(make_engine, tiny_model, tiny_model_path):
    """With a 4-channel UNet the kept part is blended in after every call, noised to the level of the sample it
    joins. After DPM-Solver-2's first call the sample is at the midpoint σ̂', but KDPM2DiscreteScheduler.add_noise
    takes sigmas[step_index], the step's end σ̂_{i+1}, so StableDiffusionInpaintPipeline blends the kept part at
    another level than the rest for the second call; latentd blends at the sample's own. The pipeline with add_noise
    at the midpoint there (sigmas_interpol) is the reference, alone and batched, and the closer by far."""
    image, mask = picture(1), square_mask()
    pipe = pipeline(StableDiffusionInpaintPipeline, tiny_model_path, "dpm2")
    scheduler, add_noise = pipe.scheduler, pipe.scheduler.add_noise

    def at_the_samples_level(original_samples, noise, timesteps):
        if scheduler.step_index is not None and not scheduler.state_in_first_order:  # after a first call
            return original_samples + noise * scheduler.sigmas_interpol[scheduler.step_index]
        return add_noise(original_samples, noise, timesteps)

    plain = theirs(pipe, image=image, mask_image=mask, strength=0.7, num_images_per_prompt=2)
    scheduler.add_noise = at_the_samples_level
    expected = theirs(pipe, image=image, mask_image=mask, strength=0.7, num_images_per_prompt=2)
    target = request("inpaint", sampler="dpm2", image=image, mask=mask, strength=0.7, num_images=2)
    alone = make_engine().submit(target).result(60).images
    assert psnr(alone, expected) >= 40
    assert psnr(run_batched(tiny_model, [target])["inpaint"], expected) >= 40
    matched, unmatched = psnr(alone, expected), psnr(alone, plain)
    print(f"\ndpm2 inpainting at 0.7: {matched:.1f} dB to the reference, {unmatched:.1f} to the plain pipeline")
    assert matched >= unmatched + 10


def test_inpainting_keeps_what_the_mask_keeps(make_engine):
    """Where the mask is black the result is the picture's own latents decoded; the repainted square moves."""
    engine = make_engine()
    image, mask = picture(2), square_mask()
    a = engine.submit(request("a", image=image, mask=mask, seed=1)).result(60).images[0]
    b = engine.submit(request("b", image=image, mask=mask, seed=2)).result(60).images[0]
    inside = np.asarray(square_mask()) > 127
    diff = np.abs(pixels([a])[0] - pixels([b])[0]).max(axis=-1)
    far_outside = np.ones_like(inside)
    far_outside[NATIVE_SIZE // 8 : 7 * NATIVE_SIZE // 8, :] = False  # away from the mask's edge (VAE receptive field)
    assert diff[inside].mean() > 5 * diff[far_outside].mean()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_inpainting_parity_nine_channel_unet(inpaint_model, inpaint_model_path, sampler):
    """A 9-channel inpainting UNet: mask and masked picture's latents as extra input channels; at strength 0.6
    and 1, alone and batched with text-to-image requests (which the model runs as its pipeline does with a
    white mask)."""
    pipe = pipeline(StableDiffusionInpaintPipeline, inpaint_model_path, sampler)
    image, mask = picture(4), square_mask()
    engine = Engine(inpaint_model).start()
    try:
        for strength in (0.6, 1.0):
            expected = theirs(pipe, image=image, mask_image=mask, strength=strength, num_images_per_prompt=2)
            target = request("inpaint", sampler=sampler, image=image, mask=mask, strength=strength, num_images=2)
            assert psnr(engine.submit(target).result(60).images, expected) >= 40, strength
            assert psnr(run_batched(inpaint_model, [target])["inpaint"], expected) >= 40, strength
        # text to image on an inpainting model: the pipeline with a white mask (any picture)
        white = Image.new("L", (NATIVE_SIZE, NATIVE_SIZE), 255)
        expected = theirs(pipe, seed=3, image=picture(9), mask_image=white)
        ours = engine.submit(request("t2i", sampler=sampler, seed=3)).result(60).images
        assert psnr(ours, expected) >= 40
    finally:
        engine.stop()


def test_steps_count_what_runs_and_trajectory_starts_noised(make_engine, tiny_model):
    """An image-to-image request makes int(steps·strength) updates: its events count them, and its reverse
    trajectory's first x_t is the picture noised to the start step (ᾱ of that timestep), not static."""
    engine = make_engine()
    image = picture(5)
    handle = engine.submit(request("i2i", image=image, strength=0.5, num_inference_steps=10, trajectory_every=1))
    events = list(handle.events(timeout=60))
    result = handle.result(60)
    assert [e.step for e in events] == [1, 2, 3, 4, 5] and {e.total for e in events} == {5}
    plan = engine.samplers["ddim"].plan(10)
    assert [e.timestep for e in events] == [int(t) for t in plan.timesteps[5:]]
    first = result.frames[0]
    assert first.alpha_bar == pytest.approx(plan.alpha_bar(5))
    # the noised start still shows the picture (high ᾱ): closer to it than pure noise's decoding is
    noise_start = make_engine().submit(request("t2i", trajectory_every=1)).result(60).frames[0]
    assert psnr(first.x_t, [image]) > psnr(noise_start.x_t, [image])


@pytest.mark.parametrize(
    "overrides,field,message",
    [
        (dict(image=picture(size=20)), "image", "image is 20x20: width must be a multiple of 8"),
        (dict(image=picture(), width=64), "width", "width must be the image's width (32)"),
        (dict(image=picture(), mask=square_mask(64)), "mask", "mask must be the image's size (32x32), got 64x64"),
        (dict(mask=square_mask()), "mask", "mask applies to image to image only"),
        (dict(strength=0.5), "strength", "strength applies to image to image only"),
        (dict(image=picture(), strength=1.5), "strength", "strength must be between 0 and 1"),
        (dict(image=picture(), strength=0.05), "strength", "strength must leave at least one"),
        (dict(image="not a picture"), "image", "image must be a picture"),
        (
            dict(image=picture(), strength=0.3, preview_every=4),
            "preview_every",
            "preview_every must be between 0 and the steps it runs at its strength (3)",
        ),
    ],
)
def test_bad_image_input_is_named(make_engine, overrides, field, message):
    with pytest.raises(InvalidRequestError) as error:
        make_engine().submit(request("bad", **overrides))
    assert error.value.field == field and message in str(error.value)


def test_a_nine_channel_model_warms_up_with_its_extra_channels(inpaint_model):
    """The worker warms every engine up before serving (compiled.warm_up): the backbone call gets the mask and
    masked-latents channels a 9-channel UNet needs."""
    engine = Engine(inpaint_model, buckets=(1, 2))
    try:
        seconds = engine.warm_up(timeout=120)
        assert seconds["backbone_s"] > 0
    finally:
        engine.stop()


def test_params_are_listed_where_read(make_engine, tiny_model, inpaint_model):
    """The SD family reads image, strength and mask (GET /v1/models `params`); the start step is
    get_timesteps' arithmetic."""
    info = model_info(tiny_model, make_engine())
    assert set(rules.IMAGE_PARAMS) <= set(info.params)
    assert model_info(inpaint_model, make_engine(inpaint_model)).pipeline == "StableDiffusionInpaintPipeline"
    assert [rules.start_step(50, s) for s in (1.0, 0.8, 0.6, 0.01, 0.0)] == [0, 10, 20, 50, 50]
