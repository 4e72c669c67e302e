"""The Redis job store: every key and every operation on jobs that the gateway and the workers use.

Keys (all expire after `ttl_s` once written):
  latentd:job:<id>             hash: kind, model, owner, status, params, progress, timings, images, frames,
                               error, attempt, cancel, created_at (JSON where structured; see jobs.JobRecord)
  latentd:job:<id>:events      stream of {event, data(JSON)}; the entry id is the SSE id
  latentd:job:<id>:blob:<name> bytes of one image or frame, or the uploaded input picture ("input")
  latentd:pending:<model>      set of job ids queued or running (the bounded queue; ids whose record
                               expired unfinished are swept when the queue looks full)
  latentd:models               hash: model name -> JSON ModelInfo published by workers
Worker liveness keys are in services/common/workers.py.

The gateway's side is `AsyncJobStore` (redis.asyncio, one bounded pool per process); the worker's side is
`JobStore` (blocking redis, on the task threads and the engine thread). A claimed attempt is fenced: the
claim bumps `attempt`, and the result is written once, by the current attempt, in one Lua script.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from services.common.jobs import TERMINAL, JobEvent, JobRecord
from services.common.models import ModelInfo

MODELS_KEY = "latentd:models"
INPUT_BLOB = "input"


def job_key(job_id: str) -> str:
    return f"latentd:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"latentd:job:{job_id}:events"


def blob_key(job_id: str, name: str) -> str:
    return f"latentd:job:{job_id}:blob:{name}"


def image_blob_name(attempt: int, index: int) -> str:
    return f"a{attempt}-image-{index}"


def frame_blob_name(attempt: int, index: int) -> str:
    """Blob name of trajectory frame `index` written by `attempt` (live, while the job runs, or at its end)."""
    return f"a{attempt}-frame-{index}"


def pending_key(model: str) -> str:
    return f"latentd:pending:{model}"


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _entries(items: Iterable) -> list[JobEvent]:
    return [JobEvent(_s(entry_id), _s(fields[b"event"]), _s(fields[b"data"])) for entry_id, fields in items]


def _event_fields(name: str, data: dict) -> dict[str, str]:
    return {"event": name, "data": json.dumps(data)}


# Claim: a fenced attempt number, unless the job is already over (or cancelled while queued).
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -2 end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return -1 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return -1 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'progress', '{}')
return attempt
"""

# Finish: written once, by the attempt that holds the fence. KEYS: job, events, pending, blob keys...;
# ARGV: attempt, ttl, status, fields JSON, event name, event data, job id, blobs...
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[2])
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 4], 'EX', ttl)
end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'event', ARGV[5], 'data', ARGV[6])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('SREM', KEYS[3], ARGV[7])
return 1
"""

# Cancel: a queued job ends now; a running one gets the flag its worker reads once per engine iteration.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
redis.call('HSET', KEYS[1], 'cancel', '1')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled')
  redis.call('XADD', KEYS[2], '*', 'event', 'cancelled', 'data', ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[2])
  return 'cancelled'
end
return 'cancelling'
"""


def new_record(job_id: str, *, kind: str, model: str, owner: str, params: dict, now: float) -> dict[str, Any]:
    """The hash fields of a job as it is queued."""
    return {
        "kind": kind,
        "model": model,
        "owner": owner,
        "status": "queued",
        "params": json.dumps(params),
        "progress": "{}",
        "timings": json.dumps({"queued_at": now}),
        "images": "[]",
        "frames": "[]",
        "error": "null",
        "attempt": 0,
        "cancel": "0",
        "created_at": now,
    }


class AsyncJobStore:
    """The gateway's side: create, read, cancel, stored pictures, event history and live reads."""

    def __init__(self, client: aioredis.Redis, ttl_s: int = 3600):
        self.redis = client
        self.ttl_s = ttl_s
        self._cancel = client.register_script(_CANCEL)

    async def create(
        self, job_id: str, *, kind: str, model: str, owner: str, params: dict, input_image: bytes | None = None
    ) -> JobRecord:
        now = time.time()
        record = new_record(job_id, kind=kind, model=model, owner=owner, params=params, now=now)
        pipe = self.redis.pipeline(transaction=True)
        if input_image is not None:  # the upload rides in Redis next to the job, not in the Celery message
            pipe.set(blob_key(job_id, INPUT_BLOB), input_image, ex=self.ttl_s)
        pipe.hset(job_key(job_id), mapping=record)
        pipe.expire(job_key(job_id), self.ttl_s)
        pipe.xadd(events_key(job_id), _event_fields("queued", {"id": job_id, "emitted_at": now}))
        pipe.expire(events_key(job_id), self.ttl_s)
        pipe.sadd(pending_key(model), job_id)
        await pipe.execute()
        return JobRecord.from_redis(job_id, record)

    async def get(self, job_id: str) -> JobRecord | None:
        return JobRecord.from_redis(job_id, await self.redis.hgetall(job_key(job_id)))

    async def cancel(self, job_id: str, model: str) -> str:
        """'cancelled' (it was queued), 'cancelling' (running: it stops at its next step), the final status, or 'missing'."""
        data = json.dumps({"id": job_id, "emitted_at": time.time()})
        keys = [job_key(job_id), events_key(job_id), pending_key(model)]
        return _s(await self._cancel(keys=keys, args=[data, job_id]))

    async def blob(self, job_id: str, name: str) -> bytes | None:
        return await self.redis.get(blob_key(job_id, name))

    async def models(self) -> dict[str, ModelInfo]:
        return {_s(k): ModelInfo.from_json(v) for k, v in (await self.redis.hgetall(MODELS_KEY)).items()}

    async def pending_count(self, model: str) -> int:
        return int(await self.redis.scard(pending_key(model)))

    async def sweep_pending(self, model: str) -> int:
        """Drop from the bounded queue the jobs whose record has expired unfinished (a worker lost with its
        job after the TTL, say), so they no longer hold a slot. Returns how many went."""
        members = [_s(member) for member in await self.redis.smembers(pending_key(model))]
        if not members:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for job_id in members:
            pipe.exists(job_key(job_id))
        gone = [job_id for job_id, exists in zip(members, await pipe.execute()) if not exists]
        if gone:
            await self.redis.srem(pending_key(model), *gone)
        return len(gone)

    async def events_after(self, job_id: str, after: str = "0", count: int = 1024) -> list[JobEvent]:
        """The stored events after the entry id `after` ("0": from the first), oldest first."""
        start = "-" if after in ("0", "0-0") else f"({after}"
        return _entries(await self.redis.xrange(events_key(job_id), min=start, count=count))

    async def read_live(self, cursors: dict[str, str], block_ms: int, count: int = 256) -> dict[str, list[JobEvent]]:
        """One blocking XREAD over many jobs' streams: {job id: events after its cursor}."""
        reply = await self.redis.xread({events_key(j): c for j, c in cursors.items()}, count=count, block=block_ms)
        return {_s(stream).split(":")[2]: _entries(items) for stream, items in reply or []}


