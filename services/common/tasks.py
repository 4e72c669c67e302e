"""Celery task and queue names: the gateway sends tasks by name and never imports the worker."""

from __future__ import annotations

GENERATE_TASK = "latentd.generate"
TRAJECTORY_TASK = "latentd.trajectory"


def queue_for(model: str) -> str:
    """One queue per model, so a worker consumes only the models it has loaded."""
    return f"latentd.{model}"
