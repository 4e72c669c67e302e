"""POST /v1/images/generations: OpenAI Images API compatible and synchronous (waits for the job, on the
event loop, without holding a thread)."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from services.api.deps import CoreDep, IdempotencyKey, OwnerDep
from services.core.schemas import OpenAIImageRequest

router = APIRouter(prefix="/v1/images", tags=["openai"])


@router.post("/generations")
async def openai_generate(
    body: OpenAIImageRequest, request: Request, core: CoreDep, owner: OwnerDep, idempotency_key: IdempotencyKey = None
) -> dict:
    job = await core.submit_openai(owner, body, idempotency_key)  # a retry with its key waits for the first job
    job = await core.wait(owner, job.id, core.settings.openai_timeout_s)
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(blob).decode()} for blob in await core.blobs(job)]
    else:
        base = str(request.base_url).rstrip("/")
        data = [{"url": base + url} for url in job.view()["images"]]
    return {"created": int(job.created_at), "data": data}