@dataclass
class StepWrite:
    """What one engine step of one job writes: its `step` event, the frames kept at this step, its progress."""

    job_id: str
    attempt: int
    event: dict[str, Any]
    progress: dict[str, Any]
    frames: list[tuple[int, dict[str, Any], bytes]] = field(default_factory=list)  # (index, event data, PNG)


class JobStore:
    """The worker's side: claim a fenced attempt, stream its events, write its result once."""

    def __init__(self, client: redis.Redis, ttl_s: int = 3600):
        self.redis = client
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, health_check_interval=30), ttl_s)

    def get(self, job_id: str) -> JobRecord | None:
        return JobRecord.from_redis(job_id, self.redis.hgetall(job_key(job_id)))

    def blob(self, job_id: str, name: str) -> bytes | None:
        return self.redis.get(blob_key(job_id, name))

    def publish_model(self, info: ModelInfo) -> None:
        self.redis.hset(MODELS_KEY, info.name, info.to_json())

    def claim(self, job_id: str) -> int | None:
        """A fenced attempt number, or None when the job is gone, over, or cancelled."""
        attempt = int(self._claim(keys=[job_key(job_id)]))
        return attempt if attempt > 0 else None

    def current_attempt(self, job_id: str) -> int | None:
        value = self.redis.hget(job_key(job_id), "attempt")
        return None if value is None else int(value)

    def started(self, job_id: str, attempt: int, timings: dict) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(job_key(job_id), "timings", json.dumps(timings))
        pipe.xadd(
            events_key(job_id), _event_fields("started", {"attempt": attempt, "emitted_at": timings["started_at"]})
        )
        pipe.expire(events_key(job_id), self.ttl_s)
        pipe.execute()

    def write_steps(self, steps: list[StepWrite]) -> list[tuple[bool, bool]]:
        """One engine iteration's events, frames and progress in one round trip. Returns, per step,
        (cancel requested, attempt superseded): read in the same pipeline, so the engine drops those at once."""
        pipe = self.redis.pipeline(transaction=False)
        reads = []
        for step in steps:
            events = events_key(step.job_id)
            pipe.xadd(events, _event_fields("step", step.event))
            for index, data, png in step.frames:  # a reverse trajectory's frame: stored and announced now
                pipe.set(blob_key(step.job_id, frame_blob_name(step.attempt, index)), png, ex=self.ttl_s)
                pipe.xadd(events, _event_fields("frame", data))
            pipe.hset(job_key(step.job_id), "progress", json.dumps(step.progress))
            pipe.hmget(job_key(step.job_id), "cancel", "attempt")
            reads.append(len(pipe) - 1)
        replies = pipe.execute()
        out = []
        for step, position in zip(steps, reads):
            cancel, current = replies[position]
            out.append((_s(cancel) == "1", current is not None and int(current) != step.attempt))
        return out

    def add_frames(self, job_id: str, attempt: int, frames: list[dict]) -> bool:
        """Frame events (not terminal) before the result, only while `attempt` is current."""
        if self.current_attempt(job_id) != attempt:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for data in frames:
            pipe.xadd(events_key(job_id), _event_fields("frame", data))
        pipe.execute()
        return True

    def renew_blobs(self, job_id: str, names: list[str]) -> None:
        """Blobs written while the job ran (live frames) expire with the job's result, not before."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.expire(blob_key(job_id, name), self.ttl_s)
        pipe.execute()

    def finish(
        self,
        job_id: str,
        model: str,
        attempt: int,
        status: str,
        fields: dict,
        event: tuple[str, dict],
        blobs: dict[str, bytes] | None = None,
    ) -> bool:
        """Write the outcome once: False when another attempt holds the fence or the job is already over."""
        assert status in TERMINAL
        blobs = blobs or {}
        keys = [job_key(job_id), events_key(job_id), pending_key(model)] + [blob_key(job_id, n) for n in blobs]
        args = [
            str(attempt),
            self.ttl_s,
            status,
            json.dumps({k: json.dumps(v) for k, v in fields.items()}),
            event[0],
            json.dumps(event[1]),
            job_id,
        ] + list(blobs.values())
        return bool(self._finish(keys=keys, args=args))
