"""SDXL, SD3 and Flux through the engine against their diffusers pipelines, on tiny models built from config
(tests/fixtures/tiny_families.py): one request alone gives the pipeline's latents (SD3 and Flux bit for bit on the
CPU in float32; SDXL within the DDIM update's float64 rounding), image to image and inpainting give their
image-to-image and inpainting pipelines' latents, batched requests give their alone pictures within 1/255, and
what does not apply to a family is refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from PIL import Image

from services.common import rules
from services.worker.diffusion.samplers import diffusers_scheduler
from services.worker.engine.engine import Engine
from services.worker.engine.errors import InvalidRequestError
from services.worker.engine.requests import GenerationRequest
from services.worker.families.flow import latent_image_ids, pack_latents, unpack_latents
from services.worker.loading import ModelLoadError, load_model, to_pil
from services.worker.trajectories import _noised, noise_levels
from tests.fixtures.pictures import pixels, psnr
from tests.fixtures.tiny_families import NATIVE_SIZE, T5_MAX_LENGTH

PIPELINES = {
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "flux-schnell": FluxPipeline,
}
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def models(family_paths):
    return {name: load_model(path) for name, path in family_paths.items()}


@pytest.fixture(scope="module")
def pipes(family_paths):
    loaded = {}
    for name, path in family_paths.items():
        pipe = PIPELINES[name].from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        loaded[name] = pipe
    return loaded


@pytest.fixture
def engines():
    started = []

    def make(model, **kwargs) -> Engine:
        started.append(Engine(model, **kwargs).start())
        return started[-1]

    yield make
    for engine in started:
        engine.stop()


def pipeline_kwargs(name: str, width: int = NATIVE_SIZE, height: int = NATIVE_SIZE) -> dict:
    """What the pipelines need besides the request: the fixtures' short T5 sequence, Flux's size."""
    if name == "sdxl":
        return {}
    kwargs = {"max_sequence_length": T5_MAX_LENGTH}
    if name.startswith("flux"):
        kwargs |= {"width": width, "height": height}
    return kwargs


def theirs(pipe, name: str, seed: int, width: int = NATIVE_SIZE, height: int = NATIVE_SIZE, **kwargs):
    """(latents (n, C, h, w), pictures) of the pipeline; Flux's latents unpacked."""
    common = dict(**pipeline_kwargs(name, width, height), **kwargs)
    latents = pipe(PROMPT, output_type="latent", generator=torch.Generator("cpu").manual_seed(seed), **common).images
    if name.startswith("flux"):
        latents = FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    images = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **common).images
    return latents, images


def ours(engine: Engine, **fields):
    """(final latents, result) of one request run alone: the latents as the engine hands them to the VAE."""
    request = GenerationRequest(request_id=fields.pop("request_id", "r"), prompt=fields.pop("prompt", PROMPT), **fields)
    return engine.submit(request).result(120)


def capturing(model):
    """A copy of the model whose decode_latents keeps what it decodes (the first call: a request alone)."""
    seen: list[torch.Tensor] = []
    copy = dataclasses.replace(model)

    def decode(latents):
        seen.append(latents.clone())
        return model.decode_latents(latents)

    copy.decode_latents = decode
    return copy, seen


def levels_apart(a, b) -> int:
    """The largest difference between two lists of pictures, in 8-bit levels (1 level = 1/255)."""
    return int(
        np.abs(np.stack([np.asarray(i, np.int16) for i in a]) - np.stack([np.asarray(i, np.int16) for i in b])).max()
    )


# ---- what each family is ------------------------------------------------------------------------


