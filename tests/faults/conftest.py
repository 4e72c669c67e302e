"""The fault suite's stack: its own redis-server (append-only, on a fixed port, so a test can restart it), TWO
Celery workers, the REST gateway and the gRPC door, each started as deploy/ starts them (scripts/run_stack.py),
with short leases, drain grace and visibility timeout so every failure plays out in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from scripts import run_stack
from services.common import workers
from services.common.jobstore import events_key, job_key
from services.common.settings import hash_key
from tests.conftest import DEFAULT_MODEL, LEASE_S, REAP_INTERVAL_S

KEY = "fault-key"
DRAIN_GRACE_S = 5.0
MAX_LOST = 3
# The broker's redelivery of an unacknowledged task, short here so the suite sees it happen; harmless at any
# value, since a task only says "run the model's next job" (services/common/tasks.py).
VISIBILITY_TIMEOUT_S = 8
WORKER_SETTINGS = dict(
    lease_s=LEASE_S,
    reap_interval_s=REAP_INTERVAL_S,
    drain_grace_s=DRAIN_GRACE_S,
    max_lost=MAX_LOST,
    visibility_timeout_s=VISIBILITY_TIMEOUT_S,
    redis_timeout_s=1,
    worker_torch_threads=1,  # two workers on a 2-core machine
)
CONCURRENCY = 8  # two workers: 16 jobs in flight
PROMPT = "a red circle on a white background"


def wait_until(what: str, check: Callable[[], object], timeout_s: float = 60.0, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


@dataclass
class FaultStack:
    log_dir: Path
    redis_port: int
    redis_dir: Path
    redis_proc: subprocess.Popen = None
    api: subprocess.Popen = None
    grpc: subprocess.Popen = None
    url: str = ""
    grpc_target: str = ""
    workers: list[subprocess.Popen] = field(default_factory=list)
    started: int = 0
    model: str = DEFAULT_MODEL.name

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)

    headers = {"Authorization": f"Bearer {KEY}"}

    # ---- processes ---------------------------------------------------------------------------
    def start_redis(self) -> None:
        self.redis_proc, _ = run_stack.start_redis(self.redis_port, data_dir=self.redis_dir)

    def stop_redis(self, sig: int = signal.SIGTERM) -> None:
        """A clean stop (SIGTERM: Redis writes its append-only file and exits), as a restart or failover does; or
        a crash (SIGKILL: what Redis had written to its append-only file, and so to the kernel, before it answered
        is all that is left)."""
        self.redis_proc.send_signal(sig)
        self.redis_proc.wait(timeout=30)

    def start_worker(self, **settings) -> subprocess.Popen:
        self.started += 1
        log = open(self.log_dir / f"worker-{self.started}.log", "w")
        proc = run_stack.start_worker(
            self.redis_url, DEFAULT_MODEL, concurrency=CONCURRENCY, log=log, **(WORKER_SETTINGS | settings)
        )
        self.workers.append(proc)
        return proc

    def alive(self) -> list[subprocess.Popen]:
        return [proc for proc in self.workers if proc.poll() is None]

    def live_ids(self) -> list[str]:
        return workers.live_workers(self.redis, [self.model], 30).get(self.model, [])

    def ensure_workers(self, n: int = 2, timeout_s: float = 120.0) -> None:
        """Exactly `n` workers running and consuming (a test may have killed some, or left more)."""
        for proc in self.alive()[n:]:
            proc.send_signal(signal.SIGTERM)  # idle: it drains at once
            proc.wait(timeout=60)
        for _ in range(n - len(self.alive())):
            self.start_worker()
        pids = {proc.pid for proc in self.alive()}
        wait_until(
            f"{n} live workers",
            lambda: pids <= {worker_pid(w) for w in self.live_ids()} and len(pids) == n,
            timeout_s,
            every_s=0.25,
        )

    def worker_proc(self, pid: int) -> subprocess.Popen:
        return next(proc for proc in self.workers if proc.pid == pid)

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, n: int, steps: int, guidance: float = 7.5, **fields) -> list[str]:
        ids = []
        for i in range(n):
            body = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, seed=i) | fields
            response = httpx.post(f"{self.url}/v1/generations", json=body, headers=self.headers, timeout=30)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        return ids

    def job(self, job_id: str) -> dict:
        """The job's Redis hash, decoded (its `worker` field names the worker of its current attempt)."""
        raw = self.redis.hgetall(job_key(job_id))
        return {k: (json.loads(v) if k in ("error", "images", "progress") else v) for k, v in raw.items()}

    def events(self, job_id: str) -> list[tuple[str, dict]]:
        return [(f["event"], json.loads(f["data"])) for _, f in self.redis.xrange(events_key(job_id))]

    def terminal_events(self, job_id: str) -> list[str]:
        return [name for name, _ in self.events(job_id) if name in ("succeeded", "failed", "cancelled")]

    def statuses(self, ids: list[str]) -> dict[str, str]:
        return {job_id: self.redis.hget(job_key(job_id), "status") for job_id in ids}

    def wait_all(self, ids: list[str], final=("succeeded", "failed", "cancelled"), timeout_s: float = 120.0) -> None:
        wait_until(
            f"{len(ids)} jobs ended",
            lambda: all(status in final for status in self.statuses(ids).values()),
            timeout_s,
            every_s=0.25,
        )

    def wait_running(self, ids: list[str], min_step: int = 1, timeout_s: float = 60.0) -> None:
        """Every job running and past `min_step`: each in some worker's engine."""

        def running() -> bool:
            for job_id in ids:
                job = self.job(job_id)
                if job.get("status") != "running" or job.get("progress", {}).get("step", 0) < min_step:
                    return False
            return True

        wait_until(f"{len(ids)} jobs running", running, timeout_s, every_s=0.1)

    def by_worker(self, ids: list[str]) -> dict[int, list[str]]:
        """{worker pid: the jobs its engine runs now}."""
        held: dict[int, list[str]] = {}
        for job_id in ids:
            held.setdefault(worker_pid(self.job(job_id)["worker"]), []).append(job_id)
        return held


