"""Following a job's events: one reader per gateway process, however many clients watch.

`EventHub` keeps a *watch* per job that someone follows: the job's owner and a log of its events, shared by
every subscriber of that job. The first subscriber loads the log (XRANGE, one read per job however many
arrive at once); from then on one task reads the streams of every watched job with one blocking XREAD and
appends what comes to their logs. A subscriber (an SSE response, a gRPC stream, the OpenAI route waiting for
its job) walks the log from its `Last-Event-ID` at its own pace and waits on the watch when it has caught
up: there is no queue per subscriber, so a slow reader costs a position in a list, not a copy of the events,
and the Redis connections a gateway holds stay a small constant (the hub's reads, plus the pool of short
commands), whatever the number of readers.

A log keeps at most `log_limit` events (the newest). A subscriber that starts before the log's window, or
falls behind it, reads the missing part from Redis (XRANGE, paged) and joins the log where it begins.

When Redis goes away the hub retries; after `broken_after_s` every watch breaks with `StreamBroken`, which
the doors turn into an `error` event (SSE) or UNAVAILABLE (gRPC): a client resumes from the last id it saw,
never silently cut off.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import AsyncIterator

import redis.exceptions

from services.common.jobs import JobEvent, stream_id
from services.common.jobstore import AsyncJobStore, cancel_and_wait

log = logging.getLogger(__name__)
HISTORY_PAGE = 512
LOG_LIMIT = 4096  # events kept per watched job; a 1000-step job with every frame kept fits


class StreamBroken(Exception):
    """The job's events cannot be read now (Redis away); resume from the last event id."""


def _key(event: JobEvent) -> tuple[int, int]:
    return stream_id(event.id)


class _Watch:
    """One watched job: its owner, the newest events (log[i] is event number base + i), its subscribers."""

    def __init__(self, job_id: str, owner: str | None):
        self.job_id = job_id
        self.owner = owner
        self.log: list[JobEvent] = []
        self.base = 0  # events dropped from the front of the log
        self.complete = False  # the log starts at the stream's first event (nothing was ever dropped)
        self.ended = False  # the terminal event is in the log: nothing comes after it
        self.subscribers = 0
        self.loading: asyncio.Task | None = None
        self.error: StreamBroken | None = None
        self.changed = asyncio.Event()

    @property
    def end(self) -> int:
        return self.base + len(self.log)

    def append(self, events: list[JobEvent], limit: int) -> None:
        if self.log:
            last = _key(self.log[-1])
            events = [e for e in events if _key(e) > last]
        if not events:
            return
        self.log.extend(events)
        self.ended = self.ended or any(e.terminal for e in events)
        if len(self.log) > 2 * limit:  # trim in bulk, not per event
            drop = len(self.log) - limit
            del self.log[:drop]
            self.base += drop
            self.complete = False
        self.changed.set()
        self.changed.clear()  # the waiters already woke; the next wait waits for the next append

    def position_after(self, after: str) -> int | None:
        """The absolute position of the first event after `after`, or None if the log may miss some of them."""
        if after in ("0", "0-0"):
            return self.base if self.complete else None
        key = stream_id(after)
        index = bisect.bisect_right(self.log, key, key=_key)
        if index == 0 and not self.complete:
            return None  # `after` is before the window: events between it and the window may be missing
        return self.base + index

    def terminal(self) -> JobEvent:
        """The terminal event (the log holds it once `ended`: nothing is appended after it, trims keep the newest)."""
        return next(e for e in reversed(self.log) if e.terminal)

    def fail(self, error: StreamBroken) -> None:
        self.error = error
        self.changed.set()
        self.changed.clear()


