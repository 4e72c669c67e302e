"""POST /v1/generations: submit a text-to-image job."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.deps import CoreDep, IdempotencyKey, OwnerDep, submitted
from services.api.errors import documented
from services.core.schemas import GenerationCreate, Job

router = APIRouter(prefix="/v1", tags=["generations"])
REPLAY = "The job an earlier request with the same Idempotency-Key and body made (header Idempotent-Replayed)."


@router.post(
    "/generations",
    status_code=202,
    response_model=Job,
    responses={200: {"model": Job, "description": REPLAY}} | documented(401, 409, 413, 422, 429, 503),
)
async def create_generation(
    body: GenerationCreate, core: CoreDep, owner: OwnerDep, idempotency_key: IdempotencyKey = None
):
    return submitted(await core.submit_generation(owner, body, idempotency_key))
