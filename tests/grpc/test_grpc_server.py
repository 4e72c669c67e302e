"""The gRPC front door: every RPC, streaming, resume, auth, status codes, health, reflection."""

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from tests.grpc.conftest import AUTH

pytestmark = pytest.mark.timeout(60)


def stub(channel):
    return pb_grpc.LatentdServiceStub(channel)


def submit(channel, steps=5, **fields):
    params = pb.GenerationParams(prompt="a red circle on a white background", num_inference_steps=steps, **fields)
    return stub(channel).SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=AUTH).job


def test_submit_get_and_stream_every_step(channel):
    job = submit(channel, steps=6, seed=7, guidance_scale=3.0)
    assert job.status == pb.JOB_STATUS_QUEUED and job.id
    assert json.loads(job.params_json)["seed"] == 7
    events = list(stub(channel).StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id), metadata=AUTH))
    types = [e.event.type for e in events]
    assert types[0] == pb.EVENT_TYPE_QUEUED and types[-1] == pb.EVENT_TYPE_SUCCEEDED
    steps = [e.event.step for e in events if e.event.type == pb.EVENT_TYPE_STEP]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(e.event.total == 6 for e in events if e.event.type == pb.EVENT_TYPE_STEP)
    done = stub(channel).GetJob(pb.GetJobRequest(job_id=job.id), metadata=AUTH).job
    assert done.status == pb.JOB_STATUS_SUCCEEDED and done.step == 6 and len(done.images) == 1
    art = stub(channel).GetArtifact(
        pb.GetArtifactRequest(job_id=job.id, kind=pb.ARTIFACT_KIND_IMAGE, index=0), metadata=AUTH
    )
    assert art.data.startswith(b"\x89PNG") and art.media_type == "image/png"


def test_resume_from_event_id_gives_the_rest_exactly(channel):
    job = submit(channel, steps=5)
    full = [e.event for e in stub(channel).StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id), metadata=AUTH)]
    cut = full[3].id
    rest = [
        e.event
        for e in stub(channel).StreamJobEvents(
            pb.StreamJobEventsRequest(job_id=job.id, after_event_id=cut), metadata=AUTH
        )
    ]
    assert [e.id for e in rest] == [e.id for e in full[4:]]


def test_generate_stream_first_job_then_events(channel):
    params = pb.GenerationParams(prompt="a blue square", num_inference_steps=3)
    replies = list(stub(channel).GenerateStream(pb.GenerateStreamRequest(params=params), metadata=AUTH))
    assert replies[0].WhichOneof("payload") == "job"
    assert [r.event.type for r in replies[1:]][-1] == pb.EVENT_TYPE_SUCCEEDED
    assert sum(r.event.type == pb.EVENT_TYPE_STEP for r in replies[1:]) == 3


def test_trajectory_and_models(channel):
    params = pb.TrajectoryParams(
        kind=pb.TRAJECTORY_KIND_FORWARD,
        generation=pb.GenerationParams(prompt="x", num_inference_steps=2),
        timesteps=[0, 250, 500, 999],
        noise_seed=3,
    )
    job = stub(channel).SubmitTrajectory(pb.SubmitTrajectoryRequest(params=params), metadata=AUTH).job
    assert job.kind == pb.JOB_KIND_TRAJECTORY
    sent = json.loads(job.params_json)
    assert sent["kind"] == "forward" and sent["timesteps"] == [0, 250, 500, 999] and sent["noise_seed"] == 3
    models = stub(channel).ListModels(pb.ListModelsRequest(), metadata=AUTH).models
    assert [(m.name, m.native_width, m.native_height) for m in models] == [("tiny", 64, 64)]


def test_cancel(channel):
    job = submit(channel, steps=200)
    stub(channel).CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=AUTH)
    last = list(stub(channel).StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id), metadata=AUTH))[-1]
    assert last.event.type == pb.EVENT_TYPE_CANCELLED
    with pytest.raises(grpc.RpcError) as err:  # cancelling a finished job
        stub(channel).CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)])
