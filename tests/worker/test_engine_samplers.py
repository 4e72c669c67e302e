"""Samplers and guidance rescale through the engine: against diffusers' StableDiffusionPipeline with the
scheduler swapped as a pipeline user would, alone vs batched with other samplers, and what is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from services.common import rules
from services.common.rules import DDPM_SAMPLERS as SAMPLERS  # the DDPM-family models' samplers
from services.worker.diffusion.samplers import diffusers_scheduler
from services.worker.engine.errors import InvalidRequestError
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import ModelLoadError, load_model
from services.worker.runtime import model_info
from tests.fixtures.guidance import pipeline_images_with_interval, seed_brownian_path
from tests.fixtures.pictures import pixels, psnr
from tests.fixtures.tiny_model import build_tiny_model

STEPS = 8
PROMPT = "a red circle"
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-ldm"
# see DPMSolver2MKarrasSampler and HeunSampler (DPM++ SDE, laid out as Heun, is offered: DPMSolverSDESampler)
NOT_ON_COSINE = ("dpmpp_2m_karras", "dpmpp_2m_sde_karras", *(n for n in rules.TWO_CALLS_PER_STEP if "sde" not in n))
COSINE_SAMPLERS = tuple(name for name in SAMPLERS if name not in NOT_ON_COSINE)


def request(request_id: str, **overrides) -> GenerationRequest:
    fields = dict(prompt=PROMPT, seed=1234, num_inference_steps=STEPS, guidance_scale=7.5)
    fields.update(overrides)
    return GenerationRequest(request_id=request_id, **fields)


def pipeline_for(folder, sampler: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe, prompt=PROMPT, steps=STEPS, seed=1234, **kwargs):
    seed_brownian_path(pipe, seed)
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def cosine_v_model(tmp_path_factory):
    """The default model's schedule (cosine, trailing) with a v-predicting tiny UNet."""
    folder = build_tiny_model(
        tmp_path_factory.mktemp("models") / "cosine-v",
        seed=3,
        prediction_type="v_prediction",
        beta_schedule="squaredcos_cap_v2",
        timestep_spacing="trailing",
    )
    return folder, load_model(folder)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_seed_parity_with_the_pipeline(make_engine, tiny_model, tiny_model_path, sampler):
    """ε-prediction, scaled_linear, leading (SD 1.x's schedule): 2 images at guidance 7.5, and 1 at guidance 1."""
    engine = make_engine()
    pipe = pipeline_for(tiny_model_path, sampler)
    ours = engine.submit(request("p", sampler=sampler, num_images=2)).result(60)
    theirs = pipeline_images(pipe, guidance_scale=7.5, num_images_per_prompt=2)
    assert psnr(pixels(ours.images), pixels(theirs)) >= 40
    ours = engine.submit(request("q", sampler=sampler, guidance_scale=1.0, seed=5)).result(60)
    assert psnr(pixels(ours.images), pixels(pipeline_images(pipe, guidance_scale=1.0, seed=5))) >= 40
    # another seed gives another picture, so the comparison can fail
    assert psnr(pixels(ours.images), pixels(pipeline_images(pipe, guidance_scale=1.0, seed=6))) < 40


@pytest.mark.parametrize("sampler", COSINE_SAMPLERS)
def test_seed_parity_cosine_trailing_v_prediction(make_engine, cosine_v_model, sampler):
    folder, model = cosine_v_model
    ours = make_engine(model=model).submit(request("v", sampler=sampler, seed=9, guidance_scale=3.0)).result(60)
    theirs = pipeline_images(pipeline_for(folder, sampler), guidance_scale=3.0, seed=9)
    assert psnr(pixels(ours.images), pixels(theirs)) >= 40


@pytest.fixture(scope="module")
def zero_snr_model(tmp_path_factory):
    """Zero terminal SNR (rescale_betas_zero_snr, Lin et al. 2024) with v-prediction and trailing spacing, as
    SD 2.1-v and SDXL v-prediction fine-tunes trained that way ship it."""
    folder = build_tiny_model(
        tmp_path_factory.mktemp("models") / "zero-snr",
        seed=4,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
    )
    return folder, load_model(folder)


ZERO_SNR_SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "euler", "euler_karras", "euler_ancestral", "lcm")


