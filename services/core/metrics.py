"""What the core counts, whichever door a request came in by: jobs accepted and requests refused.

Labels are bounded sets (kind, model, reason); never a job id or an API key."""

from __future__ import annotations

import redis.exceptions
from prometheus_client import Counter

from services.common.errors import ServiceError
from services.common.jobstore import pool_exhausted

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
queued_cancellations_total = Counter(
    "latentd_queued_cancellations_total",
    "Jobs cancelled while still queued, which the door that took the cancel ends at once (the workers count the "
    "jobs cancelled while running: latentd_cancellations_total).",
    ["model"],
)
# Refusals counted by their status where a door maps them; the others are counted where they happen
# (queue_full and no_worker in the core, payload_too_large in the REST body limit), but redis_unavailable, which
# only a door can tell apart: there, the error says Redis failed, and the door knows it was refusing a new job
# (not a read, not a job already queued).
_REASON_OF_STATUS = {422: "validation", 401: "auth"}


def record_submission(kind: str, model: str) -> None:
    jobs_submitted_total.labels(kind=kind, model=model).inc()


def record_queued_cancellation(model: str) -> None:
    queued_cancellations_total.labels(model=model).inc()


def record_rejection(reason: str) -> None:
    rejections_total.labels(reason=reason).inc()


def record_refusal(error: ServiceError | int, *, submission: bool = False) -> None:
    """Called by each door where it maps an error to its transport; `submission`: the request would have queued
    a job, and none was queued."""
    status = error if isinstance(error, int) else error.status_code
    if status in _REASON_OF_STATUS:
        record_rejection(_REASON_OF_STATUS[status])
    elif submission and isinstance(error, ServiceError) and redis_refused(error):
        record_rejection("redis_unavailable")


def redis_refused(error: ServiceError) -> bool:
    """Whether the job store refused the request: Redis unreachable, stalled past its timeout or full (the core
    chains the Redis error under the 503 it answers, core.translate_redis_errors). Not a pool whose connections
    all stayed busy: that is the gateway's own load, with Redis answering (docs/api.md, REDIS_POOL_WAIT_S)."""
    cause = error.__cause__
    return isinstance(cause, redis.exceptions.RedisError) and not pool_exhausted(cause)