def test_each_family_loads_with_its_facts(models):
    sdxl, sd3, flux, schnell = models["sdxl"], models["sd3"], models["flux"], models["flux-schnell"]
    assert [m.family.name for m in (sdxl, sd3, flux, schnell)] == ["sdxl", "sd3", "flux", "flux"]
    assert sdxl.prediction_type == "epsilon" and sd3.prediction_type == flux.prediction_type == "flow"
    assert sdxl.alphas_cumprod is not None and sd3.alphas_cumprod is None and flux.alphas_cumprod is None
    assert (sdxl.default_sampler, sd3.default_sampler, flux.default_sampler) == ("ddim", "flow_euler", "flow_euler")
    assert (sdxl.default_guidance_scale, sd3.default_guidance_scale, flux.default_guidance_scale) == (5.0, 7.0, 3.5)
    assert (sdxl.default_num_inference_steps, sd3.default_num_inference_steps) == (50, 28)
    for model in models.values():
        assert (model.native_width, model.native_height, model.vae_scale_factor) == (32, 32, 4)
        assert model.size_multiple == 8  # SDXL: 4 x 2 (UNet levels); SD3: 4 x patch 2; Flux: 4 x 2 (packing)
    assert sdxl.max_prompt_tokens == 77 and sd3.max_prompt_tokens == flux.max_prompt_tokens == T5_MAX_LENGTH
    assert (sd3.scaling.shift_factor, flux.scaling.shift_factor, sdxl.scaling.shift_factor) == (0.0609, 0.1159, 0.0)
    assert (sdxl.facts.guidance_form, sd3.facts.guidance_form) == ("cfg", "cfg")
    assert (flux.facts.guidance_form, schnell.facts.guidance_form) == ("distilled", "none")
    assert "crop_top" in sdxl.facts.params and "true_cfg_scale" in flux.facts.params
    assert "guidance_scale" in flux.facts.params and "guidance_scale" not in schnell.facts.params
    assert not {"eta", "guidance_rescale", "true_cfg_scale", "crop_top"} & set(sd3.facts.params)


def test_an_unsupported_pipeline_is_refused_naming_it(family_paths, tmp_path):
    folder = shutil.copytree(family_paths["sd3"], tmp_path / "upscaler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionUpscalePipeline"}))
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert "'StableDiffusionUpscalePipeline'" in message and "is not supported" in message
    for supported in (
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
    ):
        assert supported in message


def test_a_family_without_a_part_it_needs_is_refused(family_paths, tmp_path):
    folder = shutil.copytree(family_paths["sd3"], tmp_path / "no-t5")
    shutil.rmtree(folder / "text_encoder_3")
    with pytest.raises(ModelLoadError, match="is missing text_encoder_3/"):
        load_model(folder)


# ---- one request alone = the pipeline ------------------------------------------------------------


@pytest.mark.parametrize(
    "name,fields",
    [
        ("sd3", dict(guidance_scale=4.0)),  # CFG: unconditional row of the empty negative prompt
        ("sd3", dict(guidance_scale=1.0, num_images=2)),  # s <= 1: the conditional rows only, as the pipeline
        ("flux", dict(guidance_scale=3.5)),  # distilled guidance
        ("flux", dict(guidance_scale=5.0, num_images=2)),
        ("flux-schnell", dict(guidance_scale=0.0)),
    ],
)
def test_a_flow_request_alone_is_the_pipeline_bit_for_bit(models, pipes, engines, name, fields):
    model, seen = capturing(models[name])
    result = ours(engines(model), seed=11, num_inference_steps=5, **fields)
    pipe_fields = {k: v for k, v in fields.items() if k != "num_images"}
    latents, images = theirs(
        pipes[name], name, 11, num_inference_steps=5, num_images_per_prompt=fields.get("num_images", 1), **pipe_fields
    )
    assert torch.equal(seen[0], latents)
    assert np.array_equal(pixels(result.images), pixels(images))


