"""The core's readiness against a redis-server of its own: with no live worker, its reason also names a full job
store (which refuses new jobs), so an operator sees both at once."""

from __future__ import annotations

import asyncio

import pytest
import redis

from scripts import run_stack
from services.common.jobstore import JobStore
from services.common.models import ModelInfo
from services.common.settings import Settings
from services.core import Core

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def url():  # a server of its own, not the session's own_redis: its maxmemory is set below use, which the session's
    # stacks (their workers' writes) must not see
    proc, url = run_stack.start_redis()
    yield url
    run_stack.stop([proc])


def readiness(url: str) -> dict:
    async def main():
        core = await Core.open(Settings(redis_url=url))
        try:
            return await core.readiness()
        finally:
            await core.close()

    return asyncio.run(main())


def test_no_live_worker_says_when_the_job_store_is_full(url):
    served = ModelInfo(
        "tiny", 32, 32, "DDIMScheduler", 77, num_train_timesteps=1000, size_multiple=8, max_inference_steps=999
    )
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