def test_a_zero_terminal_snr_model_offers_the_samplers_whose_scheduler_rescales(zero_snr_model, make_engine):
    folder, model = zero_snr_model
    info = model_info(model, make_engine(model=model))
    assert info.samplers == list(ZERO_SNR_SAMPLERS) and info.default_sampler == "ddim"
    assert info.scheduler == "DDIMScheduler / scaled_linear, zero terminal SNR"


@pytest.mark.parametrize("sampler", ZERO_SNR_SAMPLERS)
def test_seed_parity_at_zero_terminal_snr(make_engine, zero_snr_model, sampler):
    """The first step from pure noise (ᾱ_999 = 0; σ̂ ≈ 4096 for the σ̂-based schedulers, as diffusers'), guidance
    rescale 0.7 as the paper recommends, against the pipeline with its scheduler swapped."""
    folder, model = zero_snr_model
    fields = dict(sampler=sampler, seed=9, guidance_scale=5.0, guidance_rescale=0.7)
    ours = make_engine(model=model).submit(request("z", **fields)).result(60)
    theirs = pipeline_images(pipeline_for(folder, sampler), guidance_scale=5.0, seed=9, guidance_rescale=0.7)
    assert psnr(pixels(ours.images), pixels(theirs)) >= 40


def test_zero_terminal_snr_with_epsilon_prediction_is_refused_at_load(tmp_path):
    folder = build_tiny_model(tmp_path / "zero-snr-eps", rescale_betas_zero_snr=True)
    with pytest.raises(ModelLoadError, match="rescale_betas_zero_snr needs prediction_type v_prediction"):
        load_model(folder)


@pytest.mark.parametrize("sampler", ("ddim", "dpmpp_2m", "unipc"))
def test_thresholding_parity_with_the_pipeline(make_engine, cosine_v_model, tmp_path, sampler):
    """A model whose scheduler config turns dynamic thresholding on: the engine reads it from the folder and
    follows the pipeline's thresholded scheduler; the picture is not the one without thresholding."""
    plain_folder = cosine_v_model[0]
    folder = tmp_path / "thresholded"
    shutil.copytree(plain_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "thresholding": True, "sample_max_value": 1.5}))
    ours = make_engine(model=load_model(folder)).submit(request("t", sampler=sampler, seed=9)).result(60)
    pipe = pipeline_for(folder, sampler)
    assert pipe.scheduler.config.thresholding and pipe.scheduler.config.sample_max_value == 1.5
    matched = psnr(pixels(ours.images), pixels(pipeline_images(pipe, guidance_scale=7.5, seed=9)))
    assert matched >= 40
    plain = pipeline_images(pipeline_for(plain_folder, sampler), guidance_scale=7.5, seed=9)
    assert psnr(pixels(ours.images), pixels(plain)) < matched - 10


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="models/shapes-ldm has not landed")
@pytest.mark.parametrize("sampler", COSINE_SAMPLERS)
def test_seed_parity_on_the_default_model(make_engine, sampler):
    """At the model's defaults, its guidance interval included (latentd.json), against the pipeline guided where
    diffusers' guider with the same start and stop guides."""
    prompt = "a large red circle on a white background"
    model = load_model(DEFAULT_MODEL)
    interval = (model.default_guidance_start, model.default_guidance_stop)
    assert interval != (0.0, 1.0)  # the shipped model's recommendation (docs/model.md)
    ours = (
        make_engine(model=model)
        .submit(request("d", prompt=prompt, sampler=sampler, seed=11, num_inference_steps=10))
        .result(120)
    )
    theirs = pipeline_images_with_interval(
        pipeline_for(DEFAULT_MODEL, sampler),
        prompt,
        steps=10,
        seed=11,
        guidance_scale=7.5,
        start=interval[0],
        stop=interval[1],
    )
    measured = psnr(pixels(ours.images), pixels(theirs))
    print(f"\n{sampler} 10 steps on the default model vs its pipeline: PSNR {measured:.1f} dB")  # pytest -s
    assert measured >= 40


@pytest.mark.parametrize(
    ("sampler", "start", "stop"),
    [("ddim", 0.25, 0.75), ("dpmpp_2m", 0.0, 0.5), ("euler_ancestral", 0.5, 1.0), ("euler", 0.3, 0.3)],
)
def test_guidance_interval_parity_with_the_pipeline(make_engine, tiny_model_path, sampler, start, stop):
    engine = make_engine()
    pipe = pipeline_for(tiny_model_path, sampler)
    ours = engine.submit(request("i", sampler=sampler, guidance_start=start, guidance_stop=stop, seed=5)).result(60)
    theirs = pipeline_images_with_interval(
        pipe, PROMPT, steps=STEPS, seed=5, guidance_scale=7.5, start=start, stop=stop
    )
    matched = psnr(pixels(ours.images), pixels(theirs))
    assert matched >= 40
    # the comparison can fail: guided at every step, the pipeline's picture is much further off
    plain = pipeline_images(pipe, guidance_scale=7.5, seed=5)
    assert psnr(pixels(ours.images), pixels(plain)) < matched - 10


