"""POST /v1/images/generations and POST /v1/images/edits: OpenAI Images API compatible and synchronous (wait
for the job, on the event loop, without holding a thread). Edits come as multipart/form-data: the files
`image` (and `mask`), the other fields as form fields."""

from __future__ import annotations

import asyncio
import base64
import contextlib

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile

from services.api.deps import REPLAYED_HEADER, CoreDep, IdempotencyKey, OwnerDep
from services.api.errors import documented, mark_queued
from services.common.errors import InvalidInput, ServiceError
from services.common.jobs import JobRecord
from services.core import Core
from services.core.schemas import OpenAIImageEditRequest, OpenAIImageRequest
from services.core.validation import parse

router = APIRouter(prefix="/v1/images", tags=["openai"])
DISCONNECT_POLL_S = 0.5  # how often a synchronous call looks whether its caller is still there
# as POST /v1/generations answers a retry with its Idempotency-Key (deps.submitted)
REPLAYED = {
    REPLAYED_HEADER: {
        "description": "true: the answer of an earlier request with the same Idempotency-Key and body.",
        "schema": {"type": "string"},
    }
}


@router.post(
    "/generations",
    responses={200: {"headers": REPLAYED}} | documented(401, 409, 413, 422, 429, 503, 500),
)
async def openai_generate(
    body: OpenAIImageRequest,
    request: Request,
    response: Response,
    core: CoreDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKey = None,
) -> dict:
    job = await core.submit_openai(owner, body, idempotency_key)  # a retry with its key waits for the first job
    return await _images_response(core, owner, job, body.response_format, request, response, idempotency_key)


async def _images_response(
    core: Core,
    owner: str,
    job: JobRecord,
    response_format: str,
    request: Request,
    response: Response,
    idempotency_key: str | None,
) -> dict:
    """Wait for the queued (or, on a retry, the earlier) job and answer its images."""
    mark_queued(request)
    if job.replayed:  # said before the wait: the record it returns is read afresh, without the mark
        response.headers[REPLAYED_HEADER] = "true"
    job = await _wait_while_connected(core, owner, job.id, request, keep=idempotency_key is not None)
    if response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(blob).decode()} for blob in await core.blobs(job)]
    else:
        base = core.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        data = [{"url": base + url} for url in job.view()["images"]]
    return {"created": int(job.created_at), "data": data}


class ClientGone(ServiceError):
    """The caller of a synchronous call closed its connection before the answer (nobody reads this one)."""

    status_code = 499  # nginx's "client closed request", as the request metrics count it
    error_type = "client_closed_request"


async def _wait_while_connected(core: Core, owner: str, job_id: str, request: Request, keep: bool) -> JobRecord:
    """core.wait for the job, unless its caller goes away first. Then the job is cancelled, since nobody is left to
    take its images, unless the call carried an Idempotency-Key (`keep`): its retry comes back for that job."""
    waiting = asyncio.ensure_future(core.wait(owner, job_id, core.settings.openai_timeout_s))
    try:
        while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                if not keep:
                    with contextlib.suppress(ServiceError):  # it may have ended meanwhile
                        await core.cancel(owner, job_id)
                raise ClientGone(f"the caller of job {job_id} went away; {'kept' if keep else 'cancelled'} it", None)
        return waiting.result()
    finally:
        waiting.cancel()


FILE_FIELDS = {"image": ("image", "image[]"), "mask": ("mask",)}  # the openai client sends a list as image[]
EDIT_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "PNG or JPEG to edit."},
                        "mask": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG of the image's size: transparent (alpha 0) where the image is to be "
                            "edited; a mask without alpha: white. Without one, the image's own transparent pixels, "
                            "or (an opaque image) the whole image at `strength`.",
                        },
                        **OpenAIImageEditRequest.model_json_schema()["properties"],
                    },
                }
            }
        },
    }
}


async def _file(form, name: str) -> bytes | None:
    """The bytes of file field `name` (a plain text field is refused naming it), or None when absent."""
    values = [v for key in FILE_FIELDS[name] for v in form.getlist(key)]
    if not values:
        return None
    if len(values) > 1:
        raise InvalidInput(f"{name}: send one file, got {len(values)}", name)
    if not isinstance(values[0], UploadFile):
        raise InvalidInput(f"{name} must be a file part (a PNG or JPEG picture), got a text field", name)
    return await values[0].read()


def _text_fields(form) -> dict[str, str]:
    """The form's text fields, each sent once: a field sent twice is refused naming it (which one was meant?)."""
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            continue
        if key in fields:
            raise InvalidInput(f"{key}: send it once, got {len(form.getlist(key))} values", key)
        fields[key] = value
    return fields


@router.post(
    "/edits",
    openapi_extra=EDIT_FORM,
    responses={200: {"headers": REPLAYED}} | documented(401, 409, 413, 422, 429, 503, 500),
)
async def openai_edit(
    request: Request, response: Response, core: CoreDep, owner: OwnerDep, idempotency_key: IdempotencyKey = None
) -> dict:
    """Image to image and inpainting, the OpenAI way (`client.images.edit(image=..., mask=..., prompt=...)`)."""
    async with request.form() as form:
        image = await _file(form, "image")
        mask = await _file(form, "mask")
        fields = _text_fields(form)
    if image is None:
        raise InvalidInput("image is required: a PNG or JPEG file part", "image")
    body = parse(OpenAIImageEditRequest, fields, core.caps)
    job = await core.submit_openai_edit(owner, body, image, mask, idempotency_key)
    return await _images_response(core, owner, job, body.response_format, request, response, idempotency_key)
