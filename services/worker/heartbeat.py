"""Worker heartbeat in Redis that proves the Celery consumer loop still consumes.

A Celery worker on Redis can stay alive yet stop taking messages after a broker reconnect.
A plain "I am alive" key would not notice, so every `interval_s` the heartbeat thread
1. writes `alive_at` (services/common/workers.py holds the keys and the rule), and
2. sends a probe task through this worker's own probe queue (`latentd.probe.<hostname-pid>`,
   consumed only by this worker, over the same broker connection as the job queues). The probe,
   run by the consumer, writes `consumed_at`.
A worker is live when its `consumed_at` is fresher than `stale_after_s`.
A worker whose every pool thread holds a job cannot take the probe (prefetch is full, by design);
while it is saturated and its engine still makes progress (denoising steps or finished tasks),
the heartbeat itself refreshes `consumed_at` (and `saturated_at`), so load is never taken for a hang. A worker
whose engine has stalled (one iteration past LATENTD_ENGINE_STALL_S: a hung device) refreshes nothing, probe or
not, so it goes stale and its liveness probe fails (and a while later it exits: services/worker/leases.py).
Redis full refuses the probe (a message is a write): the heartbeat counts the consumer as consuming meanwhile,
its engine not stalled, and its own writes pass (services/common/workers.py), so a full store takes no worker out.
Readiness, model listing, gRPC health and metrics read `services.common.workers`; the container's probes run
`python -m services.worker.heartbeat --check`, which exits 1 when this host's heartbeat is stale or missing or
Redis cannot be reached; the liveness probe's `--liveness` passes when Redis cannot be reached (a restart would
not bring it back, and would lose the results the worker holds until Redis takes them).

Wiring in the worker: `install(celery_app, models, redis_url)` once, where the Celery app is
built; it registers the probe task and starts/stops the heartbeat with the worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from services.common import workers
from services.common.jobstore import redis_full, sync_client
from services.common.settings import get_settings

log = logging.getLogger(__name__)

PROBE_TASK_NAME = "latentd.heartbeat.probe"
DEFAULT_INTERVAL_S = 5.0
DEFAULT_TTL_S = 30


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def probe_queue(worker: str) -> str:
    return f"latentd.probe.{worker}"


def mark_consumed(redis_client: Any, models: Iterable[str], worker: str, ttl_s: int) -> None:
    """Record that this worker's consumer just ran a message (the probe task calls this)."""
    workers.write(redis_client, worker, models, ttl_s, time.time(), consumed=True)


