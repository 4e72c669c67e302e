"""The engine against diffusers' pipeline and against itself (alone vs batched), on the tiny model."""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from services.common.rules import GUIDED_AT_EVERY_STEP
from services.worker.engine.errors import InvalidRequestError, NonFiniteOutputError, RequestCancelled
from services.worker.engine.requests import GenerationRequest
from tests.fixtures.pictures import pixels, psnr

STEPS = 8


def request(request_id: str, **overrides) -> GenerationRequest:
    fields = dict(prompt="a red circle", seed=1234, num_inference_steps=STEPS, guidance_scale=7.5)
    fields.update(overrides)
    return GenerationRequest(request_id=request_id, **fields)


@pytest.fixture(scope="module")
def pipeline(tiny_model_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance_scale,eta,num_images", [(7.5, 0.0, 1), (1.0, 0.0, 2), (3.0, 1.0, 1)])
def test_seed_parity_with_diffusers_pipeline(make_engine, pipeline, guidance_scale, eta, num_images):
    engine = make_engine()
    ours = engine.submit(request("p", guidance_scale=guidance_scale, eta=eta, num_images=num_images, seed=42)).result(
        60
    )
    theirs = pipeline(
        "a red circle",
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        eta=eta,
        num_images_per_prompt=num_images,
        generator=torch.Generator("cpu").manual_seed(42),
    ).images
    assert len(ours.images) == num_images and ours.seed == 42
    assert psnr(pixels(ours.images), pixels(theirs)) >= 40
    # and a different seed gives a different picture, so the comparison can fail
    other = pipeline(
        "a red circle",
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        eta=eta,
        num_images_per_prompt=num_images,
        generator=torch.Generator("cpu").manual_seed(43),
    ).images
    assert psnr(pixels(ours.images), pixels(other)) < 40


def test_seed_parity_cosine_trailing_v_prediction(make_engine, tmp_path):
    """The default model's schedule (cosine, trailing) and a v-prediction model, against the pipeline."""
    from services.worker.loading import load_model
    from tests.fixtures.tiny_model import build_tiny_model

    folder = build_tiny_model(
        tmp_path / "cosine-v",
        seed=3,
        prediction_type="v_prediction",
        beta_schedule="squaredcos_cap_v2",
        timestep_spacing="trailing",
    )
    engine = make_engine(model=load_model(folder))
    ours = engine.submit(request("v", seed=9, guidance_scale=3.0, eta=1.0)).result(60)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red circle",
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        eta=1.0,
        generator=torch.Generator("cpu").manual_seed(9),
    ).images
    assert psnr(pixels(ours.images), pixels(theirs)) >= 40


def test_batch_invariance(make_engine):
    """A request alone and among 7 others with different settings gives the same pictures (≤ 1/255)."""
    target = request("target", seed=7, eta=0.5, num_images=2)
    alone = make_engine().submit(target).result(60)
    engine = make_engine(max_batch_rows=12)  # fewer rows than asked for: batches change from step to step
    others = [
        request(
            f"other-{i}",
            prompt=prompt,
            seed=100 + i,
            num_inference_steps=steps,
            guidance_scale=scale,
            eta=eta,
            negative_prompt=negative,
            num_images=n,
        )
        for i, (prompt, steps, scale, eta, negative, n) in enumerate(
            [
                ("a blue square", 5, 0.0, 0.0, "", 1),
                ("a green triangle", 12, 1.0, 1.0, "", 2),
                ("yellow", 3, 3.0, 0.0, "red", 1),
                ("", 9, 7.5, 0.2, "", 3),
                ("a red circle", 8, 7.5, 0.0, "", 1),
                ("a purple thing", 20, 12.0, 1.0, "blue", 1),
                ("orange", 1, 2.0, 0.0, "", 2),
            ]
        )
    ]
    handles = [engine.submit(r) for r in others[:4]] + [engine.submit(target)] + [engine.submit(r) for r in others[4:]]
    batched = handles[4].result(60)
    for handle in handles:
        handle.result(60)
    diff = np.abs(pixels(alone.images) - pixels(batched.images)).max()
    assert diff <= 1 / 255 + 1e-9, diff


