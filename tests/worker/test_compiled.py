"""The GPU path's machinery on the CPU: row buckets and padding, warm-up, the deferred finiteness check, the
output thread, and the settings that choose them (services/worker/engine/compiled.py, finite.py, output.py)."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

from services.common.settings import Settings
from services.worker import metrics as worker_metrics
from services.worker.engine.compiled import (
    Backbone,
    SpeedOptions,
    bucket_for,
    bucket_sizes,
    decode_sizes,
    pad_rows,
    parse_buckets,
    resolve_compile_mode,
    warmup_inputs,
)
from services.worker.engine.engine import Engine
from services.worker.engine.errors import NonFiniteOutputError
from services.worker.engine.requests import GenerationRequest
from tests.fixtures.pictures import pixels

STEPS = 8


def request(request_id: str, **overrides) -> GenerationRequest:
    fields = dict(prompt="a red circle", seed=1234, num_inference_steps=STEPS, guidance_scale=7.5)
    fields.update(overrides)
    return GenerationRequest(request_id=request_id, **fields)


def test_bucket_arithmetic():
    assert parse_buckets("1,2,4,8,16,32,48,64") == (1, 2, 4, 8, 16, 32, 48, 64)
    assert parse_buckets(" 8, 2 ,2") == (2, 8)
    assert parse_buckets("") == parse_buckets("off") == parse_buckets(None) == ()
    with pytest.raises(ValueError):
        parse_buckets("0,4")
    # capped at max_batch_rows, which is always a bucket (a call never has more rows)
    assert bucket_sizes((1, 2, 4, 8, 16, 32, 48, 64), 12) == (1, 2, 4, 8, 12)
    assert bucket_sizes((1, 2, 4, 8, 16, 32, 48, 64), 64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert bucket_sizes((), 64) == ()
    sizes = (1, 2, 4, 8, 16, 32, 48, 64)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 9, 17, 33, 48, 49, 64)] == [1, 2, 4, 8, 16, 32, 48, 48, 64, 64]
    assert bucket_for(7, ()) == 7
    assert decode_sizes((1, 2, 4, 64), 16) == (1, 2, 4, 8, 16)
    assert decode_sizes((2, 4, 8, 16, 32, 48, 64), 16) == (2, 4, 8, 16)
    assert decode_sizes((), 16) == ()
    values = torch.arange(6.0).reshape(3, 2)
    padded = pad_rows(values, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], values) and torch.equal(padded[3:], values[[2, 2]])
    assert pad_rows(values, 3) is values


def test_padded_backbone_call_gives_each_row_what_it_gives_unpadded(tiny_model):
    """Padding rows are copies of a real row and are dropped: the real rows' outputs are those of the unpadded
    call (to float32 rounding of a different batch shape; bit for bit at one row)."""
    engine = Engine(tiny_model)
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 3, 5, 7):
            latents, _, cond = warmup_inputs(engine, rows)
            latents = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (rows,)).float()
            cond = {key: torch.randn_like(value) for key, value in cond.items()}
            plain = Backbone(tiny_model)(latents, timesteps, cond)
            padded = Backbone(tiny_model, (1, 2, 4, 8, 16))(latents, timesteps, cond)
            assert padded.shape == plain.shape
            assert (padded - plain).abs().max() <= 1e-5
            if rows == 1:
                assert torch.equal(padded, plain)


def test_buckets_change_no_picture(make_engine):
    """The same request with and without padding, alone and batched among others in buckets: ≤ 1/255."""
    target = request("target", seed=7, eta=0.5, num_images=2)
    plain = make_engine().submit(target).result(60)
    padded_engine = make_engine(buckets=(1, 2, 4, 8, 16), max_batch_rows=12)
    alone = padded_engine.submit(target).result(60)
    others = [
        padded_engine.submit(request(f"o{i}", prompt=p, seed=50 + i, num_inference_steps=s, guidance_scale=g))
        for i, (p, s, g) in enumerate([("a blue square", 5, 0.0), ("green", 12, 1.0), ("", 3, 3.0)])
    ]
    batched = padded_engine.submit(target)
    for handle in others:
        handle.result(60)
    batched = batched.result(60)
    for result in (alone, batched):
        assert np.abs(pixels(result.images) - pixels(plain.images)).max() <= 1 / 255 + 1e-9


def test_warm_up_runs_every_bucket_and_reports_its_time(tiny_model):
    calls, threads = [], set()
    engine = Engine(tiny_model, buckets=(1, 2, 4, 8, 16, 32), max_batch_rows=12)
    backbone, decoder = engine.backbone, engine.decoder

    class Counting:
        def __init__(self, inner, name):
            self.inner, self.name, self.sizes, self.compile_mode = inner, name, inner.sizes, inner.compile_mode

        def __call__(self, latents, *args):
            calls.append((self.name, latents.shape[0]))
            threads.add(threading.current_thread().name)
            return self.inner(latents, *args)

    engine.backbone, engine.decoder = Counting(backbone, "backbone"), Counting(decoder, "decode")
    engine.start()
    try:
        seconds = engine.warm_up(timeout=60)
    finally:
        engine.stop()
    assert threads == {f"engine-{tiny_model.name}"}  # where a captured CUDA graph must be replayed
    assert calls == [("backbone", n) for n in (1, 2, 4, 8, 12)] + [("decode", n) for n in (1, 2, 4, 8, 16)]
    assert seconds["total_s"] >= seconds["backbone_s"] > 0
    value = worker_metrics.warmup_seconds.labels(model=tiny_model.name)._value.get()
    assert value == pytest.approx(seconds["total_s"])
    # under CUDA graphs (reduce-overhead) each bucket runs twice: the second call records its graph, at warm-up
    calls.clear()
    engine = Engine(tiny_model, buckets=(2, 4), max_batch_rows=4)
    engine.backbone = Counting(engine.backbone, "backbone")
    engine.decoder = Counting(engine.decoder, "decode")
    engine.backbone.compile_mode = "reduce-overhead"  # the mode's warm-up, without compiling on the CPU
    engine.start()
    try:
        engine.warm_up(timeout=60)
    finally:
        engine.stop()
    assert calls == [("backbone", n) for n in (2, 2, 4, 4)] + [("decode", n) for n in (2, 2, 4, 4, 8, 8, 16, 16)]


def test_non_finite_rows_fail_naming_their_step_when_read_every_few_steps(make_engine, tiny_model):
    """With the flags read every 4 iterations, a request poisoned from its first step still fails (naming step
    1) and the others finish with the pictures they make alone."""

    def encode_prompts(prompts):
        encoded = tiny_model.encode_prompts(prompts)
        return [
            {key: torch.full_like(value, float("nan")) for key, value in c.items()} if prompt == "poison" else c
            for prompt, c in zip(prompts, encoded)
        ]

    poisoned = dataclasses.replace(tiny_model)
    poisoned.encode_prompts = encode_prompts
    clean_alone = make_engine().submit(request("clean")).result(60)
    engine = make_engine(model=poisoned, finite_check_every=4, output_thread=True)
    gate = threading.Event()
    engine.call(lambda model: gate.wait(30))
    bad = engine.submit(request("bad", prompt="poison", num_inference_steps=40))
    clean = engine.submit(request("clean"))
    gate.set()
    with pytest.raises(NonFiniteOutputError, match="request bad: latents became non-finite at step 1 of 40"):
        bad.result(60)
    steps_seen = [event.step for event in bad.events(timeout=5)]
    assert max(steps_seen, default=0) < 4  # failed at the first read of the flags
    assert np.abs(pixels(clean.result(60).images) - pixels(clean_alone.images)).max() <= 1 / 255


def test_output_thread_writes_every_step_before_the_result(make_engine):
    """Step events go out on the output thread, in order, and a request's result comes only after its last
    step event was written; pictures as without the thread."""
    written: list[tuple[str, int]] = []
    seen_at_result: dict[str, int] = {}
    lock = threading.Lock()

    def on_events(events):
        assert threading.current_thread().name.startswith("engine-output-")
        with lock:
            written.extend((e.request_id, e.step) for e in events)

    plain = make_engine().submit(request("a")).result(60)
    engine = make_engine(on_step_events=on_events, output_thread=True)
    handles = {rid: engine.submit(request(rid, num_inference_steps=steps)) for rid, steps in (("a", STEPS), ("b", 3))}
    for rid, handle in handles.items():
        handle._future.add_done_callback(
            lambda _, rid=rid: seen_at_result.__setitem__(rid, max(s for r, s in written if r == rid))
        )
    results = {rid: handle.result(60) for rid, handle in handles.items()}
    assert seen_at_result == {"a": STEPS, "b": 3}
    assert [s for r, s in written if r == "a"] == list(range(1, STEPS + 1))
    assert np.array_equal(pixels(results["a"].images), pixels(plain.images))


def test_speed_options_from_settings():
    cpu = SpeedOptions.from_settings(Settings(), "cpu")
    assert cpu.compile_mode is None and cpu.buckets == () and cpu.finite_check_every == 1
    assert not cpu.channels_last and cpu.output_thread
    cuda = SpeedOptions.from_settings(Settings(), torch.device("cuda"))
    assert cuda.compile_mode == "default" and cuda.buckets == (2, 4, 8, 16, 32, 48, 64)
    assert cuda.finite_check_every == 8 and cuda.channels_last and cuda.compile_dynamic
    off = SpeedOptions.from_settings(Settings(compile_mode="off", batch_buckets="1,4"), torch.device("cuda"))
    assert off.compile_mode is None and off.buckets == () and not off.channels_last
    forced = SpeedOptions.from_settings(Settings(compile_mode="max-autotune", batch_buckets="4,1"), "cpu")
    assert forced.compile_mode == "max-autotune" and forced.buckets == (1, 4)
    assert resolve_compile_mode("reduce-overhead", "cuda") == "reduce-overhead"
    with pytest.raises(ValueError, match="compile mode"):
        resolve_compile_mode("fast", "cpu")


@pytest.mark.skipif(
    os.environ.get("LATENTD_TEST_COMPILE") != "1",
    reason="torch.compile on the CPU (Inductor's C++ backend) took 267 s for the tiny model's 3 row buckets and "
    "5 decode buckets on the shared 2-core CI CPU; set LATENTD_TEST_COMPILE=1 to run it (tests/gpu runs it on CUDA)",
)
def test_compiled_engine_matches_eager_on_the_cpu(make_engine, tiny_model):
    target = request("c", num_images=2)
    eager = make_engine().submit(target).result(60)
    engine = Engine(tiny_model, buckets=(1, 2, 4), max_batch_rows=4, compile_mode="default")
    engine.start()
    engine.warm_up()
    try:
        compiled = engine.submit(target).result(600)
    finally:
        engine.stop()
    assert np.abs(pixels(compiled.images) - pixels(eager.images)).max() <= 1 / 255 + 1e-9


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_every_family_warms_up_and_pads_without_changing_a_picture(family_paths, name):
    """The warm-up's inputs carry each family's own conditioning (SDXL's time ids, Flux's guidance, pooled text),
    and padded calls give each family's request its unpadded picture."""
    from services.worker.loading import load_model

    model = load_model(family_paths[name])
    target = GenerationRequest(request_id="f", prompt="a red circle", seed=3, num_inference_steps=3, num_images=2)
    plain = Engine(model).start()
    padded = Engine(model, buckets=(1, 2, 4, 8), max_batch_rows=8).start()
    try:
        seconds = padded.warm_up(timeout=120)
        assert seconds["backbone_s"] > 0
        a = pixels(plain.submit(target).result(120).images)
        b = pixels(padded.submit(dataclasses.replace(target, num_images=1)).result(120).images)
        c = pixels(padded.submit(target).result(120).images)
    finally:
        plain.stop()
        padded.stop()
    assert np.abs(c - a).max() <= 1 / 255 + 1e-9
    assert b.shape[0] == 1


