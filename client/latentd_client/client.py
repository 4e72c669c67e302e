"""One interface over REST and gRPC: `Client("http://127.0.0.1:8000")` or `Client("grpc://127.0.0.1:50051")`.

with Client(url, api_key=key) as client:
    job = client.generate("a red circle on a white background", seed=1)
    for event in client.events(job.id):      # resumes by itself after a dropped connection
        print(event.type, event.step, event.total)
    png = client.image(job.id, 0)
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from services.common.rules import MAX_LIST_LIMIT

from .errors import JobFailedError, LatentdError, StreamDropped, UnavailableError
from .types import Job, JobEvent, JobPage, Model

DEFAULT_URL = "http://127.0.0.1:8000"


def _transport_class(url: str, asynchronous: bool):
    if url.startswith(("grpc://", "grpcs://")):
        from .grpc_transport import AsyncGrpcTransport, GrpcTransport

        return AsyncGrpcTransport if asynchronous else GrpcTransport
    from .rest import AsyncRestTransport, RestTransport

    return AsyncRestTransport if asynchronous else RestTransport


def _statuses(status: str | Iterable[str]) -> list[str]:
    """One status name or several, as a list."""
    return [status] if isinstance(status, str) else list(status)


def _body(**fields: Any) -> dict[str, Any]:
    """The request body: the fields set; pictures (image, mask) given as bytes become base64, as REST carries
    them (a {"job_id", "index"} dict passes as it is)."""
    body = {k: v for k, v in fields.items() if v is not None}
    for name in ("image", "mask"):
        if isinstance(body.get(name), (bytes, bytearray)):
            body[name] = base64.b64encode(body[name]).decode()
    return body


def _final_job(event: JobEvent | None) -> Job | None:
    """The job a terminal event carries (its data is the final job, as GET answers once it has caught up: a poll
    of a live job may be up to the gateway's job_poll_max_age_s, 0.25 s, behind its events); None if it carries
    none."""
    if event is None or not event.terminal or "status" not in event.data or "id" not in event.data:
        return None
    return Job.from_dict(event.data)


def _check_final(job: Job) -> Job:
    if job.status in ("failed", "cancelled"):
        message = (job.error or {}).get("message") or f"job {job.id} {job.status}"
        raise JobFailedError(message, job, type=(job.error or {}).get("type"))
    return job


class Resume:
    """The reconnect rule of both clients: each new stream starts after the last event id seen, so nothing is
    missed or repeated; a stream that breaks, ends without a terminal event, or cannot open for now (503 /
    UNAVAILABLE: Redis away) is opened again after a short, growing pause (at least a 503's Retry-After);
    `max_reconnects` breaks in a row without an event in between give up. A stream that ends cleanly with no
    event at all is followed by one GET of the job: if it has ended, the events end there too (a server that
    closes the stream of an ended job resumed after its terminal event, as one before 93dcd80 did, would
    otherwise be reconnected to for about 78 s, then reported as broken)."""

    def __init__(self, job_id: str, after: str | None, max_reconnects: int, delay_s: float):
        self.job_id, self.last = job_id, after
        self.max_reconnects, self.delay_s = max_reconnects, delay_s
        self.failures = 0

    def saw(self, event: JobEvent) -> bool:
        """Record `event`; True when it ends the job."""
        self.last, self.failures = event.id or self.last, 0
        return event.terminal

    def ended_quietly(self, cause: BaseException | None, heard: bool) -> bool:
        """Whether a stream ended cleanly having brought nothing: then the job may be over already (a GET says),
        and there is nothing left to resume."""
        return cause is None and not heard

    def broke(self, cause: BaseException | None = None) -> float:
        """Seconds to wait before reconnecting; UnavailableError once out of tries."""
        self.failures += 1
        if self.failures > self.max_reconnects:
            raise UnavailableError(
                f"event stream of job {self.job_id} broke {self.failures} times in a row: {cause or 'ended early'}"
            ) from cause
        retry_after = getattr(cause, "retry_after", None) or 0.0  # a 503's Retry-After
        return min(max(self.delay_s * self.failures, retry_after), 5.0)


class _Connection:
    """What both clients are made of: the URL (http(s):// for REST, grpc(s):// for gRPC), the key, the
    transport of that URL, and the reconnect settings of `events`."""

    asynchronous = False

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_reconnects: int = 20,
        reconnect_delay: float = 0.5,
    ):
        self.url = url or os.environ.get("LATENTD_URL") or DEFAULT_URL
        self.api_key = api_key if api_key is not None else os.environ.get("LATENTD_API_KEY")
        self.transport = _transport_class(self.url, self.asynchronous)(self.url, self.api_key, timeout)
        self.max_reconnects, self.reconnect_delay = max_reconnects, reconnect_delay


class Client(_Connection):
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def generate(self, prompt: str, *, idempotency_key: str | None = None, **fields: Any) -> Job:
        """Submit a generation (fields as in POST /v1/generations); returns the queued job. With an
        `idempotency_key`, sending the same call again (after a timeout, say) returns the first job."""
        return self.transport.submit_generation(_body(prompt=prompt, **fields), idempotency_key)

    def trajectory(self, kind: str, *, idempotency_key: str | None = None, **fields: Any) -> Job:
        """Submit a trajectory: kind forward | reverse | guidance_sweep; fields as in POST /v1/trajectories."""
        return self.transport.submit_trajectory(_body(kind=kind, **fields), idempotency_key)

    def get_job(self, job_id: str) -> Job:
        return self.transport.get_job(job_id)

    def cancel(self, job_id: str) -> Job:
        return self.transport.cancel_job(job_id)

    def jobs(
        self, *, limit: int | None = None, starting_after: str | None = None, status: str | Iterable[str] = ()
    ) -> JobPage:
        """A page of this key's jobs of the last hour (the server's result TTL), newest first, only those with
        `status` (one name or several) if given; `page.next_starting_after` asks for the next page."""
        return self.transport.list_jobs(limit, starting_after, _statuses(status))

    def all_jobs(self, *, status: str | Iterable[str] = (), page_size: int = MAX_LIST_LIMIT) -> Iterator[Job]:
        """Every one of this key's jobs of the last hour, newest first, a page at a time."""
        after = None
        while True:
            page = self.jobs(limit=page_size, starting_after=after, status=status)
            yield from page.jobs
            if page.next_starting_after is None:
                return
            after = page.next_starting_after

    def models(self) -> list[Model]:
        return self.transport.models()

    def image(self, job_id: str, index: int = 0) -> bytes:
        return self.transport.artifact(job_id, "image", index)[0]

    def frame(self, job_id: str, index: int) -> bytes:
        return self.transport.artifact(job_id, "frame", index)[0]

    def events(self, job_id: str, after: str | None = None) -> Iterator[JobEvent]:
        """Every event of the job from `after` (exclusive) to the terminal one, across dropped connections."""
        resume = Resume(job_id, after, self.max_reconnects, self.reconnect_delay)
        while True:
            cause, heard = None, False
            try:
                for event in self.transport.events(job_id, resume.last):
                    heard = True
                    yield event
                    if resume.saw(event):
                        return
            except (StreamDropped, UnavailableError) as exc:  # a dropped stream, or 503 (Redis away): resume
                cause = exc
            if resume.ended_quietly(cause, heard) and self._over(job_id):
                return
            time.sleep(resume.broke(cause))

    def _over(self, job_id: str) -> bool:
        try:
            return self.get_job(job_id).done
        except UnavailableError:  # Redis away: the reconnecting goes on
            return False

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Follow the events until the job ends; returns the final job or raises JobFailedError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        for event in self.events(job_id):
            last = event
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
        return _check_final(_final_job(last) or self.get_job(job_id))


class AsyncClient(_Connection):
    asynchronous = True

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    async def generate(self, prompt: str, *, idempotency_key: str | None = None, **fields: Any) -> Job:
        return await self.transport.submit_generation(_body(prompt=prompt, **fields), idempotency_key)

    async def trajectory(self, kind: str, *, idempotency_key: str | None = None, **fields: Any) -> Job:
        return await self.transport.submit_trajectory(_body(kind=kind, **fields), idempotency_key)

    async def get_job(self, job_id: str) -> Job:
        return await self.transport.get_job(job_id)

    async def cancel(self, job_id: str) -> Job:
        return await self.transport.cancel_job(job_id)

    async def jobs(
        self, *, limit: int | None = None, starting_after: str | None = None, status: str | Iterable[str] = ()
    ) -> JobPage:
        return await self.transport.list_jobs(limit, starting_after, _statuses(status))

    async def all_jobs(
        self, *, status: str | Iterable[str] = (), page_size: int = MAX_LIST_LIMIT
    ) -> AsyncIterator[Job]:
        after = None
        while True:
            page = await self.jobs(limit=page_size, starting_after=after, status=status)
            for job in page.jobs:
                yield job
            if page.next_starting_after is None:
                return
            after = page.next_starting_after

    async def models(self) -> list[Model]:
        return await self.transport.models()

    async def image(self, job_id: str, index: int = 0) -> bytes:
        return (await self.transport.artifact(job_id, "image", index))[0]

    async def frame(self, job_id: str, index: int) -> bytes:
        return (await self.transport.artifact(job_id, "frame", index))[0]

    async def events(self, job_id: str, after: str | None = None) -> AsyncIterator[JobEvent]:
        resume = Resume(job_id, after, self.max_reconnects, self.reconnect_delay)
        while True:
            cause, heard = None, False
            try:
                async for event in self.transport.events(job_id, resume.last):
                    heard = True
                    yield event
                    if resume.saw(event):
                        return
            except (StreamDropped, UnavailableError) as exc:  # a dropped stream, or 503 (Redis away): resume
                cause = exc
            if resume.ended_quietly(cause, heard) and await self._over(job_id):
                return
            await asyncio.sleep(resume.broke(cause))

    async def _over(self, job_id: str) -> bool:
        try:
            return (await self.get_job(job_id)).done
        except UnavailableError:  # Redis away: the reconnecting goes on
            return False

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        async def follow():
            last = None
            async for event in self.events(job_id):
                last = event
            return last

        event = await asyncio.wait_for(follow(), timeout)
        return _check_final(_final_job(event) or await self.get_job(job_id))


__all__ = ["AsyncClient", "Client", "LatentdError", "Resume"]
