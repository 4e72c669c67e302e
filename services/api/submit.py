"""From a validated request body to a queued job: resolve the model and defaults, check the limits that
depend on the model (size, prompt tokens, timesteps), bound the queue, write the job, send the task by name."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import secrets
import uuid
from functools import lru_cache

from celery import Celery

from services.api import metrics
from services.common.errors import InvalidInput, NotFound, QueueFull, Unavailable
from services.common.jobstore import JobStore
from services.common.settings import Settings
from services.common.tasks import GENERATE_TASK, TRAJECTORY_TASK, queue_for

log = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def _tokenizer(path: str):
    """The model's own CLIP tokenizer (transformers' tokenizer needs no torch), or None if unreadable here."""
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - the folder lives on the worker's disk only
        log.warning("cannot load tokenizer from %s (%s); prompt length checked by the worker", path, error)
        return None


def resolve_model(store: JobStore, settings: Settings, name: str | None) -> dict:
    models = store.models()
    if name:
        if name not in models:
            known = ", ".join(sorted(models)) or "none yet"
            raise NotFound(f"unknown model {name!r}; served models: {known}", "model")
        return models[name]
    default = settings.default_model
    if default and default in models:
        return models[default]
    if not models:
        metrics.record_rejection("no_worker")
        raise Unavailable("no model is served yet: start a worker", "model")
    if len(models) == 1:
        return next(iter(models.values()))
    live = metrics.count_live_workers(store.redis, settings.worker_stale_after_s)
    return models[max(sorted(models), key=lambda m: live.get(m, 0))]


def check_size(model: dict, width: int | None, height: int | None) -> tuple[int, int]:
    multiple, sizes = model["size_multiple"], {}
    for field, value, native in (("width", width, model["native_width"]), ("height", height, model["native_height"])):
        value = native if value is None else value
        if value % multiple or not multiple <= value <= 2 * native:
            raise InvalidInput(
                f"{field} must be a multiple of {multiple} between {multiple} and {2 * native}, got {value}", field
            )
        sizes[field] = value
    return sizes["width"], sizes["height"]


def check_prompt(model: dict, field: str, text: str | None) -> None:
    if not text:
        return
    tokenizer = _tokenizer(model.get("tokenizer_path", ""))
    if tokenizer is None:
        return
    tokens = len(tokenizer(text, truncation=False).input_ids)
    limit = model["max_prompt_tokens"]
    if tokens > limit:
        raise InvalidInput(
            f"{field} is {tokens} tokens long; the model takes at most {limit} (start and end tokens included)", field
        )


def check_steps(model: dict, value: int) -> None:
    """The schema allows 1..1000; the model's scheduler may allow fewer (leading spacing with an offset)."""
    limit = model.get("max_inference_steps", model["num_train_timesteps"])
    if not 1 <= value <= limit:
        raise InvalidInput(
            f"num_inference_steps must be between 1 and {limit} for model {model['name']!r}, got {value}",
            "num_inference_steps",
        )


def check_images(settings: Settings, field: str, value: int) -> None:
    if not 1 <= value <= settings.max_num_images:
        raise InvalidInput(f"{field} must be between 1 and {settings.max_num_images}, got {value}", field)


def check_timesteps(model: dict, timesteps: list[int]) -> None:
    T = model["num_train_timesteps"]
    for index, t in enumerate(timesteps):
        if not 0 <= t <= T:
            raise InvalidInput(f"timesteps must each be between 0 and {T}, got {t}", f"timesteps.{index}")


def check_image(data: str) -> None:
    from PIL import Image

    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise ValueError(f"format {image.format}")
            image.verify()
    except (binascii.Error, ValueError, OSError) as error:
        raise InvalidInput(f"image must be a base64-encoded PNG or JPEG picture ({error})", "image") from None


def resolve_seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else seed


def enqueue(
    store: JobStore,
    celery: Celery,
    settings: Settings,
    *,
    kind: str,
    model: str,
    owner: str,
    params: dict,
    input_image: str | None = None,
) -> dict:
    full = store.pending_count(model) >= settings.max_queue_per_model
    if full and store.sweep_pending(model):  # ids of jobs that expired unfinished held some of the slots
        full = store.pending_count(model) >= settings.max_queue_per_model
    if full:
        metrics.record_rejection("queue_full")
        raise QueueFull(
            f"the queue of model {model!r} is full ({settings.max_queue_per_model} jobs); retry later",
            None,
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    job_id = uuid.uuid4().hex
    if input_image is not None:  # the upload rides in Redis next to the job, not in the Celery message
        store.redis.set(f"latentd:job:{job_id}:blob:input", input_image, ex=store.ttl_s)
    job = store.create(job_id, kind=kind, model=model, owner=owner, params=params)
    task = GENERATE_TASK if kind == "generation" else TRAJECTORY_TASK
    celery.send_task(task, args=[job_id], queue=queue_for(model))
    metrics.record_submission(kind, model)
    return job


def job_view(job: dict) -> dict:
    """The public job: URLs for images and frames, never the owner."""
    base = f"/v1/jobs/{job['id']}"
    view = {k: v for k, v in job.items() if k not in ("owner", "cancel")}
    view["images"] = [f"{base}/images/{i}" for i in range(len(job["images"] or []))]
    view["frames"] = [
        dict({k: v for k, v in meta.items() if k != "blob"}, url=f"{base}/frames/{i}")
        for i, meta in enumerate(job["frames"] or [])
    ]
    return view