@pytest.mark.parametrize(
    "fields,pipe_fields",
    [
        (dict(guidance_scale=5.0), dict(guidance_scale=5.0)),  # empty negative: zeros, not the encoding of ""
        (
            dict(guidance_scale=6.0, eta=0.7, crop_top=8, crop_left=4, original_width=64, original_height=48),
            dict(guidance_scale=6.0, eta=0.7, crops_coords_top_left=(8, 4), original_size=(48, 64)),
        ),
        (
            dict(guidance_scale=4.0, negative_prompt="blue", target_width=24, target_height=40, num_images=2),
            dict(guidance_scale=4.0, negative_prompt="blue", target_size=(40, 24), num_images_per_prompt=2),
        ),
        (dict(guidance_scale=1.0), dict(guidance_scale=1.0)),  # s <= 1: conditional rows only
    ],
)
def test_an_sdxl_request_alone_is_the_pipeline(models, pipes, engines, fields, pipe_fields):
    """The engine's DDIM update runs in float64 and rounds once, so latents agree to float32 rounding; the
    pictures to PSNR >= 40 dB (here: the same pixels)."""
    model, seen = capturing(models["sdxl"])
    result = ours(engines(model), seed=5, num_inference_steps=6, **fields)
    latents, images = theirs(pipes["sdxl"], "sdxl", 5, num_inference_steps=6, **pipe_fields)
    assert (seen[0] - latents).abs().max() < 1e-4
    assert psnr(result.images, images) >= 40


def pipe_with(family_paths, name: str, sampler: str):
    """A fresh pipeline of the family with its scheduler swapped for `sampler`'s, as a user would."""
    pipe = PIPELINES[name].from_pretrained(family_paths[name])
    pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "unipc", "lcm", "plms"])
def test_an_sdxl_request_with_another_sampler_is_the_pipeline_with_that_scheduler(
    models, family_paths, engines, sampler
):
    """The samplers are the seam's, whatever the family: SDXL with the SDE solver (a noise draw per step from the
    request's generator), UniPC (a corrector's state), LCM (SDXL with the LCM-LoRA fused in is an SDXL model) and
    PLMS (a model call more than its steps) against StableDiffusionXLPipeline with the scheduler swapped; another scheduler ends elsewhere, so the
    comparison can fail."""
    model, seen = capturing(models["sdxl"])
    result = ours(engines(model), seed=5, num_inference_steps=6, guidance_scale=5.0, sampler=sampler)
    latents, images = theirs(
        pipe_with(family_paths, "sdxl", sampler), "sdxl", 5, num_inference_steps=6, guidance_scale=5.0
    )
    assert (seen[0] - latents).abs().max() < 1e-4
    assert psnr(result.images, images) >= 40
    other, _ = theirs(pipe_with(family_paths, "sdxl", "dpmpp_2m"), "sdxl", 5, num_inference_steps=6, guidance_scale=5.0)
    assert (other - latents).abs().max() > 1e-2


