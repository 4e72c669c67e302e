"""The gateway's job reads against a redis-server of its own: readers of one job in the same loop turn share one
HGETALL, a live job is read from Redis every time unless the caller polls (then a read younger than its
max_age_s answers), a settled one once per process until its record could expire. Redis's own command counts (INFO commandstats) say how many reads reached it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
import redis.asyncio as aioredis

from scripts import run_stack
from services.common.jobs import JobRecord, live_frame_field
from services.common.jobstore import AsyncJobStore, job_key, new_record

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def url():
    proc, url = run_stack.start_redis()
    yield url
    run_stack.stop([proc])


def put(client: redis.Redis, job_id: str, status: str, created_at: float | None = None) -> None:
    record = new_record(job_id, kind="generation", model="m", owner="k", params={}, now=created_at or time.time())
    client.hset(job_key(job_id), mapping=record | {"status": status})


def hgetalls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


def reads(url: str, body, ttl_s: int = 3600):
    async def main():
        store = AsyncJobStore(aioredis.Redis.from_url(url), ttl_s=ttl_s)
        try:
            return await body(store)
        finally:
            await store.redis.aclose()

    return asyncio.run(main())


def test_readers_of_one_job_in_the_same_turn_share_one_hgetall(url):
    client = redis.Redis.from_url(url)
    put(client, "one", "running")
    put(client, "two", "queued")
    before = hgetalls(client)

    async def body(store):
        return await asyncio.gather(*[store.get("one") for _ in range(50)], store.get("two"), store.get("gone"))

    *ones, two, gone = reads(url, body)
    assert hgetalls(client) - before == 3  # one per distinct key, not one per reader
    assert {job.status for job in ones} == {"running"} and all(job.id == "one" for job in ones)
    assert two.status == "queued" and gone is None


def test_a_live_job_is_read_from_redis_every_time(url):
    client = redis.Redis.from_url(url)
    put(client, "live", "queued")

    async def body(store):
        first = await store.get("live")
        client.hset(job_key("live"), "status", "running")
        return first, await store.get("live")

    first, second = reads(url, body)
    assert (first.status, second.status) == ("queued", "running")


def test_a_polled_live_job_is_read_once_per_max_age_and_a_fresh_read_always_goes_to_redis(url):
    client = redis.Redis.from_url(url)
    put(client, "polled", "queued")

    async def body(store):
        first = await store.get("polled", max_age_s=0.5)
        client.hset(job_key("polled"), "status", "running")
        before = hgetalls(client)
        polls = [await store.get("polled", max_age_s=0.5) for _ in range(20)]
        within = hgetalls(client) - before
        fresh = await store.get("polled")  # cancel, pictures, waits: always Redis, and it renews the polled read
        client.hset(job_key("polled"), "status", "succeeded")
        renewed = await store.get("polled", max_age_s=0.5)
        await asyncio.sleep(0.5)
        return first, polls, within, fresh, renewed, await store.get("polled", max_age_s=0.5)

    first, polls, within, fresh, renewed, later = reads(url, body)
    assert first.status == "queued" and within == 0 and all(job is first for job in polls)
    assert fresh.status == "running" and renewed is fresh
    assert later.status == "succeeded"


def test_polls_that_come_while_a_read_is_on_its_way_wait_for_it_rather_than_send_their_own(url):
    client = redis.Redis.from_url(url)
    put(client, "slow", "running")

    async def body(store):
        before = hgetalls(client)
        client.execute_command("CLIENT", "PAUSE", 300, "ALL")  # Redis answers late, as under load
        first = asyncio.ensure_future(store.get("slow", max_age_s=1))
        later = []
        for _ in range(5):  # polls in later turns of the loop, while the first read waits
            await asyncio.sleep(0.02)
            later.append(asyncio.ensure_future(store.get("slow", max_age_s=1)))
        jobs = await asyncio.gather(first, *later)
        return jobs, hgetalls(client) - before

    jobs, sent = reads(url, body)
    assert sent == 1 and all(job is jobs[0] for job in jobs) and jobs[0].status == "running"


def test_a_poll_near_its_max_age_is_answered_at_once_and_reads_ahead(url):
    """Steady polling never waits for Redis: once the read at hand is within 1.5 round trips of its max age, a
    poll answers from it and asks for the next read in the background, which the polls after it get."""
    client = redis.Redis.from_url(url)
    put(client, "ahead", "queued")

    async def body(store):
        first = await store.get("ahead", max_age_s=1)
        store._round_trip_s = 0.3  # as learnt on a loaded Redis: read ahead from 1 - 1.5 x 0.3 = 0.55 s of age
        client.hset(job_key("ahead"), "status", "running")
        await asyncio.sleep(0.6)
        before = hgetalls(client)
        client.execute_command("CLIENT", "PAUSE", 300, "ALL")
        started = time.monotonic()
        meanwhile = await store.get("ahead", max_age_s=1)
        waited = time.monotonic() - started
        await asyncio.sleep(0.5)  # the read ahead has come back; the first read is now 1.1 s old
        sent = hgetalls(client) - before
        client.execute_command("CLIENT", "PAUSE", 300, "ALL")
        started = time.monotonic()
        later = await store.get("ahead", max_age_s=1)
        return first, meanwhile, max(waited, time.monotonic() - started), later, sent

    first, meanwhile, waited, later, sent = reads(url, body)
    assert meanwhile is first and first.status == "queued"
    assert later.status == "running" and sent == 1  # the read ahead, and no other
    assert waited < 0.2  # neither poll waited for the paused Redis


def test_a_settled_job_is_read_once_then_kept_until_its_record_could_expire(url):
    client = redis.Redis.from_url(url)
    put(client, "done", "succeeded")
    put(client, "old", "succeeded", created_at=time.time() - 10)

    async def body(store):
        first = await store.get("done")
        before = hgetalls(client)
        again = [await store.get("done") for _ in range(5)]
        kept = hgetalls(client) - before
        await store.get("old")
        client.delete(job_key("old"))  # its TTL (5 s from creation) is over: it is not served from memory
        return first, again, kept, await store.get("old")

    first, again, kept, old = reads(url, body, ttl_s=5)
    assert first.status == "succeeded" and all(job is first for job in again)
    assert kept == 0
    assert old is None


def test_a_jobs_streamed_frames_are_its_current_attempts_from_the_first_up_to_a_gap():
    """Frames stored as a reverse trajectory runs are listed by the record: only its current attempt's (a lost
    attempt's stay in the hash until it expires), in order, and only up to the first missing one, so frame i of the
    list is frame i of the job; the result's own list replaces them once the job succeeds."""
    record = new_record("j", kind="reverse", model="m", owner="k", params={}, now=time.time()) | {"attempt": "2"}
    stored = {live_frame_field(attempt, index): json.dumps({"i": index, "a": attempt}) for attempt, index in
              [(1, 0), (1, 1), (1, 2), (2, 1), (2, 0), (2, 3)]}  # fmt: skip
    frames = JobRecord.from_redis("j", record | stored).frames
    assert frames == [{"i": 0, "a": 2}, {"i": 1, "a": 2}]
    result = json.dumps([{"i": n, "blob": f"a2-frame-{n}"} for n in range(4)])
    assert len(JobRecord.from_redis("j", record | stored | {"frames": result}).frames) == 4