def test_events_previews_and_trajectory(make_engine):
    seen: list[list] = []
    engine = make_engine(on_step_events=lambda events: seen.append([(e.request_id, e.step) for e in events]))
    gate = threading.Event()
    engine.call(lambda model: gate.wait(30))  # hold the engine so both requests join the first iteration
    handle = engine.submit(request("t", preview_every=2, trajectory_every=4, num_images=2))
    other = engine.submit(request("u", num_inference_steps=3))
    gate.set()
    events = list(handle.events(timeout=60))
    result = handle.result(60)
    other.result(60)
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert all(e.total == STEPS for e in events)
    assert [e.timestep for e in events] == sorted((e.timestep for e in events), reverse=True)
    assert [e.step for e in events if e.preview is not None] == [2, 4, 6, 8]
    assert events[1].preview.size == (2 * 64, 64)  # two images side by side, upscaled from 8×8 latents
    assert [f.step for f in result.frames] == [4, 8]
    frame = result.frames[0]
    assert len(frame.x_t) == len(frame.x0_pred) == 2 and frame.x_t[0].size == (32, 32)
    assert 0 < frame.alpha_bar < 1
    # one on_step_events call per iteration, holding both requests while both run
    assert seen[0] == [("t", 1), ("u", 1)]
    assert sum(len(batch) for batch in seen) == STEPS + 3


def test_cancel_leaves_at_next_step_and_others_go_on(make_engine):
    engine = make_engine()
    survivor_alone = make_engine().submit(request("s", seed=5)).result(60)
    long = engine.submit(request("long", num_inference_steps=500, guidance_scale=1.0))
    survivor = engine.submit(request("s", seed=5))
    steps_seen = []
    for event in long.events(timeout=60):
        steps_seen.append(event.step)
        if event.step == 3:
            long.cancel()
    with pytest.raises(RequestCancelled, match="cancelled after"):
        long.result(60)
    assert long.done() and len(steps_seen) <= 5
    assert np.array_equal(pixels(survivor.result(60).images), pixels(survivor_alone.images))


def test_cancel_while_waiting(make_engine):
    engine = make_engine()
    handle = engine.submit(request("c"))
    handle.cancel()
    with pytest.raises(RequestCancelled):
        handle.result(60)


def test_nan_fails_only_that_request(make_engine, tiny_model):
    """A prompt whose embedding is NaN poisons its own rows only: it fails typed, the others finish unchanged."""

    def encode_prompts(prompts):
        encoded = tiny_model.encode_prompts(prompts)  # one conditioning dict per prompt
        return [
            {key: torch.full_like(value, float("nan")) for key, value in c.items()} if prompt == "poison" else c
            for prompt, c in zip(prompts, encoded)
        ]

    poisoned = dataclasses.replace(tiny_model)
    poisoned.encode_prompts = encode_prompts
    clean_alone = make_engine().submit(request("clean")).result(60)
    engine = make_engine(model=poisoned)
    bad = engine.submit(request("bad", prompt="poison"))
    clean = engine.submit(request("clean"))
    with pytest.raises(NonFiniteOutputError, match="request bad: latents became non-finite at step 1"):
        bad.result(60)
    assert np.abs(pixels(clean.result(60).images) - pixels(clean_alone.images)).max() <= 1 / 255


