"""/livez: the process answers. /readyz: Redis answers and a live worker serves a model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.api.deps import CoreDep

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        503: {
            "description": "Not ready: Redis unreachable or full, or no live worker serves a model; the body says "
            "which (the same shape as the 200).",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def readyz(core: CoreDep) -> JSONResponse:
    readiness = await core.readiness()
    return JSONResponse(readiness, status_code=200 if readiness["status"] == "ready" else 503)
