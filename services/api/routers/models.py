"""GET /v1/models and GET /v1/models/{name}: the models that a live worker serves."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.deps import CoreDep, OwnerDep
from services.api.errors import documented
from services.common.errors import NotFound, shown

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", responses=documented(401, 503))
async def list_models(core: CoreDep, _owner: OwnerDep) -> dict:
    data = [served.view() for served in await core.live_models()]
    return {"object": "list", "data": data, "models": data}


@router.get("/models/{name}", responses=documented(401, 404, 422, 503))
async def get_model(name: str, core: CoreDep, _owner: OwnerDep) -> dict:
    """One model a live worker serves, as GET /v1/models lists it (OpenAI's models.retrieve)."""
    served = {model.info.name: model for model in await core.live_models()}
    if name not in served:
        raise NotFound(f"no model {shown(name)} is served now; served models: {', '.join(served) or 'none'}", "name")
    return served[name].view()
