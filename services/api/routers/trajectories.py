"""POST /v1/trajectories: forward noising, reverse denoising, guidance sweeps."""

from __future__ import annotations

from fastapi import APIRouter

from services.api import submit
from services.api.deps import CeleryDep, OwnerDep, SettingsDep, StoreDep
from services.common.errors import InvalidInput
from services.common.schemas import MAX_GUIDANCE, Job, TrajectoryCreate

router = APIRouter(prefix="/v1", tags=["trajectories"])


@router.post("/trajectories", status_code=202, response_model=Job)
def create_trajectory(
    body: TrajectoryCreate, store: StoreDep, celery: CeleryDep, settings: SettingsDep, owner: OwnerDep
) -> dict:
    model = submit.resolve_model(store, settings, body.model)
    width, height = submit.check_size(model, body.width, body.height)
    submit.check_steps(model, body.num_inference_steps)
    params = body.model_dump()
    if body.kind == "forward":
        if body.image is None and body.prompt is None:
            raise InvalidInput("a forward trajectory needs an image or a prompt", "image")
        if body.image is not None:
            submit.check_image(body.image)
        T = model["num_train_timesteps"]
        timesteps = body.timesteps if body.timesteps is not None else sorted({min(t, T) for t in range(0, 1001, 50)})
        if not timesteps:
            raise InvalidInput(f"timesteps must hold at least one t between 0 and {T}", "timesteps")
        submit.check_timesteps(model, timesteps)
        params["timesteps"] = timesteps
    elif body.prompt is None:
        raise InvalidInput(f"a {body.kind} trajectory needs a prompt", "prompt")
    if body.kind == "reverse" and body.trajectory_every > body.num_inference_steps:
        raise InvalidInput(
            f"trajectory_every must be between 1 and num_inference_steps ({body.num_inference_steps}), "
            f"got {body.trajectory_every}",
            "trajectory_every",
        )
    for index, scale in enumerate(body.guidance_scales):
        if not 0 <= scale <= MAX_GUIDANCE:
            raise InvalidInput(
                f"guidance_scales must each be between 0 and {MAX_GUIDANCE:g}, got {scale}", f"guidance_scales.{index}"
            )
    submit.check_prompt(model, "prompt", body.prompt)
    submit.check_prompt(model, "negative_prompt", body.negative_prompt)
    params.pop("image", None)
    params.update(
        model=model["name"],
        seed=submit.resolve_seed(body.seed),
        width=width,
        height=height,
        has_image=body.image is not None,
    )
    job = submit.enqueue(
        store, celery, settings, kind=body.kind, model=model["name"], owner=owner, params=params, input_image=body.image
    )
    return submit.job_view(job)