class EventHub:
    def __init__(
        self,
        store: AsyncJobStore,
        *,
        block_ms: int = 100,
        broken_after_s: float = 5.0,
        log_limit: int = LOG_LIMIT,
    ):
        self.store = store
        self.block_ms = block_ms
        self.broken_after_s = broken_after_s
        self.log_limit = log_limit
        self._watches: dict[str, _Watch] = {}
        self._cursors: dict[str, str] = {}  # the streams the reader follows, each after its last entry read
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def watched_jobs(self) -> int:
        return len(self._watches)

    @property
    def subscribers(self) -> int:
        return sum(w.subscribers for w in self._watches.values())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="latentd-event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for watch in self._watches.values():
            if watch.loading is not None:
                watch.loading.cancel()

    async def owner(self, job_id: str) -> str | None:
        """The key hash that owns the job (None: no such job): from the watch when someone follows it."""
        watch = self._watches.get(job_id)
        if watch is not None and watch.owner is not None:
            return watch.owner
        return await self.store.owner(job_id)

    async def follow(
        self, job_id: str, after: str = "0", idle_s: float | None = None, owner: str | None = None
    ) -> AsyncIterator[JobEvent | None]:
        """The job's events after the entry id `after` ("0": all), up to and including the terminal one (that one
        alone when the job has ended at or before `after`). With `idle_s`, yields None after that many seconds without an event (for keep-alives)."""
        async for batch in self.follow_batches(job_id, after, idle_s, owner):
            if not batch:
                yield None
            for event in batch:
                yield event

    async def follow_batches(
        self, job_id: str, after: str = "0", idle_s: float | None = None, owner: str | None = None
    ) -> AsyncIterator[list[JobEvent]]:
        """As `follow`, but each time with every event available at once (an empty list: `idle_s` passed)."""
        watch = self._watches.get(job_id)
        if watch is None or watch.error is not None:
            watch = self._watches[job_id] = _Watch(job_id, owner)
        watch.owner = watch.owner or owner
        watch.subscribers += 1
        try:
            if watch.loading is None:
                watch.loading = asyncio.get_running_loop().create_task(self._load(watch))
            await asyncio.shield(watch.loading)
            last = after
            position = watch.position_after(after)
            while True:
                if watch.error is not None:
                    raise watch.error
                if position is None or position < watch.base:  # before the log's window: catch up from Redis
                    batch = await self._history(job_id, last)
                    if batch:
                        last = batch[-1].id
                        yield batch
                        if batch[-1].terminal:
                            return
                    position = watch.position_after(last)
                    if position is None and len(batch) < HISTORY_PAGE:
                        # read up to the present: every event in the log came after `last`
                        position = watch.base
                    continue
                if position < watch.end:
                    if _key(watch.log[position - watch.base]) <= stream_id(last):
                        # `after` is ahead of the stream (an id the running job has not reached): what comes
                        # before it is not sent, as Redis's XRANGE from `after` would not send it
                        position = watch.position_after(last)
                        continue
                    batch = watch.log[position - watch.base :]
                    for index, event in enumerate(batch):
                        if event.terminal:
                            batch = batch[: index + 1]
                            break
                    position += len(batch)
                    last = batch[-1].id
                    yield batch
                    if batch[-1].terminal:
                        return
                    continue
                if watch.ended:
                    # `after` is the terminal event or later (a client resuming from the last id it saw): the
                    # terminal event again, so no stream of an ended job closes without one
                    yield [watch.terminal()]
                    return
                try:
                    async with asyncio.timeout(idle_s):
                        await watch.changed.wait()
                except TimeoutError:
                    yield []
        finally:
            watch.subscribers -= 1
            if watch.subscribers == 0 and self._watches.get(job_id) is watch:
                del self._watches[job_id]
                self._cursors.pop(job_id, None)
                if watch.loading is not None and not watch.loading.done():
                    watch.loading.cancel()

    async def _history(self, job_id: str, after: str) -> list[JobEvent]:
        try:
            return await self.store.events_after(job_id, after, HISTORY_PAGE)
        except redis.exceptions.RedisError as error:
            raise StreamBroken(f"events of job {job_id} cannot be read now: {error}") from error

    async def _load(self, watch: _Watch) -> None:
        """The job's stored events into its log (up to the log's limit), then the live reader follows it."""
        try:
            last, events, dropped = "0", [], False
            while True:
                page = await self._history(watch.job_id, last)
                events += page
                if page:
                    last = page[-1].id
                if len(events) > self.log_limit:
                    events, dropped = events[-self.log_limit :], True
                if len(page) < HISTORY_PAGE:
                    break
        except StreamBroken as error:
            if self._watches.get(watch.job_id) is watch:
                del self._watches[watch.job_id]
            watch.fail(error)
            return
        watch.complete = not dropped
        self.store.forget_polled(watch.job_id)
        watch.append(events, self.log_limit)
        if not watch.ended and self._watches.get(watch.job_id) is watch:
            self._cursors[watch.job_id] = last if last != "0" else "0-0"
            self._wake.set()

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
                    failing_since = None
                log.warning("event hub: read failed (%s); retrying", error)
                await asyncio.sleep(0.25)
                continue
            for job_id, events in replies.items():
                self.store.forget_polled(job_id)  # a reader who saw these events and then polls gets them in the job
                watch = self._watches.get(job_id)
                if job_id in self._cursors:
                    self._cursors[job_id] = events[-1].id
                if watch is not None:
                    watch.append(events, self.log_limit)
                    if watch.ended:
                        self._cursors.pop(job_id, None)  # nothing comes after a terminal event

    def _break_all(self, error: StreamBroken) -> None:
        """Every watch breaks: its subscribers end with `error`; the next subscriber of a job starts afresh."""
        watches, self._watches = self._watches, {}
        self._cursors.clear()
        for watch in watches.values():
            watch.fail(error)
