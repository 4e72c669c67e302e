"""Following a job's events: one reader per gateway process, however many clients watch.

`EventHub` runs one task that reads the event streams of every job someone is watching with one
blocking XREAD over all of them, and hands each entry to the in-process subscribers of its job. A
subscriber (an SSE response, a gRPC stream, the OpenAI route waiting for its job) first registers,
then replays the job's history after its `Last-Event-ID` with XRANGE, then takes live entries from
the hub, skipping any it already had: nothing falls between history and live, nothing comes twice.
So the Redis connections a gateway holds stay a small constant (the hub's one, plus the pool of
short commands), whatever the number of readers.

When Redis goes away the hub retries; its subscribers get a `StreamBroken` after `broken_after_s`,
which the doors turn into an `error` event (SSE) or UNAVAILABLE (gRPC): a client resumes from the
last id it saw, never silently cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import redis.exceptions

from services.common.jobs import JobEvent, stream_id
from services.common.jobstore import AsyncJobStore

log = logging.getLogger(__name__)
HISTORY_PAGE = 512


class StreamBroken(Exception):
    """The job's events cannot be read now (Redis away); resume from the last event id."""


class _Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[JobEvent | BaseException] = asyncio.Queue()


class EventHub:
    def __init__(self, store: AsyncJobStore, *, block_ms: int = 100, broken_after_s: float = 5.0):
        self.store = store
        self.block_ms = block_ms
        self.broken_after_s = broken_after_s
        self._subscribers: dict[str, set[_Subscriber]] = {}
        self._cursors: dict[str, str] = {}  # the streams the reader follows, each after its last entry read
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def watched_jobs(self) -> int:
        return len(self._subscribers)

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="latentd-event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def follow(
        self, job_id: str, after: str = "0", idle_s: float | None = None
    ) -> AsyncIterator[JobEvent | None]:
        """The job's events after the entry id `after` ("0": all), up to and including the terminal one.
        With `idle_s`, yields None after that many seconds without an event (for keep-alives)."""
        subscriber = _Subscriber()
        self._subscribers.setdefault(job_id, set()).add(subscriber)
        try:
            last = after
            while True:  # history first, in pages
                try:
                    page = await self.store.events_after(job_id, last, HISTORY_PAGE)
                except redis.exceptions.RedisError as error:
                    raise StreamBroken(f"events of job {job_id} cannot be read now: {error}") from error
                for event in page:
                    yield event
                    last = event.id
                    if event.terminal:
                        return
                if len(page) < HISTORY_PAGE:
                    break
            if job_id not in self._cursors:
                self._cursors[job_id] = last if last != "0" else "0-0"
                self._wake.set()
            while True:
                try:
                    item = await asyncio.wait_for(subscriber.queue.get(), idle_s)
                except TimeoutError:
                    yield None
                    continue
                if isinstance(item, BaseException):
                    raise item
                if last != "0" and stream_id(item.id) <= stream_id(last):
                    continue  # already in the history
                yield item
                last = item.id
                if item.terminal:
                    return
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._subscribers[job_id]
                    self._cursors.pop(job_id, None)

    async def _run(self) -> None:
        failing_since: float | None = None
        while True:
            if not self._cursors:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                replies = await self.store.read_live(dict(self._cursors), self.block_ms)
                failing_since = None
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Redis away: retry, and after a while tell the readers
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.broken_after_s:
                    self._break_all(StreamBroken(f"Redis unreachable for {now - failing_since:.0f} s: {error}"))
                    failing_since = now
                log.warning("event hub: read failed (%s); retrying", error)
                await asyncio.sleep(0.25)
                continue
            for job_id, events in replies.items():
                if job_id in self._cursors:
                    self._cursors[job_id] = events[-1].id
                for subscriber in self._subscribers.get(job_id, ()):
                    for event in events:
                        subscriber.queue.put_nowait(event)
                if any(event.terminal for event in events):
                    self._cursors.pop(job_id, None)  # nothing comes after a terminal event

    def _break_all(self, error: StreamBroken) -> None:
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.queue.put_nowait(error)
