"""POST /v1/trajectories: forward noising, reverse denoising, guidance sweeps."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.deps import CoreDep, IdempotencyKey, OwnerDep, submitted
from services.api.errors import documented
from services.api.routers.generations import REPLAY
from services.core.schemas import Job, TrajectoryCreate

router = APIRouter(prefix="/v1", tags=["trajectories"])


@router.post(
    "/trajectories",
    status_code=202,
    response_model=Job,
    responses={200: {"model": Job, "description": REPLAY}} | documented(401, 409, 413, 422, 429, 503),
)
async def create_trajectory(
    body: TrajectoryCreate, core: CoreDep, owner: OwnerDep, idempotency_key: IdempotencyKey = None
):
    return submitted(await core.submit_trajectory(owner, body, idempotency_key))
