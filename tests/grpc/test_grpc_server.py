"""The gRPC door over the real core: every RPC, streaming, resume, auth, status codes, health, reflection, metrics.

Jobs run on the real stack (tests/conftest.py: Redis, a Celery worker, the gateway and the gRPC door as
processes); refusals that need a setting of their own use a door in this process (conftest `door`)."""

import json
import subprocess
import sys
import time
import urllib.request

import grpc
import httpx
import pytest
import redis
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from scripts import run_stack
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from tests.grpc.conftest import DOOR_KEY, DOOR_REDIS_URL, auth

pytestmark = pytest.mark.timeout(120)


def stub(channel):
    return pb_grpc.LatentdServiceStub(channel)


def key(real_stack, index: int = 0):
    return auth(real_stack.keys[index])


def submit(channel, real_stack, steps=5, **fields):
    params = pb.GenerationParams(prompt="a red circle on a white background", num_inference_steps=steps, **fields)
    return stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=key(real_stack)).job


def stream(channel, real_stack, job_id, after=""):
    request = pb.StreamJobEventsRequest(job_id=job_id, after_event_id=after)
    return [r.event for r in stub(channel).StreamJobEvents(request, metadata=key(real_stack))]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_submit_get_and_stream_every_step(channel, real_stack):
    job = submit(channel, real_stack, steps=6, seed=7, guidance_scale=3.0)
    assert job.status == pb.JOB_STATUS_QUEUED and job.id and job.kind == pb.JOB_KIND_GENERATION
    assert job.generation.seed == 7 and json.loads(job.params_json)["seed"] == 7
    events = stream(channel, real_stack, job.id)
    assert events[0].type == pb.EVENT_TYPE_QUEUED and events[-1].type == pb.EVENT_TYPE_SUCCEEDED
    assert [e.step for e in events if e.type == pb.EVENT_TYPE_STEP] == [1, 2, 3, 4, 5, 6]
    assert all(e.total == 6 and e.attempt == 1 for e in events if e.type == pb.EVENT_TYPE_STEP)
    done = stub(channel).GetJob(pb.GetJobRequest(job_id=job.id), metadata=key(real_stack)).job
    assert done.status == pb.JOB_STATUS_SUCCEEDED and done.step == 6 and len(done.images) == 1
    assert done.attempt == 1 and done.run_seconds > 0 and done.finished_at >= done.started_at > 0
    art = stub(channel).GetArtifact(
        pb.GetArtifactRequest(job_id=job.id, kind=pb.ARTIFACT_KIND_IMAGE, index=0), metadata=key(real_stack)
    )
    assert art.data.startswith(b"\x89PNG") and art.media_type == "image/png"


def test_resume_from_event_id_gives_the_rest_exactly(channel, real_stack):
    job = submit(channel, real_stack, steps=5)
    full = stream(channel, real_stack, job.id)
    assert [e.id for e in stream(channel, real_stack, job.id, full[3].id)] == [e.id for e in full[4:]]


def test_generate_stream_first_job_then_events(channel, real_stack):
    params = pb.GenerationParams(prompt="a blue square", num_inference_steps=3)
    replies = list(stub(channel).GenerateStream(pb.GenerateStreamRequest(params=params), metadata=key(real_stack)))
    assert replies[0].WhichOneof("payload") == "job"
    assert [r.event.type for r in replies[1:]][-1] == pb.EVENT_TYPE_SUCCEEDED
    assert sum(r.event.type == pb.EVENT_TYPE_STEP for r in replies[1:]) == 3


