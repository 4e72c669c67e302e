"""Dispatch in the job store, against real Redis (its own database): fair order between API keys, the
atomic take-and-claim with a lease, requeue of a lapsed lease, the fence, and poison jobs."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from services.common.jobstore import AsyncJobStore, JobStore, QueueFull, owned_key, pending_key

MODEL = "m"


@pytest.fixture
def stores(own_redis):
    url = own_redis.rsplit("/", 1)[0] + "/12"  # the tests' own redis-server, a database of its own
    redis.Redis.from_url(url).flushdb()
    loop = asyncio.new_event_loop()
    gateway = AsyncJobStore(aioredis.Redis.from_url(url), 600)
    worker = JobStore.from_url(url, 600)

    def submit(owner: str, n: int = 1, **limits) -> list[str]:
        ids = []
        for _ in range(n):
            job_id = f"{owner}-{len(ids)}-{time.monotonic_ns()}"
            loop.run_until_complete(
                gateway.create(job_id, kind="generation", model=MODEL, owner=owner, params={}, **limits)
            )
            ids.append(job_id)
        return ids

    yield submit, gateway, worker, loop, url
    loop.run_until_complete(gateway.redis.aclose())
    loop.close()
    redis.Redis.from_url(url).flushdb()


def owners_in_order(worker: JobStore, n: int) -> list[str]:
    return [worker.take(MODEL, 30, "w1")[0].split("-")[0] for _ in range(n)]


def test_keys_take_turns_so_a_flood_does_not_starve_a_single_job(stores):
    submit, _, worker, _, url = stores
    submit("alice", 6)
    assert owners_in_order(worker, 2) == ["alice", "alice"]  # alone, alice's jobs go in order
    submit("bob", 1)
    submit("carol", 2)
    # bob and carol enter at the turn last served, before alice's next: then the three take turns
    assert owners_in_order(worker, 7) == ["bob", "carol", "alice", "carol", "alice", "alice", "alice"]
    assert worker.take(MODEL, 30, "w1") is None


def test_a_keys_share_and_the_models_queue_are_bounded(stores):
    submit, _, _, _, _ = stores
    submit("alice", 2, max_owned=2)
    with pytest.raises(QueueFull) as full:
        submit("alice", 1, max_owned=2)
    assert full.value.scope == "owner"
    submit("bob", 1, max_pending=4)
    with pytest.raises(QueueFull) as full:
        submit("carol", 1, max_pending=3)
    assert full.value.scope == "model"


def test_a_lapsed_lease_is_requeued_at_the_head_and_the_old_attempt_is_fenced_out(stores):
    submit, _, worker, _, url = stores
    first, second = submit("alice", 2)
    job_id, attempt = worker.take(MODEL, 0.2, "w1")
    assert (job_id, attempt) == (first, 1)
    assert worker.renew(MODEL, [(first, 1)], 0.2) == []  # still ours
    time.sleep(0.3)
    assert worker.lapsed(MODEL) == [first]
    job = worker.get(first)
    assert worker.requeue(job, attempt=None, lost=True, max_lost=3, reason="test") == "requeued"
    assert worker.renew(MODEL, [(first, 1)], 0.2) == [first]  # the lost worker learns it is out
    assert not worker.holds(first, 1)
    assert worker.take(MODEL, 30, "w2") == (first, 2)  # at the head of its key's queue, before `second`
    # a late copy of attempt 1 can neither finish nor step the job
    assert not worker.finish(worker.get(first), 1, "succeeded", {}, ("succeeded", {}))
    assert worker.finish(worker.get(first), 2, "succeeded", {}, ("succeeded", {}))
    r = redis.Redis.from_url(url)
    assert not r.sismember(pending_key(MODEL), first) and not r.sismember(owned_key(MODEL, "alice"), first)
    assert worker.take(MODEL, 30, "w2") == (second, 1)


def test_a_job_that_loses_its_worker_max_lost_times_fails_with_a_reason(stores):
    submit, _, worker, _, url = stores
    (job_id,) = submit("alice", 1)
    for expected in ("requeued", "requeued", "failed"):
        assert worker.take(MODEL, 30, "w")[0] == job_id
        assert worker.requeue(worker.get(job_id), attempt=None, lost=True, max_lost=3, reason="x") in ("alive",)
        worker.redis.zadd(f"latentd:leases:{MODEL}", {job_id: 0})  # its lease lapses
        assert worker.requeue(worker.get(job_id), attempt=None, lost=True, max_lost=3, reason="x") == expected
    job = worker.get(job_id)
    assert job.status == "failed" and job.error["type"] == "worker_lost" and "3 times" in job.error["message"]
    assert worker.take(MODEL, 30, "w") is None


def test_cancel_of_a_queued_job_takes_it_out_of_its_keys_queue(stores):
    submit, gateway, worker, loop, _ = stores
    first, second = submit("alice", 2)
    assert loop.run_until_complete(gateway.cancel(worker.get(first))) == "cancelled"
    assert worker.take(MODEL, 30, "w") == (second, 1)
    assert worker.take(MODEL, 30, "w") is None


def test_a_worker_left_with_a_hung_device_hands_back_its_other_models_jobs_and_exits(stores):
    """The lease keeper's way out of a hung device (services/worker/leases.py): past engine_stall_s plus
    engine_stall_exit_s, the jobs of the models still running go back to the head of their queues as new attempts
    (not counted as lost), the hung model's are left to their lapsing leases (counted as lost by the reaper), and
    the process exits with EXIT_HUNG_DEVICE."""
    from services.common.settings import Settings
    from services.worker.leases import EXIT_HUNG_DEVICE, LeaseKeeper
    from services.worker.runtime import Runtime

    submit, _, worker, _, url = stores
    hung_job, live_job = submit("alice", 2)
    runtime = Runtime(Settings(redis_url=url, engine_stall_s=2, engine_stall_exit_s=3), worker="w1")
    for model, engine in (
        ("hung", SimpleNamespace(stalled_s=0.0, broken=None)),
        (MODEL, SimpleNamespace(stalled_s=0.0, broken=None)),
    ):
        runtime.engines[model] = engine  # an engine's one reading the keeper takes: its current iteration's age
    for job_id, model in ((hung_job, "hung"), (live_job, MODEL)):
        taken, attempt = worker.take(MODEL, 30, "w1")
        assert taken == job_id
        runtime.hold(model, job_id, attempt)
    keeper, exits = LeaseKeeper(runtime, celery_app=None), []
    keeper.send = lambda model: None  # the broker is not under test

    runtime.engines["hung"].stalled_s = 4.9  # stalled, but not yet past the exit limit
    keeper.exit_if_hung(exit=exits.append)
    assert exits == [] and runtime.stalled() == ["hung"]
    runtime.engines["hung"].stalled_s = 5.1
    keeper.exit_if_hung(exit=exits.append)
    assert exits == [EXIT_HUNG_DEVICE]
    assert worker.get(live_job).status == "queued" and worker.get(live_job).attempt == 1
    assert worker.get(hung_job).status == "running"  # its lease lapses; a reaper counts the loss
    assert runtime.held() == {"hung": [(hung_job, 1)]}
    assert worker.take(MODEL, 30, "w2") == (live_job, 2)

    never = Runtime(Settings(redis_url=url, engine_stall_s=2, engine_stall_exit_s=0), worker="w3")
    never.engines["hung"] = SimpleNamespace(stalled_s=1e9, broken=None)
    LeaseKeeper(never, celery_app=None).exit_if_hung(exit=exits.append)
    assert exits == [EXIT_HUNG_DEVICE]  # 0: the worker stays, for the liveness probe


def test_an_attempt_whose_result_redis_would_not_take_runs_again_not_counted_as_lost(stores):
    """Redis away or full past redis_retry_s when a job's result was ready (tasks.run_next): the worker keeps the
    attempt, so its lease keeper renews it once writes pass and hands it back before any reaper counts a loss."""
    from services.common.settings import Settings
    from services.worker.leases import LeaseKeeper
    from services.worker.runtime import Runtime

    submit, _, worker, _, url = stores
    (job_id,) = submit("alice", 1)
    runtime = Runtime(Settings(redis_url=url, lease_s=0.2), worker="w1")
    taken, attempt = worker.take(MODEL, 0.2, "w1")
    runtime.hold(MODEL, job_id, attempt)
    runtime.leave_unwritten(MODEL, job_id, attempt)
    keeper, sent = LeaseKeeper(runtime, celery_app=None), []
    keeper.send = sent.append  # the broker is not under test
    time.sleep(0.3)  # its lease lapsed while Redis took no writes
    keeper.renew()
    assert worker.requeue(worker.get(job_id), attempt=None, lost=True, max_lost=3, reason="reaper") == "alive"
    keeper.hand_back_unwritten()
    job = worker.get(job_id)
    assert job.status == "queued" and sent == [MODEL] and runtime.unwritten() == [] and runtime.held() == {}
    assert worker.redis.hget(f"latentd:job:{job_id}", "lost") in (None, b"0")
    assert worker.take(MODEL, 30, "w2") == (job_id, 2)


def test_a_job_taken_or_requeued_late_lives_ttl_from_then_with_its_input_pictures(stores):
    """A job that waited in its queue most of its TTL (workers away) is taken with its record, events and uploaded
    pictures re-armed to the full TTL, and so is a job requeued late: an attempt never finds them expired under it."""
    from services.common.jobstore import INPUT_BLOB, MASK_BLOB, blob_key, events_key, job_key

    _, gateway, worker, loop, url = stores
    client = redis.Redis.from_url(url)
    job_id = "late-job"
    create = gateway.create(
        job_id, kind="generation", model=MODEL, owner="alice", params={}, input_image=b"png", input_mask=b"mask"
    )
    loop.run_until_complete(create)
    keys = [job_key(job_id), events_key(job_id), blob_key(job_id, INPUT_BLOB), blob_key(job_id, MASK_BLOB)]
    for key in keys:
        client.expire(key, 5)  # nearly expired while it waited
    assert worker.take(MODEL, 30, "w1") == (job_id, 1)
    assert all(590 < client.ttl(key) <= 600 for key in keys), [client.ttl(key) for key in keys]
    for key in keys:
        client.expire(key, 5)
    job = worker.get(job_id)
    assert worker.requeue(job, attempt=1, lost=False, max_lost=3, reason="drain") == "requeued"
    assert all(590 < client.ttl(key) <= 600 for key in keys), [client.ttl(key) for key in keys]
