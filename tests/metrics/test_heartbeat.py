"""The worker heartbeat against a real Celery worker process on real Redis (database 14; a full store's tests on
a redis-server of their own, its maxmemory set below use, which the session's other stacks must not see)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from scripts import run_stack
from services.common import workers
from services.worker import heartbeat

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/14"


def _check(stale_after_s: float, url: str = REDIS_URL, probe: str = "--check") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.worker.heartbeat",
            probe,
            "--redis-url",
            url,
            "--stale-after",
            str(stale_after_s),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture()
def client():
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    yield r
    r.flushdb()


def _start_celery_worker(url: str) -> subprocess.Popen:
    env = {**os.environ, "LATENTD_TEST_REDIS_URL": url}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.metrics.heartbeat_app",
            "worker",
            "-P",
            "threads",
            "-c",
            "2",
            "-n",
            "hbtest@%h",
            "-Q",
            "tiny-queue",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture()
def celery_worker(client):
    proc = _start_celery_worker(REDIS_URL)
    yield proc
    _stop(proc)


@pytest.mark.timeout(120)
def test_check_fails_without_any_heartbeat(client):
    result = _check(5)
    assert result.returncode == 1
    assert f"no heartbeat in Redis for host {socket.gethostname()}" in result.stderr


@pytest.mark.timeout(120)
def test_heartbeat_proves_consumption_and_catches_a_stalled_consumer(client, celery_worker):
    live = _wait_for(
        lambda: workers.live_workers(client, ["tiny-model"], stale_after_s=5), 60, "the worker's probe to be consumed"
    )
    (worker_id,) = live["tiny-model"]
    assert worker_id == f"{socket.gethostname()}-{celery_worker.pid}"
    ok = _check(5)
    assert ok.returncode == 0, ok.stderr

    # Alive but no longer consuming: the process and its heartbeat thread go on, but the
    # consumer stops taking messages from the probe queue (as after a broken reconnect).
    from celery import Celery

    replies = Celery("control", broker=REDIS_URL).control.cancel_consumer(
        heartbeat.probe_queue(worker_id),
        destination=[f"hbtest@{socket.gethostname()}"],
        reply=True,
        timeout=10,
    )
    assert replies, "worker did not answer the control command"
    key = workers.worker_key(worker_id)
    time.sleep(1.0)  # a probe the consumer had already fetched may still run once
    consumed_before = float(client.hget(key, "consumed_at"))
    time.sleep(2.5)
    info = {k.decode(): float(v) for k, v in client.hgetall(key).items() if k in (b"alive_at", b"consumed_at")}
    assert info["alive_at"] > consumed_before + 1, "heartbeat thread must still be beating"
    assert info["consumed_at"] - consumed_before < 0.5, "probe must not be consumed any more"
    assert workers.live_workers(client, ["tiny-model"], stale_after_s=2) == {}
    stale = _check(2)
    assert stale.returncode == 1
    assert "consumer stale" in stale.stderr and worker_id in stale.stderr


@pytest.mark.timeout(120)
def test_shutdown_removes_the_heartbeat(client, celery_worker):
    _wait_for(lambda: workers.live_workers(client, ["tiny-model"], stale_after_s=5), 60, "heartbeat")
    celery_worker.terminate()
    celery_worker.wait(timeout=30)
    assert workers.read_workers(client) == []
    assert workers.live_workers(client, ["tiny-model"], stale_after_s=5) == {}


@pytest.mark.timeout(60)
def test_a_saturated_worker_counts_as_consuming_only_while_it_makes_progress(client):
    state = {"saturated": True, "progress": 0}
    beat = heartbeat.Heartbeat(
        client,
        ["tiny-model"],
        worker="busy-1",
        ttl_s=10,
        saturated=lambda: state["saturated"],
        progress=lambda: state["progress"],
    )
    beat.beat()  # first beat: no progress seen yet
    assert workers.live_workers(client, ["tiny-model"], stale_after_s=5) == {}
    state["progress"] = 7  # the engine stepped since the last beat
    beat.beat()
    assert workers.live_workers(client, ["tiny-model"], stale_after_s=5) == {"tiny-model": ["busy-1"]}
    assert client.hget(workers.worker_key("busy-1"), "saturated_at") is not None
    time.sleep(1.2)
    beat.beat()  # saturated but stuck: consumed_at is not refreshed
    assert workers.live_workers(client, ["tiny-model"], stale_after_s=1) == {}
    state.update(saturated=False, progress=9)  # a free thread: only the probe may prove consumption
    time.sleep(1.2)
    beat.beat()
    assert workers.live_workers(client, ["tiny-model"], stale_after_s=1) == {}


@pytest.mark.timeout(60)
def test_the_liveness_check_reads_redis_url_as_every_process_does(client):
    """Was: `--check` read LATENTD_REDIS_URL from os.environ only and ignored the REDIS_URL alias."""
    beat = heartbeat.Heartbeat(client, ["tiny-model"], ttl_s=10)
    beat.beat()
    heartbeat.mark_consumed(client, ["tiny-model"], beat.worker, ttl_s=10)
    env = {k: v for k, v in os.environ.items() if k not in ("LATENTD_REDIS_URL", "REDIS_URL")} | {
        "REDIS_URL": REDIS_URL
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.worker.heartbeat", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "consuming" in result.stdout


@pytest.mark.timeout(120)
def test_a_full_store_still_hears_the_heartbeat_so_no_worker_drops_out(fillable_redis):
    """Redis at its maxmemory refuses every write but the heartbeat's (a script flagged allow-oom) and the probe
    task with it (a message): the heartbeat counts the consumer as consuming meanwhile. Was: every worker dropped
    out of the live ones 30 s into a full store, the gateways went unready and the liveness probes restarted the
    workers, losing their jobs."""
    url = fillable_redis
    store = redis.Redis.from_url(url)
    worker = _start_celery_worker(url)
    try:
        _wait_for(lambda: workers.live_workers(store, ["tiny-model"], stale_after_s=2), 60, "the worker to consume")
        store.config_set("maxmemory", 1)  # below what it holds: every write that could grow it refused
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            store.set("room?", "no")
        full_at = time.time()
        time.sleep(3.0)  # past the staleness below, many beats (0.3 s) and refused probes later
        (info,) = workers.read_workers(store)
        assert info.alive_at > full_at + 2 and info.consumed_at > full_at + 2
        assert workers.live_workers(store, ["tiny-model"], stale_after_s=2) == {"tiny-model": [info.worker]}
        for probe in ("--check", "--liveness"):
            result = _check(2, url, probe)
            assert result.returncode == 0, result.stderr
    finally:
        store.config_set("maxmemory", 0)
        _stop(worker)


@pytest.mark.timeout(60)
def test_the_liveness_probe_passes_while_redis_cannot_be_reached():
    """Restarting a worker does not bring Redis back, and loses the results it holds until Redis takes them: the
    liveness probe (`--liveness`) passes then, saying why; the startup and readiness probes' `--check` fails."""
    nowhere = f"redis://127.0.0.1:{run_stack.free_port()}/0"
    strict, lenient = _check(2, nowhere, "--check"), _check(2, nowhere, "--liveness")
    assert strict.returncode == 1 and "Redis unreachable" in strict.stderr
    assert lenient.returncode == 0 and "not this worker's fault" in lenient.stdout