def test_an_sdxl_v_prediction_model_at_zero_terminal_snr_is_its_pipeline(family_paths, engines, tmp_path):
    """The folder of an SDXL fine-tune trained with v-prediction at zero terminal SNR (as NoobAI-XL v-pred ships
    it): EulerDiscreteScheduler with rescale_betas_zero_snr and trailing spacing, so `euler` is its default; with
    guidance rescale 0.7, as the paper recommends, against StableDiffusionXLPipeline loaded from the folder."""
    folder = tmp_path / "sdxl-vpred"
    shutil.copytree(family_paths["sdxl"], folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    diffusers.EulerDiscreteScheduler.from_config(
        config, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    ).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    model, seen = capturing(load_model(folder))
    assert model.default_sampler == "euler" and model.prediction_type == "v_prediction"
    fields = dict(num_inference_steps=6, guidance_scale=5.0, guidance_rescale=0.7)
    result = ours(engines(model), seed=5, **fields)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents, images = theirs(pipe, "sdxl", 5, **fields)
    assert (seen[0] - latents).abs().max() < 1e-4
    assert psnr(result.images, images) >= 40


def test_sdxl_empty_negative_is_zeros(models):
    model = models["sdxl"]
    encoded = model.encode_prompts([""])[0]
    zeros = model.uncond_conditioning("", encoded)
    assert set(zeros) == {"encoder_hidden_states", "text_embeds"}
    assert all(not value.any() for value in zeros.values())
    assert model.uncond_conditioning("blue", encoded) is encoded


# ---- batched = alone --------------------------------------------------------------------------------

BATCH = [  # different seeds, steps, guidance and image counts, one model, one latent size
    dict(seed=1, num_inference_steps=4, guidance_scale=1.0),
    dict(seed=2, num_inference_steps=7, guidance_scale=4.0, num_images=2),
    dict(seed=3, num_inference_steps=5, guidance_scale=6.5, negative_prompt="blue"),
]


def counting_rows(model):
    """A copy of the model whose backbone calls record their row counts."""
    calls: list[int] = []
    copy = dataclasses.replace(model)

    def forward(latents, timesteps, cond):
        calls.append(latents.shape[0])
        return model.forward(latents, timesteps, cond)

    copy.forward = forward
    return copy, calls


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_batched_requests_give_their_alone_pictures(models, engines, name):
    extra = {"sdxl": dict(eta=0.5, crop_top=8), "sd3": {}, "flux": dict(true_cfg_scale=2.0)}[name]
    batch = [dict(fields, **(extra if i == 1 else {})) for i, fields in enumerate(BATCH)]
    alone = [ours(engines(models[name]), request_id=f"a{i}", **fields) for i, fields in enumerate(batch)]
    model, calls = counting_rows(models[name])
    engine = engines(model)
    handles = [engine.submit(GenerationRequest(request_id=f"b{i}", prompt=PROMPT, **f)) for i, f in enumerate(batch)]
    together = [handle.result(120) for handle in handles]
    assert max(calls) > max(2 * f.get("num_images", 1) for f in batch)  # rows of several requests in one call
    for a, b in zip(alone, together):
        assert levels_apart(a.images, b.images) <= 1


def test_sizes_mix_in_separate_calls_each_its_own_schedule(models, pipes, engines):
    """Flux at 32x32 and 48x32: different latent shapes never share a call, and each has its own μ."""
    engine = engines(models["flux"])
    square = engine.submit(GenerationRequest(request_id="sq", prompt=PROMPT, seed=4, num_inference_steps=4))
    wide = engine.submit(
        GenerationRequest(request_id="wide", prompt=PROMPT, seed=4, num_inference_steps=4, width=48, height=32)
    )
    for handle, width in ((square, 32), (wide, 48)):
        _, images = theirs(pipes["flux"], "flux", 4, width=width, height=32, num_inference_steps=4)
        picture = handle.result(120).images
        assert picture[0].size == (width, 32)
        assert levels_apart(picture, images) <= 1
    sampler = engine.samplers["flow_euler"]
    assert sampler.plan_for(4, 16).sigmas != sampler.plan_for(4, 24).sigmas  # μ follows the token count


# ---- Flux ----------------------------------------------------------------------------------------------


# ---- image to image and inpainting ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_picture():
    """A picture with structure at the tiny families' size, and a mask over its middle (white = repaint)."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray((rng.random((NATIVE_SIZE, NATIVE_SIZE, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (NATIVE_SIZE, NATIVE_SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    return picture, mask


@pytest.fixture(scope="module")
def image_pipes(models):
    """Each family's image-to-image and inpainting pipelines (Family.image_pipelines)."""
    loaded = {}
    for name in ("sdxl", "sd3", "flux"):
        model = models[name]
        for mode, class_name in zip(("img2img", "inpaint"), model.family.image_pipelines):
            loaded[name, mode] = getattr(diffusers, class_name).from_pretrained(model.path)
            loaded[name, mode].set_progress_bar_config(disable=True)
    return loaded


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_without_a_strength_a_request_gets_its_familys_pipeline_default(
    models, image_pipes, engines, start_picture, name, mode
):
    """No strength on either side: the engine fills in the model's default (SDXL 0.3 and 0.9999, SD3 and Flux 0.6:
    the pipelines' own), so a request gives the pipeline's latents called with its default strength. (The
    guidance scale is the model's on both sides: SDXL's and Flux's inpainting pipelines default to another.)"""
    picture, mask = start_picture
    fields = {"mask": mask} if mode == "inpaint" else {}
    model, seen = capturing(models[name])
    ours(engines(model), seed=2, num_inference_steps=10, image=picture, **fields)
    pipe = image_pipes[name, mode]
    kwargs = pipeline_kwargs(name) | ({"mask_image": mask} if mode == "inpaint" else {})
    kwargs["guidance_scale"] = models[name].default_guidance_scale
    generator = torch.Generator("cpu").manual_seed(2)
    latents = pipe(PROMPT, image=picture, num_inference_steps=10, generator=generator, output_type="latent", **kwargs)
    latents = latents.images
    if name == "flux":
        latents = FluxPipeline._unpack_latents(latents, NATIVE_SIZE, NATIVE_SIZE, pipe.vae_scale_factor)
    assert (seen[0] - latents).abs().max() < 1e-4
    limits = engines(models[name]).limits
    assert (limits.default_strength, limits.default_inpaint_strength) == {
        "sdxl": (0.3, 0.9999),
        "sd3": (0.6, 0.6),
        "flux": (0.6, 0.6),
    }[name]


def test_flow_pipelines_count_a_strengths_steps_their_own_way():
    """get_timesteps of the SD3 and Flux image pipelines starts at int(n − n·strength): 8 steps at 0.6 run 5
    (the DDPM-family pipelines run int(8·0.6) = 4), and any strength above 0 runs at least one."""
    assert [rules.steps_run(8, s, "flow_euler") for s in (0.6, 1.0, 0.5, 0.01, 0.0)] == [5, 8, 4, 1, 0]
    assert [rules.steps_run(8, s, "ddim") for s in (0.6, 1.0, 0.5, 0.01, 0.0)] == [4, 8, 4, 0, 0]


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
@pytest.mark.parametrize("mode,strength", [("img2img", 0.6), ("inpaint", 0.6), ("inpaint", 1.0)])
def test_image_to_image_and_inpainting_are_each_familys_pipeline(
    models, image_pipes, engines, start_picture, name, mode, strength
):
    """Same seed, picture, mask and strength: the pipeline's final latents (SD3 and Flux bit for bit on the CPU;
    SDXL within its DDIM update's float64 rounding), the pipeline's picture within one 8-bit level, and another
    strength's latents far off (the comparison can fail).
    StableDiffusion3InpaintPipeline decodes without the VAE's shift_factor (diffusers issue #13611, fixed by pull
    request #14671), so there the pictures are compared with its latents decoded as its other pipelines do."""
    picture, mask = start_picture
    fields = dict(num_inference_steps=8, guidance_scale=4.0, image=picture, strength=strength)
    fields |= {"mask": mask} if mode == "inpaint" else {}
    model, seen = capturing(models[name])
    result = ours(engines(model), seed=3, **fields)
    pipe = image_pipes[name, mode]
    pipe_fields = dict(num_inference_steps=8, guidance_scale=4.0, image=picture, **pipeline_kwargs(name))
    pipe_fields |= {"mask_image": mask} if mode == "inpaint" else {}

    def their_latents(strength):
        generator = torch.Generator("cpu").manual_seed(3)
        latents = pipe(PROMPT, strength=strength, generator=generator, output_type="latent", **pipe_fields).images
        if name == "flux":
            latents = FluxPipeline._unpack_latents(latents, NATIVE_SIZE, NATIVE_SIZE, pipe.vae_scale_factor)
        return latents

    latents = their_latents(strength)
    if name == "sdxl":
        assert (seen[0] - latents).abs().max() < 1e-4
    else:
        assert torch.equal(seen[0], latents)
    if (name, mode) == ("sd3", "inpaint"):
        images = to_pil(models[name].decode_latents(latents))
    else:
        images = pipe(PROMPT, strength=strength, generator=torch.Generator("cpu").manual_seed(3), **pipe_fields).images
    assert levels_apart(result.images, images) <= 1
    assert (seen[0] - their_latents(strength - 0.2)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_image_requests_batched_with_text_to_image_give_their_alone_pictures(models, engines, start_picture, name):
    picture, mask = start_picture
    batch = [
        dict(seed=1, num_inference_steps=6, guidance_scale=4.0, image=picture, strength=0.7),
        dict(seed=2, num_inference_steps=5, guidance_scale=4.0),
        dict(seed=3, num_inference_steps=7, guidance_scale=4.0, image=picture, mask=mask, strength=0.9),
    ]
    alone = [ours(engines(models[name]), request_id=f"a{i}", **fields) for i, fields in enumerate(batch)]
    model, calls = counting_rows(models[name])
    engine = engines(model)
    handles = [engine.submit(GenerationRequest(request_id=f"b{i}", prompt=PROMPT, **f)) for i, f in enumerate(batch)]
    together = [handle.result(120) for handle in handles]
    assert max(calls) > 2  # rows of several requests in one call
    for a, b in zip(alone, together):
        assert levels_apart(a.images, b.images) <= 1


@pytest.mark.parametrize("name,steps_run", [("sd3", 5), ("flux", 5), ("sdxl", 4)])
def test_a_trajectory_from_a_picture_keeps_the_steps_it_runs(models, engines, start_picture, name, steps_run):
    """Frames of a request from a picture (8 steps at 0.6): one per step it runs, each with its noise level, σ
    falling for the flow families and ᾱ rising for SDXL."""
    picture, _ = start_picture
    result = ours(engines(models[name]), seed=1, num_inference_steps=8, image=picture, strength=0.6, trajectory_every=1)
    assert [f.step for f in result.frames] == list(range(1, steps_run + 1))
    levels = [f.sigma if name != "sdxl" else f.alpha_bar for f in result.frames]
    assert levels == sorted(levels, reverse=name != "sdxl") and len(set(levels)) == steps_run


def test_flux_packing_is_the_pipelines_and_round_trips():
    latents = torch.randn((3, 16, 8, 12), generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 3, 16, 8, 12))
    assert packed.shape == (3, 4 * 6, 64)
    assert torch.equal(unpack_latents(packed, 8, 12), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 8 * 4, 12 * 4, 4), latents)
    ids = latent_image_ids(4, 6, "cpu", torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))