def test_long_request_does_not_starve_later_short_ones(make_engine):
    """One row per UNet call: a 300-step request and three 10-step ones that came later take turns."""
    long_steps_when_short_done: dict[str, int] = {}
    progress = {"long": 0}
    lock = threading.Lock()

    def on_events(events):
        with lock:
            for e in events:
                if e.request_id == "long":
                    progress["long"] = e.step
                elif e.step == e.total:
                    long_steps_when_short_done[e.request_id] = progress["long"]

    engine = make_engine(max_batch_rows=1, on_step_events=on_events)
    long = engine.submit(request("long", num_inference_steps=300, guidance_scale=1.0))
    next(long.events(timeout=60))  # it is running
    shorts = [engine.submit(request(f"short-{i}", num_inference_steps=10, guidance_scale=1.0)) for i in range(3)]
    for handle in shorts:
        handle.result(60)
    long.cancel()
    assert not long.done() or isinstance(long._future.exception(), RequestCancelled)
    # round-robin: each short one got every 4th row, so the long one made about 40 steps meanwhile, not 300
    assert max(long_steps_when_short_done.values()) <= 45, long_steps_when_short_done


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_inference_steps", 0, "num_inference_steps must be between 1 and 1000, got 0"),
        ("num_inference_steps", 1000, "num_inference_steps must be between 1 and 999 for model 'tiny-sd', got 1000"),
        ("guidance_scale", -1.0, "guidance_scale must be between 0 and 100, got -1"),
        ("eta", 2.0, "eta must be between 0 and 1, got 2"),
        ("num_images", 0, "num_images must be between 1 and 16, got 0"),
        ("width", 30, "width must be a multiple of 8 between 8 and 64, got 30"),
        ("seed", -1, "seed must be between 0 and 9223372036854775807, got -1"),
        ("seed", 2**63, "seed must be between 0 and 9223372036854775807, got 9223372036854775808"),
        ("prompt", "a " * 80, "prompt is 82 tokens long; model 'tiny-sd' takes at most 77"),
    ],
)
def test_bad_input_is_named(make_engine, field, value, message):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match=message) as error:
        engine.submit(request("bad", **{field: value}))
    assert error.value.field == field


def test_call_runs_on_the_engine_thread(make_engine):
    engine = make_engine()
    future = engine.call(lambda model: (threading.current_thread().name, model.latent_channels))
    assert future.result(30) == (f"engine-{engine.model.name}", 4)
    assert engine.active_requests == 0


def test_stop_fails_pending_requests(make_engine, tiny_model):
    from services.worker.engine.engine import Engine
    from services.worker.engine.errors import EngineStopped

    engine = Engine(tiny_model).start()
    handle = engine.submit(request("x", num_inference_steps=500))
    time.sleep(0.2)
    engine.stop()
    with pytest.raises(EngineStopped):
        handle.result(5)


def exploding_on_boom(model):
    """The model, but its text encoder raises on the prompt "boom"."""

    def encode_prompts(prompts):
        if "boom" in prompts:
            raise RuntimeError("text encoder exploded")
        return model.encode_prompts(prompts)

    broken = dataclasses.replace(model)
    broken.encode_prompts = encode_prompts
    return broken


