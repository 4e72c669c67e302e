"""The event hub alone, against a redis-server of its own (killed and restarted here): many subscribers on one
XREAD, history read once per job, a log window that subscribers fall behind, and Redis going away."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
import redis.asyncio as aioredis

from scripts import run_stack
from services.common.jobs import stream_id
from services.common.jobstore import AsyncJobStore, events_key, job_key, new_record
from services.core.events import EventHub, StreamBroken

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def hub_redis():
    proc, url = run_stack.start_redis()
    yield proc, url
    run_stack.stop([proc])


def add(client: redis.Redis, job_id: str, name: str, **data) -> str:
    return client.xadd(events_key(job_id), {"event": name, "data": json.dumps(data)}).decode()


def run_hub(url: str, body, **hub_settings):
    """Run `body(hub, store)` with a hub over a pool of 4 connections, on a fresh event loop."""

    async def main():
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=4, timeout=5)
        store = AsyncJobStore(aioredis.Redis(connection_pool=pool))
        hub = EventHub(store, **hub_settings)
        hub.start()
        try:
            return await body(hub, store)
        finally:
            await hub.stop()
            await store.redis.aclose()

    return asyncio.run(main())


async def collect(hub: EventHub, job_id: str, after: str = "0") -> list[str]:
    return [event.name async for event in hub.follow(job_id, after)]


async def ids_after(hub: EventHub, job_id: str, after: str) -> list[tuple[str, str]]:
    return [(event.name, event.id) async for event in hub.follow(job_id, after)]


def test_five_hundred_subscribers_get_every_event_from_one_history_read_per_job(hub_redis):
    _, url = hub_redis
    client = redis.Redis.from_url(url)
    jobs = ["a", "b", "c"]
    for job_id in jobs:
        client.hset(job_key(job_id), "owner", "k")
        add(client, job_id, "queued")

    async def body(hub, store):
        readers = [asyncio.ensure_future(collect(hub, jobs[i % 3])) for i in range(500)]
        await asyncio.sleep(0.3)
        for step in range(1, 21):  # what the engine writes while the readers watch
            for job_id in jobs:
                add(client, job_id, "step", step=step, total=20)
            await asyncio.sleep(0.01)
        for job_id in jobs:
            add(client, job_id, "succeeded")
        names = await asyncio.wait_for(asyncio.gather(*readers), 30)
        late = await collect(hub, "a")  # the job has ended: its history, once more
        return names, late, hub.watched_jobs

    before = {k: v["calls"] for k, v in client.info("commandstats").items() if k in ("cmdstat_xrange",)}
    names, late, watched = run_hub(url, body)
    expected = ["queued"] + ["step"] * 20 + ["succeeded"]
    assert all(n == expected for n in names) and late == expected
    xranges = client.info("commandstats")["cmdstat_xrange"]["calls"] - before.get("cmdstat_xrange", 0)
    assert xranges <= 2 * len(jobs) + 1, xranges  # once per job (and once for the late reader), not per reader
    assert watched == 0  # a watch goes with its last subscriber
    assert len(client.client_list()) <= 4 + 1  # the hub's pool, and this test's client


def test_a_subscriber_behind_the_log_window_catches_up_from_redis(hub_redis):
    _, url = hub_redis
    client = redis.Redis.from_url(url)
    ids = [add(client, "long", "queued")] + [add(client, "long", "step", step=i) for i in range(1, 41)]

    async def body(hub, store):
        keeper = asyncio.ensure_future(collect(hub, "long", ids[-1]))  # loads the log: only the newest 8 kept
        await asyncio.sleep(0.3)
        early = asyncio.ensure_future(collect(hub, "long", ids[3]))  # before the window: reads Redis first
        resumed = asyncio.ensure_future(collect(hub, "long", ids[-3]))  # inside it: from memory
        await asyncio.sleep(0.3)
        add(client, "long", "succeeded")
        return await asyncio.wait_for(asyncio.gather(keeper, early, resumed), 10)

    client.config_resetstat()
    keeper, early, resumed = run_hub(url, body, log_limit=8)
    assert client.info("commandstats")["cmdstat_xrange"]["calls"] == 2  # the load, and the early one's catch-up
    assert keeper == ["succeeded"]
    assert early == ["step"] * 37 + ["succeeded"]  # steps 4..40 exactly once, in order
    assert resumed == ["step", "step", "succeeded"]


def test_resuming_at_or_past_the_terminal_event_gets_the_terminal_event_again(hub_redis):
    """A client that saw the terminal event (or names a later id) and resumes gets that event once more, never a
    stream closed with nothing: with the log whole, trimmed to a window, and read back from Redis."""
    _, url = hub_redis
    client = redis.Redis.from_url(url)
    ids = [add(client, "done", "queued")] + [add(client, "done", "step", step=i) for i in range(1, 13)]
    terminal = add(client, "done", "succeeded")

    async def body(hub, store):
        return [await ids_after(hub, "done", after) for after in (terminal, "9999999999999-0", ids[-1])]

    for settings in ({}, {"log_limit": 4}):
        at_terminal, past_it, before_it = run_hub(url, body, **settings)
        assert at_terminal == past_it == before_it == [("succeeded", terminal)], settings


def test_resuming_a_running_job_from_an_id_ahead_of_its_stream_skips_the_events_before_it(hub_redis):
    """A Last-Event-ID the running job has not reached yet: the events that come with lower ids are not sent
    (as Redis's XRANGE from that id would not send them), the first one after it is, and so is the end."""
    _, url = hub_redis
    client = redis.Redis.from_url(url)
    add(client, "live", "queued")
    ahead = f"{int(time.time() * 1000) + 400}-0"  # 0.4 s ahead of Redis's clock (same machine)

    async def body(hub, store):
        reader = asyncio.ensure_future(ids_after(hub, "live", ahead))
        await asyncio.sleep(0.1)
        early = [add(client, "live", "step", step=step) for step in (1, 2)]
        await asyncio.sleep(0.6)
        late = add(client, "live", "step", step=3)
        terminal = add(client, "live", "succeeded")
        return early, late, terminal, await asyncio.wait_for(reader, 10)

    early, late, terminal, got = run_hub(url, body)
    assert all(stream_id(i) <= stream_id(ahead) < stream_id(late) for i in early), (early, ahead, late)
    assert got == [("step", late), ("succeeded", terminal)]


def test_redis_going_away_ends_every_stream_with_stream_broken_and_a_resume_point(hub_redis):
    proc, url = hub_redis
    client = redis.Redis.from_url(url)
    first = add(client, "j", "queued")

    async def body(hub, store):
        async def follow():
            seen = []
            try:
                async for event in hub.follow("j"):
                    seen.append(event.id)
            except StreamBroken as error:
                return seen, str(error)
            return seen, None

        readers = [asyncio.ensure_future(follow()) for _ in range(20)]
        await asyncio.sleep(0.3)
        proc.kill()
        return await asyncio.wait_for(asyncio.gather(*readers), 15)

    results = run_hub(url, body, broken_after_s=0.5)
    assert all(seen == [first] and error and "Redis unreachable" in error for seen, error in results)


def test_a_poll_after_an_event_the_hub_delivered_reads_the_job_anew(hub_redis):
    """A poll may answer from a read of a live job younger than its max age, but never one older than an event
    this process has delivered: a client that saw `succeeded` and then polls gets the succeeded job."""
    _, url = hub_redis
    client = redis.Redis.from_url(url)
    record = new_record("polled", kind="generation", model="m", owner="k", params={}, now=time.time())
    client.hset(job_key("polled"), mapping=record | {"status": "running"})
    add(client, "polled", "started")

    async def body(hub, store):
        seen = []

        async def follow():
            async for event in hub.follow("polled", "0"):
                seen.append(event.name)
                if event.name == "succeeded":
                    return await store.get("polled", max_age_s=60)

        reader = asyncio.ensure_future(follow())
        await asyncio.sleep(0.3)
        first = await store.get("polled", max_age_s=60)  # another client's poll while it runs
        client.hset(job_key("polled"), "status", "succeeded")  # the worker's finish: record, then event
        add(client, "polled", "succeeded")
        return first, await asyncio.wait_for(reader, 10), seen

    first, after, seen = run_hub(url, body)
    assert first.status == "running" and seen == ["started", "succeeded"]
    assert after.status == "succeeded"
