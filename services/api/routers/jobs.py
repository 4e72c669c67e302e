"""A job: read it, stream its events (SSE), fetch its images and frames, cancel it."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from services.api import metrics, submit
from services.api.deps import OwnerDep, SettingsDep, StoreDep
from services.common.errors import Conflict, InvalidInput, NotFound
from services.common.jobstore import TERMINAL, JobStore, events_key, frame_blob_name
from services.common.schemas import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def owned_job(store: JobStore, job_id: str, owner: str) -> dict:
    job = store.get(job_id)
    if job is None or job["owner"] != owner:  # another key's job does not exist for this caller
        raise NotFound(f"no job {job_id!r}", "id")
    return job


@router.get("/{job_id}", response_model=Job)
def get_job(job_id: str, store: StoreDep, owner: OwnerDep) -> dict:
    return submit.job_view(owned_job(store, job_id, owner))


@router.post("/{job_id}/cancel", response_model=Job)
def cancel_job(job_id: str, store: StoreDep, owner: OwnerDep) -> dict:
    job = owned_job(store, job_id, owner)
    outcome = store.cancel(job_id, job["model"])
    if outcome in ("succeeded", "failed"):
        raise Conflict(f"job {job_id} already {outcome}; only queued or running jobs can be cancelled", "id")
    return submit.job_view(store.get(job_id))


def _blob(store: JobStore, job: dict, names: list, index: int, what: str) -> Response:
    if not 0 <= index < len(names):
        raise NotFound(f"job {job['id']} has no {what} {index} (it has {len(names)})", "index")
    data = store.blob(job["id"], names[index] if isinstance(names[index], str) else names[index]["blob"])
    if data is None:
        raise NotFound(f"{what} {index} of job {job['id']} has expired", "index")
    fmt = job["params"].get("output_format", "png") if what == "image" else "png"
    return Response(content=data, media_type=MEDIA_TYPES[fmt])


@router.get("/{job_id}/images/{index}", responses={200: {"content": {"image/png": {}}}})
def get_image(job_id: str, index: int, store: StoreDep, owner: OwnerDep) -> Response:
    job = owned_job(store, job_id, owner)
    return _blob(store, job, job["images"] or [], index, "image")


@router.get("/{job_id}/frames/{index}", responses={200: {"content": {"image/png": {}}}})
def get_frame(job_id: str, index: int, store: StoreDep, owner: OwnerDep) -> Response:
    """A trajectory frame. A reverse trajectory's frames can be fetched while it runs, as soon as their
    `frame` event is out; the others once the job has succeeded."""
    job = owned_job(store, job_id, owner)
    if job["status"] == "running" and index >= len(job["frames"] or []):
        data = store.blob(job_id, frame_blob_name(job["attempt"], index))
        if data is not None:
            return Response(content=data, media_type=MEDIA_TYPES["png"])
    return _blob(store, job, job["frames"] or [], index, "frame")


async def sse_stream(store: JobStore, aredis, job_id: str, after: str, keepalive_s: float) -> AsyncIterator[bytes]:
    """Entries of the job's Redis stream as SSE, from `after`; ends after a terminal event."""
    metrics.sse_readers.inc()
    try:
        last_sent = time.monotonic()
        yield b"retry: 1000\n\n"
        while True:
            reply = await aredis.xread({events_key(job_id): after}, count=256, block=int(min(keepalive_s, 1.0) * 1000))
            if not reply:
                if time.monotonic() - last_sent >= keepalive_s:
                    last_sent = time.monotonic()
                    yield b": keep-alive\n\n"
                continue
            chunk, terminal = [], False
            for entry_id, fields in reply[0][1]:
                entry_id = entry_id.decode()
                name, data = fields[b"event"].decode(), fields[b"data"].decode()
                after = entry_id
                chunk.append(f"id: {entry_id}\nevent: {name}\ndata: {data}\n\n")
                if name in TERMINAL:
                    terminal = True
                    break
            last_sent = time.monotonic()
            yield "".join(chunk).encode()
            if terminal:
                return
    finally:
        metrics.sse_readers.dec()


@router.get(
    "/{job_id}/events", response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}}
)
def job_events(
    job_id: str,
    request: Request,
    store: StoreDep,
    owner: OwnerDep,
    settings: SettingsDep,
    last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
    last_event_id: str | None = Query(None, description="Resume after this event id (as Last-Event-ID)."),
) -> StreamingResponse:
    owned_job(store, job_id, owner)
    after = last_event_id_header or last_event_id or "0"
    if not _STREAM_ID.match(after):
        raise InvalidInput(f"Last-Event-ID must be an event id like 1700000000000-0, got {after!r}", "last_event_id")
    return StreamingResponse(
        sse_stream(store, request.app.state.aredis, job_id, after, settings.sse_keepalive_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