def test_a_failing_iteration_fails_only_its_requests(make_engine, tiny_model):
    from services.worker.engine.errors import EngineError

    engine = make_engine(model=exploding_on_boom(tiny_model))
    with pytest.raises(EngineError, match="request b failed in the engine: RuntimeError: text encoder exploded"):
        engine.submit(request("b", prompt="boom")).result(60)
    failing_call = engine.call(lambda model: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing_call.result(30)
    assert len(engine.submit(request("ok", num_inference_steps=2)).result(60).images) == 1


def test_a_call_out_of_memory_lowers_the_row_cap_and_loses_no_request(make_engine):
    """A backbone call of more than 4 rows raises torch.OutOfMemoryError, as CUDA's allocator does when a batch
    does not fit: no request fails; the engine goes on at 4 rows per call, and each request's pictures are the
    ones it gets alone (the failed call moved nothing of theirs)."""
    targets = [request(f"r{i}", seed=10 + i, num_inference_steps=4) for i in range(4)]  # 2 rows each (guided)
    alone = [make_engine().submit(r).result(60) for r in targets]
    engine = make_engine(max_batch_rows=16)
    fits, calls = engine.backbone, []

    def backbone(latents, timesteps, cond):
        calls.append(latents.shape[0])
        if latents.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fits(latents, timesteps, cond)

    engine.backbone = backbone
    gate = threading.Event()
    engine.call(lambda model: gate.wait(30))  # holds the engine thread: the four join one first call of 8 rows
    handles = [engine.submit(r) for r in targets]
    gate.set()
    results = [handle.result(60) for handle in handles]
    assert calls.count(8) == 1 and max(calls[calls.index(8) + 1 :]) <= 4, calls
    assert engine.row_cap.rows == 4
    for ours, theirs in zip(results, alone):
        assert np.abs(pixels(ours.images) - pixels(theirs.images)).max() <= 1 / 255 + 1e-9


def test_a_request_that_runs_out_of_memory_alone_fails_and_the_engine_goes_on(make_engine):
    from services.worker.engine.errors import EngineError

    engine = make_engine(max_batch_rows=8)
    fits = engine.backbone

    def backbone(latents, timesteps, cond):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    engine.backbone = backbone
    with pytest.raises(EngineError, match="request big failed in the engine: OutOfMemoryError: CUDA out of memory"):
        engine.submit(request("big", num_inference_steps=2)).result(60)
    assert engine.row_cap.rows == 1  # halved down to one row per call before giving up
    engine.backbone = fits
    assert len(engine.submit(request("after", num_inference_steps=2)).result(60).images) == 1


def test_a_decode_out_of_memory_decodes_again_in_smaller_calls(make_engine):
    """Three requests that finish together are decoded in one VAE call, which runs out of memory past one image:
    the decode starts over one image per call, and each request gets its pictures."""
    targets = [request(f"d{i}", seed=20 + i, num_inference_steps=3) for i in range(3)]
    alone = [make_engine().submit(r).result(60) for r in targets]
    engine = make_engine()
    fits, calls = engine.decoder, []

    def decoder(latents):
        calls.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return fits(latents)

    engine.decoder = decoder
    gate = threading.Event()
    engine.call(lambda model: gate.wait(30))  # the three start, and so finish, together
    handles = [engine.submit(r) for r in targets]
    gate.set()
    results = [handle.result(60) for handle in handles]
    assert calls == [3, 1, 1, 1] and engine.decode_cap.rows == 1
    for ours, theirs in zip(results, alone):
        assert np.abs(pixels(ours.images) - pixels(theirs.images)).max() <= 1 / 255 + 1e-9


def test_stalled_s_is_how_long_the_engine_has_been_inside_one_iteration(make_engine):
    """What the worker's hung-device watchdog reads (Runtime.stalled, LATENTD_ENGINE_STALL_S): 0 between
    iterations, the time since the iteration began while a call does not come back."""
    engine = make_engine()
    assert engine.stalled_s == 0.0
    fits, release, entered = engine.backbone, threading.Event(), threading.Event()

    def backbone(latents, timesteps, cond):
        entered.set()
        release.wait(30)
        return fits(latents, timesteps, cond)

    engine.backbone = backbone
    handle = engine.submit(request("slow", num_inference_steps=1))
    assert entered.wait(30)
    time.sleep(0.3)
    assert engine.stalled_s >= 0.3
    release.set()
    handle.result(60)
    time.sleep(0.1)
    assert engine.stalled_s == 0.0


@pytest.mark.parametrize(
    "message, lost",
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: device-side assert triggered", True),
        ("CUDA error: unspecified launch failure", True),
        ("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx`", False),  # that call only
        ("CUDA error: invalid configuration argument", False),
        ("CUDA error: out of memory", False),
        ("text encoder exploded", False),
    ],
)
def test_only_a_sticky_cuda_error_counts_as_a_lost_device(message, lost):
    from services.worker.engine.errors import device_lost

    assert device_lost(RuntimeError(message)) is lost


def test_a_lost_device_fails_no_request_and_reads_as_a_hung_engine(make_engine):
    """A sticky device error (CUDA's illegal memory access) makes every later call fail: the engine fails none of the
    requests it holds (none is at fault), steps no more, and reads as hung (stalled_s infinite), so the worker's
    watchdog lets its jobs run again elsewhere and exits for a fresh process, instead of the engine failing the
    whole queue one iteration at a time."""
    engine = make_engine()
    fits, calls = engine.backbone, []

    def backbone(latents, timesteps, cond):
        calls.append(1)
        if len(calls) >= 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return fits(latents, timesteps, cond)

    engine.backbone = backbone
    handles = [engine.submit(request(f"r{i}", num_inference_steps=4)) for i in range(2)]
    deadline = time.monotonic() + 30
    while engine.broken is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "illegal memory access" in str(engine.broken) and engine.stalled_s == math.inf
    time.sleep(0.2)
    assert not any(handle.done() for handle in handles) and len(calls) == 2  # failed nothing, stepped no more