class Heartbeat:
    """Daemon thread writing the heartbeat hash of each model this worker serves."""

    def __init__(
        self,
        redis_client: Any,
        models: Iterable[str],
        *,
        worker: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        ttl_s: int = DEFAULT_TTL_S,
        celery_app: Any = None,
        saturated: Callable[[], bool] | None = None,
        progress: Callable[[], float] | None = None,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        self.healthy = healthy
        self.saturated = saturated
        self.progress = progress
        self._last_progress: float | None = None
        self.redis = redis_client
        self.models = list(models)
        self.worker = worker or worker_id()
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.celery_app = celery_app
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe_refused = False  # Redis full refused the last probe (logged once an episode)

    def beat(self) -> None:
        """One heartbeat: refresh alive_at and, with a Celery app, send the consumption probe."""
        now = time.time()
        details = {"hostname": socket.gethostname(), "pid": os.getpid()}
        consumed = self._busy_and_progressing() and self._healthy()
        workers.write(
            self.redis,
            self.worker,
            self.models,
            self.ttl_s,
            now,
            details=details,
            consumed=consumed,
            saturated=consumed,
        )
        if self.celery_app is None:
            return
        try:
            self.celery_app.send_task(
                PROBE_TASK_NAME,
                args=[self.worker, self.models, self.ttl_s],
                queue=probe_queue(self.worker),
                expires=self.ttl_s,
            )
        except Exception as error:
            if not redis_full(error):
                raise
            # Redis full takes no message, so the consumer cannot be probed; that is the store's state, not this
            # worker's. Counted as consuming meanwhile (its engine not stalled): else every worker that is fine
            # would drop out of the live ones, and its liveness probe restart it, for as long as the store is full.
            if not consumed and self._healthy():
                workers.write(self.redis, self.worker, self.models, self.ttl_s, now, consumed=True)
            if not self._probe_refused:
                log.warning("Redis full: consumption probes are not sent; counted as consuming meanwhile")
            self._probe_refused = True
            return
        if self._probe_refused:
            log.warning("consumption probes are sent again")
        self._probe_refused = False

    def _healthy(self) -> bool:
        return self.healthy is None or self.healthy()

    def _busy_and_progressing(self) -> bool:
        if self.progress is None:
            return False
        progress, last = self.progress(), self._last_progress
        self._last_progress = progress
        return self.saturated is not None and self.saturated() and last is not None and progress > last

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:
                log.warning("heartbeat failed; retrying in %.1fs", self.interval_s, exc_info=True)
            self._stop.wait(self.interval_s)

    def start(self) -> Heartbeat:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="latentd-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self, *, remove: bool = True) -> None:
        """Stop beating; with `remove`, delete the keys so readers stop counting us at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)
            self._thread = None
        if remove:
            try:
                workers.remove(self.redis, self.worker, self.models)
                self.redis.delete(probe_queue(self.worker))
            except Exception:
                log.warning("could not remove heartbeat keys", exc_info=True)


def install(
    celery_app: Any,
    models: Iterable[str],
    redis_url: str,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    ttl_s: int = DEFAULT_TTL_S,
    healthy: Callable[[], bool] | None = None,
) -> None:
    """Register the probe task on `celery_app` and run the heartbeat while the worker runs. healthy: False while
    the worker cannot serve though its consumer consumes (a stalled engine): nothing says it consumes then."""
    from celery import signals

    models = list(models)
    state: dict[str, Any] = {"in_flight": 0, "finished": 0, "concurrency": None}
    lock = threading.Lock()
    timeout_s = get_settings().redis_timeout_s  # Redis away: an error the next beat retries, never a hang
    probe_redis = sync_client(redis_url, timeout_s)

    def _count(delta: int, finished: int, task: Any) -> None:
        if getattr(task, "name", None) != PROBE_TASK_NAME:
            with lock:
                state["in_flight"] += delta
                state["finished"] += finished

    signals.task_prerun.connect(lambda sender=None, **_: _count(1, 0, sender), weak=False)
    signals.task_postrun.connect(lambda sender=None, **_: _count(-1, 1, sender), weak=False)

    def saturated() -> bool:
        return state["concurrency"] is not None and state["in_flight"] >= state["concurrency"]

    def progress() -> float:
        from services.worker import metrics as worker_metrics

        steps = sum(
            s.value for m in worker_metrics.steps_total.collect() for s in m.samples if s.name.endswith("_total")
        )
        return steps + state["finished"]

    @celery_app.task(name=PROBE_TASK_NAME, ignore_result=True, acks_late=False)
    def probe(worker: str, probe_models: list[str], probe_ttl_s: int) -> None:
        if healthy is None or healthy():
            mark_consumed(probe_redis, probe_models, worker, probe_ttl_s)

    @signals.worker_ready.connect(weak=False)
    def _start(sender: Any = None, **_: Any) -> None:
        controller = getattr(sender, "controller", None)
        state["concurrency"] = getattr(controller, "concurrency", None) or celery_app.conf.worker_concurrency
        beat = Heartbeat(
            sync_client(redis_url, timeout_s),
            models,
            interval_s=interval_s,
            ttl_s=ttl_s,
            celery_app=celery_app,
            saturated=saturated,
            progress=progress,
            healthy=healthy,
        )
        # sender is the worker's Consumer: consume our own probe queue over its connection.
        sender.add_task_queue(probe_queue(beat.worker))
        state["beat"] = beat.start()

    @signals.worker_shutdown.connect(weak=False)
    def _stop(**_: Any) -> None:
        beat = state.pop("beat", None)  # type: Heartbeat | None
        if beat is not None:
            beat.stop()


def check(redis_client: Any, hostname: str, stale_after_s: float) -> tuple[bool, str]:
    """Liveness of this host's worker(s): every heartbeat of `hostname` must be consuming."""
    now = time.time()
    mine = [i for i in workers.read_workers(redis_client) if i.hostname == hostname]
    if not mine:
        return False, f"no heartbeat in Redis for host {hostname}"
    stale = [i for i in mine if not i.consuming(now, stale_after_s)]
    if stale:
        ages = ", ".join(
            f"{i.worker}: "
            + ("never consumed" if i.consumed_at is None else f"last consumed {now - i.consumed_at:.0f}s ago")
            for i in stale
        )
        return False, f"consumer stale (limit {stale_after_s:.0f}s): {ages}"
    return True, f"{len(mine)} heartbeat(s) consuming on {hostname}"


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()  # LATENTD_REDIS_URL or REDIS_URL, as every other process reads them
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if this host's heartbeat is stale")
    parser.add_argument(
        "--liveness",
        action="store_true",
        help="--check for a liveness probe: Redis unreachable passes (a restart would not bring it back, and would "
        "lose the results the worker holds until Redis takes them)",
    )
    parser.add_argument("--list", action="store_true", help="print live workers per model")
    parser.add_argument("--redis-url", default=settings.redis_url)
    parser.add_argument("--hostname", default=socket.gethostname())
    parser.add_argument(
        "--stale-after",
        type=float,
        default=settings.worker_stale_after_s,
        help="seconds without a consumed probe before the worker counts as stuck",
    )
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis_url, socket_timeout=5)
    try:
        if args.list:
            models = {m for info in workers.read_workers(client) for m in info.models}
            for model, ids in sorted(workers.live_workers(client, models, args.stale_after).items()):
                print(f"{model}: {' '.join(ids)}")
            return 0
        ok, message = check(client, args.hostname, args.stale_after)
    except redis.RedisError as exc:
        ok, message = args.liveness, f"Redis unreachable at {args.redis_url}: {exc}"
        if args.liveness:
            message += " (not this worker's fault: passes as liveness)"
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
