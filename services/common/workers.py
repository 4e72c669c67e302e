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
# One script for both writes, flagged allow-oom: Redis at its maxmemory (noeviction) refuses every other write,
# and a refused heartbeat would take every worker that is fine out of the live ones (the gateways unready, the
# pods' liveness probes failing) for as long as the store is full. It grows nothing a beat at a time: one hash per
# worker with fixed fields, one member per worker in each sorted set, the stale ones trimmed. Redis 7.0 or later
# (script flags). KEYS: the worker's hash, WORKERS_KEY, then consumers_key of each model. ARGV: worker, now,
# now - ttl, ttl, alive ('1': write alive_at and the details), consumed ('1'), saturated ('1'), then the
# details' field/value pairs.
_BEAT = """#!lua flags=allow-oom
local worker, now, stale_before, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'alive_at', now, unpack(ARGV, 8))
  redis.call('HSETNX', KEYS[1], 'started_at', now)
  redis.call('ZADD', KEYS[2], now, worker)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', stale_before)
end
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'consumed_at', now)
  if ARGV[7] == '1' then
    redis.call('HSET', KEYS[1], 'saturated_at', now)
  end
  for i = 3, #KEYS do
    redis.call('ZADD', KEYS[i], now, worker)
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', stale_before)
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
"""


def write(
    client: Any,
    worker: str,
    models: Iterable[str],
    ttl_s: int,
    now: float,
    *,
    details: dict[str, Any] | None = None,
    consumed: bool = False,
    saturated: bool = False,
) -> None:
    """Say that `worker` is alive now (with `details`: hostname, pid) and/or that its consumer just ran a message
    (`consumed`; `saturated`: the heartbeat says so for a worker too busy to take its probe). Written even while
    Redis is full."""
    models = list(models)
    keys = [worker_key(worker), WORKERS_KEY] + [consumers_key(model) for model in models]
    fields = (details or {}) | ({"models": json.dumps(models)} if details is not None else {})
    flags = [int(details is not None), int(consumed), int(saturated)]
    args = [worker, repr(now), repr(now - ttl_s), int(ttl_s), *flags]
    client.register_script(_BEAT)(keys=keys, args=args + [x for pair in fields.items() for x in pair])


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