def worker_pid(worker_id: str) -> int:
    """Worker ids are "<hostname>-<pid>" (services/worker/heartbeat.py)."""
    return int(worker_id.rsplit("-", 1)[1])


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> FaultStack:
    log_dir = tmp_path_factory.mktemp("fault-logs")
    stack = FaultStack(log_dir=log_dir, redis_port=run_stack.free_port(), redis_dir=log_dir / "redis")
    stack.start_redis()
    port = run_stack.free_port()
    stack.url = f"http://127.0.0.1:{port}"
    hashes = hash_key(KEY)
    stack.api = run_stack.start_api(
        stack.redis_url,
        port,
        log=open(log_dir / "api.log", "w"),
        api_key_hashes=hashes,
        redis_timeout_s=1,
        max_queue_per_key=64,
    )
    grpc_port = run_stack.free_port()
    stack.grpc_target = f"127.0.0.1:{grpc_port}"
    stack.grpc = run_stack.start_grpc(
        stack.redis_url,
        grpc_port,
        log=open(log_dir / "grpc.log", "w"),
        api_key_hashes=hashes,
        grpc_metrics_port=run_stack.free_port(),
        redis_timeout_s=1,
    )
    try:
        stack.ensure_workers(2)
        run_stack.wait_ready(stack.url, timeout_s=120, procs=(stack.api, stack.grpc))
        yield stack
    except BaseException:
        for log in sorted(log_dir.iterdir()):
            if log.is_file():
                print(f"--- {log.name}\n{log.read_text()[-4000:]}")
        raise
    finally:
        run_stack.stop([stack.redis_proc, stack.api, stack.grpc, *stack.workers])  # Redis last
