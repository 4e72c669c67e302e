"""How the doors count what they refuse, against real Redis: a submission refused because Redis stalled is
`latentd_rejections_total{reason="redis_unavailable"}` on either door (a read refused the same way is not a
rejection), and a body refused by its Content-Length is counted under the route it was sent to."""

from __future__ import annotations

import io
import os
import signal

import grpc
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY

from scripts import run_stack
from services.api.app import create_app
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from services.common.jobstore import JobStore
from services.common.settings import Settings, hash_key
from tests.fixtures.gateway import in_process_gateway
from tests.fixtures.tiny_model import published_info
from tests.grpc.conftest import InProcessDoor, auth

pytestmark = pytest.mark.timeout(120)

KEY = "refusals-key"
REDIS_URL = "redis://127.0.0.1:6379/10"


def rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("latentd_rejections_total", {"reason": reason}) or 0.0


def http_requests(route: str, method: str, status: int) -> float:
    labels = {"route": route, "method": method, "status": str(status)}
    return REGISTRY.get_sample_value("latentd_http_requests_total", labels) or 0.0


def png(size: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), "white").save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(autouse=True)
def no_metrics_port(monkeypatch):
    monkeypatch.setenv("LATENTD_API_METRICS_PORT", "off")  # read in-process, from the registry


@pytest.fixture(scope="module")
def stalled_redis():
    """A redis-server of the module's own that knows the tiny model, then stops answering (SIGSTOP): it takes
    connections (the kernel does) but answers nothing, as a stalled or partitioned Redis does."""
    proc, url = run_stack.start_redis()
    JobStore.from_url(url).publish_model(published_info())
    os.kill(proc.pid, signal.SIGSTOP)
    yield url
    os.kill(proc.pid, signal.SIGCONT)
    run_stack.stop([proc])


def stalled_settings(url: str) -> Settings:
    return Settings(redis_url=url, api_key_hashes=hash_key(KEY), redis_timeout_s=0.3, retry_after_s=2)


def test_rest_submissions_refused_while_redis_stalls_are_counted(stalled_redis):
    """Was: every 503 of an outage went uncounted; redis_unavailable was in the HELP only."""
    submissions = [
        ("/v1/generations", {"json": {"prompt": "x"}}),
        ("/v1/trajectories", {"json": {"kind": "reverse", "prompt": "x"}}),
        ("/v1/images/generations", {"json": {"prompt": "x"}}),
        ("/v1/images/edits", {"files": {"image": ("in.png", png(), "image/png")}, "data": {"prompt": "x"}}),
    ]
    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(stalled_settings(stalled_redis)), headers=headers) as client:
        before = rejections("redis_unavailable")
        for path, body in submissions:
            response = client.post(path, **body)
            assert response.status_code == 503, (path, response.text)
            assert "job store (Redis) is unreachable" in response.json()["error"]["message"]
        assert rejections("redis_unavailable") - before == len(submissions)
        for path in ("/v1/models", "/v1/jobs/0123456789abcdef"):  # reads: refused the same way, no rejection
            assert client.get(path).status_code == 503, path
        assert rejections("redis_unavailable") - before == len(submissions)


def test_grpc_submissions_refused_while_redis_stalls_are_counted(stalled_redis):
    door = InProcessDoor(stalled_settings(stalled_redis))
    try:
        before = rejections("redis_unavailable")
        params = pb.GenerationParams(prompt="x", num_inference_steps=2)
        with grpc.insecure_channel(door.target) as channel:
            stub = pb_grpc.LatentdServiceStub(channel)
            calls = [
                lambda: stub.SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=auth(KEY)),
                lambda: stub.SubmitTrajectory(
                    pb.SubmitTrajectoryRequest(
                        params=pb.TrajectoryParams(kind=pb.TRAJECTORY_KIND_REVERSE, generation=params)
                    ),
                    metadata=auth(KEY),
                ),
                lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(params=params), metadata=auth(KEY))),
                lambda: stub.GetJob(pb.GetJobRequest(job_id="0123456789abcdef"), metadata=auth(KEY)),  # a read
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert rejections("redis_unavailable") - before == 3
    finally:
        door.close()


@pytest.fixture
def small_body_gateway():
    with in_process_gateway(REDIS_URL, KEY, max_body_bytes=4096) as client:
        yield client


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/generations", {"json": {"prompt": "x" * 5000}}),
        ("/v1/trajectories", {"json": {"kind": "reverse", "prompt": "x" * 5000}}),
        ("/v1/images/generations", {"json": {"prompt": "x" * 5000}}),
        ("/v1/images/edits", {"files": {"image": ("big.png", b"\0" * 5000, "image/png")}, "data": {"prompt": "x"}}),
    ],
)
def test_a_body_refused_by_its_content_length_is_counted_under_its_route(small_body_gateway, path, body):
    """Was: refused before routing, it was counted as route="unmatched" (a chunked one got its route)."""
    before = {route: http_requests(route, "POST", 413) for route in (path, "unmatched")}
    response = small_body_gateway.post(path, **body)
    assert response.status_code == 413 and "bytes; the limit is 4096" in response.json()["error"]["message"]
    assert http_requests(path, "POST", 413) - before[path] == 1
    assert http_requests("unmatched", "POST", 413) == before["unmatched"]


def test_an_unknown_path_over_the_limit_is_still_unmatched(small_body_gateway):
    before = http_requests("unmatched", "POST", 413)
    assert small_body_gateway.post("/v1/nowhere", content=b"x" * 5000).status_code == 413
    assert http_requests("unmatched", "POST", 413) - before == 1
