"""The Redis job store: job record (hash), event stream (Redis Streams), stored images and frames (TTL),
the fenced claim and the write-once result. Shared by the gateway and the workers; no torch, no FastAPI.

Keys (all expire after `ttl_s` once written):
  latentd:job:<id>             hash: kind, model, owner, status, params, progress, timings, images, frames,
                               error, attempt, cancel, created_at (JSON where structured)
  latentd:job:<id>:events      stream of {event, data(JSON)}; the entry id is the SSE id
  latentd:job:<id>:blob:<name> bytes of one image or frame
  latentd:pending:<model>      set of job ids queued or running (the bounded queue; ids whose record
                               expired unfinished are swept when the queue looks full)
  latentd:models               hash: model name -> JSON model info published by workers
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

TERMINAL = ("succeeded", "failed", "cancelled")
MODELS_KEY = "latentd:models"


def job_key(job_id: str) -> str:
    return f"latentd:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"latentd:job:{job_id}:events"


def blob_key(job_id: str, name: str) -> str:
    return f"latentd:job:{job_id}:blob:{name}"


def frame_blob_name(attempt: int, index: int) -> str:
    """Blob name of trajectory frame `index` written by `attempt` (live, while the job runs, or at its end)."""
    return f"a{attempt}-frame-{index}"


def pending_key(model: str) -> str:
    return f"latentd:pending:{model}"


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


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

# Finish: written once, by the attempt that holds the fence. KEYS: job, events, blob keys...;
# ARGV: attempt, ttl, status, fields JSON, event name, event data, blobs...
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[2])
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 4], 'EX', ttl)
end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'event', ARGV[5], 'data', ARGV[6])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
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


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int = 3600):
        self.redis = client
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, health_check_interval=30), ttl_s)

    # ---- gateway side ----
    def create(self, job_id: str, *, kind: str, model: str, owner: str, params: dict) -> dict:
        now = time.time()
        record = {
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
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=record)
        pipe.expire(job_key(job_id), self.ttl_s)
        pipe.xadd(events_key(job_id), {"event": "queued", "data": json.dumps({"id": job_id, "emitted_at": now})})
        pipe.expire(events_key(job_id), self.ttl_s)
        pipe.sadd(pending_key(model), job_id)
        pipe.execute()
        return self.get(job_id)

    def pending_count(self, model: str) -> int:
        return int(self.redis.scard(pending_key(model)))

    def sweep_pending(self, model: str) -> int:
        """Drop from the bounded queue the jobs whose record has expired unfinished (a worker lost
        with its job after the TTL, say), so they no longer hold a slot. Returns how many went."""
        members = [_s(member) for member in self.redis.smembers(pending_key(model))]
        if not members:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for job_id in members:
            pipe.exists(job_key(job_id))
        gone = [job_id for job_id, exists in zip(members, pipe.execute()) if not exists]
        if gone:
            self.redis.srem(pending_key(model), *gone)
        return len(gone)

    def get(self, job_id: str) -> dict | None:
        raw = self.redis.hgetall(job_key(job_id))
        if not raw:
            return None
        fields = {_s(k): _s(v) for k, v in raw.items()}
        job = {
            "id": job_id,
            "kind": fields["kind"],
            "model": fields["model"],
            "owner": fields["owner"],
            "status": fields["status"],
            "attempt": int(fields.get("attempt", 0)),
            "created_at": float(fields["created_at"]),
            "cancel": fields.get("cancel") == "1",
        }
        for name in ("params", "progress", "timings", "images", "frames", "error"):
            job[name] = json.loads(fields.get(name) or "null")
        return job

    def cancel(self, job_id: str, model: str) -> str:
        data = json.dumps({"id": job_id, "emitted_at": time.time()})
        return _s(self._cancel(keys=[job_key(job_id), events_key(job_id), pending_key(model)], args=[data, job_id]))

    def read_events(
        self, job_id: str, after: str = "0", block_ms: int | None = None, count: int = 256
    ) -> list[tuple[str, str, dict]]:
        """Entries after `after` (a stream id; "0" for all), waiting up to block_ms for the first."""
        reply = self.redis.xread({events_key(job_id): after}, count=count, block=block_ms)
        entries = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                fields = {_s(k): _s(v) for k, v in fields.items()}
                entries.append((_s(entry_id), fields["event"], json.loads(fields["data"])))
        return entries

    def blob(self, job_id: str, name: str) -> bytes | None:
        return self.redis.get(blob_key(job_id, name))

    # ---- models ----
    def publish_model(self, info: dict) -> None:
        self.redis.hset(MODELS_KEY, info["name"], json.dumps(info))

    def models(self) -> dict[str, dict]:
        return {_s(k): json.loads(v) for k, v in self.redis.hgetall(MODELS_KEY).items()}

    # ---- worker side ----
    def claim(self, job_id: str) -> int | None:
        """A fenced attempt number, or None when the job is gone, over, or cancelled."""
        attempt = int(self._claim(keys=[job_key(job_id)]))
        return attempt if attempt > 0 else None

    def add_events(self, pipe: Any, job_id: str, events: Iterable[tuple[str, dict]]) -> None:
        for name, data in events:
            pipe.xadd(events_key(job_id), {"event": name, "data": json.dumps(data)})

    def emit(self, job_id: str, name: str, data: dict, **fields: Any) -> None:
        pipe = self.redis.pipeline(transaction=False)
        if fields:
            pipe.hset(
                job_key(job_id), mapping={k: json.dumps(v) if not isinstance(v, str) else v for k, v in fields.items()}
            )
        self.add_events(pipe, job_id, [(name, data)])
        pipe.expire(events_key(job_id), self.ttl_s)
        pipe.execute()

    def control(self, jobs: list[tuple[str, int]]) -> list[tuple[bool, bool]]:
        """For (job_id, attempt) pairs: (cancel requested, attempt superseded), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, _ in jobs:
            pipe.hmget(job_key(job_id), "cancel", "attempt")
        out = []
        for (_, attempt), (cancel, current) in zip(jobs, pipe.execute()):
            out.append((_s(cancel) == "1", current is not None and int(current) != attempt))
        return out

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
        blobs = blobs or {}
        keys = [job_key(job_id), events_key(job_id)] + [blob_key(job_id, name) for name in blobs]
        args = [
            str(attempt),
            self.ttl_s,
            status,
            json.dumps({k: json.dumps(v) for k, v in fields.items()}),
            event[0],
            json.dumps(event[1]),
        ] + list(blobs.values())
        written = bool(self._finish(keys=keys, args=args))
        if written:
            self.redis.srem(pending_key(model), job_id)
        return written
