"""No accepted job lost or stranded (issue 11), against real processes: a worker SIGKILLed or drained, a worker
killed between a job's result and its ack, a job that keeps killing its workers, Redis restarted mid-run, and
cancels while a worker's jobs fail over. Figures (failover and drain times) are printed: `pytest -s` shows them.

Each test starts from two consuming workers (conftest.FaultStack.ensure_workers) and reads the truth from
Redis: the job's hash and its event stream, where "exactly one terminal event" is checked.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import httpx
import pytest

from client.latentd_client import Client
from scripts import run_stack
from services.common import workers
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from services.common.settings import Settings, hash_key
from services.core.core import Core, TaskSender
from services.worker.broker import UNACKED_MUTEX_KEY, unacked_mutex_expire
from services.worker.leases import EXIT_HUNG_DEVICE
from tests.faults.conftest import (
    DRAIN_GRACE_S,
    KEY,
    MAX_LOST,
    PROMPT,
    VISIBILITY_TIMEOUT_S,
    kill,
    wait_until,
    worker_pid,
)

pytestmark = pytest.mark.timeout(300)


def started_attempts(faults, job_id: str) -> list[int]:
    return [data["attempt"] for name, data in faults.events(job_id) if name == "started"]


def assert_one_outcome(faults, ids: list[str], status: str = "succeeded") -> None:
    for job_id in ids:
        assert faults.job(job_id)["status"] == status, (job_id, faults.events(job_id)[-3:])
        assert faults.terminal_events(job_id) == [status], job_id


def test_sigkill_one_of_two_workers_with_16_jobs_in_flight(faults):
    faults.ensure_workers(2)
    ids = faults.submit(16, steps=150, guidance=1.0)  # long enough to be running at the kill on a fast machine
    faults.wait_running(ids)
    held = faults.by_worker(ids)
    assert len(held) == 2, f"both workers should run some of the 16 jobs: {held}"
    victim, orphans = max(held.items(), key=lambda item: len(item[1]))
    killed_at = time.monotonic()
    kill(faults.worker_proc(victim))
    wait_until("the dead worker's jobs run again", lambda: all(2 in started_attempts(faults, j) for j in orphans))
    failover_s = time.monotonic() - killed_at
    print(f"\nfailover: {len(orphans)} jobs of the SIGKILLed worker running again after {failover_s:.1f} s")
    assert failover_s < 30  # the bound; leases lapse after LEASE_S, reaped every REAP_INTERVAL_S
    faults.wait_all(ids)
    assert_one_outcome(faults, ids)
    for job_id in orphans:
        requeued = [data for name, data in faults.events(job_id) if name == "queued" and data.get("requeued")]
        assert len(requeued) == 1 and "lease lapsed" in requeued[0]["reason"]
        assert faults.job(job_id)["attempt"] == "2"
    response = httpx.get(f"{faults.url}/v1/jobs/{orphans[0]}/images/0", headers=faults.headers)
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")


def test_sigterm_drains_within_the_grace_and_requeues_the_rest(faults):
    """A rolling update: one worker runs 8 jobs, gets SIGTERM, and its replacement starts at the same time."""
    faults.ensure_workers(1)
    (proc,) = faults.alive()
    # long jobs that cannot finish within the grace, then short ones that can (in this order, so that the short
    # ones are still running when the long ones are: a 12-step job can be done before a job sent with it starts)
    long = faults.submit(4, steps=600)
    faults.wait_running(long)
    short = faults.submit(4, steps=12)
    faults.wait_running(short + long)
    assert set(faults.by_worker(short + long)) == {proc.pid}
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    faults.start_worker()
    proc.wait(timeout=DRAIN_GRACE_S + 30)
    exit_s = time.monotonic() - signalled
    print(f"\ndrain: SIGTERM to exit {exit_s:.1f} s (grace {DRAIN_GRACE_S:g} s), exit code {proc.returncode}")
    assert proc.returncode == 0
    assert DRAIN_GRACE_S <= exit_s < DRAIN_GRACE_S + 15
    faults.wait_all(short + long)
    assert_one_outcome(faults, short + long)
    for job_id in short:  # the engine finished what it held within the grace
        assert faults.job(job_id)["attempt"] == "1", faults.events(job_id)
    for job_id in long:  # requeued at once as a new attempt, not counted as a loss
        reasons = [data.get("reason") for name, data in faults.events(job_id) if name == "queued"]
        assert reasons[1:] == ["its worker was draining"], reasons
        job = faults.job(job_id)
        assert job["attempt"] == "2" and job.get("lost") in (None, "0")


def test_kill_after_the_result_is_stored_but_before_the_ack_gives_one_result(faults):
    for proc in faults.alive():  # only the crashing worker may take the job
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    crashing = faults.start_worker(fault_kill_after_result=True)
    wait_until(
        "the crashing worker consumes", lambda: crashing.pid in {int(w.rsplit("-", 1)[1]) for w in faults.live_ids()}
    )
    (job_id,) = faults.submit(1, steps=8)
    crashing.wait(timeout=60)
    assert crashing.returncode == -signal.SIGKILL
    job = faults.job(job_id)
    assert job["status"] == "succeeded" and job["attempt"] == "1"
    images = job["images"]
    assert faults.redis.hlen("unacked") >= 1  # its task was never acked: the broker will redeliver it
    # as if it had died holding kombu's sweep lock (a SIGKILL can land while its consumer sweeps): the lock lapses
    # after broker.unacked_mutex_expire, not kombu's 300 s, and the sweep goes on
    expire = unacked_mutex_expire(VISIBILITY_TIMEOUT_S)
    faults.redis.set(UNACKED_MUTEX_KEY, f"killed-{crashing.pid}", ex=expire, nx=True)
    faults.ensure_workers(2)
    # the broker redelivers the task after the visibility timeout; the worker that runs it finds no job to take
    wait_until(
        "the redelivered task ran and was acked",
        lambda: faults.redis.hlen("unacked") == 0 and faults.redis.llen(f"latentd.{faults.model}") == 0,
        timeout_s=60,
    )
    job = faults.job(job_id)
    assert job["status"] == "succeeded" and job["attempt"] == "1" and job["images"] == images
    assert faults.terminal_events(job_id) == ["succeeded"]
    assert started_attempts(faults, job_id) == [1]


def test_a_job_that_keeps_killing_its_workers_fails_after_max_lost_attempts(faults):
    faults.ensure_workers(2)
    (job_id,) = faults.submit(1, steps=500, guidance=1.0)
    for attempt in range(1, MAX_LOST + 1):
        wait_until(
            f"attempt {attempt} running",
            lambda a=attempt: faults.job(job_id).get("attempt") == str(a) and faults.job(job_id)["status"] == "running",
        )
        pid = int(faults.job(job_id)["worker"].rsplit("-", 1)[1])
        kill(faults.worker_proc(pid))  # the job "brings its worker down"
        faults.start_worker()
    faults.wait_all([job_id])
    job = faults.job(job_id)
    assert job["status"] == "failed", faults.events(job_id)
    assert job["error"]["type"] == "worker_lost"
    assert f"lost {MAX_LOST} times" in job["error"]["message"] and "not retried again" in job["error"]["message"]
    assert faults.terminal_events(job_id) == ["failed"]
    assert started_attempts(faults, job_id) == list(range(1, MAX_LOST + 1))
    response = httpx.get(f"{faults.url}/v1/jobs/{job_id}", headers=faults.headers)
    assert response.json()["status"] == "failed" and "lost 3 times" in response.json()["error"]["message"]


def test_redis_restart_mid_run(faults):
    faults.ensure_workers(2)
    ids = faults.submit(16, steps=60)
    faults.wait_running(ids)
    followed: dict[str, list] = {ids[0]: [], ids[1]: [], ids[2]: []}

    def follow(job_id: str, url: str = faults.url) -> None:  # the Python client, across the outage
        with Client(url, api_key=KEY, max_reconnects=100) as client:
            followed[job_id].extend(client.events(job_id))

    readers = [threading.Thread(target=follow, args=(ids[0],), daemon=True)]
    readers[0].start()  # reading when Redis goes
    time.sleep(0.5)
    faults.stop_redis()
    down_at = time.monotonic()
    readers.append(threading.Thread(target=follow, args=(ids[1],), daemon=True))
    readers[1].start()  # its first request is answered 503: it tries again after Retry-After
    readers.append(threading.Thread(target=follow, args=(ids[2], f"grpc://{faults.grpc_target}"), daemon=True))
    readers[2].start()  # the gRPC door: UNAVAILABLE, then the stream again
    try:
        started = time.monotonic()
        response = httpx.post(
            f"{faults.url}/v1/generations", json={"prompt": "a blue square"}, headers=faults.headers, timeout=30
        )
        submit_s = time.monotonic() - started
        print(f"\nRedis down: POST /v1/generations answered {response.status_code} in {submit_s:.2f} s")
        assert response.status_code == 503 and submit_s < 5
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "service_unavailable"
        response = httpx.get(f"{faults.url}/v1/jobs/{ids[0]}", headers=faults.headers, timeout=30)
        assert response.status_code == 503 and "retry-after" in response.headers, response.text
        assert httpx.get(f"{faults.url}/readyz", timeout=30).status_code == 503
        with grpc.insecure_channel(faults.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.LatentdServiceStub(channel).GetJob(
                    pb.GetJobRequest(job_id=ids[0]), metadata=(("authorization", f"Bearer {KEY}"),), timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ("retry-after", "2") in tuple(refused.value.trailing_metadata() or ())
        time.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))  # down for 3 s at least
    finally:
        faults.start_redis()
    print(f"Redis was down {time.monotonic() - down_at:.1f} s")
    faults.wait_all(ids)
    assert_one_outcome(faults, ids)
    # the live workers renewed their leases before any reaper looked: no job ran twice for the outage
    assert [faults.job(j)["attempt"] for j in ids] == ["1"] * len(ids)
    for reader in readers:
        reader.join(timeout=60)
    for events in followed.values():
        assert events and events[-1].type == "succeeded"
        assert len({event.id for event in events}) == len(events)  # resumed after the last id: no repeats
    run_stack_ready = httpx.get(f"{faults.url}/readyz", timeout=30)
    assert run_stack_ready.status_code == 200, run_stack_ready.text


def test_redis_killed_mid_run_loses_no_accepted_job(faults):
    """Redis SIGKILLed (a crash, not a shutdown) while two workers run 12 jobs, then started again on its
    append-only file: every job accepted before the crash ends once, with its pictures; the gateway answers its
    first requests after it (its pooled connections, all closed by the crash, are retried once on new ones;
    before, each answered a 503); and both workers reconnect and take new work (before, kombu's close of the
    lost connection raised, and each worker exited 1 once its jobs were done: services/worker/broker.py).
    A reader that follows a job over SSE with the Python client across the crash ends with its `succeeded`, no
    event twice. (A machine crash could also lose the last second that fsync had not reached the disk; a process
    crash loses nothing Redis answered.)"""
    faults.ensure_workers(2)
    workers = faults.alive()
    ids = faults.submit(12, steps=80)
    faults.wait_running(ids[:4])
    followed: list = []

    def follow() -> None:
        with Client(faults.url, api_key=KEY, max_reconnects=100) as client:
            followed.extend(client.events(ids[0]))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(0.5)
    faults.stop_redis(signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(2.0)
    faults.start_redis()
    faults.wait_all(ids)
    reader.join(timeout=60)
    assert followed and followed[-1].type == "succeeded", [e.type for e in followed[-3:]]
    assert len({event.id for event in followed}) == len(followed)
    print(f"\nRedis SIGKILLed and back after {time.monotonic() - killed_at:.1f} s: {len(ids)} jobs ended once each")
    assert_one_outcome(faults, ids)
    for job_id in ids[:2] + ids[-2:]:
        response = httpx.get(f"{faults.url}/v1/jobs/{job_id}/images/0", headers=faults.headers, timeout=30)
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    # ready again once each worker's Celery consumer has reconnected and answered its heartbeat's probe
    wait_until(
        "both workers consuming again",
        lambda: httpx.get(f"{faults.url}/readyz", timeout=30).json().get("workers") == {faults.model: 2},
    )
    print(f"both workers consuming again {time.monotonic() - killed_at:.1f} s after the crash")
    assert all(proc.poll() is None for proc in workers), "a worker exited after the crash"
    after = faults.submit(2, steps=10)  # and it takes new work
    faults.wait_all(after)
    assert_one_outcome(faults, after)


def test_redis_full_mid_run_holds_the_results_until_there_is_room(faults):
    """Redis at its maxmemory (noeviction: every write that could grow it refused, reads served) while two
    workers run 6 jobs: a submit is answered 503 saying Redis is full, with Retry-After, and a read still works;
    each worker's result write waits for room (as for Redis away, up to LATENTD_REDIS_RETRY_S) instead of failing
    its job; both workers' heartbeats go on (their probes refused) and /readyz stays ready. Once there is room,
    every job ends once, succeeded, on its first attempt with its pictures. (Before, a refused result write failed
    the job and its failure write was refused too: with Redis full for 9 s, the 6 jobs had not ended 2 minutes
    later.)"""
    faults.ensure_workers(2)
    ids = faults.submit(6, steps=30)
    faults.wait_running(ids[:2])
    store = faults.redis
    logs = sorted(faults.log_dir.glob("worker-*.log"))
    waits_before = sum(log.read_text().count("Redis full; retrying") for log in logs)
    store.config_set("maxmemory", int(store.info("memory")["used_memory"]) // 2)
    full_at, full_since = time.monotonic(), time.time()
    try:
        response = httpx.post(
            f"{faults.url}/v1/generations", json={"prompt": "a blue square"}, headers=faults.headers, timeout=30
        )
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1, response.text
        assert "the job store (Redis) is full" in response.json()["error"]["message"]
        assert httpx.get(f"{faults.url}/v1/jobs/{ids[0]}", headers=faults.headers, timeout=30).status_code == 200
        wait_until(
            "a worker's result write waiting for room",
            lambda: sum(log.read_text().count("Redis full; retrying") for log in logs) > waits_before,
            timeout_s=60,
        )
        time.sleep(6.0)  # more results come and wait; every worker beats (each 5 s) with its probe refused
        running = {proc.pid for proc in faults.alive()}
        beats = [info for info in workers.read_workers(store) if worker_pid(info.worker) in running]
        assert len(beats) == 2 and all(min(i.alive_at, i.consumed_at or 0) > full_since for i in beats), beats
        assert {info.worker for info in beats} <= set(faults.live_ids())
        assert httpx.get(f"{faults.url}/readyz", timeout=30).status_code == 200  # no worker dropped out
    finally:
        store.config_set("maxmemory", 0)
    print(f"\nRedis full for {time.monotonic() - full_at:.1f} s")
    faults.wait_all(ids)
    assert_one_outcome(faults, ids)
    assert [faults.job(j)["attempt"] for j in ids] == ["1"] * len(ids)
    for job_id in ids:
        response = httpx.get(f"{faults.url}/v1/jobs/{job_id}/images/0", headers=faults.headers, timeout=30)
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    after = faults.submit(2, steps=10)  # and the workers take new work
    faults.wait_all(after)
    assert_one_outcome(faults, after)


def test_redis_full_past_the_retry_budget_runs_the_jobs_again_once_there_is_room(faults):
    """Redis full for longer than a worker holds a result for (LATENTD_REDIS_RETRY_S, 1 s here): the result write
    gives up and no failure is written (Redis being full is not the job's fault). Once there is room the worker
    hands the job back (attempt 2), not counted as a lost worker, and it succeeds: no job lost, one outcome each.
    (Before services/worker/broker.py let kombu's refused acks give up, Celery took them for unrecoverable, the
    worker exited, and 2 minutes later no job had ended; before the hand-back a reaper requeued the job as lost,
    and a job caught by MAX_LOST such episodes failed as if it brought its workers down.)"""
    for proc in faults.alive():
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    impatient = faults.start_worker(redis_retry_s=1)
    wait_until("the worker consumes", lambda: impatient.pid in map(worker_pid, faults.live_ids()), timeout_s=120)
    log = faults.log_dir / f"worker-{faults.started}.log"
    ids = faults.submit(3, steps=30)
    faults.wait_running(ids)
    store = faults.redis
    store.config_set("maxmemory", int(store.info("memory")["used_memory"]) // 2)
    try:
        wait_until("a result write given up", lambda: "handed back once it takes writes" in log.read_text())
        time.sleep(2.0)  # every job's result write gives up (none writes a failure instead)
    finally:
        store.config_set("maxmemory", 0)
    faults.wait_all(ids)
    assert_one_outcome(faults, ids)
    print(f"\nattempts after Redis full past the retry budget: {[faults.job(j)['attempt'] for j in ids]}")
    handed_back = [j for j in ids if faults.job(j)["attempt"] == "2"]
    assert handed_back and all(faults.job(j).get("lost", "0") == "0" for j in ids)
    assert impatient.poll() is None  # its acks refused while Redis was full did not bring the worker down
    faults.ensure_workers(2)


def test_a_hung_engine_hands_its_jobs_to_another_worker(faults, tmp_path):
    """A worker's device hangs: its engine thread never comes back from a backbone call (the test hook
    LATENTD_FAULT_HANG_FILE), its process and threads otherwise fine. Past LATENTD_ENGINE_STALL_S it stops renewing
    its jobs' leases and takes no new job, so another worker's reaper requeues them and runs them; its heartbeat
    stops saying it consumes, so it drops out of the live workers; LATENTD_ENGINE_STALL_EXIT_S later it exits with
    status 70, for its restart policy to start a fresh one (compose restarts no container for being unhealthy).
    Before, the lease keeper went on renewing the stuck jobs' leases: 2 minutes after the hang none had ended; and
    the hung worker stayed up, useless, for good under compose."""
    for proc in faults.alive():  # only the worker that hangs may take the first jobs
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    marker = tmp_path / "hang-once"
    marker.touch()
    hung = faults.start_worker(fault_hang_file=str(marker), engine_stall_s=2, engine_stall_exit_s=4)
    wait_until("the worker that hangs consumes", lambda: hung.pid in {worker_pid(w) for w in faults.live_ids()})
    ids = faults.submit(1, steps=30, prompt="a red circle, hang") + faults.submit(3, steps=30)
    wait_until("its device hung", lambda: not marker.exists(), timeout_s=60)
    hung_at = time.monotonic()
    other = faults.start_worker()  # runs what the hung one held
    assert hung.wait(timeout=60) == EXIT_HUNG_DEVICE
    print(f"\nthe hung worker exited {time.monotonic() - hung_at:.1f} s after the device hung")
    wait_until("the other worker consumes", lambda: other.pid in map(worker_pid, faults.live_ids()), timeout_s=120)
    faults.wait_all(ids)
    print(f"all {len(ids)} jobs ended {time.monotonic() - hung_at:.1f} s after the device hung")
    assert_one_outcome(faults, ids)
    assert faults.job(ids[0])["attempt"] == "2"  # the hung attempt's lease lapsed, the job ran again
    assert all(worker_pid(faults.job(job_id)["worker"]) != hung.pid for job_id in ids)
    wait_until("the hung worker no longer counted live", lambda: hung.pid not in map(worker_pid, faults.live_ids()))
    faults.ensure_workers(2)


def test_cancel_of_queued_and_running_jobs_during_a_failover(faults):
    faults.ensure_workers(2)
    running = faults.submit(16, steps=200, guidance=1.0)
    faults.wait_running(running)
    queued = faults.submit(4, steps=200, guidance=1.0)  # every task thread is busy: these wait
    ids = running + queued
    assert set(faults.statuses(queued).values()) == {"queued"}
    held = faults.by_worker(running)
    (dead, on_dead), (live, on_live) = sorted(held.items(), key=lambda item: -len(item[1]))[:2]
    kill(faults.worker_proc(dead))
    cancel = queued[:2] + on_dead[:2] + on_live[:1]
    for job_id in cancel:
        response = httpx.post(f"{faults.url}/v1/jobs/{job_id}/cancel", headers=faults.headers)
        assert response.status_code == 200, response.text
    assert all(faults.job(j)["status"] == "cancelled" for j in queued[:2])  # a queued job ends at once
    faults.wait_all(ids, timeout_s=180)
    assert_one_outcome(faults, cancel, "cancelled")
    assert_one_outcome(faults, [j for j in ids if j not in cancel], "succeeded")
    for job_id in on_dead[:2]:  # cancelled by the reaper, not run again
        assert started_attempts(faults, job_id) == [1]


def test_a_job_stored_whose_task_could_not_be_sent_still_runs(faults):
    """The core stores the job, then the broker refuses its task (Redis went away between the two): the job is
    accepted all the same, and the workers' top-up (one task per queued job) sends the task it lacks."""
    faults.ensure_workers(2)

    async def submit() -> str:
        core = await Core.open(Settings(redis_url=faults.redis_url, api_key_hashes=hash_key(KEY)))
        dead = run_stack.free_port()  # nothing listens there: every send fails
        core.tasks = TaskSender(Settings(redis_url=f"redis://127.0.0.1:{dead}/0", redis_timeout_s=1))
        try:
            job = await core.submit_generation(hash_key(KEY), {"prompt": PROMPT, "num_inference_steps": 8})
        finally:
            await core.close()
        return job.id

    job_id = asyncio.run(submit())
    assert faults.job(job_id)["status"] in ("queued", "running", "succeeded")
    faults.wait_all([job_id], timeout_s=60)
    assert_one_outcome(faults, [job_id])
