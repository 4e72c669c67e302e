"""POST /v1/generations: submit a text-to-image job."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.deps import CoreDep, OwnerDep
from services.core.schemas import GenerationCreate, Job

router = APIRouter(prefix="/v1", tags=["generations"])


@router.post("/generations", status_code=202, response_model=Job)
async def create_generation(body: GenerationCreate, core: CoreDep, owner: OwnerDep) -> dict:
    return (await core.submit_generation(owner, body)).view()
