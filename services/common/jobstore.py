"""The Redis job store: every key and every operation on jobs that the gateway and the workers use.

Keys (all expire after `ttl_s` once written):
  latentd:job:<id>             hash: kind, model, owner, status, params, progress, timings, images, frames,
                               error, attempt, cancel, created_at (JSON where structured; see jobs.JobRecord),
                               and frame:a<attempt>:<index> per frame a reverse trajectory stored as it ran
  latentd:job:<id>:events      stream of {event, data(JSON)}; the entry id is the SSE id
  latentd:job:<id>:blob:<name> bytes of one image or frame, or an input picture: "input" (a forward trajectory's
                               x0, image to image's starting picture), "mask" (inpainting's mask)
  latentd:pending:<model>      set of job ids queued or running (the model's bounded queue; ids whose
                               record expired unfinished are swept when the queue looks full)
  latentd:owned:<model>:<key>  set of the job ids one API key has queued or running (its share of the queue)
  latentd:queue:<model>:<key>  list: one API key's queued job ids, oldest first
  latentd:turns:<model>        sorted set: API key -> its turn; the key with the lowest turn goes next
  latentd:clock:<model>        the turn last served: a key that starts queueing enters at it
  latentd:leases:<model>       sorted set: running job id -> when its worker's lease lapses (Redis time)
  latentd:models               hash: model name -> JSON ModelInfo published by workers
  latentd:idem:<key>:<sha256>  "<job id> <request fingerprint>": a client's Idempotency-Key, scoped to its API
                               key, set with the job it made (same TTL)
  latentd:history:<key>        sorted set: job id -> created_at, the jobs one API key submitted in the last ttl_s
                               (GET /v1/jobs, ListJobs; trimmed by age at each submission)
Worker liveness keys are in services/common/workers.py.

Dispatch. The gateway queues a job on its key's own list and sends one Celery task ("run one job of this
model") per job; the task that gets it takes the next job in fair order: keys in turn (round-robin by
turns), each key's jobs oldest first. So a key with 100 jobs waiting delays another key's single job by
about one job, not by 100. Taking also claims: it bumps the job's fenced `attempt`, marks it running and
gives its worker a lease, in one script, so a worker that dies at any point leaves a lease that lapses.
A worker renews its leases every few seconds; the reaper (any worker of the model, one at a time) puts
the job of a lapsed lease back at the head of its key's queue as a new attempt and sends a task for it;
the fence keeps a late copy of the lost attempt from writing anything. A job whose worker was lost
`max_lost` times fails with a reason instead of looping.

The gateway's side is `AsyncJobStore` (redis.asyncio, one bounded pool per process); the worker's side is
`JobStore` (blocking redis, on the task threads and the engine thread). The result is written once, by the
current attempt, in one Lua script. Both retry a command once, at once, on a fresh connection when Redis closed
the one it went out on (`reconnect_once`): after Redis restarts or crashes, every pooled connection is stale, and
without it the first command on each fails (a 503 from a gateway whose Redis is back).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from services.common.jobs import TERMINAL, JobEvent, JobRecord, live_frame_field
from services.common.models import ModelInfo

MODELS_KEY = "latentd:models"
JOB_PREFIX = "latentd:job:"
INPUT_BLOB = "input"
MASK_BLOB = "mask"
# Jobs whose webhook is due, scored by when (0: now, as they end); a claim moves the score a lease ahead, so a
# gateway that dies mid-call leaves the job to another (services/core/webhooks.py).
WEBHOOKS_KEY = "latentd:webhooks"
SETTLED_CACHE = 4096  # settled job records a gateway process keeps in memory
LIVE_CACHE = 4096  # live (queued, running) job records a gateway process keeps for polled reads


def reconnect_once(for_asyncio: bool = False) -> redis.retry.Retry | redis.asyncio.retry.Retry:
    """The connection option (`retry=`) of every latentd Redis client: a command whose connection Redis closed
    goes again once, at once, on a new connection. Only then: a timeout is not retried (the command may have run;
    the caller reports Redis away), and a second failure is Redis really away. A connection reset after Redis ran
    a command but before its reply arrived runs it twice, as any client retry would; latentd's writes bear that:
    an enqueue run twice leaves one job (its repeated queue entry is skipped when taken), a take run twice claims a
    second job and leaves the first to its lease (requeued by the reaper once it lapses), results are fenced by
    attempt, and an event may be written twice."""
    cls = redis.asyncio.retry.Retry if for_asyncio else redis.retry.Retry
    return cls(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))


# What redis-py's BlockingConnectionPool raises when no connection frees within its timeout (Redis itself is up)
POOL_EXHAUSTED = "No connection available."


def pool_exhausted(error: BaseException) -> bool:
    """A client's pool had no connection free in time: its own load, with Redis answering (not Redis away)."""
    return isinstance(error, redis.exceptions.ConnectionError) and str(error) == POOL_EXHAUSTED


def redis_full(error: BaseException) -> bool:
    """Redis at its maxmemory refusing a write (policy noeviction): "OOM command not allowed when used memory >
    'maxmemory'" (redis-py's OutOfMemoryError), or those words inside a script's error, or an error raised from
    one of those (kombu's OperationalError when a publish is refused). Room comes back as results and records
    expire (their TTL) or an operator raises the limit, so a writer may wait for it as for Redis away.
    A script so refused wrote nothing: Redis refuses a script's first write only, never one half-way through."""
    cause: BaseException | None = error
    for _ in range(4):  # the error, and what it was raised from (kombu's OperationalError from a refused publish)
        if cause is None:
            return False
        if isinstance(cause, redis.exceptions.OutOfMemoryError) or (
            isinstance(cause, redis.exceptions.ResponseError) and "command not allowed when used memory" in str(cause)
        ):
            return True
        cause = cause.__cause__
    return False


# The oldest Redis latentd runs on: the workers' heartbeat and lease-renewal scripts are flagged allow-oom
# ("#!lua flags=..."), which Redis reads from 7.0 on (older ones refuse the script).
MIN_REDIS_VERSION = (7, 0)


