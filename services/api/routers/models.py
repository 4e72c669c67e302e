"""GET /v1/models: the models that a live worker serves."""

from __future__ import annotations

from fastapi import APIRouter

from services.api import metrics
from services.api.deps import OwnerDep, SettingsDep, StoreDep

router = APIRouter(prefix="/v1", tags=["models"])
PUBLIC_FIELDS = (
    "name",
    "native_width",
    "native_height",
    "scheduler",
    "max_prompt_tokens",
    "num_train_timesteps",
    "size_multiple",
)


@router.get("/models")
def list_models(store: StoreDep, settings: SettingsDep, _owner: OwnerDep) -> dict:
    live = metrics.count_live_workers(store.redis, settings.worker_stale_after_s)
    data = [
        dict({k: info[k] for k in PUBLIC_FIELDS}, id=name, object="model", workers=live.get(name, 0))
        for name, info in sorted(store.models().items())
        if live.get(name, 0) > 0
    ]
    return {"object": "list", "data": data, "models": data}
