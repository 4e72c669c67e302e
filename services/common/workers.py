"""Worker liveness, in one place: what the heartbeat writes (services/worker/heartbeat.py) and what readiness,
model listing, gRPC health and metrics read.

A worker is *live* for a model when its Celery consumer ran a message (the heartbeat's probe task, or real
work while every pool thread is busy) within `stale_after_s`. Keys:
  latentd:worker:<worker>       hash: hostname, pid, models (JSON), started_at, alive_at, consumed_at,
                                saturated_at; expires after the heartbeat's TTL
  latentd:workers               sorted set: worker -> alive_at (every worker whose heartbeat runs)
  latentd:consumers:<model>     sorted set: worker -> consumed_at (the model's consuming workers)
Sorted sets keep reads O(log n) per model, whatever else Redis holds (no SCAN over the keyspace).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_STALE_AFTER_S = 30.0
WORKERS_KEY = "latentd:workers"


def worker_key(worker: str) -> str:
    return f"latentd:worker:{worker}"


def consumers_key(model: str) -> str:
    return f"latentd:consumers:{model}"


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# ---- writing (the worker's heartbeat) -----------------------------------------------------------
def write_alive(pipe: Any, worker: str, models: Iterable[str], details: dict[str, Any], ttl_s: int, now: float) -> None:
    """Queue on `pipe` the commands that say `worker` is alive now."""
    key = worker_key(worker)
    pipe.hset(key, mapping=details | {"models": json.dumps(list(models)), "alive_at": now})
    pipe.hsetnx(key, "started_at", now)
    pipe.expire(key, ttl_s)
    pipe.zadd(WORKERS_KEY, {worker: now})
    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - ttl_s)


def write_consumed(
    pipe: Any, worker: str, models: Iterable[str], ttl_s: int, now: float, saturated: bool = False
) -> None:
    """Queue on `pipe` the commands that say `worker`'s consumer just ran a message."""
    key = worker_key(worker)
    pipe.hset(key, mapping={"consumed_at": now, **({"saturated_at": now} if saturated else {})})
    pipe.expire(key, ttl_s)
    for model in models:
        pipe.zadd(consumers_key(model), {worker: now})
        pipe.zremrangebyscore(consumers_key(model), "-inf", now - ttl_s)


def remove(client: Any, worker: str, models: Iterable[str]) -> None:
    """A clean stop: readers stop counting the worker at once."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(worker_key(worker))
    pipe.zrem(WORKERS_KEY, worker)
    for model in models:
        pipe.zrem(consumers_key(model), worker)
    pipe.execute()


# ---- reading -------------------------------------------------------------------------------------
def _queue_live(pipe: Any, models: list[str], since: float) -> None:
    for model in models:
        pipe.zrangebyscore(consumers_key(model), since, "+inf")


def _parse_live(models: list[str], replies: list) -> dict[str, list[str]]:
    return {model: sorted(_s(w) for w in workers) for model, workers in zip(models, replies) if workers}


def live_workers(
    client: Any, models: Iterable[str], stale_after_s: float = DEFAULT_STALE_AFTER_S
) -> dict[str, list[str]]:
    """{model: ids of its live workers}, for the models given (models without one are left out)."""
    models = list(models)
    pipe = client.pipeline(transaction=False)
    _queue_live(pipe, models, time.time() - stale_after_s)
    return _parse_live(models, pipe.execute())


async def live_workers_async(
    client: Any, models: Iterable[str], stale_after_s: float = DEFAULT_STALE_AFTER_S
) -> dict[str, list[str]]:
    """live_workers over redis.asyncio."""
    models = list(models)
    pipe = client.pipeline(transaction=False)
    _queue_live(pipe, models, time.time() - stale_after_s)
    return _parse_live(models, await pipe.execute())


@dataclass(frozen=True)
class WorkerInfo:
    worker: str
    hostname: str
    models: list[str]
    alive_at: float
    consumed_at: float | None

    def consuming(self, now: float, stale_after_s: float) -> bool:
        return self.consumed_at is not None and now - self.consumed_at <= stale_after_s


def read_workers(client: Any) -> list[WorkerInfo]:
    """Every worker whose heartbeat key is still there (live or stale)."""
    workers = [_s(w) for w in client.zrange(WORKERS_KEY, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for worker in workers:
        pipe.hgetall(worker_key(worker))
    infos = []
    for worker, raw in zip(workers, pipe.execute()):
        fields = {_s(k): _s(v) for k, v in raw.items()}
        if "alive_at" not in fields:
            continue
        consumed = fields.get("consumed_at")
        infos.append(
            WorkerInfo(
                worker=worker,
                hostname=fields.get("hostname", ""),
                models=json.loads(fields.get("models") or "[]"),
                alive_at=float(fields["alive_at"]),
                consumed_at=float(consumed) if consumed else None,
            )
        )
    return infos