def test_trajectory_jobs_say_which_trajectory(channel, real_stack):
    """Was: a forward, reverse or sweep job came back as JOB_KIND_GENERATION."""
    params = pb.TrajectoryParams(
        kind=pb.TRAJECTORY_KIND_FORWARD,
        generation=pb.GenerationParams(prompt="a red circle", num_inference_steps=2),
        timesteps=[0, 250, 500, 1000],
        noise_seed=3,
    )
    job = stub(channel).SubmitTrajectory(pb.SubmitTrajectoryRequest(params=params), metadata=key(real_stack)).job
    assert job.kind == pb.JOB_KIND_TRAJECTORY and job.trajectory_kind == pb.TRAJECTORY_KIND_FORWARD
    assert list(job.trajectory.timesteps) == [0, 250, 500, 1000] and job.trajectory.noise_seed == 3
    assert stream(channel, real_stack, job.id)[-1].type == pb.EVENT_TYPE_SUCCEEDED
    done = stub(channel).GetJob(pb.GetJobRequest(job_id=job.id), metadata=key(real_stack)).job
    assert [f.timestep for f in done.frames] == [0, 250, 500, 1000]
    assert done.frames[0].alpha_bar == 1.0 and done.frames[0].space == pb.NOISE_SPACE_LATENT
    models = stub(channel).ListModels(pb.ListModelsRequest(), metadata=key(real_stack)).models
    model = next(m for m in models if m.name == real_stack.model)
    assert model.workers >= 1 and model.size_multiple > 0 and model.max_inference_steps > 0


def test_cancel(channel, real_stack):
    job = submit(channel, real_stack, steps=400)
    stub(channel).CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=key(real_stack))
    assert stream(channel, real_stack, job.id)[-1].type == pb.EVENT_TYPE_CANCELLED
    again = stub(channel).CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=key(real_stack)).job
    assert again.status == pb.JOB_STATUS_CANCELLED  # cancelling twice is harmless
    done = submit(channel, real_stack, steps=2)
    stream(channel, real_stack, done.id)
    with pytest.raises(grpc.RpcError) as err:  # cancelling a finished job
        stub(channel).CancelJob(pb.CancelJobRequest(job_id=done.id), metadata=key(real_stack))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)])
