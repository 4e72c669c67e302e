"""Through the real service (tests/conftest.py `real_stack`: own redis-server, a Celery worker process on the
tiny or trained model, the gateway under uvicorn, the gRPC door): the client and `latentd` end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from client.latentd_client import Client, InvalidRequestError, NotFoundError
from scripts import run_stack
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live_grpc(real_stack):
    return real_stack.grpc_target


def auth(stack):
    return (("authorization", f"Bearer {stack.keys[0]}"),)


def test_grpc_generate_stream_through_the_real_worker(real_stack, live_grpc):
    with grpc.insecure_channel(live_grpc) as channel:
        stub = pb_grpc.LatentdServiceStub(channel)
        params = pb.GenerationParams(prompt="a red circle on a white background", num_inference_steps=3, seed=1)
        replies = list(stub.GenerateStream(pb.GenerateStreamRequest(params=params), metadata=auth(real_stack)))
        job = replies[0].job
        events = [r.event for r in replies[1:]]
        assert [e.step for e in events if e.type == pb.EVENT_TYPE_STEP] == [1, 2, 3]
        assert events[-1].type == pb.EVENT_TYPE_SUCCEEDED
        resumed = [
            r.event.id
            for r in stub.StreamJobEvents(
                pb.StreamJobEventsRequest(job_id=job.id, after_event_id=events[1].id), metadata=auth(real_stack)
            )
        ]
        assert resumed == [e.id for e in events[2:]]
        done = stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=auth(real_stack)).job
        assert done.status == pb.JOB_STATUS_SUCCEEDED and json.loads(done.params_json)["seed"] == 1
        png = stub.GetArtifact(
            pb.GetArtifactRequest(job_id=job.id, kind=pb.ARTIFACT_KIND_IMAGE, index=0), metadata=auth(real_stack)
        ).data
        assert png.startswith(b"\x89PNG")
        models = stub.ListModels(pb.ListModelsRequest(), metadata=auth(real_stack)).models
        assert real_stack.model in [m.name for m in models]
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (auth(real_stack), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitGeneration(
                    pb.SubmitGenerationRequest(params=pb.GenerationParams(prompt="x", num_inference_steps=0)),
                    metadata=metadata,
                )
            assert err.value.code() == code
        assert "num_inference_steps" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # another key's job does not exist
            stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=(("authorization", f"Bearer {real_stack.keys[1]}"),))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_client_both_transports(real_stack, live_grpc, transport):
    url = real_stack.url if transport == "rest" else f"grpc://{live_grpc}"
    with Client(url, real_stack.keys[0]) as client:
        job = client.generate("a blue square", num_inference_steps=2, seed=5)
        done = client.wait(job.id, timeout=120)
        assert done.status == "succeeded" and done.seed == 5
        assert client.image(job.id, 0).startswith(b"\x89PNG")
        with pytest.raises(InvalidRequestError) as err:
            client.generate("x", guidance_scale=-1)
        assert err.value.param == "guidance_scale"
        with pytest.raises(NotFoundError):
            client.get_job("0" * 32)


def latentd(url, key, *args):
    env = os.environ | {"LATENTD_URL": url, "LATENTD_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "client.latentd_client.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_cli_png_and_gif(real_stack, live_grpc, tmp_path):
    out = tmp_path / "out.png"
    result = latentd(
        f"grpc://{live_grpc}",
        real_stack.keys[0],
        "generate",
        "a red circle on a white background",
        "--steps",
        "3",
        "--guidance",
        "7.5",
        "--seed",
        "1",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "3/3" in result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG"
    frames = tmp_path / "frames"
    result = latentd(
        real_stack.url,
        real_stack.keys[0],
        "trajectory",
        "forward",
        "--prompt",
        "a blue square",
        "--steps",
        "2",
        "--timesteps",
        "0,500,1000",
        "--noise-seed",
        "3",
        "--out-dir",
        str(frames),
    )
    assert result.returncode == 0, result.stderr
    with Image.open(frames / "trajectory.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 3
    result = latentd(real_stack.url, real_stack.keys[0], "generate", "x", "--steps", "0")
    assert result.returncode == 1 and "num_inference_steps" in result.stderr and "Traceback" not in result.stderr


def test_health_not_serving_while_the_worker_is_away(real_stack, live_grpc):
    def status(channel, service=""):
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status

    def wait_for(channel, want, service="", timeout=60):
        deadline = time.monotonic() + timeout
        while status(channel, service) != want and time.monotonic() < deadline:
            time.sleep(0.2)
        return status(channel, service)

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(live_grpc) as channel:
        assert wait_for(channel, serving) == serving
        real_stack.worker.send_signal(signal.SIGTERM)  # a clean stop takes its heartbeat with it
        real_stack.worker.wait(timeout=60)
        try:
            assert wait_for(channel, not_serving) == not_serving
            assert wait_for(channel, not_serving, f"latentd.v1.LatentdService/{real_stack.model}") == not_serving
        finally:
            real_stack.start_worker()
            run_stack.wait_ready(real_stack.url, timeout_s=180, procs=(real_stack.worker,))
        assert wait_for(channel, serving) == serving
