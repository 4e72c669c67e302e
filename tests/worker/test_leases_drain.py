"""The worker's drain on SIGTERM (services/worker/leases.py, LeaseKeeper.drain), against real Redis: what it logs
says how long the engines took, not the grace they were allowed, and warns only when jobs are left to requeue."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest
import redis
import redis.asyncio as aioredis

from services.common.jobstore import AsyncJobStore
from services.common.settings import Settings
from services.worker.leases import LeaseKeeper
from services.worker.runtime import Runtime

MODEL = "m"
LOGGER = "services.worker.leases"


@pytest.fixture
def redis_url(own_redis):
    url = own_redis.rsplit("/", 1)[0] + "/9"  # the tests' own redis-server, a database of its own
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def _running_job(url: str, runtime: Runtime) -> str:
    """A job queued as the gateway queues it, then taken and held as a worker's task takes it."""
    job_id = f"drain-{time.monotonic_ns()}"

    async def create() -> None:
        gateway = AsyncJobStore(aioredis.Redis.from_url(url), 600)
        await gateway.create(job_id, kind="generation", model=MODEL, owner="alice", params={})
        await gateway.redis.aclose()

    asyncio.run(create())
    taken, attempt = runtime.store.take(MODEL, 30, runtime.worker)
    assert taken == job_id
    runtime.hold(MODEL, job_id, attempt)
    return job_id


def _drain_report(caplog, keeper: LeaseKeeper, timeout_s: float = 10) -> logging.LogRecord:
    """Start the drain as the worker does (a daemon thread of its own) and return the line that says how the wait
    for the engines ended. The thread goes on handing back late claims for a while, as in the worker."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    threading.Thread(target=keeper.drain, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == LOGGER and record.getMessage().startswith("draining:"):
                return record
        time.sleep(0.05)
    raise AssertionError(f"no drain report within {timeout_s} s: {[r.getMessage() for r in caplog.records]}")


def _seconds(record: logging.LogRecord) -> float:
    return float(re.search(r"after ([0-9.]+) s", record.getMessage()).group(1))


def test_a_clean_drain_says_how_long_it_took_without_a_warning(redis_url, caplog):
    """Was: WARNING 'draining: 0 job(s) still running after 45 s; requeueing them', at once (45: the grace)."""
    runtime = Runtime(Settings(redis_url=redis_url, drain_grace_s=45), worker="w1")
    job_id = _running_job(redis_url, runtime)
    threading.Timer(0.5, runtime.release, (MODEL, job_id, 1)).start()  # its engine finishes it half a second in
    record = _drain_report(caplog, LeaseKeeper(runtime, celery_app=None))
    assert record.levelno == logging.INFO, record.getMessage()
    assert "requeue" not in record.getMessage()
    assert 0.4 <= _seconds(record) < 5, record.getMessage()


def test_jobs_still_running_at_the_end_of_the_grace_are_a_warning_and_requeued(redis_url, caplog):
    runtime = Runtime(Settings(redis_url=redis_url, drain_grace_s=0.5), worker="w1")
    job_id = _running_job(redis_url, runtime)
    keeper, sent = LeaseKeeper(runtime, celery_app=None), []
    keeper.send = sent.append  # the broker is not under test
    record = _drain_report(caplog, keeper)
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("draining: 1 job(s) still running after ")
    assert 0.5 <= _seconds(record) < 5, record.getMessage()
    deadline = time.monotonic() + 5
    while runtime.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.held() == {} and sent == [MODEL]
    assert runtime.store.get(job_id).status == "queued"


def test_an_old_attempt_ending_leaves_the_newer_attempts_lease_held(redis_url):
    """A worker whose lease lapsed while it still ran (a starved lease thread) may take the requeued job again as
    attempt 2; attempt 1 ending (its step write finds it superseded) must not stop the renewal of attempt 2's lease,
    or attempt 2 would be reaped as a lost worker's, and the job could fail as worker_lost on a healthy worker."""
    runtime = Runtime(Settings(redis_url=redis_url), worker="w1")
    runtime.hold(MODEL, "j", 1)
    runtime.hold(MODEL, "j", 2)  # the same job, taken again by another of this worker's threads
    runtime.release(MODEL, "j", 1)
    assert runtime.held() == {MODEL: [("j", 2)]}
    runtime.leave_unwritten(MODEL, "j", 1)
    runtime.forget_unwritten(MODEL, "j", 1)
    assert runtime.held() == {MODEL: [("j", 2)]}
    runtime.release(MODEL, "j", 2)
    assert runtime.held() == {}
