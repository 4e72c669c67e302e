"""GET /v1/models: the models that a live worker serves."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.deps import CoreDep, OwnerDep
from services.api.errors import documented

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", responses=documented(401, 503))
async def list_models(core: CoreDep, _owner: OwnerDep) -> dict:
    data = [served.view() for served in await core.live_models()]
    return {"object": "list", "data": data, "models": data}