def redis_version_problem(server_info: dict) -> str | None:
    """Why this Redis cannot serve latentd (its INFO server section), or None."""
    version = str(server_info.get("redis_version", "0"))
    numbers = tuple(int(part) if part.isdigit() else 0 for part in version.split(".")[:2])
    if numbers >= MIN_REDIS_VERSION:
        return None
    wanted = ".".join(map(str, MIN_REDIS_VERSION))
    return f"Redis {wanted} or later is required (found {version}): the workers' heartbeat and lease scripts use its script flags"


def redis_away_or_full(error: BaseException) -> bool:
    """An error worth the same command again a little later: Redis unreachable or timing out, or full."""
    return isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)) or redis_full(error)


def sync_client(url: str, timeout_s: float | None) -> redis.Redis:
    """A blocking Redis client as every long-lived latentd process holds one: `timeout_s` bounds every command and
    connect (Redis away is an error the caller retries, not a hang), a connection idle 30 s is checked before
    use, and a connection Redis closed is replaced once (`reconnect_once`)."""
    return redis.Redis.from_url(
        url,
        health_check_interval=30,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=reconnect_once(),
    )


async def cancel_and_wait(task: asyncio.Task, every_s: float = 0.05) -> None:
    """Cancel `task` and wait until it has ended. A task that awaits redis.asyncio may not end on one cancel: on
    Python 3.11 redis-py writes a command through `asyncio.wait_for`, which returns the result and drops the cancel
    when it lands just as the write completes (bpo-42130, fixed in 3.12); the task goes on as if never cancelled
    (tests/common/test_stopping.py). So the cancel is sent again every `every_s` until the task has ended. An error the task ended with is raised; its cancellation is not."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    if not task.cancelled():
        task.result()


def job_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def job_id_of(key: str) -> str:
    return key.removeprefix(JOB_PREFIX)


# A job's other keys are its record's key and a suffix (so a script can name them from the record's key).
EVENTS_SUFFIX, BLOB_INFIX = ":events", ":blob:"


def events_key(job_id: str) -> str:
    return f"{job_key(job_id)}{EVENTS_SUFFIX}"


def blob_key(job_id: str, name: str) -> str:
    return f"{job_key(job_id)}{BLOB_INFIX}{name}"


def image_blob_name(attempt: int, index: int) -> str:
    return f"a{attempt}-image-{index}"


def frame_blob_name(attempt: int, index: int) -> str:
    """Blob name of trajectory frame `index` written by `attempt` (live, while the job runs, or at its end)."""
    return f"a{attempt}-frame-{index}"


def frame_meta(attempt: int, index: int, meta: dict) -> dict:
    """A frame as the job record lists it: its metadata and the name of its picture."""
    return meta | {"blob": frame_blob_name(attempt, index)}


def frame_event(job_id: str, attempt: int, index: int, meta: dict, emitted_at: float) -> dict:
    """The data of a frame's `frame` event: its metadata, index, attempt and URL."""
    url = f"/v1/jobs/{job_id}/frames/{index}"
    return meta | {"index": index, "attempt": attempt, "url": url, "emitted_at": emitted_at}


def pending_key(model: str) -> str:
    return f"latentd:pending:{model}"


def owned_key(model: str, owner: str) -> str:
    return f"latentd:owned:{model}:{owner}"


def queue_key(model: str, owner: str) -> str:
    return f"latentd:queue:{model}:{owner}"


def turns_key(model: str) -> str:
    return f"latentd:turns:{model}"


def clock_key(model: str) -> str:
    return f"latentd:clock:{model}"


def leases_key(model: str) -> str:
    return f"latentd:leases:{model}"


def history_key(owner: str) -> str:
    return f"latentd:history:{owner}"


def dispatch_keys(model: str, owner: str) -> list[str]:
    """The keys every dispatch script takes, in this order."""
    return [pending_key(model), owned_key(model, owner), queue_key(model, owner), turns_key(model), clock_key(model)]


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _entries(items: Iterable) -> list[JobEvent]:
    return [JobEvent(_s(entry_id), _s(fields[b"event"]), _s(fields[b"data"])) for entry_id, fields in items]


# Lua helpers shared by the scripts below. Dispatch keys, always KEYS[1..5]: pending, owned, queue, turns, clock.
_NOW = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""
# A job leaves its model's queue and its key's share when it ends (succeeded, failed or cancelled: never to run
# again), and its record says when (ended_at, Redis time); one with a webhook is then due for its call (KEYS[6] is
# the job's record in every script that ends one).
_ENTER = f"""
local function enter(job_id, owner, head)
  if head then redis.call('LPUSH', KEYS[3], job_id) else redis.call('RPUSH', KEYS[3], job_id) end
  if not redis.call('ZSCORE', KEYS[4], owner) then
    redis.call('ZADD', KEYS[4], tonumber(redis.call('GET', KEYS[5]) or '0'), owner)
  end
end
local function leave(job_id)
  redis.call('SREM', KEYS[1], job_id)
  redis.call('SREM', KEYS[2], job_id)
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[6], 'ended_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
  if redis.call('HEXISTS', KEYS[6], 'webhook') == 1 then redis.call('ZADD', '{WEBHOOKS_KEY}', 0, job_id) end
end
"""

