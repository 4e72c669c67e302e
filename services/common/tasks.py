"""Celery task and queue names: the gateway sends tasks by name and never imports the worker."""

from __future__ import annotations

from typing import Any

# One task per queued job, carrying only the model: the worker that gets it takes the model's next job in
# fair order (services/common/jobstore.py, "Dispatch"), so the broker's order never decides who goes first.
RUN_TASK = "latentd.run"


def queue_for(model: str) -> str:
    """One queue per model, so a worker consumes only the models it has loaded."""
    return f"latentd.{model}"


# Celery's Redis transport keeps priority levels 1..9 in sibling lists named "<queue>\x06\x16<priority>";
# the plain name holds priority 0.
CELERY_PRIORITY_SEP = "\x06\x16"
CELERY_PRIORITY_STEPS = (3, 6, 9)


def celery_queue_length(redis_client: Any, queue: str) -> int:
    """Messages waiting in a Celery queue on the Redis transport, all priority levels summed."""
    keys = [queue] + [f"{queue}{CELERY_PRIORITY_SEP}{p}" for p in CELERY_PRIORITY_STEPS]
    pipe = redis_client.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    return int(sum(pipe.execute()))
