"""Leases and the reaper: a lost worker's jobs run again within seconds, not after the broker's visibility
timeout (services/common/jobstore.py, "Dispatch", has the rules and the scripts).

One thread per worker process:
- every lease_s / 3 it renews the lease of every attempt this worker runs (one script per model); an
  attempt that is no longer ours (requeued by a reaper meanwhile) is cancelled in the engine;
- every reap_interval_s, for each model it serves and under a short Redis lock (one reaper at a time),
  it requeues the jobs whose lease lapsed (their worker died or hung) and sends a task for each, and
  tops the broker up to one task per queued job (a task can be lost with Redis or with a worker).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from services.common.tasks import RUN_TASK, celery_queue_length, queue_for

log = logging.getLogger(__name__)


def reaper_lock_key(model: str) -> str:
    return f"latentd:reaper:{model}"


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
        while not self._stop.wait(min(self.settings.reap_interval_s, self.settings.lease_s / 3)):
            try:
                if time.monotonic() - self._renewed_at >= self.settings.lease_s / 3:
                    self.renew()
                for model in list(self.runtime.engines):
                    self.reap(model)
            except Exception:  # Redis away: the next round tries again
                log.warning("lease keeping failed; retrying", exc_info=True)

    def renew(self) -> None:
        for model, held in self.runtime.held().items():
            for job_id in self.store.renew(model, held, self.settings.lease_s):
                log.warning("job %s is no longer ours (requeued by a reaper): leaving it", job_id)
                self.runtime.cancel_job(job_id)
        self._renewed_at = time.monotonic()

    def reap(self, model: str) -> None:
        lock_ms = int(2 * self.settings.reap_interval_s * 1000)
        if not self.store.redis.set(reaper_lock_key(model), self.runtime.worker, nx=True, px=lock_ms):
            return  # another worker of the model reaps this round
        for job_id in self.store.lapsed(model):
            job = self.store.get(job_id)
            if job is None:
                self.store.redis.zrem(f"latentd:leases:{model}", job_id)
                continue
            outcome = self.store.requeue(
                job, attempt=None, lost=True, max_lost=self.settings.max_lost, reason="its worker's lease lapsed"
            )
            log.warning("job %s: lease lapsed (attempt %d): %s", job_id, job.attempt, outcome)
            if outcome == "requeued":
                self.send(model)
        missing = self.store.queued_count(model) - celery_queue_length(self.store.redis, queue_for(model))
        for _ in range(max(0, missing)):
            self.send(model)

    def send(self, model: str) -> None:
        self.celery_app.send_task(RUN_TASK, args=[model], queue=queue_for(model))