def test_the_requests_of_a_call_that_ran_out_of_memory_keep_their_turn(make_engine):
    """A and B's call (4 rows) runs out of memory: they step next, in smaller calls, before C, which waited as long
    but was not in it; their turn is not spent on a call that did not run."""
    engine = make_engine(max_batch_rows=4)
    fits, served = engine.backbone, []

    def backbone(latents, timesteps, cond):
        served.append([member.request_id for member in engine._in_iteration])
        if len(served) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fits(latents, timesteps, cond)

    engine.backbone = backbone
    gate = threading.Event()
    engine.call(lambda model: gate.wait(30))
    handles = [engine.submit(request(name, num_inference_steps=2)) for name in "ABC"]  # 2 rows each (guided)
    gate.set()
    for handle in handles:
        handle.result(60)
    assert served[:3] == [["A", "B"], ["A"], ["B"]], served  # then C, at 2 rows per call


def test_a_decode_that_fails_fails_only_the_requests_it_decodes(make_engine):
    """A finishes in an iteration where B has steps to go; A's decode fails (out of memory at one image, say): A
    fails, B, which never reached the decoder, goes on and gets its pictures."""
    from services.worker.engine.errors import EngineError

    engine = make_engine()
    fits = engine.decoder

    def decoder(latents):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    engine.decoder = decoder
    gate = threading.Event()
    engine.call(lambda model: gate.wait(30))  # both join the same first iteration
    a = engine.submit(request("A", num_inference_steps=2))
    b = engine.submit(request("B", num_inference_steps=8))
    gate.set()
    with pytest.raises(EngineError, match="request A failed in the engine: OutOfMemoryError"):
        a.result(60)
    engine.decoder = fits
    assert len(b.result(60).images) == 1


def test_a_device_lost_while_delivering_pictures_hands_their_jobs_back(make_engine):
    """The decode's kernels fail only when the output thread reads the pictures (CUDA runs them later): a sticky
    error there stops the engine (broken) and ends the requests as stopped, for their jobs to run again, not failed."""
    from services.worker.engine.errors import EngineStopped

    engine = make_engine()

    def deliver(finished, pixels, copied, timer):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine._deliver_pictures = deliver
    with pytest.raises(EngineStopped, match="the device is lost"):
        engine.submit(request("r", num_inference_steps=2)).result(60)
    assert engine.stalled_s == math.inf


def test_a_bucket_out_of_memory_at_warm_up_leaves_the_worker_serving_below_it(tiny_model):
    """A card on which the 8- and 16-row buckets do not fit: the warm-up stops at 4 and the engine serves at 4 rows
    per call, instead of the worker failing to start."""
    from services.worker.engine.engine import Engine

    engine = Engine(tiny_model, max_batch_rows=16, buckets=(2, 4, 8, 16))
    fits, warmed = engine.backbone, []

    def backbone(latents, timesteps, cond):
        if latents.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        warmed.append(latents.shape[0])
        return fits(latents, timesteps, cond)

    backbone.sizes, backbone.compile_mode = fits.sizes, fits.compile_mode  # what the warm-up reads
    engine.backbone = backbone
    engine.warm_up()
    assert warmed == [2, 4] and engine.row_cap.rows == 4
    engine.start()
    try:
        handles = [engine.submit(request(f"w{i}", seed=i, num_inference_steps=2)) for i in range(4)]
        assert all(len(handle.result(60).images) == 1 for handle in handles)
    finally:
        engine.stop()


def test_the_row_cap_steps_down_the_buckets_and_back_up():
    from services.worker.engine.engine import RAISE_CAP_AFTER_CALLS, RowCap

    cap = RowCap(64, (2, 4, 8, 16, 32, 48, 64))
    assert cap.lower(64) and cap.rows == 48
    assert cap.lower(20) and cap.rows == 16  # below the call that did not fit, not below the cap
    assert not any(cap.fitted() for _ in range(RAISE_CAP_AFTER_CALLS - 1))
    assert cap.fitted() and cap.rows == 32
    assert cap.lower(32) and cap.lower(16) and cap.lower(8) and cap.lower(4) and cap.rows == 2
    assert not cap.lower(2) and cap.rows == 2  # the floor: that call's requests fail
    plain = RowCap(12, ())
    assert plain.lower(12) and plain.rows == 6 and plain.lower(6) and plain.rows == 3
    for _ in range(2 * RAISE_CAP_AFTER_CALLS):
        plain.fitted()
    assert plain.rows == 12  # doubled back, never past max_batch_rows