def test_a_step_write_rearms_the_jobs_ttl_and_writes_nothing_once_its_attempt_is_superseded(url):
    """Every write re-arms the TTL: a job that runs longer than ttl_s keeps its record and events while it runs. A
    step of an attempt that no longer holds the job's fence writes nothing: not after a newer attempt took it (a
    reaper requeued it under a worker that still ran), not after the job ended, not to a record that expired (which
    would leave a stub)."""
    from services.common.jobstore import JobStore, StepWrite, blob_key, events_key, frame_blob_name

    client = redis.Redis.from_url(url)
    put(client, "long", "running")
    client.hset(job_key("long"), "attempt", 1)
    client.expire(job_key("long"), 5)
    store = JobStore(client, ttl_s=300)
    event = {"step": 1, "total": 2, "timestep": 500, "attempt": 1, "emitted_at": time.time()}
    assert store.write_steps([StepWrite("long", 1, event, {"step": 1, "total": 2})]) == [(False, False)]
    assert client.ttl(job_key("long")) > 290 and client.ttl(events_key("long")) > 290
    client.hset(job_key("long"), mapping={"attempt": 2})  # requeued and taken again: attempt 1 is stale
    late = (0, {"step": 2, "what": "x_t"}, b"png")
    assert store.write_steps([StepWrite("long", 1, event | {"step": 2}, {"step": 2, "total": 2}, [late])]) == [
        (False, True)
    ]
    assert not store.add_frames("long", 1, [late])
    assert store.started("long", 1, {"started_at": time.time()}) is False
    client.hset(job_key("long"), mapping={"status": "succeeded"})  # attempt 2 ended it
    assert store.write_steps([StepWrite("long", 2, event | {"step": 2}, {"step": 2, "total": 2})]) == [(False, True)]
    assert json.loads(client.hget(job_key("long"), "progress")) == {"step": 1, "total": 2}
    assert [fields[b"event"] for _, fields in client.xrange(events_key("long"))] == [b"step"]
    assert (
        not client.exists(blob_key("long", frame_blob_name(1, 0)))
        and client.hget(job_key("long"), "frame:a1:0") is None
    )
    client.delete(job_key("long"))  # expired under its worker: the write leaves no stub
    assert store.write_steps([StepWrite("long", 2, event, {"step": 2, "total": 2})]) == [(False, True)]
    assert not client.exists(job_key("long"))
    assert reads(url, lambda store: store.get("long")) is None