def test_steps_outside_the_guidance_interval_take_one_row_per_image(make_engine, monkeypatch):
    """Outside its interval a guided request's unconditional rows are not computed: with the interval empty
    every call has one row per image, with the whole run two, and with [0.25, 0.75) two in the middle half."""
    engine = make_engine()
    calls = []
    forward = engine.model.forward
    monkeypatch.setattr(
        engine.model, "forward", lambda latents, *args: calls.append(len(latents)) or forward(latents, *args)
    )
    for k, ((start, stop), rows) in enumerate(
        (((0.5, 0.5), [2] * 8), ((0.0, 1.0), [4] * 8), ((0.25, 0.75), [2, 2, 4, 4, 4, 4, 2, 2]))
    ):
        calls.clear()
        engine.submit(request(f"r{k}", num_images=2, guidance_start=start, guidance_stop=stop)).result(60)
        assert calls == rows, (start, stop, calls)


@pytest.mark.parametrize("sampler", ("ddim", "dpmpp_2m", "euler_ancestral"))
def test_guidance_rescale_parity_with_the_pipeline(make_engine, tiny_model_path, sampler):
    engine = make_engine()
    pipe = pipeline_for(tiny_model_path, sampler)
    ours = engine.submit(request("r", sampler=sampler, guidance_rescale=0.7, seed=3)).result(60)
    theirs = pipeline_images(pipe, guidance_scale=7.5, guidance_rescale=0.7, seed=3)
    matched = psnr(pixels(ours.images), pixels(theirs))
    assert matched >= 40
    # the comparison can fail: without rescale the pipeline's picture is much further off
    plain = pipeline_images(pipe, guidance_scale=7.5, seed=3)
    assert psnr(pixels(ours.images), pixels(plain)) < matched - 10
    # at guidance ≤ 1 the pipeline neither guides nor rescales; the engine does not rescale either
    low = engine.submit(request("s", sampler=sampler, guidance_scale=1.0, guidance_rescale=0.7, seed=3)).result(60)
    assert psnr(pixels(low.images), pixels(pipeline_images(pipe, guidance_scale=1.0, seed=3))) >= 40


def test_batch_invariance_across_samplers(make_engine):
    """Each sampler's request alone, and among requests with other samplers, step counts, guidance, rescale
    and image counts (fewer rows than asked for, so batches change from step to step): ≤ 1/255."""
    targets = [
        request(
            f"target-{name}",
            sampler=name,
            seed=70 + k,
            num_images=1 + k % 2,
            guidance_rescale=0.5 * (k % 2),
            guidance_start=0.25 * (k % 3),
            guidance_stop=1.0 - 0.25 * (k % 2),
        )
        for k, name in enumerate(SAMPLERS)
    ]
    alone = {t.request_id: make_engine().submit(t).result(60) for t in targets}
    others = [
        request(
            f"other-{k}", prompt=prompt, sampler=name, seed=100 + k, num_inference_steps=steps, guidance_scale=scale
        )
        for k, (prompt, name, steps, scale) in enumerate(
            [
                ("a blue square", "euler_ancestral", 5, 0.0),
                ("a green triangle", "dpmpp_2m", 12, 1.0),
                ("yellow", "euler", 3, 3.0),
                ("", "dpmpp_2m_karras", 9, 12.0),
                ("a small circle", "dpmpp_2m_sde", 6, 4.0),
                ("a large square", "unipc", 7, 5.0),
                ("a blue circle", "lcm", 4, 1.5),
                ("orange", "ddim", 20, 2.0),
            ]
        )
    ]
    engine = make_engine(max_batch_rows=10)
    handles = [engine.submit(r) for pair in zip(others, targets) for r in pair]
    for handle in handles:
        result = handle.result(60)
        if result.request_id in alone:
            diff = np.abs(pixels(alone[result.request_id].images) - pixels(result.images)).max()
            assert diff <= 1 / 255 + 1e-9, (result.request_id, diff)


