"""Shared dependencies as Annotated aliases: the application core and the caller's identity.

Both are `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
for what is a dictionary lookup and one SHA-256."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse

from services.common.jobs import JobRecord
from services.core import Core


async def get_core(request: Request) -> Core:
    return request.app.state.core


async def get_owner(request: Request) -> str:
    """The caller's key hash (the owner of the jobs it makes); anonymous when no keys are configured."""
    return request.app.state.core.authenticate(request.headers.get("authorization"))


CoreDep = Annotated[Core, Depends(get_core)]
OwnerDep = Annotated[str, Depends(get_owner)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Makes a retry safe: the same key with the same body within the result TTL (an hour by "
        "default) answers 200 with the job the first request made, not a new job; the same key with another "
        "body is 409. Scoped to the API key; 1 to 255 printable ASCII characters.",
    ),
]


# The header a replay (the same Idempotency-Key and body) is answered with, on every route that submits
REPLAYED_HEADER = "Idempotent-Replayed"


def submitted(job: JobRecord) -> dict | JSONResponse:
    """202 with a new job; 200 with the job an earlier request with the same Idempotency-Key made."""
    if job.replayed:
        return JSONResponse(job.view(), status_code=200, headers={REPLAYED_HEADER: "true"})
    return job.view()
