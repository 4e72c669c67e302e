"""POST /v1/images/generations: OpenAI Images API compatible and synchronous (waits for the job)."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request

from services.api import submit
from services.api.deps import CeleryDep, OwnerDep, SettingsDep, StoreDep
from services.common.errors import InvalidInput, ServiceError, Unavailable
from services.common.jobstore import TERMINAL
from services.common.schemas import OpenAIImageRequest

router = APIRouter(prefix="/v1/images", tags=["openai"])


class JobFailed(ServiceError):
    status_code = 500
    error_type = "server_error"


@router.post("/generations")
def openai_generate(
    body: OpenAIImageRequest,
    request: Request,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> dict:
    model = submit.resolve_model(store, settings, body.model)
    width = height = None
    if body.size:
        width, height = (int(v) for v in body.size.split("x"))
    try:
        width, height = submit.check_size(model, width, height)
    except InvalidInput as error:
        raise InvalidInput(f"size: {error.message}", "size") from None
    submit.check_steps(model, body.num_inference_steps)
    submit.check_images(settings, "n", body.n)
    submit.check_prompt(model, "prompt", body.prompt)
    submit.check_prompt(model, "negative_prompt", body.negative_prompt)
    params = dict(
        model=model["name"],
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        eta=body.eta,
        seed=submit.resolve_seed(body.seed),
        width=width,
        height=height,
        num_images=body.n,
        output_format=body.output_format,
        preview_every=0,
    )
    job = submit.enqueue(store, celery, settings, kind="generation", model=model["name"], owner=owner, params=params)
    deadline, after = time.monotonic() + settings.openai_timeout_s, "0"
    while time.monotonic() < deadline:
        entries = store.read_events(job["id"], after, block_ms=1000)
        if entries:
            after = entries[-1][0]
            if any(name in TERMINAL for _, name, _ in entries):
                break
    job = store.get(job["id"])
    if job["status"] != "succeeded":
        if job["status"] not in TERMINAL:
            store.cancel(job["id"], job["model"])
            raise Unavailable(f"job {job['id']} did not finish within {settings.openai_timeout_s:g} s", None)
        message = (job.get("error") or {}).get("message", job["status"])
        raise JobFailed(f"job {job['id']} {job['status']}: {message}", (job.get("error") or {}).get("param"))
    data = []
    for index, name in enumerate(job["images"]):
        if body.response_format == "b64_json":
            data.append({"b64_json": base64.b64encode(store.blob(job["id"], name)).decode()})
        else:
            data.append({"url": str(request.base_url).rstrip("/") + f"/v1/jobs/{job['id']}/images/{index}"})
    return {"created": int(job["created_at"]), "data": data}