def test_unauthenticated(channel, metadata):
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).ListModels(pb.ListModelsRequest(), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_invalid_argument_names_the_field(channel, real_stack):
    with pytest.raises(grpc.RpcError) as err:
        submit(channel, real_stack, steps=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "num_inference_steps must be between 1 and 1000, got 0"
    trailers = dict(err.value.trailing_metadata())
    assert (
        trailers["latentd-param"] == "num_inference_steps" and trailers["latentd-error-type"] == "invalid_request_error"
    )
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).SubmitTrajectory(
            pb.SubmitTrajectoryRequest(params=pb.TrajectoryParams()), metadata=key(real_stack)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "kind is required"
    # no params at all: refused, not run on every default with an empty prompt
    for call in (
        lambda: stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(), metadata=key(real_stack)),
        lambda: list(stub(channel).GenerateStream(pb.GenerateStreamRequest(), metadata=key(real_stack))),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "params is required"
        assert dict(err.value.trailing_metadata())["latentd-param"] == "params"
    forward_of_a_picture = pb.TrajectoryParams(
        kind=pb.TRAJECTORY_KIND_FORWARD, image=b"\x89PNG", generation=pb.GenerationParams(prompt="a red circle")
    )
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).SubmitTrajectory(
            pb.SubmitTrajectoryRequest(params=forward_of_a_picture), metadata=key(real_stack)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["latentd-param"] == "prompt", err.value.details()


def test_not_found(channel, real_stack):
    for call in (
        lambda: stub(channel).GetJob(pb.GetJobRequest(job_id="nope"), metadata=key(real_stack)),
        lambda: stream(channel, real_stack, "nope"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
        assert dict(err.value.trailing_metadata())["latentd-param"] == "job_id"  # the proto's name for it
    job = submit(channel, real_stack, steps=2)
    with pytest.raises(grpc.RpcError) as err:  # another key's job does not exist
        stub(channel).GetJob(pb.GetJobRequest(job_id=job.id), metadata=key(real_stack, 1))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_message_size_limit(channel, real_stack):
    big = pb.TrajectoryParams(kind=pb.TRAJECTORY_KIND_FORWARD, image=b"\0" * (17 * 1024 * 1024))
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).SubmitTrajectory(pb.SubmitTrajectoryRequest(params=big), metadata=key(real_stack))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_refusal_echoing_a_long_value_keeps_its_status_code(door):
    """The details travel in a trailer a client refuses past 16 KiB (as RESOURCE_EXHAUSTED): a 5000-character
    job id, 10,000 bytes of UTF-8, is still NOT_FOUND, its echo cut and its length said."""
    with grpc.insecure_channel(door.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            stub(channel).GetJob(pb.GetJobRequest(job_id="é" * 5000), metadata=auth(DOOR_KEY))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("no job 'éé") and err.value.details().endswith("… (5000 characters)")


def test_a_picture_reference_is_checked_by_its_own_fields(door):
    with grpc.insecure_channel(door.target) as channel:
        params = pb.GenerationParams(prompt="x", image_ref=pb.JobImageRef(job_id="", index=0))
        with pytest.raises(grpc.RpcError) as err:
            stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=auth(DOOR_KEY))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "image.job_id must not be empty"
    assert dict(err.value.trailing_metadata())["latentd-param"] == "image.job_id"


def test_full_queue_is_resource_exhausted_with_retry_after(door):
    with grpc.insecure_channel(door.target) as channel:
        params = pb.GenerationParams(prompt="x", num_inference_steps=10)
        for _ in range(2):
            stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=auth(DOOR_KEY))
        with pytest.raises(grpc.RpcError) as err:
            stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=auth(DOOR_KEY))
    assert (
        err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "queue of model 'tiny' is full" in err.value.details()
    )
    assert dict(err.value.trailing_metadata())["retry-after"] == "2"


def test_one_open_stream_counts_once_and_a_client_going_away_ends_it(channel, real_stack):
    """Was: latentd_grpc_stream_readers counted every stream twice."""
    gauge = ("latentd_grpc_stream_readers", ())
    before = scrape(real_stack.grpc_metrics_port)[gauge]
    job = submit(channel, real_stack, steps=300)
    call = stub(channel).StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id), metadata=key(real_stack))
    next(call)
    assert scrape(real_stack.grpc_metrics_port)[gauge] == before + 1
    call.cancel()
    deadline = time.monotonic() + 5
    while scrape(real_stack.grpc_metrics_port)[gauge] != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scrape(real_stack.grpc_metrics_port)[gauge] == before
    stub(channel).CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=key(real_stack))


def test_generate_stream_abandoned_cancels_its_job(channel, real_stack):
    params = pb.GenerationParams(prompt="a blue square", num_inference_steps=300)
    call = stub(channel).GenerateStream(pb.GenerateStreamRequest(params=params), metadata=key(real_stack))
    job = next(call).job
    next(call)
    call.cancel()
    deadline = time.monotonic() + 20
    get = pb.GetJobRequest(job_id=job.id)
    while stub(channel).GetJob(get, metadata=key(real_stack)).job.status != pb.JOB_STATUS_CANCELLED:
        assert time.monotonic() < deadline, "the abandoned job was not cancelled"
        time.sleep(0.1)
    assert stub(channel).GetJob(get, metadata=key(real_stack)).job.step < 300


def test_health_follows_the_workers(door):
    """The door's health reads the core's readiness: NOT_SERVING without a live worker, SERVING with one."""
    from services.worker.heartbeat import Heartbeat, mark_consumed

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def wait_for(channel, want, service):
        deadline = time.monotonic() + 5
        while (
            got := health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status
        ) != want:
            if time.monotonic() > deadline:
                return got
            time.sleep(0.05)
        return got

    sync = redis.Redis.from_url(DOOR_REDIS_URL)
    beat = Heartbeat(sync, ["tiny"], worker="door-test-worker", ttl_s=10)
    with grpc.insecure_channel(door.target) as channel:
        assert wait_for(channel, not_serving, "") == not_serving
        beat.beat()
        mark_consumed(sync, ["tiny"], "door-test-worker", ttl_s=10)  # what the worker's probe task does
        assert wait_for(channel, serving, "") == serving
        assert wait_for(channel, serving, "latentd.v1.LatentdService/tiny") == serving
        beat.stop()  # a clean stop takes the heartbeat away at once
        assert wait_for(channel, not_serving, "latentd.v1.LatentdService") == not_serving
        assert wait_for(channel, not_serving, "latentd.v1.LatentdService/tiny") == not_serving


