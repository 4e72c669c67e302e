"""What the core counts, whichever door a request came in by: jobs accepted and requests refused.

Labels are bounded sets (kind, model, reason); never a job id or an API key."""

from __future__ import annotations

from prometheus_client import Counter

from services.common.errors import ServiceError

jobs_submitted_total = Counter(
    "latentd_jobs_submitted_total",
    "Jobs accepted and queued, by kind (generation, forward, reverse, guidance_sweep) and model.",
    ["kind", "model"],
)
rejections_total = Counter(
    "latentd_rejections_total",
    "Requests refused before queueing, by reason (validation, auth, quota, payload_too_large, no_worker, "
    "queue_full, redis_unavailable).",
    ["reason"],
)
# Refusals counted by their status where a door maps them; the others are counted where they happen
# (queue_full and no_worker in the core, payload_too_large in the REST body limit).
_REASON_OF_STATUS = {422: "validation", 401: "auth"}


def record_submission(kind: str, model: str) -> None:
    jobs_submitted_total.labels(kind=kind, model=model).inc()


def record_rejection(reason: str) -> None:
    rejections_total.labels(reason=reason).inc()


def record_refusal(error: ServiceError | int) -> None:
    """Called by each door where it maps an error to its transport."""
    status = error if isinstance(error, int) else error.status_code
    if status in _REASON_OF_STATUS:
        record_rejection(_REASON_OF_STATUS[status])