def test_a_request_that_cannot_start_fails_alone_among_those_admitted_with_it(make_engine, tiny_model):
    """Requests admitted in one iteration share a text-encoder call: a prompt that breaks it fails its own request
    only (each prompt is then encoded alone), and the others start and finish."""
    from services.worker.engine.errors import EngineError

    engine = make_engine(model=exploding_on_boom(tiny_model))
    gate = threading.Event()
    engine.call(lambda model: gate.wait(30))  # the three are admitted together
    handles = [engine.submit(request(name, prompt=prompt, num_inference_steps=2)) for name, prompt in
               (("a", "a red circle"), ("b", "boom"), ("c", "a blue square"))]  # fmt: skip
    gate.set()
    with pytest.raises(EngineError, match="request b failed in the engine: RuntimeError: text encoder exploded"):
        handles[1].result(60)
    assert [len(handles[i].result(60).images) for i in (0, 2)] == [1, 1]


DEFAULT_MODEL = __import__("pathlib").Path(__file__).resolve().parents[2] / "models" / "shapes-ldm"


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="models/shapes-ldm has not landed")
def test_seed_parity_on_the_default_model(make_engine):
    from services.worker.loading import load_model

    model = load_model(DEFAULT_MODEL)
    prompt = "a large red circle on a white background"
    # guided at every step, as the plain pipeline guides (the model's own interval: test_engine_samplers.py)
    every_step = GUIDED_AT_EVERY_STEP
    ours = make_engine(model=model).submit(request("d", prompt=prompt, seed=11, num_inference_steps=10, **every_step))
    ours = ours.result(120)
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt, num_inference_steps=10, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(11)
    ).images
    assert psnr(pixels(ours.images), pixels(theirs)) >= 40


def test_a_flooding_owner_gets_a_bounded_share_of_each_call(make_engine):
    """rows_per_owner=4: while a second owner's request runs, each call holds at most 4 of the flood's rows, and
    the lone request is stepped in every call (so its steps cost a 6-row call, not an 18-row one); alone, an
    owner fills the call."""
    calls: list[list[str]] = []
    engine = make_engine(rows_per_owner=4, on_step_events=lambda events: calls.append([e.request_id for e in events]))
    flood = [engine.submit(request(f"flood-{i}", owner="flood", seed=i)) for i in range(8)]
    deadline = time.monotonic() + 30
    while not any(len(ids) == 8 for ids in calls):  # one owner alone fills the call (all 8 admitted, 16 rows)
        assert time.monotonic() < deadline, f"one owner alone never filled a call: {calls}"
        time.sleep(0.01)
    quiet = engine.submit(request("quiet", owner="quiet", seed=99))
    quiet_pixels = pixels(quiet.result(60).images)
    for handle in flood:
        handle.result(60)
    with_quiet = [i for i, ids in enumerate(calls) if "quiet" in ids]
    assert with_quiet == list(range(with_quiet[0], with_quiet[0] + STEPS)), "stepped in every call while it ran"
    assert all(sum(rid.startswith("flood") for rid in calls[i]) == 2 for i in with_quiet), calls
    alone = make_engine().submit(request("alone", seed=99))
    assert np.array_equal(pixels(alone.result(60).images), quiet_pixels), "the share never changes a picture"


def test_rows_per_owner_from_settings():
    from services.common.settings import Settings
    from services.worker.engine.engine import CPU_ROWS_PER_OWNER, owner_share

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert owner_share("auto", cpu) == CPU_ROWS_PER_OWNER and owner_share("auto", cuda) is None
    assert owner_share("off", cpu) is None and owner_share("6", cuda) == 6
    with pytest.raises(ValueError, match="LATENTD_ROWS_PER_OWNER must be auto, off or a whole number >= 1, got '0'"):
        Settings(rows_per_owner="0")