# Enqueue: the idempotency key, admission (the model's queue and the key's share), the record, the `queued`
# event, the key's queue. An idempotency key already used by a job that still exists answers that job and its
# request's fingerprint, before any admission check: a retry is never refused for a full queue.
# The job joins its key's history (the jobs of the last ttl seconds, older ones trimmed here).
# KEYS: dispatch keys, job, events, idempotency key, history[, input blob[, mask blob]]. ARGV: job id, owner, ttl,
# max pending, max owned, queued event data, input blob or '', request fingerprint ('': no idempotency key), job key
# prefix, mask blob or '', created_at, then the record's fields as name, value pairs.
_ENQUEUE = (
    _ENTER
    + """
local ttl = tonumber(ARGV[3])
if ARGV[8] ~= '' then
  local prior = redis.call('GET', KEYS[8])
  if prior then
    local space = string.find(prior, ' ', 1, true)
    local prior_id = string.sub(prior, 1, space - 1)
    if redis.call('EXISTS', ARGV[9] .. prior_id) == 1 then
      return {'existing', prior_id, string.sub(prior, space + 1)}
    end
  end
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 'model_full' end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 'owner_full' end
redis.call('HSET', KEYS[6], unpack(ARGV, 12, #ARGV))
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('XADD', KEYS[7], '*', 'event', 'queued', 'data', ARGV[6])
redis.call('EXPIRE', KEYS[7], ttl)
if ARGV[8] ~= '' then redis.call('SET', KEYS[8], ARGV[1] .. ' ' .. ARGV[8], 'EX', ttl) end
redis.call('ZADD', KEYS[9], ARGV[11], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', '(' .. string.format('%.6f', tonumber(ARGV[11]) - ttl))
redis.call('EXPIRE', KEYS[9], ttl)
if KEYS[10] then redis.call('SET', KEYS[10], ARGV[7], 'EX', ttl) end
if KEYS[11] then redis.call('SET', KEYS[11], ARGV[10], 'EX', ttl) end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
enter(ARGV[1], ARGV[2], false)
return 'queued'
"""
)

# A page of a key's history, newest first, after the job ARGV[1] ('': from the newest). KEYS: history. ARGV: that
# job id or '', how many. Returns the ids, or false when that job is not in the history (another key's, or trimmed).
_HISTORY_PAGE = """
local start = 0
if ARGV[1] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
  if not rank then return false end
  start = rank + 1
end
return redis.call('ZREVRANGE', KEYS[1], start, start + tonumber(ARGV[2]) - 1)
"""

# A job that waited in its queue (or is requeued) lives ttl from now: its record, events and input pictures, so an
# attempt that starts late does not find them expired under it. Its keys: the record's and its suffixes (above).
_REARM = f"""
local function rearm(job, ttl, input_blob, mask_blob)
  local blob = job .. '{BLOB_INFIX}'
  for _, key in ipairs({{job, job .. '{EVENTS_SUFFIX}', blob .. input_blob, blob .. mask_blob}}) do
    redis.call('EXPIRE', key, ttl)
  end
end
"""

# Take and claim the next job in fair order: the key with the lowest turn gives its oldest job, and its
# turn moves on by one. The claim bumps the fenced attempt, starts the worker's lease and re-arms the job's TTL,
# atomically. KEYS: turns, clock, leases. ARGV: queue key prefix, job key prefix, lease seconds, worker id, ttl,
# input blob name, mask blob name. Returns {job id, attempt} or false.
_TAKE = (
    _NOW
    + _REARM
    + """
for _ = 1, 256 do
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #head == 0 then return false end
  local owner, turn = head[1], tonumber(head[2])
  local queue = ARGV[1] .. owner
  local job_id = redis.call('LPOP', queue)
  if (not job_id) or redis.call('LLEN', queue) == 0 then
    redis.call('ZREM', KEYS[1], owner)
  else
    redis.call('ZADD', KEYS[1], turn + 1, owner)
  end
  if job_id then
    redis.call('SET', KEYS[2], turn)
    local job = ARGV[2] .. job_id
    if redis.call('HGET', job, 'status') == 'queued' and redis.call('HGET', job, 'cancel') ~= '1' then
      local attempt = redis.call('HINCRBY', job, 'attempt', 1)
      redis.call('HSET', job, 'status', 'running', 'progress', '{}', 'worker', ARGV[4])
      redis.call('ZADD', KEYS[3], now() + tonumber(ARGV[3]), job_id)
      rearm(job, tonumber(ARGV[5]), ARGV[6], ARGV[7])
      return {job_id, attempt}
    end
  end
end
return false
"""
)

# Renew the leases of the attempts a worker runs. KEYS: leases, then one job key per attempt.
# ARGV: lease seconds, then the job id and attempt of each. Returns the job ids that are no longer ours.
# Flagged allow-oom (Redis 7): it only moves the scores of leases the worker holds, so it grows nothing, and a
# store at its maxmemory, which refuses every other write, does not make live workers' leases lapse.
_RENEW = (
    "#!lua flags=allow-oom"
    + _NOW
    + """
local lost = {}
local deadline = now() + tonumber(ARGV[1])
for i = 2, #KEYS do
  local job_id, attempt = ARGV[2 * i - 2], ARGV[2 * i - 1]
  if redis.call('HGET', KEYS[i], 'attempt') == attempt and redis.call('HGET', KEYS[i], 'status') == 'running' then
    redis.call('ZADD', KEYS[1], deadline, job_id)
  else
    table.insert(lost, job_id)
  end
end
return lost
"""
)

# Requeue a running job whose worker is gone (the reaper, after its lease lapsed) or going (a draining
# worker, for its own attempt): back to the head of its key's queue, for a new attempt. The old attempt is
# fenced out from now on: only a running job's current attempt may step or finish it. A job cancelled
# meanwhile ends cancelled; one lost `max_lost` times ends failed.
# KEYS: dispatch keys, job, events, leases. ARGV: job id, owner, ttl, attempt ('' : the reaper, which
# requeues only a still-lapsed lease), counts as a loss ('1'/'0'), max lost, queued event data,
# failed event data (the error's JSON), cancelled event data, input blob name, mask blob name.
_REQUEUE = (
    _NOW
    + _ENTER
    + _REARM
    + """
local job, events, leases, job_id = KEYS[6], KEYS[7], KEYS[8], ARGV[1]
local status = redis.call('HGET', job, 'status')
if status ~= 'running' then redis.call('ZREM', leases, job_id); return 'over' end
if ARGV[4] == '' then
  local deadline = redis.call('ZSCORE', leases, job_id)
  if deadline and tonumber(deadline) > now() then return 'alive' end
elseif redis.call('HGET', job, 'attempt') ~= ARGV[4] then
  return 'moved'
end
redis.call('ZREM', leases, job_id)
local ttl = tonumber(ARGV[3])
local function finish(final, name, data)
  redis.call('HSET', job, 'status', final)
  redis.call('XADD', events, '*', 'event', name, 'data', data)
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', events, ttl)
  leave(job_id)
end
if redis.call('HGET', job, 'cancel') == '1' then finish('cancelled', 'cancelled', ARGV[9]); return 'cancelled' end
if ARGV[5] == '1' and redis.call('HINCRBY', job, 'lost', 1) >= tonumber(ARGV[6]) then
  redis.call('HSET', job, 'error', ARGV[8])
  finish('failed', 'failed', ARGV[8])
  return 'failed'
end
redis.call('HSET', job, 'status', 'queued', 'progress', '{}')
redis.call('XADD', events, '*', 'event', 'queued', 'data', ARGV[7])
rearm(job, ttl, ARGV[10], ARGV[11])
enter(job_id, ARGV[2], true)
return 'requeued'
"""
)

