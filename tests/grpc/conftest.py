"""Fixtures: the gRPC door of the real stack (a process of its own, started as deploy/ starts it) and, for the
refusals that need a particular setting or no worker at all, a door in this process over its own Core and its
own Redis database."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import redis

from services.common.jobstore import JobStore
from services.common.settings import Settings, hash_key
from tests.fixtures.tiny_model import published_info

DOOR_REDIS_URL = "redis://127.0.0.1:6379/13"
DOOR_KEY = "door-key"
TINY = published_info()


def auth(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
def channel(real_stack):
    with grpc.insecure_channel(real_stack.grpc_target) as ch:
        yield ch


class InProcessDoor:
    """A gRPC door on an event loop in a thread of this process, so a test can read its state directly."""

    def __init__(self, settings: Settings):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.core, self.server, self.port, self.watcher = self.run(self._start(settings))
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self, settings: Settings):
        from services.api import grpc_server
        from services.core import Core

        core = await Core.open(settings)
        server, port, watcher = await grpc_server.start_server(core, port=0, health_interval_s=0.1)
        return core, server, port, watcher

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        from services.api import grpc_server

        self.run(grpc_server.stop_server(self.server, self.watcher, None))
        self.run(self.core.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def door():
    """A door whose model has no worker (jobs stay queued) and whose queue holds 2 jobs."""
    redis.Redis.from_url(DOOR_REDIS_URL).flushdb()
    JobStore.from_url(DOOR_REDIS_URL).publish_model(TINY)
    settings = Settings(
        redis_url=DOOR_REDIS_URL, api_key_hashes=hash_key(DOOR_KEY), max_queue_per_model=2, max_queue_per_key=2
    )
    door = InProcessDoor(settings)
    yield door
    door.close()
    redis.Redis.from_url(DOOR_REDIS_URL).flushdb()