def test_flux_two_guidance_values_in_one_call(models, pipes, engines):
    """Flux-dev embeds the guidance scale: each row its own, so two requests at 2 and 6 share one call."""
    guidance_seen: list[list[float]] = []
    model = dataclasses.replace(models["flux"])

    def forward(latents, timesteps, cond):
        guidance_seen.append(sorted(set(cond["guidance"].tolist())))
        return models["flux"].forward(latents, timesteps, cond)

    model.forward = forward
    engine = engines(model)
    handles = {
        scale: engine.submit(GenerationRequest(request_id=f"g{scale}", prompt=PROMPT, seed=9, guidance_scale=scale))
        for scale in (2.0, 6.0)
    }
    results = {scale: handle.result(120) for scale, handle in handles.items()}
    assert [2.0, 6.0] in guidance_seen
    for scale, result in results.items():
        _, images = theirs(pipes["flux"], "flux", 9, guidance_scale=scale, num_inference_steps=28)
        assert levels_apart(result.images, images) <= 1
    assert not np.array_equal(pixels(results[2.0].images), pixels(results[6.0].images))


def test_flux_true_cfg_with_a_negative_prompt(models, pipes, engines):
    """true_cfg_scale > 1: an unconditional row from the negative prompt (one call with the conditional row,
    where the pipeline makes two: equal within batch rounding)."""
    model, seen = capturing(models["flux"])
    result = ours(engines(model), seed=2, num_inference_steps=4, true_cfg_scale=3.0, negative_prompt="blue")
    latents, images = theirs(
        pipes["flux"], "flux", 2, num_inference_steps=4, true_cfg_scale=3.0, negative_prompt="blue"
    )
    assert (seen[0] - latents).abs().max() < 2e-6
    assert levels_apart(result.images, images) <= 1