def test_default_sampler_and_steps_and_frames(make_engine):
    engine = make_engine()
    assert engine.default_sampler == "ddim" and list(engine.samplers) == list(SAMPLERS)
    default = engine.submit(request("a")).result(60)
    explicit = engine.submit(request("b", sampler="ddim")).result(60)
    assert np.array_equal(pixels(default.images), pixels(explicit.images))
    handle = engine.submit(request("e", sampler="euler", trajectory_every=4, preview_every=4))
    events = list(handle.events(timeout=60))
    result = handle.result(60)
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert [e.timestep for e in events] == sorted((e.timestep for e in events), reverse=True)
    assert [f.step for f in result.frames] == [4, 8] and 0 < result.frames[0].alpha_bar < 1
    assert events[3].preview is not None


@pytest.mark.parametrize(
    "overrides,field,message",
    [
        (
            dict(sampler="ddpm"),
            "sampler",
            "sampler must be one of ddim, plms, dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, unipc, "
            "euler, euler_karras, lms, lms_karras, heun, heun_karras, dpm2, dpm2_karras, dpm2_ancestral, "
            "dpm2_ancestral_karras, dpmpp_sde, dpmpp_sde_karras, euler_ancestral, lcm",
        ),
        (
            dict(sampler="euler", eta=0.5),
            "eta",
            "eta applies to the ddim sampler only; got eta 0.5 with sampler 'euler'",
        ),
        (dict(guidance_rescale=1.5), "guidance_rescale", "guidance_rescale must be between 0 and 1, got 1.5"),
        (dict(guidance_rescale=-0.1), "guidance_rescale", "guidance_rescale must be between 0 and 1"),
        (dict(guidance_rescale=float("nan")), "guidance_rescale", "guidance_rescale must be between 0 and 1"),
        (
            dict(sampler="dpmpp_2m", num_inference_steps=999),
            "num_inference_steps",
            "num_inference_steps must be between 1 and 998 for model 'tiny-sd' with sampler 'dpmpp_2m', got 999",
        ),
    ],
)
def test_bad_sampler_input_is_named(make_engine, overrides, field, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        make_engine().submit(request("bad", **overrides))
    assert error.value.field == field


@pytest.mark.parametrize(
    "sampler,timesteps",
    [("plms", [751, 501, 501, 251, 1]), ("heun", [751, 501, 501, 251, 251, 1, 1])],  # leading spacing, offset 1
)
def test_samplers_of_more_calls_than_steps_count_the_calls(make_engine, sampler, timesteps):
    """PLMS makes n + 1 model calls for n steps, Heun 2n − 1: their step events count the calls (the timesteps as the
    pipeline's scheduler lists them), the doors' rule (rules.steps_run) agrees, and preview_every may reach the last
    call, not more, with the reason named."""
    engine = make_engine()
    calls = len(timesteps)
    handle = engine.submit(request(sampler, sampler=sampler, num_inference_steps=4, preview_every=calls))
    events = list(handle.events(timeout=60))
    handle.result(60)
    assert [e.step for e in events] == list(range(1, calls + 1)) and {e.total for e in events} == {calls}
    assert [e.timestep for e in events] == timesteps
    assert [e.preview is not None for e in events] == [False] * (calls - 1) + [True]
    assert rules.steps_run(4, None, sampler) == calls and rules.steps_run(1, None, sampler) == 1
    message = rf"preview_every must be between 0 and the steps it runs \({sampler}: .*\) \({calls}\), got {calls + 1}"
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit(request("too-late", sampler=sampler, num_inference_steps=4, preview_every=calls + 1))


def test_karras_dpm_solver_and_the_two_call_samplers_are_not_offered_on_the_capped_cosine_schedule(
    make_engine, cosine_v_model
):
    _, model = cosine_v_model
    engine = make_engine(model=model)
    assert list(engine.samplers) == list(COSINE_SAMPLERS)
    for name in NOT_ON_COSINE:
        with pytest.raises(InvalidRequestError, match="squaredcos_cap_v2") as error:
            engine.submit(request("k", sampler=name))
        assert error.value.field == "sampler"


def test_model_defaults_from_latentd_json(make_engine, tiny_model_path, tmp_path):
    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_model_path, folder)
    (folder / "latentd.json").write_text(
        json.dumps(
            {
                "default_sampler": "euler_ancestral",
                "default_guidance_rescale": 0.5,
                "default_guidance_start": 0.25,
                "default_guidance_stop": 0.75,
            }
        )
    )
    model = load_model(folder)
    assert (model.default_sampler, model.default_guidance_rescale) == ("euler_ancestral", 0.5)
    assert (model.default_guidance_start, model.default_guidance_stop) == (0.25, 0.75)
    engine = make_engine(model=model)
    info = model_info(model, engine)
    assert info.samplers == list(SAMPLERS) and info.default_sampler == "euler_ancestral"
    assert info.default_guidance_rescale == 0.5 and info.sampler_max_inference_steps["dpmpp_2m"] == 998
    assert (info.default_guidance_start, info.default_guidance_stop) == (0.25, 0.75)
    by_default = engine.submit(request("d")).result(60)
    explicit = engine.submit(
        request("e", sampler="euler_ancestral", guidance_rescale=0.5, guidance_start=0.25, guidance_stop=0.75)
    ).result(60)
    assert np.array_equal(pixels(by_default.images), pixels(explicit.images))
    every_step = engine.submit(request("f", guidance_start=0.0, guidance_stop=1.0)).result(60)
    assert not np.array_equal(pixels(by_default.images), pixels(every_step.images))
    # the pipeline ignores the file
    assert StableDiffusionPipeline.from_pretrained(folder, safety_checker=None) is not None
    for bad, complaint in (
        ({"default_sampler": "ddpm"}, "default_sampler must be one of"),
        ({"default_guidance_rescale": 2}, "default_guidance_rescale must be between 0 and 1"),
        (
            {"default_guidance_start": 0.8, "default_guidance_stop": 0.2},
            r"default_guidance_stop must be between "
            r"guidance_start \(0.8\) and 1, got 0.2",
        ),
        ({"default_guidance_start": "0.1"}, "default_guidance_start must be a number between 0 and 1"),
        ({"default_steps": 20}, "may hold only default_sampler, default_guidance_rescale"),
    ):
        (folder / "latentd.json").write_text(json.dumps(bad))
        with pytest.raises(ModelLoadError, match=complaint):
            load_model(folder)


