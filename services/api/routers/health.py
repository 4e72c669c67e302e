"""/livez: the process answers. /readyz: Redis answers and a live worker serves a model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.api import metrics
from services.api.deps import SettingsDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/livez")
def livez() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    try:
        store.redis.ping()
        live = metrics.count_live_workers(store.redis, settings.worker_stale_after_s)
    except Exception as error:  # noqa: BLE001 - readiness reports, never raises
        return JSONResponse({"status": "unavailable", "redis": False, "reason": str(error)}, status_code=503)
    serving = {m: n for m, n in live.items() if n > 0}
    if not serving:
        return JSONResponse({"status": "unavailable", "redis": True, "workers": {}}, status_code=503)
    return JSONResponse({"status": "ready", "redis": True, "workers": serving})
