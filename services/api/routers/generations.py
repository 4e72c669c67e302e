"""POST /v1/generations: submit a text-to-image job."""

from __future__ import annotations

from fastapi import APIRouter

from services.api import submit
from services.api.deps import CeleryDep, OwnerDep, SettingsDep, StoreDep
from services.common.schemas import GenerationCreate, Job

router = APIRouter(prefix="/v1", tags=["generations"])


@router.post("/generations", status_code=202, response_model=Job)
def create_generation(
    body: GenerationCreate, store: StoreDep, celery: CeleryDep, settings: SettingsDep, owner: OwnerDep
) -> dict:
    model = submit.resolve_model(store, settings, body.model)
    width, height = submit.check_size(model, body.width, body.height)
    submit.check_steps(model, body.num_inference_steps)
    submit.check_images(settings, "num_images", body.num_images)
    submit.check_prompt(model, "prompt", body.prompt)
    submit.check_prompt(model, "negative_prompt", body.negative_prompt)
    if body.preview_every > body.num_inference_steps:
        raise submit.InvalidInput(
            f"preview_every must be between 0 and num_inference_steps ({body.num_inference_steps}), "
            f"got {body.preview_every}",
            "preview_every",
        )
    params = body.model_dump()
    params.update(model=model["name"], seed=submit.resolve_seed(body.seed), width=width, height=height)
    job = submit.enqueue(store, celery, settings, kind="generation", model=model["name"], owner=owner, params=params)
    return submit.job_view(job)