def test_reflection_lists_the_service(channel):
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"latentd.v1.LatentdService", "grpc.health.v1.Health"} <= names


def test_reflection_client_calls_without_generated_code(real_stack):
    base = [sys.executable, "-m", "client.latentd_client.reflect"]
    target = real_stack.grpc_target
    listed = subprocess.run(base + [target, "list"], capture_output=True, text=True, timeout=30)
    assert "latentd.v1.LatentdService" in listed.stdout.split()
    header = f"authorization: Bearer {real_stack.keys[0]}"
    called = subprocess.run(
        base + ["-H", header, target, "latentd.v1.LatentdService/ListModels"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert called.returncode == 0 and json.loads(called.stdout)["models"][0]["name"] == real_stack.model
    denied = subprocess.run(
        base + [target, "latentd.v1.LatentdService/ListModels"], capture_output=True, text=True, timeout=30
    )
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr


def test_calls_are_counted_by_method_and_code(channel, real_stack):
    def count(method, code):
        labels = (("code", code), ("method", method))
        return scrape(real_stack.grpc_metrics_port).get(("latentd_grpc_requests_total", labels), 0.0)

    ok, missing = count("ListModels", "OK"), count("GetJob", "NOT_FOUND")
    stub(channel).ListModels(pb.ListModelsRequest(), metadata=key(real_stack))
    with pytest.raises(grpc.RpcError):
        stub(channel).GetJob(pb.GetJobRequest(job_id="nope"), metadata=key(real_stack))
    assert count("ListModels", "OK") == ok + 1
    assert count("GetJob", "NOT_FOUND") == missing + 1


@pytest.mark.parametrize("metrics_port", ["off", "taken"])
def test_the_door_serves_with_its_metrics_port_off_or_taken(real_stack, metrics_port, tmp_path):
    """Was: the door crashed when LATENTD_GRPC_METRICS_PORT was off or its port was taken."""
    import socket

    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    setting = "off" if metrics_port == "off" else holder.getsockname()[1]
    port = run_stack.free_port()
    log = open(tmp_path / "grpc.log", "w")
    door = run_stack.start_grpc(
        real_stack.redis_url, port, log=log, grpc_metrics_port=setting, api_keys=real_stack.keys[0]
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            models = stub(channel).ListModels(pb.ListModelsRequest(), metadata=key(real_stack)).models
            assert real_stack.model in [m.name for m in models]
        assert door.poll() is None, (tmp_path / "grpc.log").read_text()
    finally:
        run_stack.stop([door])
        holder.close()


def _png_b64(stack) -> str:
    """A picture of the served model's native size, base64 PNG."""
    import base64
    import io

    from PIL import Image

    model = httpx.get(stack.url + "/v1/models", headers={"authorization": f"Bearer {stack.keys[0]}"}).json()
    native = model["data"][0]
    buffer = io.BytesIO()
    Image.new("RGB", (native["native_width"], native["native_height"]), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_rest_and_grpc_show_the_same_job_of_every_kind(channel, real_stack):
    """For the same job, REST and gRPC give the same kind, status, params, images and frames."""
    from client.latentd_client.types import Job

    bodies = [
        (
            "/v1/generations",
            {"prompt": "a red circle", "num_inference_steps": 2, "seed": 1, "guidance_scale": 3.0, "sampler": "euler"},
        ),
        (
            "/v1/trajectories",
            {"kind": "forward", "prompt": "a red circle", "num_inference_steps": 2, "timesteps": [0, 500]},
        ),
        ("/v1/trajectories", {"kind": "reverse", "prompt": "a red circle", "num_inference_steps": 2}),
        (
            "/v1/trajectories",
            {
                "kind": "guidance_sweep",
                "prompt": "a red circle",
                "num_inference_steps": 2,
                "guidance_scales": [0.0, 7.5],
            },
        ),
    ]
    picture = _png_b64(real_stack)
    bodies += [  # image to image and inpainting (a 64x64 picture: the default model's native size)
        ("/v1/generations", {"prompt": "a red circle", "num_inference_steps": 4, "image": picture, "strength": 0.5}),
        (
            "/v1/generations",
            {"prompt": "a red circle", "num_inference_steps": 2, "image": picture, "mask": picture, "seed": 3},
        ),
        (
            "/v1/trajectories",
            {"kind": "reverse", "prompt": "a red circle", "num_inference_steps": 4, "image": picture, "strength": 0.5},
        ),
    ]
    headers = {"authorization": f"Bearer {real_stack.keys[0]}"}
    for path, body in bodies:
        job_id = httpx.post(real_stack.url + path, json=body, headers=headers, timeout=30).json()["id"]
        stream(channel, real_stack, job_id)  # to the end
        rest = Job.from_dict(httpx.get(f"{real_stack.url}/v1/jobs/{job_id}", headers=headers, timeout=30).json())
        over_grpc = Job.from_proto(stub(channel).GetJob(pb.GetJobRequest(job_id=job_id), metadata=key(real_stack)).job)
        for field in ("kind", "status", "params", "images", "frames", "error", "attempt", "step"):
            assert getattr(over_grpc, field) == getattr(rest, field), (body, field)
        assert rest.kind == body.get("kind", "generation") and rest.status == "succeeded"


def test_idempotency_key_metadata_makes_a_retry_return_the_first_job(door):
    with grpc.insecure_channel(door.target) as channel:
        params = pb.GenerationParams(prompt="a red circle", num_inference_steps=10)
        metadata = auth(DOOR_KEY) + (("idempotency-key", "grpc-retry-1"),)
        first = stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=metadata).job
        again = stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=metadata).job
        assert again.id == first.id and again.generation.seed == first.generation.seed
        # the queue holds 2: a second new job fits, a third does not, the retry still does
        stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=auth(DOOR_KEY))
        assert (
            stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=metadata).job.id
            == first.id
        )
        other = pb.GenerationParams(prompt="a blue square", num_inference_steps=10)
        with pytest.raises(grpc.RpcError) as err:
            stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=other), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert first.id in err.value.details() and dict(err.value.trailing_metadata())["latentd-param"] == "Idempotency-Key"
    assert redis.Redis.from_url(DOOR_REDIS_URL).scard("latentd:pending:tiny") == 2