def test_flux_schnell_ignores_guidance_scale_as_its_pipeline(models, engines):
    engine = engines(models["flux-schnell"])
    low, high = (ours(engine, request_id=f"s{g}", seed=1, num_inference_steps=3, guidance_scale=g) for g in (0.0, 9.0))
    assert np.array_equal(pixels(low.images), pixels(high.images))


# ---- what does not apply is refused; prompts ------------------------------------------------------------


@pytest.mark.parametrize(
    "name,field,value,message",
    [
        ("sdxl", "true_cfg_scale", 2.0, "true_cfg_scale does not apply to model 'tiny-sdxl' \\(sdxl family\\)"),
        ("sd3", "crop_top", 8, "crop_top does not apply to model 'tiny-sd3' \\(sd3 family\\)"),
        ("flux", "guidance_rescale", 0.5, "guidance_rescale does not apply to model 'tiny-flux' \\(flux family\\)"),
        ("sd3", "eta", 0.3, "eta applies to the ddim sampler only; got eta 0.3 with sampler 'flow_euler'"),
        ("flux", "sampler", "ddim", "sampler must be one of flow_euler for model 'tiny-flux', got 'ddim'"),
        ("sdxl", "sampler", "flow_euler", "sampler must be one of ddim, .*got 'flow_euler' \\(a flow-matching"),
        ("flux", "true_cfg_scale", 0.5, "true_cfg_scale must be between 1 and 100, got 0.5"),
        ("flux", "width", 36, "width must be a multiple of 8 between 8 and 64, got 36"),
        ("sd3", "strength", 0.5, "strength applies to image to image only: send an image with it"),
        ("flux", "mask", Image.new("L", (32, 32)), "mask applies to image to image only: send an image with it"),
    ],
)
def test_what_does_not_apply_is_refused_by_name(models, engines, name, field, value, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        engines(models[name]).submit(GenerationRequest(request_id="x", prompt=PROMPT, seed=0, **{field: value}))
    assert error.value.field == field


def test_guidance_at_most_one_skips_the_unconditional_rows(models, engines):
    """SDXL and SD3 as their pipelines (guide only where s > 1); SD, unchanged, mixes rows between 0 and 1."""
    for name in ("sdxl", "sd3"):
        model, calls = counting_rows(models[name])
        ours(engines(model), seed=0, num_inference_steps=2, guidance_scale=0.5, num_images=2)
        assert set(calls) == {2}


@pytest.mark.parametrize(
    ("name", "guided", "unguided"),
    [
        ("sdxl", dict(guidance_scale=5.0), dict(guidance_scale=1.0)),
        ("sd3", dict(guidance_scale=5.0), dict(guidance_scale=1.0)),
        ("flux", dict(true_cfg_scale=3.0, negative_prompt="blue"), dict(negative_prompt="blue")),
    ],
)
def test_the_guidance_interval_applies_to_every_family_that_guides(models, engines, name, guided, unguided):
    """Outside its guidance interval a guided request is its conditional prediction alone, one row per image:
    with the interval empty it is the unguided picture exactly; with [0.5, 1) its first half of steps take one
    row per image and the rest two."""
    model, calls = counting_rows(models[name])
    engine = engines(model)
    steps = dict(seed=3, num_inference_steps=4)
    empty = ours(engine, request_id="e", guidance_start=0.5, guidance_stop=0.5, **steps, **guided)
    plain = ours(engine, request_id="p", **steps, **unguided)
    assert np.array_equal(pixels(empty.images), pixels(plain.images))
    calls.clear()
    later = ours(engine, request_id="l", guidance_start=0.5, guidance_stop=1.0, **steps, **guided)
    assert calls == [1, 1, 2, 2]
    assert not np.array_equal(pixels(later.images), pixels(plain.images))


def test_t5_limit_is_checked_while_clip_truncates_at_77(family_paths, pipes, engines, tmp_path):
    """A prompt of 89 CLIP tokens (the byte-level test tokenizer spends about one per character) but 25 T5 tokens:
    accepted, CLIP truncated as the pipeline truncates it; past the T5 limit: refused naming the limit."""
    folder = shutil.copytree(family_paths["sd3"], tmp_path / "tiny-sd3-long")
    (folder / "latentd.json").write_text(json.dumps({"max_sequence_length": 64}))
    model = load_model(folder)
    prompt = " ".join(["a large red circle on a white background"] * 3)
    assert model.count_prompt_tokens(prompt) <= 64 and len(model.components["tokenizer"](prompt).input_ids) > 77
    engine = engines(model)
    result = engine.submit(GenerationRequest(request_id="long", prompt=prompt, seed=3, num_inference_steps=3))
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt, num_inference_steps=3, max_sequence_length=64, generator=torch.Generator("cpu").manual_seed(3)
    ).images
    assert np.array_equal(pixels(result.result(120).images), pixels(images))
    with pytest.raises(
        InvalidRequestError, match="prompt is 7[0-9] tokens long; model 'tiny-sd3-long' takes at most 64"
    ):
        engine.submit(GenerationRequest(request_id="too-long", prompt=" ".join([prompt] * 3), seed=3))


