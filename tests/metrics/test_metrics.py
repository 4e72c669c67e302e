"""Every metric after real jobs through the real stack: a gateway process, a Celery worker process
(threads pool, the engine, a tiny diffusers model) and Redis (database 12). Both metrics ports are
scraped; each metric must exist with its type and a value that moved."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/12"
MODEL = "tiny-metrics"
QUEUED_AT_LEAST_S = 0.5  # the queued jobs are held at least this long behind the long one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def value(families: dict, name: str, suffix: str = "", **labels) -> float:
    """Sum of the samples of `name+suffix` whose labels include `labels` (0 when none)."""
    family = families.get(name)
    if family is None:
        return 0.0
    return sum(
        s.value
        for s in family.samples
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("models") / MODEL)
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    api_port, api_metrics, worker_metrics = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "LATENTD_REDIS_URL": REDIS_URL,
        "LATENTD_WORKER_MODELS": str(model_dir),
        "LATENTD_WORKER_DEVICE": "cpu",
        "LATENTD_MAX_BATCH_ROWS": "8",
        "LATENTD_DEFAULT_MODEL": MODEL,
        "LATENTD_API_METRICS_PORT": str(api_metrics),
        "LATENTD_WORKER_METRICS_PORT": str(worker_metrics),
        "LATENTD_MAX_BODY_BYTES": "4096",
        "LATENTD_API_KEYS": "",
        "LATENTD_API_KEY_HASHES": "",
    }
    log_dir = tmp_path_factory.mktemp("logs")
    # One pool thread: a long job holds it, so the jobs behind it wait in the queue (queue depth).
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "services.worker.celery_app",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "1",
            "-Q",
            f"latentd.{MODEL}",
            "-n",
            "metrics@%h",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=open(log_dir / "worker.log", "w"),
        stderr=subprocess.STDOUT,
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", str(api_port)],
        cwd=ROOT,
        env=env,
        stdout=open(log_dir / "gateway.log", "w"),
        stderr=subprocess.STDOUT,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)

    def ready():
        for proc, name in ((worker, "worker"), (gateway, "gateway")):
            if proc.poll() is not None:
                pytest.fail(f"{name} exited: {(log_dir / f'{name}.log').read_text()[-3000:]}")
        try:
            return http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 120, "a ready gateway with a live worker")
        yield {"http": http, "api_metrics": api_metrics, "worker_metrics": worker_metrics, "redis": r, "logs": log_dir}
    finally:
        http.close()
        for proc in (gateway, worker):
            proc.terminate()
        for proc in (gateway, worker):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        r.flushdb()


def job_status(http: httpx.Client, job_id: str) -> str:
    return http.get(f"/v1/jobs/{job_id}").json()["status"]


def submit(http: httpx.Client, **fields) -> str:
    body = {"prompt": "a red circle", "seed": 1, "num_inference_steps": 3, "guidance_scale": 7.5, **fields}
    response = http.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


@pytest.mark.timeout(600)
def test_every_metric_moves_after_real_jobs(stack):
    http = stack["http"]
    api0, worker0 = scrape(stack["api_metrics"]), scrape(stack["worker_metrics"])

    # 1. A long job holds the single pool thread; an SSE reader follows it.
    long_id = submit(http, num_inference_steps=900)
    sse_events: list[str] = []

    def read_sse():
        with httpx.Client(base_url=http.base_url, timeout=None) as sse:
            with sse.stream("GET", f"/v1/jobs/{long_id}/events") as response:
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        sse_events.append(line.split(":", 1)[1].strip())

    reader = threading.Thread(target=read_sse, daemon=True)
    reader.start()
    wait_for(lambda: "step" in sse_events, 60, "the long job's first step")

    # 2. Two jobs behind it wait in the queue.
    queued = [submit(http, num_images=2, seed=s) for s in (2, 3)]
    during_api = wait_for(
        lambda: (lambda f: f if value(f, "latentd_queue_depth", model=MODEL) >= 1 else None)(
            scrape(stack["api_metrics"])
        ),
        30,
        "queue depth >= 1",
    )
    assert value(during_api, "latentd_sse_readers") >= 1
    assert value(during_api, "latentd_workers_live", model=MODEL) == 1
    during_worker = scrape(stack["worker_metrics"])
    assert value(during_worker, "latentd_engine_active_requests", model=MODEL) == 1

    # 3. Cancel the long one (after a known wait, which the queued jobs' wait must include); the
    # queued ones then run and succeed.
    time.sleep(QUEUED_AT_LEAST_S)
    assert http.post(f"/v1/jobs/{long_id}/cancel").status_code == 200
    for job_id in [long_id] + queued:
        wait_for(
            lambda job_id=job_id: job_status(http, job_id) in ("succeeded", "failed", "cancelled"), 120, f"job {job_id}"
        )
    assert job_status(http, long_id) == "cancelled"
    assert [job_status(http, j) for j in queued] == ["succeeded", "succeeded"]
    reader.join(timeout=30)
    assert sse_events[-1] == "cancelled"

    # 4. A job the worker cannot run (its record lacks the prompt): a failure with its type.
    import asyncio

    import redis.asyncio as aioredis
    from celery import Celery

    from services.common.jobstore import AsyncJobStore, JobStore
    from services.common.tasks import RUN_TASK, queue_for

    broken = uuid.uuid4().hex

    async def create_broken():
        client = aioredis.Redis.from_url(REDIS_URL)
        await AsyncJobStore(client, 600).create(
            broken, kind="generation", model=MODEL, owner="metrics-test", params={"model": MODEL}
        )
        await client.aclose()

    asyncio.run(create_broken())
    producer = Celery("metrics-test", broker=REDIS_URL)
    producer.conf.update(task_serializer="json")
    producer.send_task(RUN_TASK, args=[MODEL], queue=queue_for(MODEL))
    store = JobStore.from_url(REDIS_URL, 600)
    wait_for(lambda: store.get(broken).status == "failed", 60, "the broken job to fail")
    error_type = store.get(broken).error["type"]

    # 5. Refusals: a body over the limit (413) and a step count out of range (422).
    assert (
        http.post(
            "/v1/generations", content=b"{" + b" " * 8000 + b"}", headers={"content-type": "application/json"}
        ).status_code
        == 413
    )
    assert http.post("/v1/generations", json={"prompt": "a red circle", "num_inference_steps": 0}).status_code == 422

    api1 = wait_for(
        lambda: (lambda f: f if value(f, "latentd_sse_readers") == 0 else None)(scrape(stack["api_metrics"])),
        30,
        "the SSE reader to be released",
    )
    worker1 = scrape(stack["worker_metrics"])

    expected_api = {
        "latentd_http_requests": "counter",
        "latentd_http_request_duration_seconds": "histogram",
        "latentd_jobs_submitted": "counter",
        "latentd_queue_depth": "gauge",
        "latentd_sse_readers": "gauge",
        "latentd_grpc_stream_readers": "gauge",
        "latentd_rejections": "counter",
        "latentd_workers_live": "gauge",
        "process_cpu_seconds": "counter",
    }
    expected_worker = {
        "latentd_queue_wait_seconds": "histogram",
        "latentd_job_run_seconds": "histogram",
        "latentd_unet_step_seconds": "histogram",
        "latentd_batch_rows": "histogram",
        "latentd_vae_decode_seconds": "histogram",
        "latentd_steps": "counter",
        "latentd_images": "counter",
        "latentd_job_failures": "counter",
        "latentd_cancellations": "counter",
        "latentd_engine_active_requests": "gauge",
        "latentd_engine_iteration_seconds": "gauge",
        "latentd_row_cap": "gauge",
        "latentd_warmup_seconds": "gauge",
        "latentd_gpu_memory_bytes": "gauge",
        "process_resident_memory_bytes": "gauge",
    }
    for families, expected in ((api1, expected_api), (worker1, expected_worker)):
        for name, kind in expected.items():
            assert name in families, f"{name} missing"
            assert families[name].type == kind, f"{name} is a {families[name].type}, not a {kind}"

    def moved(before, after, name, suffix, **labels):
        return value(after, name, suffix, **labels) - value(before, name, suffix, **labels)

    assert (
        moved(api0, api1, "latentd_http_requests", "_total", route="/v1/generations", method="POST", status="202") == 3
    )
    assert moved(api0, api1, "latentd_http_request_duration_seconds", "_count", route="/v1/generations") >= 3
    assert moved(api0, api1, "latentd_jobs_submitted", "_total", kind="generation", model=MODEL) == 3
    assert moved(api0, api1, "latentd_rejections", "_total", reason="payload_too_large") == 1
    assert moved(api0, api1, "latentd_rejections", "_total", reason="validation") == 1
    assert value(api1, "latentd_queue_depth", model=MODEL) == 0  # it went up (above), now drained
    assert value(api1, "latentd_grpc_stream_readers") == 0  # the gRPC door is its own process

    assert moved(worker0, worker1, "latentd_queue_wait_seconds", "_count", model=MODEL) == 4
    # the two queued jobs waited at least until the long job was cancelled
    assert moved(worker0, worker1, "latentd_queue_wait_seconds", "_sum", model=MODEL) >= 2 * QUEUED_AT_LEAST_S
    assert moved(worker0, worker1, "latentd_job_run_seconds", "_count", model=MODEL, kind="generation") == 4
    assert moved(worker0, worker1, "latentd_steps", "_total", model=MODEL) >= 2 * 3 + 1
    assert moved(worker0, worker1, "latentd_images", "_total", model=MODEL) == 4
    assert moved(worker0, worker1, "latentd_unet_step_seconds", "_count", model=MODEL) >= 4
    # guided jobs: two rows per image; the two-image jobs give 4-row UNet calls
    assert moved(worker0, worker1, "latentd_batch_rows", "_sum", model=MODEL) >= 2 * 4 * 3
    assert moved(worker0, worker1, "latentd_vae_decode_seconds", "_count", model=MODEL) >= 1
    assert moved(worker0, worker1, "latentd_job_failures", "_total", model=MODEL, error_type=error_type) == 1
    assert moved(worker0, worker1, "latentd_cancellations", "_total", model=MODEL) == 1
    assert value(worker1, "latentd_engine_active_requests", model=MODEL) == 0
    assert value(worker1, "latentd_warmup_seconds", model=MODEL) > 0  # the model ran once at load, before serving
    assert moved(worker0, worker1, "process_cpu_seconds", "_total") > 0
    # GPU memory is reported on CUDA only; on this CPU worker the family exists without samples.
    assert all(s.labels["kind"] in ("allocated", "reserved") for s in worker1["latentd_gpu_memory_bytes"].samples)
