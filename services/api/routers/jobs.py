"""A job: list the caller's, read one, stream its events (SSE), fetch its images and frames, cancel it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from services.api import metrics
from services.api.deps import CoreDep, OwnerDep
from services.api.errors import documented
from services.common import rules
from services.common.jobs import JobEvent
from services.core import Core
from services.core.events import StreamBroken
from services.core.schemas import Job, JobList

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
PICTURE = {200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}}


STATUS_FILTER = Query(
    description=f"Only jobs with one of these statuses ({', '.join(rules.JOB_STATUSES)}): the parameter repeated, or "
    "comma-separated.",
    json_schema_extra={"items": {"type": "string", "enum": list(rules.JOB_STATUSES)}},
)


@router.get("", response_model=JobList, responses=documented(401, 422, 503))
async def list_jobs(
    core: CoreDep,
    owner: OwnerDep,
    limit: int = Query(
        rules.DEFAULT_LIST_LIMIT,
        description=f"Jobs per page, 1 to {rules.MAX_LIST_LIMIT}.",
        json_schema_extra={"minimum": 1, "maximum": rules.MAX_LIST_LIMIT},  # checked by the rules, which say so
    ),
    starting_after: str = Query(
        "", description="Go on after this job: the previous page's next_starting_after. Empty: the newest first."
    ),
    status: Annotated[list[str], STATUS_FILTER] = (),
) -> Response:
    """The caller's jobs of the last LATENTD_RESULT_TTL_S (3600 s), newest first, each as GET /v1/jobs/{id} shows
    it. Page with `starting_after`; `has_more` says whether to."""
    statuses = [name.strip() for value in status for name in value.split(",") if name.strip()]
    jobs, after = await core.jobs(owner, limit=limit, starting_after=starting_after, statuses=statuses)
    tail = json.dumps({"has_more": after is not None, "next_starting_after": after}, separators=(",", ":"))
    body = b'{"jobs":[' + b",".join(job.view_json for job in jobs) + b"]," + tail[1:].encode()
    return Response(body, media_type="application/json")


@router.get("/{job_id}", response_model=Job, responses=documented(401, 404, 422, 503))
async def get_job(job_id: str, request: Request) -> Response:
    """The hot path of every polling client: no dependency resolution, no re-validation of the record on its
    way out (the JSON is the record's own view; `Job` documents it). A queued or running job's state may be up to
    LATENTD_JOB_POLL_MAX_AGE_S (0.25 s) older than the request; follow its events for every change as it happens."""
    core: Core = request.app.state.core
    job = await core.job(core.authenticate(request.headers.get("authorization")), job_id, poll=True)
    return Response(job.view_json, media_type="application/json")


@router.post("/{job_id}/cancel", response_model=Job, responses=documented(401, 404, 409, 422, 503))
async def cancel_job(job_id: str, core: CoreDep, owner: OwnerDep) -> dict:
    return (await core.cancel(owner, job_id)).view()


@router.get("/{job_id}/images/{index}", responses=PICTURE | documented(401, 404, 422, 503))
async def get_image(job_id: str, index: int, core: CoreDep, owner: OwnerDep) -> Response:
    data, media_type = await core.artifact(owner, job_id, "image", index)
    return Response(content=data, media_type=media_type)


@router.get("/{job_id}/frames/{index}", responses=PICTURE | documented(401, 404, 422, 503))
async def get_frame(job_id: str, index: int, core: CoreDep, owner: OwnerDep) -> Response:
    """A trajectory frame. A reverse trajectory's frames can be fetched while it runs, as soon as their
    `frame` event is out; the others once the job has succeeded."""
    data, media_type = await core.artifact(owner, job_id, "frame", index)
    return Response(content=data, media_type=media_type)


async def sse_stream(events: AsyncIterator[list[JobEvent]], after: str) -> AsyncIterator[bytes]:
    """The job's events as SSE from `after`, every event at hand in one write; ends after the terminal event.
    When the stream cannot go on (Redis away, or anything else) it ends with an `error` event naming the last
    id, so the client resumes from there: never a silent close."""
    metrics.sse_readers.inc()
    last = after
    try:
        yield b"retry: 1000\n\n"
        async for batch in events:
            if not batch:
                yield b": keep-alive\n\n"
                continue
            last = batch[-1].id
            yield b"".join(event.sse for event in batch)
    except Exception as error:  # the response has started: an error event is all that can be sent
        if not isinstance(error, StreamBroken):
            log.exception("event stream failed")
        data = {"type": "stream_unavailable", "message": str(error) or type(error).__name__, "resume_after": last}
        yield f"event: error\ndata: {json.dumps(data)}\n\n".encode()
    finally:
        metrics.sse_readers.dec()


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}} | documented(401, 404, 422, 503),
)
async def job_events(
    job_id: str,
    core: CoreDep,
    owner: OwnerDep,
    last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
    last_event_id: str | None = Query(None, description="Resume after this event id (as Last-Event-ID)."),
) -> StreamingResponse:
    after = last_event_id_header or last_event_id or "0"
    named = "Last-Event-ID" if last_event_id_header else "last_event_id"  # the header or the query, as sent
    rules.check_event_id(after, named)
    events = await core.events(owner, job_id, after, idle_s=core.settings.sse_keepalive_s)  # 404 before the stream
    return StreamingResponse(
        sse_stream(events, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