# Finish: written once, by the attempt that holds the fence (the job runs, and this is its attempt). A job whose
# cancel was accepted while it ran ends cancelled even if its worker got to the end first: the cancel was answered
# with 200 (the job "cancelling"), so it wins, and nothing of the result is kept.
# KEYS: dispatch keys, job, events, leases, blob keys... ARGV: attempt, ttl, status, fields JSON, event
# name, event data, job id, the cancelled event's data, blobs...
_FINISH = (
    _ENTER
    + """
local job, events = KEYS[6], KEYS[7]
if redis.call('HGET', job, 'status') ~= 'running' then return 0 end
if redis.call('HGET', job, 'attempt') ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[2])
local fields = cjson.decode(ARGV[4])
if ARGV[3] == 'succeeded' and redis.call('HGET', job, 'cancel') == '1' then
  if fields['timings'] then redis.call('HSET', job, 'timings', fields['timings']) end
  redis.call('HSET', job, 'status', 'cancelled')
  redis.call('XADD', events, '*', 'event', 'cancelled', 'data', ARGV[8])
else
  for i = 9, #KEYS do
    redis.call('SET', KEYS[i], ARGV[i], 'EX', ttl)
  end
  for k, v in pairs(fields) do redis.call('HSET', job, k, v) end
  redis.call('HSET', job, 'status', ARGV[3])
  redis.call('XADD', events, '*', 'event', ARGV[5], 'data', ARGV[6])
end
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', events, ttl)
redis.call('ZREM', KEYS[8], ARGV[7])
leave(ARGV[7])
return 1
"""
)

# Cancel: a queued job ends now (its record and events kept ttl from now, as every ending keeps them: a job queued
# for most of the TTL would otherwise vanish, webhook and all, soon after); a running one gets the flag its worker
# reads once per engine iteration. KEYS: dispatch keys, job, events. ARGV: cancelled event data, job id, ttl.
_CANCEL = (
    _ENTER
    + """
local job = KEYS[6]
local status = redis.call('HGET', job, 'status')
if not status then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
redis.call('HSET', job, 'cancel', '1')
if status == 'queued' then
  redis.call('HSET', job, 'status', 'cancelled')
  redis.call('XADD', KEYS[7], '*', 'event', 'cancelled', 'data', ARGV[1])
  redis.call('LREM', KEYS[3], 0, ARGV[2])
  redis.call('EXPIRE', job, tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[7], tonumber(ARGV[3]))
  leave(ARGV[2])
  return 'cancelled'
end
return 'cancelling'
"""
)


# What a running attempt writes as it goes: a step (its event, then the job's progress) and the frames kept at it
# (each picture stored, listed in the job's record and announced), all or nothing, and only while the attempt
# holds the fence (the job runs, and this is its attempt): a superseded attempt's late step, or one after the job
# ended, writes nothing (and leaves no stub of an expired record). Re-arms the record's and events' TTL.
# KEYS: job, events, frame blob keys... ARGV: attempt, ttl, step event data ('': no step), progress JSON ('':
# unchanged), then per frame: its field in the record, its listed metadata, its event data, its PNG.
# Returns {cancel flag, superseded (1/0)}.
_PROGRESS = """
local job, events = KEYS[1], KEYS[2]
local state = redis.call('HMGET', job, 'cancel', 'attempt', 'status')
if state[2] ~= ARGV[1] or state[3] ~= 'running' then return {state[1] or '0', 1} end
local ttl = tonumber(ARGV[2])
if ARGV[3] ~= '' then redis.call('XADD', events, '*', 'event', 'step', 'data', ARGV[3]) end
for k = 3, #KEYS do
  local i = 5 + 4 * (k - 3)
  redis.call('SET', KEYS[k], ARGV[i + 3], 'EX', ttl)
  redis.call('HSET', job, ARGV[i], ARGV[i + 1])
  redis.call('XADD', events, '*', 'event', 'frame', 'data', ARGV[i + 2])
end
if ARGV[4] ~= '' then redis.call('HSET', job, 'progress', ARGV[4]) end
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', events, ttl)
return {state[1] or '0', 0}
"""

# Compare and delete: KEYS: a lock. ARGV: its holder.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# An attempt has started: its timings and `started` event, only while it holds the fence. KEYS: job, events.
# ARGV: attempt, ttl, timings JSON, started event data. Returns 1, or 0 where the attempt no longer holds it.
_STARTED = """
local state = redis.call('HMGET', KEYS[1], 'attempt', 'status')
if state[1] ~= ARGV[1] or state[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'timings', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'event', 'started', 'data', ARGV[4])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""

# Claim up to ARGV[3] due webhooks: each moves a lease (ARGV[2] seconds) ahead and counts one more attempt on
# its job; a job whose record has expired is dropped. KEYS: webhooks. ARGV: job key prefix, lease seconds, how
# many. Returns {how many were dropped, job id, attempt, job id, attempt, ...}.
_WEBHOOK_CLAIM = (
    _NOW
    + """
local t = now()
local out = {0}
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local job = ARGV[1] .. job_id
  if redis.call('EXISTS', job) == 1 then
    redis.call('ZADD', KEYS[1], t + tonumber(ARGV[2]), job_id)
    table.insert(out, job_id)
    table.insert(out, redis.call('HINCRBY', job, 'webhook_attempts', 1))
  else
    redis.call('ZREM', KEYS[1], job_id)
    out[1] = out[1] + 1
  end