# ---- trajectories of flow models --------------------------------------------------------------------------


def test_flow_trajectories_carry_sigma(models, engines):
    model = models["sd3"]
    result = ours(engines(model), seed=1, num_inference_steps=4, trajectory_every=2, guidance_scale=1.0)
    assert [f.step for f in result.frames] == [2, 4]
    assert all(f.alpha_bar is None and 0 < f.sigma < 1 for f in result.frames)
    assert result.frames[0].noise_level == {"sigma": result.frames[0].sigma}
    assert noise_levels(model, [0, 250, 1000]) == [{"sigma": 0.0}, {"sigma": 0.25}, {"sigma": 1.0}]
    x0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    frames = _noised(model, x0, [0, 500, 1000], noise_seed=2)
    noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(2))
    assert torch.equal(frames[0], x0[0]) and torch.allclose(frames[1], 0.5 * x0[0] + 0.5 * noise[0], atol=1e-6)
    assert noise_levels(models["sdxl"], [0, 1000])[0] == {"alpha_bar": 1.0}


# ---- the VAE's scaling; latentd.json -------------------------------------------------------------------


def test_latent_scaling_is_each_pipelines_and_round_trips():
    from services.worker.families import LatentScaling

    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    plain = LatentScaling(0.13025)
    shifted = LatentScaling(1.5305, shift_factor=0.0609)
    per_channel = LatentScaling(0.5, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))
    assert torch.equal(plain.to_vae(z), z / 0.13025)  # StableDiffusionXLPipeline without latents_mean/std
    assert torch.equal(shifted.to_vae(z), z / 1.5305 + 0.0609)  # StableDiffusion3Pipeline, FluxPipeline
    mean, std = (
        torch.tensor(per_channel.latents_mean).view(1, 4, 1, 1),
        torch.tensor(per_channel.latents_std).view(1, 4, 1, 1),
    )
    assert torch.equal(per_channel.to_vae(z), z * std / 0.5 + mean)  # StableDiffusionXLPipeline with them
    for scaling in (plain, shifted, per_channel):
        assert torch.allclose(scaling.from_vae(scaling.to_vae(z)), z, atol=1e-6)


