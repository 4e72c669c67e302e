"""Leases and the reaper: a lost worker's jobs run again within seconds, not after the broker's visibility
timeout (services/common/jobstore.py, "Dispatch", has the rules and the scripts).

One thread per worker process:
- every lease_s / 3 it renews the lease of every attempt this worker runs (one script per model); an
  attempt that is no longer ours (requeued by a reaper meanwhile) is cancelled in the engine;
- every reap_interval_s, for each model it serves and under a short Redis lock (one reaper at a time),
  it requeues the jobs whose lease lapsed (their worker died or hung) and sends a task for each, and
  tops the broker up to one task per queued job (a task can be lost with Redis or with a worker);
- every round, it hands back the attempts whose result Redis would not take within redis_retry_s (away or full)
  once it takes writes again: they run again as new attempts, not counted as lost (hand_back_unwritten).

Drain (SIGTERM: a scale-in, a rolling update): `drain()` runs on a thread of its own once Celery's warm shutdown
begins. The worker takes no new job from then on (Celery stops consuming; a task already handed to the pool
puts its message back); the engines finish what they hold for up to drain_grace_s; whatever still runs then is
requeued at once as a new attempt (not counted as a loss) with a task sent for it, and dropped from the engine,
so the pool's threads end and the process exits 0 well within the orchestrator's grace period.

A hung device (an engine iteration past engine_stall_s): the stalled model's leases are no longer renewed, so its
jobs run again elsewhere, counted as lost (a request that hangs the device every time fails after max_lost tries
instead of taking down worker after worker). Nothing in the process can free the engine thread from a kernel that
never returns, so once the stall has lasted engine_stall_exit_s more, the keeper hands back the jobs of the
worker's other models (not counted as lost) and exits the process with EXIT_HUNG_DEVICE: its restart policy
(compose's `restart: unless-stopped`, a pod's restartPolicy) starts a fresh one. Compose never restarts a
container for failing its health check; this exit is what does it there.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from services.common.jobstore import leases_key
from services.common.tasks import RUN_TASK, celery_queue_length, queue_for
from services.worker import metrics as worker_metrics

log = logging.getLogger(__name__)

EXIT_HUNG_DEVICE = 70  # the worker's exit status when it leaves a hung device (EX_SOFTWARE)
UNWRITTEN = "Redis was away or full when its result was ready"


def reaper_lock_key(model: str) -> str:
    return f"latentd:reaper:{model}"


def count_ending(model: str, outcome: str) -> None:
    """A requeue that ended the job (its worker gone, or handing it back) counts it: no worker ran it to its end."""
    if outcome == "failed":
        worker_metrics.record_failure(model, "worker_lost")
    elif outcome == "cancelled":
        worker_metrics.record_cancellation(model)


class LeaseKeeper:
    def __init__(self, runtime: Any, celery_app: Any):
        self.runtime = runtime
        self.store = runtime.store
        self.settings = runtime.settings
        self.celery_app = celery_app
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed_at = 0.0

    def start(self) -> LeaseKeeper:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="latentd-leases", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        reap_after = 0.0
        while not self._stop.wait(min(self.settings.reap_interval_s, self.settings.lease_s / 3)):
            try:
                if time.monotonic() - self._renewed_at >= self.settings.lease_s / 3:
                    self.renew()
                self.hand_back_unwritten()
                if time.monotonic() >= reap_after:
                    for model in list(self.runtime.engines):
                        self.reap(model)
            except Exception as error:  # noqa: BLE001 - Redis away: the next round tries again
                log.warning("lease keeping failed; retrying: %s", error)
                # Every lease lapsed while Redis was away. Once it is back, reap only after one lease period, so
                # the live workers renew theirs first and only a worker that died meanwhile loses its jobs.
                reap_after = time.monotonic() + self.settings.lease_s
            self.exit_if_hung()  # Redis away or not: a hung device is left all the same

    def renew(self) -> None:
        stalled = self.runtime.stalled()  # a hung engine's jobs are left to lapse: they run again elsewhere
        for model, held in self.runtime.held().items():
            if model in stalled:
                continue
            attempts = dict(held)
            for job_id in self.store.renew(model, held, self.settings.lease_s):
                log.warning("job %s is no longer ours (requeued by a reaper): leaving it", job_id)
                self.runtime.cancel_job(job_id, attempts[job_id])
        self._renewed_at = time.monotonic()

    def hand_back_unwritten(self) -> None:
        """The attempts whose result Redis would not take within redis_retry_s (away or full) run again, once it
        takes writes, as new attempts not counted as lost: neither the job nor the worker brought anything down.
        (Their leases, still renewed, keep the reapers from counting them first.)"""
        for model, job_id, attempt in self.runtime.unwritten():
            outcome = self._requeue_attempt(model, job_id, attempt, UNWRITTEN)  # Redis still away: the next round
            log.warning("job %s attempt %d: its result was not written (%s): %s", job_id, attempt, UNWRITTEN, outcome)
            self.runtime.forget_unwritten(model, job_id, attempt)

    def reap(self, model: str) -> None:
        lock_ms = int(2 * self.settings.reap_interval_s * 1000)
        if not self.store.redis.set(reaper_lock_key(model), self.runtime.worker, nx=True, px=lock_ms):
            return  # another worker of the model reaps this round
        try:
            for job_id in self.store.lapsed(model):
                job = self.store.get(job_id)
                if job is None:
                    self.store.redis.zrem(leases_key(model), job_id)
                    continue
                outcome = self.store.requeue(
                    job, attempt=None, lost=True, max_lost=self.settings.max_lost, reason="its worker's lease lapsed"
                )
                log.warning("job %s: lease lapsed (attempt %d): %s", job_id, job.attempt, outcome)
                count_ending(model, outcome)  # the worker that ran it is gone: the reaper counts how it ended
                if outcome == "requeued":
                    self.send(model)
            missing = self.store.queued_count(model) - celery_queue_length(self.store.redis, queue_for(model))
            for _ in range(max(0, missing)):
                self.send(model)
        finally:  # the next round may reap at once (the lock only keeps two reapers from one round)
            self.store.release_lock(reaper_lock_key(model), self.runtime.worker)

    def exit_if_hung(self, exit: Any = os._exit) -> None:
        """Once an engine has been stalled engine_stall_exit_s past engine_stall_s (0: never), hand back the jobs of
        the models that still run and leave the process (`exit`, with EXIT_HUNG_DEVICE) for a fresh one."""
        after_s = self.settings.engine_stall_exit_s
        stalled_s = max((engine.stalled_s for engine in self.runtime.engines.values()), default=0.0)
        if after_s <= 0 or stalled_s <= self.settings.engine_stall_s + after_s:
            return
        stalled = self.runtime.stalled()
        log.critical(
            "an engine has been stalled %.0f s (a hung or lost device): handing back jobs and exiting", stalled_s
        )
        for model, jobs in self.runtime.held().items():
            if model not in stalled:  # a stalled model's jobs are left to their lapsing leases (counted as lost)
                for job_id, attempt in jobs:
                    self._hand_back(model, job_id, attempt, "its worker left a hung device")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        exit(EXIT_HUNG_DEVICE)

    def drain(self) -> None:
        """Stop taking jobs, let the engines finish theirs for up to drain_grace_s, requeue the rest now."""
        self.runtime.draining.set()
        started = time.monotonic()
        deadline = started + self.settings.drain_grace_s
        while self.runtime.held() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._report_drain(time.monotonic() - started)
        # A task that claimed a job just as the drain began is caught by a later round, so nothing stays held.
        # This thread is a daemon: the process exits as soon as the pool's threads end, whatever it does.
        give_up = time.monotonic() + max(10.0, self.settings.lease_s)
        while time.monotonic() < give_up:
            for model, jobs in self.runtime.held().items():
                for job_id, attempt in jobs:
                    self._hand_back(model, job_id, attempt, "its worker was draining")
            time.sleep(0.2)

    def _report_drain(self, elapsed_s: float) -> None:
        """How the wait for the engines ended: the time it took (not the grace it was allowed), and a warning only
        where jobs are left to requeue; a clean drain is routine (every scale-in, every rolling update)."""
        held = sum(len(jobs) for jobs in self.runtime.held().values())
        if held:
            log.warning("draining: %d job(s) still running after %.1f s; requeueing them", held, elapsed_s)
        else:
            log.info("draining: no job left running after %.1f s", elapsed_s)

    def _hand_back(self, model: str, job_id: str, attempt: int, reason: str) -> None:
        """Requeue this worker's attempt as a new one, not counted as lost (its fence moves on), and drop it from
        the engine."""
        try:
            outcome = self._requeue_attempt(model, job_id, attempt, reason)
        except Exception:  # Redis away: the lease lapses once we are gone, and a reaper requeues the job
            log.warning("could not requeue job %s (%s)", job_id, reason, exc_info=True)
            outcome = "left to the reaper"
        log.warning("job %s attempt %d handed back (%s): %s", job_id, attempt, reason, outcome)
        self.runtime.cancel_job(job_id, attempt)
        self.runtime.release(model, job_id, attempt)

    def _requeue_attempt(self, model: str, job_id: str, attempt: int, reason: str) -> str:
        """Put this worker's attempt back at the head of its key's queue as a new one, not counted as lost, and send
        its task; the outcome ('requeued', or 'over', 'moved', 'cancelled' where there was nothing to hand back)."""
        job = self.store.get(job_id)
        if job is None:
            return "over"
        outcome = self.store.requeue(job, attempt=attempt, lost=False, max_lost=self.settings.max_lost, reason=reason)
        count_ending(model, outcome)
        if outcome == "requeued":
            self.send(model)
        return outcome

    def send(self, model: str) -> None:
        self.celery_app.send_task(RUN_TASK, args=[model], queue=queue_for(model))