def test_unauthenticated(channel, metadata):
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).ListModels(pb.ListModelsRequest(), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_invalid_argument_names_the_field(channel):
    with pytest.raises(grpc.RpcError) as err:
        submit(channel, steps=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_inference_steps must be between 1 and 1000, got 0" in err.value.details()
    assert ("latentd-param", "num_inference_steps") in tuple(err.value.trailing_metadata())
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).SubmitTrajectory(pb.SubmitTrajectoryRequest(params=pb.TrajectoryParams()), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kind" in err.value.details()


def test_not_found(channel):
    for call in (
        lambda: stub(channel).GetJob(pb.GetJobRequest(job_id="nope"), metadata=AUTH),
        lambda: list(stub(channel).StreamJobEvents(pb.StreamJobEventsRequest(job_id="nope"), metadata=AUTH)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()


def test_full_queue_is_resource_exhausted(gateway, channel):
    gateway.max_queued = 1
    submit(channel, steps=100)
    with pytest.raises(grpc.RpcError) as err:
        submit(channel, steps=100)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()


def test_message_size_limit(channel):
    big = pb.TrajectoryParams(kind=pb.TRAJECTORY_KIND_FORWARD, image=b"\0" * (17 * 1024 * 1024))
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).SubmitTrajectory(pb.SubmitTrajectoryRequest(params=big), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_going_away_stops_the_stream_work(gateway, channel):
    job = submit(channel, steps=300)
    call = stub(channel).StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id), metadata=AUTH)
    next(call)
    deadline = time.monotonic() + 5
    while gateway.sse_readers == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gateway.sse_readers == 1
    call.cancel()
    while gateway.sse_readers and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    assert gateway.sse_readers == 0  # the server closed its upstream reader


def health_status(channel, service):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def test_health_follows_the_workers(gateway, channel):
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def wait_for(status, service):
        deadline = time.monotonic() + 5
        while health_status(channel, service) != status and time.monotonic() < deadline:
            time.sleep(0.05)
        return health_status(channel, service)

    assert wait_for(serving, "latentd.v1.LatentdService") == serving
    assert wait_for(serving, "latentd.v1.LatentdService/tiny") == serving
    gateway.worker_alive = False
    assert wait_for(not_serving, "latentd.v1.LatentdService") == not_serving
    assert wait_for(not_serving, "") == not_serving
    assert wait_for(not_serving, "latentd.v1.LatentdService/tiny") == not_serving
    gateway.worker_alive = True
    assert wait_for(serving, "") == serving


def test_reflection_lists_the_service(channel):
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"latentd.v1.LatentdService", "grpc.health.v1.Health"} <= names


def test_reflection_client_calls_without_generated_code(grpc_target):
    import subprocess
    import sys

    base = [sys.executable, "-m", "client.latentd_client.reflect"]
    listed = subprocess.run(base + [grpc_target, "list"], capture_output=True, text=True, timeout=30)
    assert "latentd.v1.LatentdService" in listed.stdout.split()
    called = subprocess.run(
        base + ["-H", AUTH[0][0] + ": " + AUTH[0][1], grpc_target, "latentd.v1.LatentdService/ListModels"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert called.returncode == 0 and json.loads(called.stdout)["models"][0]["name"] == "tiny"
    denied = subprocess.run(
        base + [grpc_target, "latentd.v1.LatentdService/ListModels"], capture_output=True, text=True, timeout=30
    )
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr


def test_generate_stream_abandoned_cancels_its_job(gateway, channel):
    params = pb.GenerationParams(prompt="a blue square", num_inference_steps=300)
    call = stub(channel).GenerateStream(pb.GenerateStreamRequest(params=params), metadata=AUTH)
    job = next(call).job
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    while gateway.job(job.id)["status"] not in ("cancelled", "succeeded") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.job(job.id)["status"] == "cancelled"
    assert gateway.job(job.id)["progress"]["step"] < 300


def test_calls_are_counted_by_method_and_code(channel):
    from services.api import grpc_server

    def count(method, code):
        return grpc_server.grpc_requests_total.labels(method, code)._value.get()

    ok, missing = count("ListModels", "OK"), count("GetJob", "NOT_FOUND")
    stub(channel).ListModels(pb.ListModelsRequest(), metadata=AUTH)
    with pytest.raises(grpc.RpcError):
        stub(channel).GetJob(pb.GetJobRequest(job_id="nope"), metadata=AUTH)
    assert count("ListModels", "OK") == ok + 1
    assert count("GetJob", "NOT_FOUND") == missing + 1
