"""The Celery task: a thin adapter. It takes the model's next job in fair order (a fenced attempt with a
lease), runs it on the engine and writes the result once (services.worker.runtime.JobRun). Errors become
job failures here, at the edge."""

from __future__ import annotations

import logging
import os
import signal
import time

from celery.exceptions import Reject

from services.common.jobstore import redis_away_or_full
from services.common.tasks import RUN_TASK
from services.worker import metrics as worker_metrics
from services.worker.celery_app import app
from services.worker.runtime import JobRun, get_runtime
from services.worker.trajectories import KINDS

log = logging.getLogger(__name__)


def run_next(model: str) -> str:
    """Run the model's next job; the job's final status, or "idle" when no job waits."""
    runtime = get_runtime()
    if model not in runtime.engines:
        return "not_served"  # queues are per model: only a misrouted task gets here
    if runtime.draining.is_set():  # SIGTERM came: the message goes back to the queue for another worker
        raise Reject("the worker is draining", requeue=True)
    run = JobRun.take(runtime, model)
    if run is None:
        return "idle"  # one task per job; a spare task (a requeue's, a top-up's) finds nothing to do
    unwritten = False
    try:
        KINDS[run.job.kind](run)
    except Exception as error:
        if redis_away_or_full(error):  # its result not written within redis_retry_s: not the job's fault, no failure
            log.warning(
                "job %s: Redis away or full past the retry budget; handed back once it takes writes: %s",
                run.job_id,
                error,
            )
            runtime.leave_unwritten(model, run.job_id, run.attempt)
            unwritten = True
        else:
            log.exception("job %s failed", run.job_id)
            try:
                run.fail("internal_error", f"{type(error).__name__}: {error}")
            except Exception as unwritten_error:
                if not redis_away_or_full(unwritten_error):
                    raise
                # the failure could not be written either: handed back once Redis takes writes, not a lost worker
                runtime.leave_unwritten(model, run.job_id, run.attempt)
                unwritten = True
    finally:
        if not unwritten:
            run.release()
    if runtime.settings.fault_kill_after_result:  # the fault suite's crash between the result and the ack
        os.kill(os.getpid(), signal.SIGKILL)
    final = run.store.get(run.job_id)
    if final is None:
        return "expired"
    # counted once the job has ended, by the attempt that ended it (a requeued copy that took over counts its own run;
    # an attempt handed back, drained or left unwritten ends nothing)
    if final.attempt == run.attempt and final.terminal:
        error_type = (final.error or {}).get("type")
        worker_metrics.observe_job_end(final.model, final.kind, final.status, error_type, time.time() - run.started_at)
    return final.status


@app.task(name=RUN_TASK)
def run(model: str) -> str:
    return run_next(model)
