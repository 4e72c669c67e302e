"""A full job store, against a redis-server of its own: the core's readiness with no live worker also names it
(it refuses new jobs), so an operator sees both at once; the leases a worker holds are still renewed."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis

from services.common.jobstore import AsyncJobStore, JobStore
from services.common.settings import Settings
from services.core import Core
from tests.fixtures.tiny_model import published_info

pytestmark = pytest.mark.timeout(60)


def readiness(url: str) -> dict:
    async def main():
        core = await Core.open(Settings(redis_url=url))
        try:
            return await core.readiness()
        finally:
            await core.close()

    return asyncio.run(main())


def test_no_live_worker_says_when_the_job_store_is_full(fillable_redis):
    url = fillable_redis
    served = published_info(max_inference_steps=999)
    JobStore.from_url(url).publish_model(served)  # a model was served, its worker no longer beats
    assert readiness(url)["reason"] == "no live worker"
    client = redis.Redis.from_url(url)
    client.config_set("maxmemory", 1)  # below what it holds: every write refused
    try:
        ready = readiness(url)
    finally:
        client.config_set("maxmemory", 0)
    assert ready["status"] == "unavailable" and ready["redis"] is True
    assert ready["reason"] == "no live worker; the job store (Redis) is at its maxmemory too, refusing new jobs"


def test_a_full_store_still_renews_the_leases_a_worker_holds(fillable_redis):
    """A lease renewal moves the scores of leases the worker holds (it grows nothing) and is written while Redis
    is at its maxmemory, as the heartbeat is: else every running job's lease would lapse while the store is full
    and its reapers would race its live worker once there is room. Taking a new job is refused meanwhile."""
    url = fillable_redis
    store = JobStore.from_url(url)
    client = redis.Redis.from_url(url)
    asyncio.run(_submit(url, "lease-job"))
    job_id, attempt = store.take("tiny", 0.5, "w1")
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("room?", "no")
        for _ in range(4):  # 1.2 s: past the 0.5 s lease twice over
            time.sleep(0.3)
            assert store.renew("tiny", [(job_id, attempt)], 0.5) == []
        assert store.lapsed("tiny") == []
    finally:
        client.config_set("maxmemory", 0)


async def _submit(url: str, job_id: str) -> None:
    gateway = AsyncJobStore(aioredis.Redis.from_url(url), 600)
    try:
        await gateway.create(job_id, kind="generation", model="tiny", owner="alice", params={})
    finally:
        await gateway.redis.aclose()
