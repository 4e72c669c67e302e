"""A job: read it, stream its events (SSE), fetch its images and frames, cancel it."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from services.api import metrics
from services.api.deps import CoreDep, OwnerDep
from services.common.errors import InvalidInput
from services.core import Core
from services.core.events import StreamBroken
from services.core.schemas import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")
PICTURE = {200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}}


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, core: CoreDep, owner: OwnerDep) -> dict:
    return (await core.job(owner, job_id)).view()


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: str, core: CoreDep, owner: OwnerDep) -> dict:
    return (await core.cancel(owner, job_id)).view()


@router.get("/{job_id}/images/{index}", responses=PICTURE)
async def get_image(job_id: str, index: int, core: CoreDep, owner: OwnerDep) -> Response:
    data, media_type = await core.artifact(owner, job_id, "image", index)
    return Response(content=data, media_type=media_type)


@router.get("/{job_id}/frames/{index}", responses=PICTURE)
async def get_frame(job_id: str, index: int, core: CoreDep, owner: OwnerDep) -> Response:
    """A trajectory frame. A reverse trajectory's frames can be fetched while it runs, as soon as their
    `frame` event is out; the others once the job has succeeded."""
    data, media_type = await core.artifact(owner, job_id, "frame", index)
    return Response(content=data, media_type=media_type)


async def sse_stream(core: Core, owner: str, job_id: str, after: str) -> AsyncIterator[bytes]:
    """The job's events as SSE from `after`; ends after the terminal event. When the stream cannot go on
    (Redis away) it ends with an `error` event naming the last id, so the client resumes from there."""
    metrics.sse_readers.inc()
    last = after
    try:
        yield b"retry: 1000\n\n"
        async for event in core.follow(owner, job_id, after, idle_s=core.settings.sse_keepalive_s):
            if event is None:
                yield b": keep-alive\n\n"
                continue
            last = event.id
            yield event.sse
    except StreamBroken as error:
        data = {"type": "stream_unavailable", "message": str(error), "resume_after": last}
        yield f"event: error\ndata: {json.dumps(data)}\n\n".encode()
    finally:
        metrics.sse_readers.dec()


@router.get(
    "/{job_id}/events", response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}}
)
async def job_events(
    job_id: str,
    core: CoreDep,
    owner: OwnerDep,
    last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
    last_event_id: str | None = Query(None, description="Resume after this event id (as Last-Event-ID)."),
) -> StreamingResponse:
    after = last_event_id_header or last_event_id or "0"
    if not _STREAM_ID.match(after):
        raise InvalidInput(f"Last-Event-ID must be an event id like 1700000000000-0, got {after!r}", "last_event_id")
    await core.job(owner, job_id)  # 404 before the stream starts
    return StreamingResponse(
        sse_stream(core, owner, job_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
