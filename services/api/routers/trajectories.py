"""POST /v1/trajectories: forward noising, reverse denoising, guidance sweeps."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.deps import CoreDep, OwnerDep
from services.core.schemas import Job, TrajectoryCreate

router = APIRouter(prefix="/v1", tags=["trajectories"])


@router.post("/trajectories", status_code=202, response_model=Job)
async def create_trajectory(body: TrajectoryCreate, core: CoreDep, owner: OwnerDep) -> dict:
    return (await core.submit_trajectory(owner, body)).view()