@pytest.mark.parametrize(
    "sizes,graphs", [((2, 4, 8, 12), 1), ((1, 2, 4, 8, 12), 2)], ids=["from-2-one-graph", "with-1-two-graphs"]
)
def test_a_dynamic_batch_compiles_one_graph_for_every_bucket(tiny_model, sizes, graphs):
    """What the warm-up time rests on: with the batch marked dynamic, every bucket from 2 rows up runs one graph
    (counted with a backend that only counts, so no C++ compile), and 1 row specialises a second one."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled: list[int] = []

    def counting(graph, example_inputs):
        compiled.append(len(graph.graph.nodes))
        return graph.forward

    engine = Engine(tiny_model, max_batch_rows=12)
    engine.backbone = Backbone(tiny_model, sizes, compile_mode="default", dynamic=True, backend=counting)
    with torch.inference_mode():
        for rows in sizes:
            engine.backbone(*warmup_inputs(engine, rows))
        engine.backbone(*warmup_inputs(engine, 3))  # padded to 4: no new graph
    torch._dynamo.reset()
    assert len(compiled) == graphs


def test_a_failing_delivery_fails_its_requests_instead_of_leaving_them_waiting(make_engine, monkeypatch):
    from services.worker.engine import engine as engine_module
    from services.worker.engine.errors import EngineError

    def broken(pixels):
        raise RuntimeError("no pictures today")

    engine = make_engine(output_thread=True)
    monkeypatch.setattr(engine_module, "to_pil", broken)
    with pytest.raises(EngineError, match="request d failed in the engine: RuntimeError: no pictures today"):
        engine.submit(request("d", num_inference_steps=2)).result(60)


def test_output_queue_runs_in_order_and_survives_a_failing_item():
    from services.worker.engine.output import OutputQueue

    ran: list[int] = []
    output = OutputQueue("engine-output-test").start()

    def fail():
        raise RuntimeError("one item fails")

    for i in range(50):
        output.submit(ran.append, i)
        if i == 10:
            output.submit(fail)
    output.close(10)
    assert ran == list(range(50))
    inline = OutputQueue("inline", threaded=False).start()
    inline.submit(ran.append, 99)  # without the thread: at once, on the caller's thread
    assert ran[-1] == 99


def test_worker_dtype_setting_takes_bfloat16_beside_float16(tiny_model_path):
    from services.worker.loading import ModelLoadError, load_model, resolve_dtype

    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("") is None
    with pytest.raises(ValueError, match="LATENTD_WORKER_DTYPE must be one of float16, bfloat16, float32"):
        resolve_dtype("fp8")
    assert Settings(worker_dtype="bfloat16").worker_dtype == "bfloat16"
    with pytest.raises(ModelLoadError, match="dtype torch.bfloat16 is not supported on CPU"):
        load_model(tiny_model_path, dtype=resolve_dtype("bfloat16"))  # half precision is for CUDA (tests/gpu)