end
return out
"""
)

# After a webhook call: done (ARGV[3] ''), or due again in ARGV[3] seconds; only by the claim that made the call
# (its attempt is still the job's last): a call whose lease lapsed, and that another process claimed again, leaves
# the newer claim be. KEYS: webhooks, job. ARGV: job id, attempt, delay.
_WEBHOOK_SETTLE = (
    _NOW
    + """
local current = redis.call('HGET', KEYS[2], 'webhook_attempts')
if current and current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return redis.call('ZADD', KEYS[1], 'XX', now() + tonumber(ARGV[3]), ARGV[1])
"""
)


def new_record(
    job_id: str, *, kind: str, model: str, owner: str, params: dict, now: float, webhook_url: str | None = None
) -> dict[str, Any]:
    """The hash fields of a job as it is queued."""
    return ({"webhook": webhook_url} if webhook_url else {}) | {
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


def idempotency_key(owner: str, key: str) -> str:
    """Where a client's Idempotency-Key lives: scoped to its API key, hashed (any string a client sends)."""
    return f"latentd:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used by job `job_id` for a request with another fingerprint."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class NotInHistory(Exception):
    """A page of a key's jobs was asked for after a job that is not in its history."""


class QueueFull(Exception):
    """The model's queue (`scope` "model") or the key's share of it (`scope` "owner") is full."""

    def __init__(self, scope: str):
        super().__init__(scope)
        self.scope = scope


def _record_args(record: dict[str, Any]) -> list[Any]:
    return [item for pair in record.items() for item in pair]


class _Batched:
    """Reads that arrive together share one round trip: each caller adds its key, and one pipeline sends all
    that came in during the same turn of the event loop. Under load (a hundred clients polling their jobs)
    that is one write and one read on the socket for dozens of requests; alone, one extra loop turn. Callers
    that ask for the same key in the same turn (a dashboard of many viewers on one job) share one command and
    one `decode` of its reply; every one of them asked before the command was sent, so none gets an older read
    than it asked for."""

    def __init__(
        self, client: aioredis.Redis, command: str, *args: Any, decode: Callable[[str, Any], Any] | None = None
    ):
        self.client, self.command, self.args = client, command, args
        self.decode = decode or (lambda key, reply: reply)
        self._pending: dict[str, list[asyncio.Future]] = {}
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, key: str) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.setdefault(key, []).append(future)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: dict[str, list[asyncio.Future]]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in batch:
                pipe.execute_command(self.command, key, *self.args)
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as error:  # every caller gets the error (Redis away: a 503), then it goes on
            for futures in batch.values():
                _settle(futures, error=error)
            if not isinstance(error, Exception):
                raise
            return
        for (key, futures), reply in zip(batch.items(), replies):
            if isinstance(reply, Exception):
                _settle(futures, error=reply)
                continue
            try:
                value = self.decode(key, reply)
            except Exception as error:  # noqa: BLE001 - a record that cannot be read fails its readers, not the batch
                _settle(futures, error=error)
            else:
                _settle(futures, value=value)