def test_no_message_breaks_the_door(door):
    """Seeded random GenerationParams and TrajectoryParams (extreme numbers, NaN, unknown enum values, odd strings
    and bytes, half-filled picture references): every refusal is INVALID_ARGUMENT or NOT_FOUND with details, never
    UNKNOWN or INTERNAL."""
    import random

    from google.protobuf.descriptor import FieldDescriptor as F

    rnd = random.Random(11)
    values = {
        F.TYPE_INT32: [0, -1, 7, 1001, 2**31 - 1, -(2**31)],
        F.TYPE_INT64: [0, -1, 2**63 - 1, -(2**63)],
        F.TYPE_UINT32: [0, 1, 2**32 - 1],
        F.TYPE_UINT64: [0, 1, 2**64 - 1],
        F.TYPE_FLOAT: [0.0, -1.0, float("nan"), float("inf"), 1e38, 0.5],
        F.TYPE_DOUBLE: [0.0, -1.0, float("nan"), float("-inf"), 1e308, 0.5],
        F.TYPE_STRING: ["", "x", "\x00", "é" * 3000, "ddim", "../x"],
        F.TYPE_BYTES: [b"", b"\x89PNG\r\n\x1a\n", bytes(range(256))],
        F.TYPE_BOOL: [True, False],
        F.TYPE_ENUM: [0, 1, 2, 99, -5],
    }

    def fill(message, fields, depth=0):
        for field in fields:
            if field.type == F.TYPE_MESSAGE:
                if depth < 2 and not field.is_repeated:
                    sub = getattr(message, field.name)
                    sub.SetInParent()
                    fill(sub, [f for f in sub.DESCRIPTOR.fields if rnd.random() < 0.5], depth + 1)
            elif field.is_repeated:
                getattr(message, field.name).extend(rnd.choice(values[field.type]) for _ in range(rnd.randint(0, 3)))
            else:
                setattr(message, field.name, rnd.choice(values[field.type]))
        return message

    def mutated(params):  # a valid request with one or two fields set at random
        generation = pb.GenerationParams(prompt="a red circle", num_inference_steps=5)
        message = (
            generation
            if params is pb.GenerationParams
            else params(kind=pb.TRAJECTORY_KIND_REVERSE, generation=generation)
        )
        return fill(message, rnd.sample(list(params.DESCRIPTOR.fields), rnd.choice([1, 1, 2])))

    codes = set()
    with grpc.insecure_channel(door.target) as channel:
        for _ in range(100):
            for call, request, params in (
                (stub(channel).SubmitGeneration, pb.SubmitGenerationRequest, pb.GenerationParams),
                (stub(channel).SubmitTrajectory, pb.SubmitTrajectoryRequest, pb.TrajectoryParams),
            ):
                try:
                    call(request(params=mutated(params)), metadata=auth(DOOR_KEY), timeout=10)
                    codes.add("OK")
                except grpc.RpcError as err:
                    codes.add(err.code().name)
                    assert err.details(), err.code()
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the door's queue of 2, not a long echo
                        assert "is full" in err.details(), err.details()
                    else:
                        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
                            err.code(),
                            err.details(),
                        )
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= codes, codes


