"""Celery tasks: thin adapters. Each takes a job id, claims a fenced attempt, runs the job on the engine,
and writes the result once (services.worker.runtime.JobRun). Errors become job failures here, at the edge."""

from __future__ import annotations

import logging
import time

from services.common.tasks import GENERATE_TASK, TRAJECTORY_TASK
from services.worker import metrics as worker_metrics
from services.worker.celery_app import app
from services.worker.runtime import JobRun, get_runtime
from services.worker.trajectories import KINDS

log = logging.getLogger(__name__)


def run_job(job_id: str) -> str:
    run = JobRun(get_runtime(), job_id)
    if not run.claim():
        return "skipped"  # gone, already over, or cancelled while queued
    try:
        if run.job.model not in run.runtime.engines:
            run.fail("model_not_served", f"this worker does not serve model {run.job.model!r}", "model")
        else:
            KINDS[run.job.kind](run)
    except Exception as error:
        log.exception("job %s failed", job_id)
        run.fail("internal_error", f"{type(error).__name__}: {error}")
    final = run.store.get(job_id)
    if final is None:
        return "expired"
    if final.attempt == run.attempt:  # a redelivered copy that took over counts its own run
        error_type = (final.error or {}).get("type")
        worker_metrics.observe_job_end(final.model, final.kind, final.status, error_type, time.time() - run.started_at)
    return final.status


@app.task(name=GENERATE_TASK)
def generate(job_id: str) -> str:
    return run_job(job_id)


@app.task(name=TRAJECTORY_TASK)
def trajectory(job_id: str) -> str:
    return run_job(job_id)
