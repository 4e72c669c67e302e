"""A gateway's background tasks (the event hub's reader, the gRPC door's health watcher) talk to Redis through
redis.asyncio, and must end when the door shuts down. On Python 3.11 one cancel does not always end such a task
(redis-py's `asyncio.wait_for` drops a cancel that lands as its write completes), which left a door's shutdown
hanging: `cancel_and_wait` cancels until the task has ended."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from services.common.jobstore import cancel_and_wait

pytestmark = pytest.mark.timeout(120)


def test_a_task_that_swallows_a_cancel_still_ends():
    async def main():
        cancels = 0

        async def stubborn():
            nonlocal cancels
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    cancels += 1
                    if cancels == 3:
                        raise

        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        async with asyncio.timeout(5):
            await cancel_and_wait(task, every_s=0.01)
        return task, cancels

    task, cancels = asyncio.run(main())
    assert task.cancelled() and cancels == 3


def test_an_error_the_task_ended_with_is_raised():
    async def main():
        async def broken():
            raise ValueError("broken")

        task = asyncio.create_task(broken())
        await asyncio.sleep(0)
        await cancel_and_wait(task)

    with pytest.raises(ValueError, match="broken"):
        asyncio.run(main())


def test_tasks_sending_commands_to_redis_all_end_when_cancelled_at_any_moment(own_redis):
    """Was: many of these tasks went on after their one cancel, and the door's shutdown waited for
    ever (a gRPC door fixture's teardown timed out in CI)."""

    async def main():
        client = aioredis.Redis.from_url(own_redis)
        rng = random.Random(7)
        try:
            for _ in range(40):

                async def pings():
                    while True:
                        await client.ping()

                task = asyncio.create_task(pings())
                await asyncio.sleep(rng.random() * 0.005)
                async with asyncio.timeout(5):
                    await cancel_and_wait(task)
                assert task.cancelled()
        finally:
            await client.aclose()

    asyncio.run(main())