@pytest.mark.parametrize(
    "method, body, reason",
    [
        ("SubmitGeneration", b"\xff\xff\xff", "wire format was corrupt"),
        ("GetJob", b"\x0a\x02\xff\xfe", "string field had bad UTF-8"),  # job_id, not UTF-8
        ("StreamJobEvents", b"\x0a\x05ab", "wire format was corrupt"),  # a string cut short
        ("GenerateStream", b"\xff", "wire format was corrupt"),
    ],
)
def test_a_request_that_does_not_parse_is_invalid_argument_naming_its_message(door, method, body, reason):
    """Not grpcio's UNKNOWN naming a Python exception: INVALID_ARGUMENT, the message the method takes, and why (in
    protobuf's words: its default backend's here); the key is checked first, as for any other request."""

    streams = method in ("StreamJobEvents", "GenerateStream")
    with grpc.insecure_channel(door.target) as channel:
        call = (channel.unary_stream if streams else channel.unary_unary)(f"/latentd.v1.LatentdService/{method}")
        with pytest.raises(grpc.RpcError) as refused:
            list(call(body, metadata=auth(DOOR_KEY), timeout=10)) if streams else call(
                body, metadata=auth(DOOR_KEY), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        message = f"the request is not a latentd.v1.{method}Request message in protobuf's binary encoding ("
        assert refused.value.details().startswith(message) and refused.value.details().endswith(")")
        if api_implementation.Type() == "upb":
            assert refused.value.details() == f"{message}{reason})"
        with pytest.raises(grpc.RpcError) as unknown_key:
            list(call(body, metadata=auth("nope"), timeout=10)) if streams else call(
                body, metadata=auth("nope"), timeout=10
            )
        assert unknown_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