def _settle(futures: list[asyncio.Future], value: Any = None, error: BaseException | None = None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _keep(cache: OrderedDict, key: str, value: Any, limit: int) -> None:
    """Put key last in an LRU dict of at most `limit` entries."""
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > limit:
        cache.popitem(last=False)


class AsyncJobStore:
    """The gateway's side: queue, read, cancel, stored pictures, event history and live reads."""

    def __init__(self, client: aioredis.Redis, ttl_s: int = 3600):
        self.redis = client
        self.ttl_s = ttl_s
        self._enqueue = client.register_script(_ENQUEUE)
        self._cancel = client.register_script(_CANCEL)
        self._history_page = client.register_script(_HISTORY_PAGE)
        self._webhook_claim = client.register_script(_WEBHOOK_CLAIM)
        self._webhook_settle = client.register_script(_WEBHOOK_SETTLE)
        self._record = _Batched(client, "HGETALL", decode=lambda key, raw: JobRecord.from_redis(job_id_of(key), raw))
        self._owner = _Batched(client, "HGET", "owner")
        self._status = _Batched(client, "HGET", "status")
        # Settled jobs (succeeded, failed, cancelled) never change again until their record expires, so reads of
        # them (pollers that keep asking, pages reloaded, the OpenAI route's last look) are answered from here.
        self._settled: OrderedDict[str, JobRecord] = OrderedDict()
        # Polls of live jobs (GET /v1/jobs/{id}): a poll may take a read of the job asked for less than its
        # max_age_s ago. _ready: the newest read that came back, (asked at, record); _asked: the newest read asked
        # for, (asked at, its future), which a poll with nothing ready joins; _changed: when the event hub last saw
        # the job change (no read asked before it is used). Everything that acts on a job reads Redis.
        self._ready: OrderedDict[str, tuple[float, JobRecord]] = OrderedDict()
        self._asked: OrderedDict[str, tuple[float, asyncio.Future]] = OrderedDict()
        self._changed: OrderedDict[str, float] = OrderedDict()
        self._round_trip_s = 0.01  # how long a read takes to come back (a moving average): when to read ahead

    async def create(
        self,
        job_id: str,
        *,
        kind: str,
        model: str,
        owner: str,
        params: dict,
        max_pending: int = 10**9,
        max_owned: int = 10**9,
        input_image: bytes | None = None,
        input_mask: bytes | None = None,
        idempotency: tuple[str, str] | None = None,
        webhook_url: str | None = None,
    ) -> JobRecord:
        """Queue a new job on its key's queue; QueueFull when the model's queue or the key's share is full.
        With `idempotency` (the client's Idempotency-Key, the request's fingerprint): the job that key already
        made, marked `replayed`, when the fingerprints match; IdempotencyConflict when they do not."""
        now = time.time()
        record = new_record(
            job_id, kind=kind, model=model, owner=owner, params=params, now=now, webhook_url=webhook_url
        )
        key, fingerprint = idempotency or ("", "")
        keys = dispatch_keys(model, owner) + [
            job_key(job_id),
            events_key(job_id),
            idempotency_key(owner, key),
            history_key(owner),
        ]
        if input_image is not None:  # the upload rides in Redis next to the job, not in the Celery message
            keys.append(blob_key(job_id, INPUT_BLOB))
            if input_mask is not None:  # a mask comes with an image only (rules.check_image_inputs)
                keys.append(blob_key(job_id, MASK_BLOB))
        queued = json.dumps({"id": job_id, "emitted_at": now})
        args = [
            job_id,
            owner,
            self.ttl_s,
            max_pending,
            max_owned,
            queued,
            input_image or b"",
            fingerprint,
            JOB_PREFIX,
            input_mask or b"",
            repr(now),
        ]
        outcome = await self._enqueue(keys=keys, args=args + _record_args(record))
        if isinstance(outcome, list):  # the Idempotency-Key's job
            prior_id, prior_fingerprint = _s(outcome[1]), _s(outcome[2])
            if prior_fingerprint != fingerprint:
                raise IdempotencyConflict(prior_id)
            prior = await self.get(prior_id)
            if prior is None:  # expired between the script and the read: the key is free now
                return await self.create(
                    job_id,
                    kind=kind,
                    model=model,
                    owner=owner,
                    params=params,
                    max_pending=max_pending,
                    max_owned=max_owned,
                    input_image=input_image,
                    input_mask=input_mask,
                    idempotency=idempotency,
                    webhook_url=webhook_url,
                )
            return replace(prior, replayed=True)
        outcome = _s(outcome)
        if outcome != "queued":
            raise QueueFull("model" if outcome == "model_full" else "owner")
        return JobRecord.from_redis(job_id, record)

    async def get(self, job_id: str, max_age_s: float = 0.0) -> JobRecord | None:
        """The job (None: no such job); concurrent reads share a round trip, and a settled job is read once per
        process: it stays in memory (the SETTLED_CACHE most recently read) until its record would expire. With
        max_age_s > 0 (a poll) a live job may come from this process's newest read of it asked for less than
        max_age_s ago and after the job last changed (forget_polled): a hundred clients polling one job cost a few
        HGETALLs per max_age_s, not one each, and read ahead of time they do not wait for them."""
        job = self._settled.get(job_id)
        if job is not None:
            if time.time() < job.created_at + self.ttl_s:  # every write re-arms the TTL: never sooner than this
                self._settled.move_to_end(job_id)
                return job
            del self._settled[job_id]
        now = time.monotonic()
        changed = self._changed.get(job_id, 0.0)
        ready = self._ready.get(job_id)
        if ready is not None and now - ready[0] < max_age_s:
            newest = max(ready[0], self._asked.get(job_id, (0.0,))[0])  # the newest read asked for
            if now - newest >= max(max_age_s - 1.5 * self._round_trip_s, max_age_s / 4):
                # read ahead, not awaited, to be back before the newest is too old; while reads take longer than
                # the max age allows, one every quarter of it (a few on their way at once)
                self._read(job_id)
            return ready[1]
        asked = self._asked.get(job_id)
        if asked is not None and asked[0] >= changed and now - asked[0] < max_age_s:
            return await asyncio.shield(asked[1])  # a read on its way, asked for recently enough
        return await asyncio.shield(self._read(job_id))

    def _read(self, job_id: str) -> asyncio.Future:
        """One HGETALL of the job (shared with its loop turn's other reads), kept for polls when it comes back."""
        asked_at = time.monotonic()
        read = asyncio.ensure_future(self._record(job_key(job_id)))
        _keep(self._asked, job_id, (asked_at, read), LIVE_CACHE)
        read.add_done_callback(lambda read: self._came_back(job_id, asked_at, read))
        return read

    def _came_back(self, job_id: str, asked_at: float, read: asyncio.Future) -> None:
        self._round_trip_s += 0.2 * (time.monotonic() - asked_at - self._round_trip_s)
        if self._asked.get(job_id, (0.0, None))[1] is read:
            del self._asked[job_id]
        if read.cancelled() or read.exception() is not None:  # its caller gets the error; the next poll asks again
            return
        job = read.result()
        if job is None or job.terminal:
            self._ready.pop(job_id, None)
            self._changed.pop(job_id, None)
            if job is not None:
                _keep(self._settled, job_id, job, SETTLED_CACHE)
        elif asked_at >= max(self._ready.get(job_id, (0.0,))[0], self._changed.get(job_id, 0.0)):
            _keep(self._ready, job_id, (asked_at, job), LIVE_CACHE)  # never an older read over a newer one

    def forget_polled(self, job_id: str) -> None:
        """The job changed (the event hub read new events of it): the next poll reads Redis, and no read asked for
        before now (one still on its way) answers a poll."""
        self._ready.pop(job_id, None)
        _keep(self._changed, job_id, time.monotonic(), LIVE_CACHE)

    async def history(
        self, owner: str, *, limit: int, starting_after: str = "", statuses: Iterable[str] = (), scan: int = 1000
    ) -> tuple[list[JobRecord], str | None]:
        """The key's jobs, newest first, after the job `starting_after` (empty: from the newest): up to `limit` of
        them, only those whose status is in `statuses` when it is not empty, reading at most `scan` entries of the
        history (a filter that matches little costs a bounded read, and the caller gets where to go on); with a
        filter, the status alone is read first, and the whole record only of the jobs that pass, at most `limit`.
        Returns the jobs and the job id the next page starts after (None: the history ends there). NotInHistory
        when `starting_after` is not one of the key's jobs of the last ttl_s."""
        statuses, key = set(statuses), history_key(owner)
        found: list[JobRecord] = []
        cursor, more = starting_after, True
        while more and len(found) < limit and scan > 0:
            want = min(scan, limit - len(found) if not statuses else max(limit, 100))
            page = await self._history_page(keys=[key], args=[cursor, want + 1])  # one more: whether more follow
            if page is None:
                raise NotInHistory(cursor)
            ids = [_s(job_id) for job_id in page[:want]]
            scan -= len(ids)
            wanted = ids
            if statuses:
                now = await asyncio.gather(*(self._status(job_key(job_id)) for job_id in ids))
                wanted = [job_id for job_id, status in zip(ids, now) if _s(status) in statuses]
            read = wanted[: limit - len(found)]
            jobs = dict(zip(read, await asyncio.gather(*map(self.get, read))))
            unread = set(wanted) - set(read)
            for job_id in ids:
                if job_id in unread:
                    break  # passed the filter but not read (the page is full by now, or is filled after it)
                cursor, job = job_id, jobs.get(job_id)
                if job is None or job.owner != owner or (statuses and job.status not in statuses):
                    continue  # filtered out, or expired early (evicted)
                found.append(job)
                if len(found) == limit:
                    break
            more = bool(ids) and (cursor != ids[-1] or len(page) > want)  # some of this page left, or the one more
        return found, cursor if more else None

    async def owner(self, job_id: str) -> str | None:
        """The key hash that owns the job (None: no such job); concurrent reads share a round trip."""
        return _s(await self._owner(job_key(job_id)))

    async def cancel(self, job: JobRecord) -> str:
        """'cancelled' (it was queued), 'cancelling' (running: it stops at its next step), the final status, or 'missing'."""
        data = json.dumps({"id": job.id, "emitted_at": time.time()})
        keys = dispatch_keys(job.model, job.owner) + [job_key(job.id), events_key(job.id)]
        return _s(await self._cancel(keys=keys, args=[data, job.id, self.ttl_s]))

    async def blob(self, job_id: str, name: str) -> bytes | None:
        return await self.redis.get(blob_key(job_id, name))

    async def queued_counts(self, models: list[str]) -> dict[str, int]:
        """{model: jobs queued, not yet running}: `queued_count` of each (pending less those holding a lease)."""
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.scard(pending_key(model))
            pipe.zcard(leases_key(model))
        replies = await pipe.execute()
        return {model: max(0, replies[2 * i] - replies[2 * i + 1]) for i, model in enumerate(models)}

    async def models(self) -> dict[str, ModelInfo]:
        return {_s(k): ModelInfo.from_json(v) for k, v in (await self.redis.hgetall(MODELS_KEY)).items()}

    async def sweep(self, model: str, owner: str) -> int:
        """Drop from the model's queue and the key's share the jobs whose record has expired unfinished (lost
        with every worker of the model, say), so they no longer hold a slot. Returns how many went."""
        gone = 0
        for key in (pending_key(model), owned_key(model, owner)):
            members = [_s(member) for member in await self.redis.smembers(key)]
            if not members:
                continue
            pipe = self.redis.pipeline(transaction=False)
            for job_id in members:
                pipe.exists(job_key(job_id))
            expired = [job_id for job_id, exists in zip(members, await pipe.execute()) if not exists]
            if expired:
                await self.redis.srem(key, *expired)
                gone += len(expired)
        return gone

    async def claim_webhooks(self, lease_s: float, count: int) -> tuple[list[tuple[str, int]], int]:
        """Up to `count` jobs whose webhook is due, each with the attempt this call is, and how many due jobs had
        expired meanwhile (dropped: see _WEBHOOK_CLAIM)."""
        reply = await self._webhook_claim(keys=[WEBHOOKS_KEY], args=[JOB_PREFIX, lease_s, count])
        return [(_s(reply[i]), int(reply[i + 1])) for i in range(1, len(reply), 2)], int(reply[0])

    async def settle_webhook(self, job_id: str, attempt: int, retry_in_s: float | None) -> None:
        """The call of `attempt` is over: done (None), or due again in `retry_in_s` seconds (see _WEBHOOK_SETTLE)."""
        delay = "" if retry_in_s is None else retry_in_s
        await self._webhook_settle(keys=[WEBHOOKS_KEY, job_key(job_id)], args=[job_id, attempt, delay])

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
    frames: list[tuple[int, dict[str, Any], bytes]] = field(default_factory=list)  # (index, metadata, PNG)


def queued_count(client: redis.Redis, model: str) -> int:
    """Jobs of `model` queued, not yet running: its pending jobs less those holding a lease (not its Celery
    messages, wake-up calls that top-ups and requeues add and lost sends remove). AsyncJobStore.queued_counts is
    the same count for the gateway's event loop."""
    pipe = client.pipeline(transaction=False)
    pipe.scard(pending_key(model))
    pipe.zcard(leases_key(model))
    pending, running = pipe.execute()
    return max(0, pending - running)


class JobStore:
    """The worker's side: take and claim jobs in fair order, hold their leases, stream their events, write
    their result once, and put back the jobs of lost workers."""

    def __init__(self, client: redis.Redis, ttl_s: int = 3600):
        self.redis = client
        self.ttl_s = ttl_s
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)
        self._requeue = client.register_script(_REQUEUE)
        self._finish = client.register_script(_FINISH)
        self._progress = client.register_script(_PROGRESS)
        self._release_lock = client.register_script(_RELEASE_LOCK)
        self._started = client.register_script(_STARTED)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 3600, timeout_s: float | None = None) -> JobStore:
        """`timeout_s` bounds every command and connect, so Redis away is an error the caller retries, not a hang."""
        return cls(sync_client(url, timeout_s), ttl_s)

    def get(self, job_id: str) -> JobRecord | None:
        return JobRecord.from_redis(job_id, self.redis.hgetall(job_key(job_id)))

    def blob(self, job_id: str, name: str) -> bytes | None:
        return self.redis.get(blob_key(job_id, name))

    def publish_model(self, info: ModelInfo) -> None:
        self.redis.hset(MODELS_KEY, info.name, info.to_json())

    def take(self, model: str, lease_s: float, worker: str) -> tuple[str, int] | None:
        """The next job of `model` in fair order, claimed for `worker` with a lease: (job id, attempt)."""
        keys = [turns_key(model), clock_key(model), leases_key(model)]
        args = [f"latentd:queue:{model}:", JOB_PREFIX, lease_s, worker, self.ttl_s, INPUT_BLOB, MASK_BLOB]
        taken = self._take(keys=keys, args=args)
        return (_s(taken[0]), int(taken[1])) if taken else None

    def renew(self, model: str, held: list[tuple[str, int]], lease_s: float) -> list[str]:
        """Renew the leases of the attempts this worker runs; returns the job ids that are no longer its own."""
        if not held:
            return []
        keys = [leases_key(model)] + [job_key(job_id) for job_id, _ in held]
        args = [lease_s] + [item for job_id, attempt in held for item in (job_id, attempt)]
        return [_s(job_id) for job_id in self._renew(keys=keys, args=args)]

    def queued_count(self, model: str) -> int:
        """Jobs of `model` queued, not yet running (`queued_count`): each should have a task in the broker."""
        return queued_count(self.redis, model)

    def lapsed(self, model: str) -> list[str]:
        """Running jobs of `model` whose lease has lapsed (by Redis's clock)."""
        seconds, micros = self.redis.time()
        return [_s(j) for j in self.redis.zrangebyscore(leases_key(model), "-inf", seconds + micros / 1e6)]

    def requeue(self, job: JobRecord, *, attempt: int | None, lost: bool, max_lost: int, reason: str) -> str:
        """Put a running job back at the head of its key's queue as a new attempt (see _REQUEUE): 'requeued',
        'failed' (lost max_lost times), 'cancelled', or 'over' / 'moved' / 'alive' (nothing to do)."""
        now = time.time()
        queued = {"id": job.id, "requeued": True, "reason": reason, "emitted_at": now}
        error = {
            "type": "worker_lost",
            "message": f"the job's worker was lost {max_lost} times while running it ({reason}); it is not "
            "retried again, since it may be what brings its workers down",
            "param": None,
            "emitted_at": now,
        }
        keys = dispatch_keys(job.model, job.owner) + [job_key(job.id), events_key(job.id), leases_key(job.model)]
        args = [
            job.id,
            job.owner,
            self.ttl_s,
            "" if attempt is None else attempt,
            "1" if lost else "0",
            max_lost,
            json.dumps(queued),
            json.dumps(error),
            json.dumps({"id": job.id, "emitted_at": now}),
            INPUT_BLOB,
            MASK_BLOB,
        ]
        return _s(self._requeue(keys=keys, args=args))

    def release_lock(self, key: str, holder: str) -> None:
        """Delete the lock `key` if `holder` still holds it (not one another took after it expired)."""
        self._release_lock(keys=[key], args=[holder])

    def holds(self, job_id: str, attempt: int) -> bool:
        """Whether `attempt` still holds the job's fence: the job runs, and this is its attempt."""
        current, status = self.redis.hmget(job_key(job_id), "attempt", "status")
        return current is not None and int(current) == attempt and _s(status) == "running"

    def started(self, job_id: str, attempt: int, timings: dict) -> bool:
        """The attempt's start (timings, `started` event); False, writing nothing, where it no longer holds the
        job's fence (a reaper requeued it meanwhile, or it was cancelled while queued)."""
        started = json.dumps({"attempt": attempt, "emitted_at": timings["started_at"]})
        keys = [job_key(job_id), events_key(job_id)]
        return bool(self._started(keys=keys, args=[attempt, self.ttl_s, json.dumps(timings), started]))

    def _progress_args(
        self, job_id: str, attempt: int, event: dict | None, progress: dict | None, frames: list, emitted_at: float
    ) -> tuple[list, list]:
        keys, args = [job_key(job_id), events_key(job_id)], [attempt, self.ttl_s]
        args += [json.dumps(event) if event else "", json.dumps(progress) if progress is not None else ""]
        for index, meta, png in frames:
            keys.append(blob_key(job_id, frame_blob_name(attempt, index)))
            listed = json.dumps(frame_meta(attempt, index, meta))
            data = json.dumps(frame_event(job_id, attempt, index, meta, emitted_at))
            args += [live_frame_field(attempt, index), listed, data, png]
        return keys, args

    def write_steps(self, steps: list[StepWrite]) -> list[tuple[bool, bool]]:
        """One engine iteration's events, frames and progress in one round trip, each job's fenced (_PROGRESS).
        Returns, per step, (cancel requested, attempt superseded), so the engine drops those at once."""
        pipe = self.redis.pipeline(transaction=False)
        for step in steps:  # a reverse trajectory's frames are stored, listed and announced with their step
            emitted_at = step.event["emitted_at"]
            keys, args = self._progress_args(
                step.job_id, step.attempt, step.event, step.progress, step.frames, emitted_at
            )
            self._progress(keys=keys, args=args, client=pipe)
        return [(_s(cancel) == "1", bool(superseded)) for cancel, superseded in pipe.execute()]

    def add_frames(self, job_id: str, attempt: int, frames: list[tuple[int, dict, bytes]]) -> bool:
        """Frames (index, metadata, PNG) before the result, only while `attempt` holds the fence (_PROGRESS): each
        picture is stored with its event, so a client may fetch a frame as soon as it hears of it."""
        keys, args = self._progress_args(job_id, attempt, None, None, frames, time.time())
        _, superseded = self._progress(keys=keys, args=args)
        return not superseded

    def renew_blobs(self, job_id: str, names: list[str]) -> None:
        """Blobs written while the job ran (live frames) expire with the job's result, not before."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.expire(blob_key(job_id, name), self.ttl_s)
        pipe.execute()

    def finish(
        self,
        job: JobRecord,
        attempt: int,
        status: str,
        fields: dict,
        event: tuple[str, dict],
        blobs: dict[str, bytes] | None = None,
    ) -> bool:
        """Write the outcome once: False when another attempt holds the fence or the job is already over. A job
        succeeding after its cancel was accepted ends cancelled (see _FINISH)."""
        assert status in TERMINAL
        blobs = blobs or {}
        job_id = job.id
        keys = dispatch_keys(job.model, job.owner) + [job_key(job_id), events_key(job_id), leases_key(job.model)]
        keys += [blob_key(job_id, n) for n in blobs]
        args = [
            str(attempt),
            self.ttl_s,
            status,
            json.dumps({k: json.dumps(v) for k, v in fields.items()}),
            event[0],
            json.dumps(event[1]),
            job_id,
            json.dumps({"id": job_id, "emitted_at": time.time()}),
        ] + list(blobs.values())
        return bool(self._finish(keys=keys, args=args))