@pytest.mark.parametrize(
    "scheduler,options,expected",
    [
        ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral"),
        ("UniPCMultistepScheduler", {}, "unipc"),
        ("PNDMScheduler", {"skip_prk_steps": True}, "plms"),  # SD 1.x's, as its folders ship it
        ("PNDMScheduler", {}, "ddim"),
    ],
)
def test_a_request_without_a_sampler_gets_the_folders_own_scheduler(
    make_engine, tiny_model_path, tmp_path, scheduler, options, expected
):
    """A folder saved with another scheduler (as SD 1.x ships PNDM, SDXL base Euler, community models DPM-Solver or
    UniPC): its default sampler is the one that does what that scheduler does, so a request without a sampler gets
    the picture of StableDiffusionPipeline.from_pretrained(folder) called plainly. PNDM with its Runge-Kutta warm-up
    (skip_prk_steps false) has no latentd sampler: ddim, as before. latentd.json's default_sampler still wins."""
    import diffusers

    folder = tmp_path / f"{scheduler}-{len(options)}"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **options)
    pipe.save_pretrained(folder)  # model_index.json and scheduler_config.json both name it
    model = load_model(folder)
    assert model.default_sampler == expected
    engine = make_engine(model=model)
    ours = engine.submit(request("plain", num_images=2)).result(60)
    if expected != "ddim":
        plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        plain.set_progress_bar_config(disable=True)
        assert type(plain.scheduler).__name__ == scheduler
        assert (
            psnr(pixels(ours.images), pixels(pipeline_images(plain, guidance_scale=7.5, num_images_per_prompt=2))) >= 40
        )
    ddim = engine.submit(request("ddim", sampler="ddim", num_images=2)).result(60)
    assert np.array_equal(pixels(ours.images), pixels(ddim.images)) == (expected == "ddim")
    (folder / "latentd.json").write_text(json.dumps({"default_sampler": "euler"}))
    assert load_model(folder).default_sampler == "euler"
    # the class comes from model_index.json, as from_pretrained takes it, whatever scheduler_config.json says
    (folder / "latentd.json").unlink()
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "DDIMScheduler"}))
    assert load_model(folder).default_sampler == expected


def test_model_info_of_the_default_model_lists_what_it_supports(tiny_model, make_engine):
    info = model_info(tiny_model, make_engine())
    assert info.samplers == list(SAMPLERS) and info.default_sampler == "ddim"
    assert info.default_guidance_rescale == 0.0 and info.max_inference_steps == 999
