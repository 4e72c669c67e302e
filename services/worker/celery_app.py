"""The worker's Celery app: Redis broker, JSON only, late acks, prefetch 1, one queue per model.

Run it with the threads pool, so every task thread hands its job to the one engine thread per model:
    celery -A services.worker.celery_app worker --pool threads --concurrency 32 -Q latentd.<model>
The models come from LATENTD_WORKER_MODELS (comma-separated folders); they are loaded when the worker
starts (before it consumes), their info is published in Redis, and the heartbeat runs while it consumes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from pathlib import Path

import redis
from celery import Celery, signals
from kombu import Queue

from services.common.settings import get_settings
from services.common.tasks import queue_for
from services.worker import broker, heartbeat

log = logging.getLogger(__name__)


def model_paths() -> list[str]:
    return [p.strip() for p in get_settings().worker_models.split(",") if p.strip()]


def model_names() -> list[str]:
    return [Path(p).resolve().name for p in model_paths()]


def create_celery() -> Celery:
    settings = get_settings()
    broker.install()  # the worker reconnects after Redis crashes, rather than exit (services/worker/broker.py)
    app = Celery("latentd-worker", broker=settings.redis_url, include=["services.worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # sweep for unacknowledged messages older than that about 36 times per timeout (kombu's default:
            # every 100 s), so a short timeout (the fault suite's) redelivers soon
            "unacked_restore_interval": max(1, min(100, settings.visibility_timeout_s // 36)),
            "unacked_restore_throttle": 1,
            # the sweep's lock: a worker killed while holding it must not stop the others' sweeps for long
            "unacked_mutex_expire": broker.unacked_mutex_expire(settings.visibility_timeout_s),
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
        },
        broker_connection_retry_on_startup=True,
        # a lost broker connection leaves the running jobs running: their tasks hold no work but the engine's
        # (the job store's leases decide who runs a job), so cancelling them would only requeue finished work
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        task_queues=[Queue(queue_for(name)) for name in model_names()],
        task_default_queue=queue_for(model_names()[0]) if model_names() else "latentd.default",
    )
    heartbeat.install(app, model_names(), settings.redis_url, healthy=_no_engine_stalled)
    return app


def _no_engine_stalled() -> bool:
    from services.worker.runtime import get_runtime

    return not get_runtime().stalled()


app = create_celery()


_leases: dict[str, object] = {}


@signals.worker_init.connect(weak=False)
def _load_models(**_: object) -> None:
    """Load and publish the models before the worker consumes. Celery logs and drops what a worker_init handler
    raises (and its log is not set up yet), and the worker would stay up serving nothing: where it cannot serve,
    the handler says why on stderr and leaves with EXIT_CANNOT_SERVE."""
    from services.worker import metrics
    from services.worker.leases import LeaseKeeper
    from services.worker.loading import ModelLoadError
    from services.worker.runtime import EXIT_CANNOT_SERVE, get_runtime

    metrics.serve_metrics_from_env()
    runtime = get_runtime()
    try:
        runtime.load(model_paths())
    except Exception as error:  # noqa: BLE001 - whatever it is, the worker cannot serve: say why and leave
        if not isinstance(error, (ModelLoadError, RuntimeError, redis.RedisError)):
            traceback.print_exc()
        print(f"latentd worker cannot serve: {error}", file=sys.stderr, flush=True)
        os._exit(EXIT_CANNOT_SERVE)
    _leases["keeper"] = LeaseKeeper(runtime, app).start()


@signals.worker_shutting_down.connect(weak=False)
def _drain(how: str = "", **_: object) -> None:
    """SIGTERM (Celery's warm shutdown): Celery stops consuming and waits for the pool's threads; the drain
    bounds that wait by drain_grace_s (services/worker/leases.py). Runs in the signal handler: a thread does it."""
    keeper = _leases.get("keeper")
    if keeper is not None and how == "Warm":
        threading.Thread(target=keeper.drain, name="latentd-drain", daemon=True).start()


@signals.worker_shutdown.connect(weak=False)
def _stop_engines(**_: object) -> None:
    from services.worker.runtime import get_runtime

    keeper = _leases.pop("keeper", None)
    if keeper is not None:
        keeper.stop()
    get_runtime().stop()