def test_latentd_json_sets_a_models_defaults_and_refuses_what_its_family_does_not_read(family_paths, tmp_path):
    folder = shutil.copytree(family_paths["flux-schnell"], tmp_path / "schnell")
    (folder / "latentd.json").write_text(
        json.dumps({"default_num_inference_steps": 4, "default_guidance_scale": 0.0, "native_width": 48})
    )
    model = load_model(folder)
    assert (model.default_num_inference_steps, model.default_guidance_scale, model.native_width) == (4, 0.0, 48)
    (folder / "latentd.json").write_text(json.dumps({"default_guidance_rescale": 0.5}))
    with pytest.raises(ModelLoadError, match="default_guidance_rescale does not apply to Flux"):
        load_model(folder)
    sdxl = shutil.copytree(family_paths["sdxl"], tmp_path / "sdxl")
    (sdxl / "latentd.json").write_text(json.dumps({"max_sequence_length": 64}))
    with pytest.raises(ModelLoadError, match="may hold only"):
        load_model(sdxl)
    (sdxl / "latentd.json").write_text(json.dumps({"default_strength": 0.5, "default_inpaint_strength": 0.9}))
    model = load_model(sdxl)
    assert (model.default_strength, model.default_inpaint_strength) == (0.5, 0.9)
    (sdxl / "latentd.json").write_text(json.dumps({"default_strength": 0}))
    with pytest.raises(ModelLoadError, match="default_strength must be a number above 0 and at most 1, got 0"):
        load_model(sdxl)
