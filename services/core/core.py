"""The application core: everything a door does, with no HTTP and no gRPC in it.

    core = await Core.open(settings)
    owner = core.authenticate(authorization_header)
    job = await core.submit_generation(owner, GenerationCreate(prompt="a red circle"))
    async for event in core.follow(owner, job.id, after="0"):
        ...

The REST routers, the OpenAI route and the gRPC servicer are thin adapters over one Core: they translate
their transport's request into a call here and the result (a JobRecord, a JobEvent, a ServiceError) back.
The Core resolves the model and defaults, checks every rule (services/common/rules.py), writes the job
(services/common/jobstore.py), sends its Celery task by name, and follows its events (events.EventHub).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from functools import lru_cache
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from celery import Celery
from pydantic import BaseModel

from services.common import rules, workers
from services.common.errors import (
    Conflict,
    InvalidInput,
    JobFailed,
    NotFound,
    RateLimited,
    ServiceError,
    Unauthorized,
    Unavailable,
    shown,
)
from services.common.jobs import JobEvent, JobRecord
from services.common.jobstore import (
    AsyncJobStore,
    IdempotencyConflict,
    NotInHistory,
    QueueFull,
    frame_blob_name,
    pool_exhausted,
    reconnect_once,
    redis_full,
)
from services.common.models import ModelInfo, ServedModel
from services.common.settings import Settings, hash_key
from services.common.tasks import RUN_TASK, queue_for
from services.core import metrics
from services.core.events import EventHub
from services.core.schemas import (
    GenerationCreate,
    JobImage,
    OpenAIImageEditRequest,
    OpenAIImageRequest,
    TrajectoryCreate,
)
from services.core.validation import parse
from services.core.webhooks import WebhookSender

log = logging.getLogger(__name__)
T = TypeVar("T")
ANONYMOUS = "anonymous"
MAX_IDEMPOTENCY_KEY = 255
Picture = tuple[bytes, tuple[int, int]]  # a request's picture: its bytes (PNG or JPEG) and (width, height)
IDEMPOTENCY_PARAM = "Idempotency-Key"
ARTIFACT_KINDS = ("image", "frame")


TOKENIZER_CLASSES = ("CLIPTokenizer", "T5TokenizerFast")
# params a job shows only where set (the tokenizers above are those whose limits models publish)
FAMILY_ONLY_PARAMS = ("true_cfg_scale", *rules.SIZE_CONDITIONING_PARAMS, "strength")
# A request's fields that are not among its params as sent: the pictures (stored beside the job), and the job's own
# fields (its webhook); and those the generation rules do not check besides (the model, chosen before; the format).
NOT_PARAMS = frozenset({"image", "mask", *rules.JOB_FIELDS})
NOT_RESOLVED = NOT_PARAMS | {"model", "output_format"}


@lru_cache(maxsize=16)
def _token_counter(path: str, class_name: str = "CLIPTokenizer") -> Callable[[str], int] | None:
    """The model's own tokenizer (CLIP's, or T5's for SD3 and Flux: transformers' tokenizers need no torch), or
    None where its folder is not on this machine (then the worker's engine counts tokens and fails the job with
    the same message)."""
    try:
        import transformers

        if class_name not in TOKENIZER_CLASSES:
            raise ValueError(f"unknown tokenizer class {class_name!r}")
        tokenizer = getattr(transformers, class_name).from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - the folder may live on the worker's disk only
        log.warning("cannot load tokenizer from %s (%s); prompt length checked by the worker", path, error)
        return None
    return lambda text: len(tokenizer(text, truncation=False).input_ids)


def _params(params: dict[str, Any]) -> dict[str, Any]:
    """A job's resolved params, without the fields of other families left unset (both doors show the same)."""
    return {k: v for k, v in params.items() if not (k in FAMILY_ONLY_PARAMS and v is None)}


def decode_image(data: str | bytes, param: str = "image", formats: tuple[str, ...] = ("PNG", "JPEG")) -> bytes:
    """A PNG or JPEG picture, from bytes or base64 (a data: URL is accepted); InvalidInput otherwise."""
    from PIL import Image

    sent_as = "a base64-encoded" if isinstance(data, str) else "a"
    try:
        if isinstance(data, str):
            payload = data.split(",", 1)[1] if data.startswith("data:") else data
            data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in formats:
                raise ValueError(f"format {image.format}")
            image.verify()
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as error:
        raise InvalidInput(f"{param} must be {sent_as} PNG or JPEG picture ({_why(error)})", param) from None
    return data


def _why(error: Exception) -> str:
    """What PIL or base64 says is wrong with a picture, without the in-memory file PIL names in its words."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not a picture file that can be read"
    return str(error)


def picture_size(data: bytes, param: str = "image") -> tuple[int, int]:
    """(width, height) of a decoded picture, its pixels read in full where the size is one any model could take
    (a truncated file fails here, naming the field, not in the worker); a larger one is left to the size rule."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if max(size) <= rules.MAX_SIDE:
                image.load()
    except (ValueError, OSError, Image.DecompressionBombError) as error:
        raise InvalidInput(f"{param} could not be decoded ({error})", param) from None
    return size


def read_picture(data: str | bytes, param: str, formats: tuple[str, ...] = ("PNG", "JPEG")) -> Picture:
    """(bytes, size) of a picture sent as bytes or base64; InvalidInput naming `param` for anything else."""
    data = decode_image(data, param, formats)
    return data, picture_size(data, param)


def openai_edit_inputs(image: bytes, mask: bytes | None) -> tuple[Picture, Picture | None]:
    """An OpenAI edit's upload as latentd's (image, mask) pictures (openai_edit_pictures), each checked and sized;
    pictures too large for any model are left as sent, for the size rule to refuse them undecoded."""
    image_in = read_picture(image, "image")
    mask_in = read_picture(mask, "mask") if mask is not None else None
    if max(max(p[1]) for p in (image_in, mask_in) if p is not None) > rules.MAX_SIDE:
        return image_in, mask_in
    image_out, mask_out = openai_edit_pictures(image_in[0], mask_in and mask_in[0])
    if mask_out is None:
        return (image_out, image_in[1]), None
    # a mask made from the image's own alpha has the image's size
    return (image_out, image_in[1]), (mask_out, mask_in[1] if mask_in is not None else image_in[1])


def _sizes(image: Picture | None, mask: Picture | None) -> dict:
    """The pictures' sizes as rules.check_generation takes them."""
    return {"image_size": image and image[1], "mask_size": mask and mask[1]}


def _set_away_from_default(body: BaseModel, fields: Iterable[str]) -> list[str]:
    """Those of `fields` the request set to something other than their default (a client may send defaults)."""
    return [
        name
        for name in fields
        if getattr(body, name) != type(body).model_fields[name].get_default(call_default_factory=True)
    ]


def _image_params(body: GenerationCreate, image, mask) -> dict[str, Any]:
    """What a job's params say about its pictures (the bytes are not in them): only where it has one."""
    if image is None:
        return {}
    params: dict[str, Any] = {"has_image": True, "has_mask": mask is not None}
    for name in ("image", "mask"):
        value = getattr(body, name)
        if isinstance(value, JobImage):
            params[f"{name}_from"] = value.model_dump()
    return params


def openai_edit_pictures(image: bytes, mask: bytes | None) -> tuple[bytes, bytes | None]:
    """An OpenAI edit's picture and mask in latentd's terms: (RGB PNG, mask PNG with white = repaint, or None).
    OpenAI marks what to edit by transparency: the mask's alpha 0 (a mask without alpha: white, as latentd's),
    or without a mask the image's own alpha 0; an opaque image without a mask is re-imagined whole."""
    import numpy as np
    from PIL import Image

    def png(picture: Image.Image) -> bytes:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()

    def transparent(picture: Image.Image) -> Image.Image | None:
        """White where fully transparent (L), or None for a picture without alpha."""
        if picture.mode not in ("RGBA", "LA", "PA") and "transparency" not in picture.info:
            return None
        alpha = np.asarray(picture.convert("RGBA"))[..., 3]
        return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")

    with Image.open(io.BytesIO(image)) as picture:
        from_alpha = transparent(picture) if mask is None else None
        rgb = png(picture.convert("RGB"))
    if from_alpha is not None and np.asarray(from_alpha).any():
        return rgb, png(from_alpha)
    if mask is None:
        return rgb, None
    with Image.open(io.BytesIO(mask)) as picture:
        marked = transparent(picture)
        return rgb, png(marked if marked is not None else picture.convert("L"))


def translate_redis_errors(error: redis.exceptions.RedisError, retry_after_s: float) -> Unavailable:
    """The 503 a Redis error is answered with, the error chained under it (`__cause__`), so every door counts the
    refusal as Redis's (metrics.redis_refused) whether it raises the 503 or answers it."""
    unavailable = _unavailable(error, retry_after_s)
    unavailable.__cause__ = error
    return unavailable


def _unavailable(error: redis.exceptions.RedisError, retry_after_s: float) -> Unavailable:
    if pool_exhausted(error):
        return Unavailable(
            "the gateway is overloaded: all of its Redis connections stayed busy for LATENTD_REDIS_POOL_WAIT_S; retry",
            None,
            retry_after_s=retry_after_s,
        )
    if redis_full(error):
        return Unavailable(
            "the job store (Redis) is full: at its maxmemory it takes no new job until results expire; retry later",
            None,
            retry_after_s=retry_after_s,
        )
    return Unavailable(f"the job store (Redis) is unreachable: {error}", None, retry_after_s=retry_after_s)


class TaskSender:
    """Sends a job's Celery task by name to its model's queue; the worker's code is never imported here."""

    def __init__(self, settings: Settings):
        self.celery = Celery("latentd-gateway", broker=settings.redis_url)
        self.celery.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
            broker_connection_max_retries=1,
            broker_pool_limit=2,
            # Redis away: give up within about redis_timeout_s, never hang a request (the job is stored already)
            task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
            broker_transport_options={
                "visibility_timeout": settings.visibility_timeout_s,
                "socket_timeout": settings.redis_timeout_s,
                "socket_connect_timeout": settings.redis_timeout_s,
            },
        )

    async def send(self, model: str) -> None:
        """One task per queued job: the worker that gets it takes the model's next job in fair order."""
        # kombu's producer blocks; a thread keeps the event loop free while it writes to Redis
        await asyncio.to_thread(self.celery.send_task, RUN_TASK, args=[model], queue=queue_for(model))

    def close(self) -> None:
        self.celery.close()


class Core:
    def __init__(self, settings: Settings, store: AsyncJobStore, hub: EventHub, tasks: TaskSender):
        self.settings = settings
        images = rules.images_allowed(settings.max_num_images)
        self.caps = {"num_images": images, "n": images}  # bounds of this deployment below the schema's (validation)
        self.store = store
        self.hub = hub
        self.tasks = tasks
        self.key_hashes = settings.key_hashes()
        self.webhooks: WebhookSender | None = None  # started by open(), where settings.webhooks

    @classmethod
    async def open(cls, settings: Settings) -> Core:
        pool = aioredis.BlockingConnectionPool.from_url(  # a request waits for a free connection, never opens more
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_pool_wait_s,  # a connection to free up: load, not Redis away
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,  # the event hub's XREAD blocks 100 ms (EventHub.block_ms)
            health_check_interval=30,
            retry=reconnect_once(for_asyncio=True),  # a connection left from before a Redis restart
        )
        client = aioredis.Redis(connection_pool=pool)
        store = AsyncJobStore(client, settings.result_ttl_s)
        core = cls(settings, store, EventHub(store), TaskSender(settings))
        core.hub.start()
        if settings.webhooks:
            core.webhooks = WebhookSender(settings, store)
            core.webhooks.start()
        return core

    async def close(self) -> None:
        await self.hub.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        self.tasks.close()
        await self.store.redis.aclose()

    # ---- identity --------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> str:
        """The caller's key hash (the owner of the jobs it makes) from `Bearer <key>`; anonymous when the
        service runs without keys. Unauthorized for a missing or unknown key."""
        if not self.key_hashes:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", None)
        digest = hash_key(token.strip())
        matched = False
        for stored in self.key_hashes:  # every stored hash, each in constant time
            matched |= hmac.compare_digest(digest, stored)
        if not matched:
            raise Unauthorized("invalid API key", None)
        return digest

    # ---- models ----------------------------------------------------------------------------------
    async def live_models(self) -> list[ServedModel]:
        """Each model a live worker serves, by name, with its workers, queue depth and whether it is the default."""
        models = await self._redis(self.store.models())
        live = await self._live(models)
        served = [name for name in sorted(models) if name in live]
        depth = await self._redis(self.store.queued_counts(served))
        default = self._default(models, live) if models else None
        return [ServedModel(models[n], len(live[n]), depth[n], n == default) for n in served]

    async def resolve_model(self, name: str | None) -> ModelInfo:
        models = await self._redis(self.store.models())
        if name:
            if name not in models:
                known = ", ".join(sorted(models)) or "none yet"
                raise NotFound(f"unknown model {shown(name)}; served models: {known}", "model")
            return models[name]
        if not models:
            metrics.record_rejection("no_worker")
            raise Unavailable(
                "no model is served yet: start a worker", "model", retry_after_s=self.settings.retry_after_s
            )
        live = await self._live(models) if len(models) > 1 else {}
        return models[self._default(models, live)]

    def _default(self, models: dict[str, ModelInfo], live: dict[str, list[str]]) -> str:
        """The model of requests that name none: the setting's, else the only one, else the most served."""
        if self.settings.default_model in models:
            return self.settings.default_model
        return max(sorted(models), key=lambda m: len(live.get(m, ())))

    async def _live(self, models: dict[str, ModelInfo]) -> dict[str, list[str]]:
        stale_s = self.settings.worker_stale_after_s
        return await self._redis(workers.live_workers_async(self.store.redis, models, stale_s))

    def limits(self, model: ModelInfo) -> rules.ModelLimits:
        counter = _token_counter(model.tokenizer_path, model.tokenizer_class) if model.tokenizer_path else None
        return model.limits(counter)

    async def readiness(self) -> dict[str, Any]:
        """ready: Redis answers and a live worker serves some model; with the reason when not."""
        try:
            await self.store.redis.ping()
            live = {served.info.name: served.workers for served in await self.live_models()}
        except (ServiceError, redis.exceptions.RedisError) as error:
            return {"status": "unavailable", "redis": False, "reason": str(error)}
        if not live:
            reason = "no live worker"
            if await self._store_full():  # not why (heartbeats pass a full store), but what else an operator sees
                reason += "; the job store (Redis) is at its maxmemory too, refusing new jobs"
            return {"status": "unavailable", "redis": True, "workers": {}, "reason": reason}
        return {"status": "ready", "redis": True, "workers": live}

    async def _store_full(self) -> bool:
        """Redis at its maxmemory (used_memory past it, where policy noeviction refuses writes)."""
        try:
            memory = await self.store.redis.info("memory")
        except redis.exceptions.RedisError:
            return False
        limit = int(memory.get("maxmemory", 0))
        return 0 < limit <= int(memory.get("used_memory", 0))

    # ---- submitting ------------------------------------------------------------------------------
    async def submit_generation(
        self, owner: str, body: GenerationCreate | dict, idempotency_key: str | None = None
    ) -> JobRecord:
        """Queue a generation. With an `idempotency_key` (Idempotency-Key), a repeat of the same request
        within the result TTL returns the first job (`replayed`); another request with it is a Conflict."""
        body = body if isinstance(body, GenerationCreate) else parse(GenerationCreate, body, self.caps)
        return await self._submit_generation(owner, body, self.idempotency("generation", body, idempotency_key))

    async def _submit_generation(
        self,
        owner: str,
        body: GenerationCreate,
        idempotency: tuple[str, str] | None,
        images_field: str = "num_images",
        pictures: tuple[Picture | None, Picture | None] | None = None,
    ) -> JobRecord:
        """`pictures`: the (image, mask) a door has decoded already; else they are read from `body`."""
        webhook_url = self._webhook_url(body)  # checked before any picture is read and decoded
        model = await self.resolve_model(body.model)
        if pictures is None:
            pictures = (
                await self._input_picture(owner, body.image, "image"),
                await self._input_picture(owner, body.mask, "mask"),
            )
        image, mask = pictures
        fields = body.model_dump(exclude=NOT_RESOLVED)
        resolved = self._resolve(model, fields | _sizes(image, mask), images_field=images_field)
        params = _params(body.model_dump(exclude=NOT_PARAMS) | resolved | _image_params(body, image, mask))
        return await self._enqueue(
            "generation",
            model,
            owner,
            params,
            input_image=image and image[0],
            input_mask=mask and mask[0],
            idempotency=idempotency,
            webhook_url=webhook_url,
        )

    async def _input_picture(self, owner: str, value: str | JobImage | None, param: str) -> Picture | None:
        """(bytes, size) of an uploaded picture (base64), or of an earlier job's image of this caller; None for
        None. InvalidInput naming the field for anything else."""
        if value is None:
            return None
        if isinstance(value, JobImage):
            try:
                source = await self.job(owner, value.job_id)
                if source.status != "succeeded":
                    raise NotFound(
                        f"job {value.job_id} is {source.status}; its images can be used once it has succeeded"
                    )
                data, _ = await self.artifact(owner, value.job_id, "image", value.index)
            except NotFound as error:
                # the part of the reference at fault: its index (no such image), else its job
                part = "index" if error.param == "index" else "job_id"
                raise InvalidInput(f"{param}: {error.message}", f"{param}.{part}") from None
            formats = ("PNG", "JPEG", "WEBP")  # a job's own output may be WebP
        else:
            data, formats = value, ("PNG", "JPEG")
        # decoding a picture of up to the body limit is CPU work: off the event loop, which serves every reader
        return await asyncio.to_thread(read_picture, data, param, formats)

    async def submit_trajectory(
        self, owner: str, body: TrajectoryCreate | dict, idempotency_key: str | None = None
    ) -> JobRecord:
        body = body if isinstance(body, TrajectoryCreate) else parse(TrajectoryCreate, body, self.caps)
        idempotency = self.idempotency("trajectory", body, idempotency_key)
        webhook_url = self._webhook_url(body)  # checked before any picture is read and decoded
        model = await self.resolve_model(body.model)
        kind, image, start, mask, timesteps = body.kind, None, None, None, None
        sent = _set_away_from_default(body, set(TrajectoryCreate.model_fields) - {"kind"})
        rules.check_trajectory_fields(kind, sent, from_image=body.image is not None)
        if kind == "forward":
            if body.image is None and not body.prompt:
                raise InvalidInput("a forward trajectory needs an image or a prompt", "image")
            picture = await self._input_picture(owner, body.image, "image")
            image = picture and picture[0]
            timesteps = rules.default_timesteps(model.num_train_timesteps) if body.timesteps is None else body.timesteps
            timesteps = rules.check_timesteps(model.num_train_timesteps, timesteps)
        elif not body.prompt:
            raise InvalidInput(f"a {kind} trajectory needs a prompt", "prompt")
        else:  # reverse, guidance_sweep: an image is image to image's starting picture
            start = await self._input_picture(owner, body.image, "image")
            mask = await self._input_picture(owner, body.mask, "mask")
            image = start and start[0]
        if kind == "guidance_sweep":
            rules.check_guidance_scales(body.guidance_scales)
        generation = body.model_dump(include=set(GenerationCreate.model_fields) - NOT_RESOLVED)
        resolved = self._resolve(model, generation | {"prompt": body.prompt or ""} | _sizes(start, mask))
        if kind == "reverse":
            runs = rules.steps_run(resolved["num_inference_steps"], resolved["strength"], resolved["sampler"])
            label = rules.steps_run_label(resolved["strength"], resolved["sampler"])
            rules.check_every("trajectory_every", body.trajectory_every, runs, low=1, steps_are=label)
        params = _params(
            body.model_dump(exclude=NOT_PARAMS)
            | resolved
            | {"prompt": body.prompt or "", "timesteps": timesteps, "has_image": image is not None}
            | ({"has_mask": True} if mask is not None else {})
        )
        params = rules.trajectory_params(kind, params, from_image=image is not None)
        return await self._enqueue(
            kind,
            model,
            owner,
            params,
            input_image=image,
            input_mask=mask and mask[0],
            idempotency=idempotency,
            webhook_url=webhook_url,
        )

    async def submit_openai(
        self, owner: str, body: OpenAIImageRequest, idempotency_key: str | None = None
    ) -> JobRecord:
        """The OpenAI Images API's generation, as a generation job (`n` images of `size`)."""
        idempotency = self.idempotency("openai", body, idempotency_key)
        model = await self.resolve_model(body.model)
        width = height = None
        if body.size and body.size != "auto":  # auto: the model's native size, as no size
            width, height = (int(v) for v in body.size.split("x"))
        try:
            width, height = rules.check_size(self.limits(model), width, height)
        except InvalidInput as error:
            raise InvalidInput(f"size: {error.message}", "size") from None
        fields = body.model_dump(include=set(GenerationCreate.model_fields)) | {"width": width, "height": height}
        generation = GenerationCreate(**fields, num_images=body.n)
        return await self._submit_generation(owner, generation, idempotency, images_field="n")

    async def submit_openai_edit(
        self,
        owner: str,
        body: OpenAIImageEditRequest,
        image: bytes,
        mask: bytes | None = None,
        idempotency_key: str | None = None,
    ) -> JobRecord:
        """The OpenAI Images API's edit, as an image-to-image job (`n` images): with a mask, inpainting where the
        mask is transparent (OpenAI's convention; a mask without alpha: where it is white); without one, where the
        image itself is transparent, else the whole picture re-imagined at `strength`."""
        pictures = hashlib.sha256(image).hexdigest() + (hashlib.sha256(mask).hexdigest() if mask else "")
        idempotency = self.idempotency(f"openai_edit:{pictures}", body, idempotency_key)
        image_in, mask_in = await asyncio.to_thread(openai_edit_inputs, image, mask)  # CPU work: off the loop
        size = image_in[1]
        if body.size and body.size != f"{size[0]}x{size[1]}":
            raise InvalidInput(
                f"size must be the image's size ({size[0]}x{size[1]}) or left out, got {body.size!r}", "size"
            )
        generation = GenerationCreate(**body.model_dump(include=set(GenerationCreate.model_fields)), num_images=body.n)
        # decoded and sized above: handed over as they are, not sent round through base64 and decoded again
        pictures = (image_in, mask_in)
        return await self._submit_generation(owner, generation, idempotency, images_field="n", pictures=pictures)

    def _webhook_url(self, body: GenerationCreate | TrajectoryCreate) -> str | None:
        if body.webhook_url is None:
            return None
        return rules.check_webhook_url(body.webhook_url, allow_private=self.settings.webhook_allow_private)

    def _resolve(self, model: ModelInfo, fields: dict[str, Any], images_field: str = "num_images") -> dict[str, Any]:
        """Check a generation's fields against every rule; the values it leaves to the service, filled in."""
        seed = self.resolve_seed(fields.pop("seed", None))
        resolved = rules.check_generation(
            self.limits(model),
            **fields,
            seed=seed,
            max_num_images=self.settings.max_num_images,
            images_field=images_field,
        )
        return {"model": model.name, "seed": seed} | resolved._asdict()

    @staticmethod
    def resolve_seed(seed: int | None) -> int:
        return secrets.randbits(63) if seed is None else seed

    @staticmethod
    def idempotency(endpoint: str, body: BaseModel, key: str | None) -> tuple[str, str] | None:
        """(the client's Idempotency-Key, the request's fingerprint), or None without a key. The fingerprint
        is a hash of the endpoint and the validated request as sent (before a null seed is drawn), so a
        retry matches whichever door it comes in by, and the same fields in another order match too."""
        if key is None:
            return None
        if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
            raise InvalidInput(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters", IDEMPOTENCY_PARAM
            )
        canonical = json.dumps([endpoint, body.model_dump(mode="json")], sort_keys=True, separators=(",", ":"))
        return key, hashlib.sha256(canonical.encode()).hexdigest()

    async def _enqueue(
        self,
        kind: str,
        model: ModelInfo,
        owner: str,
        params: dict,
        input_image: bytes | None = None,
        input_mask: bytes | None = None,
        idempotency: tuple[str, str] | None = None,
        webhook_url: str | None = None,
    ) -> JobRecord:
        settings = self.settings
        job_id = uuid.uuid4().hex
        create = dict(
            kind=kind,
            model=model.name,
            owner=owner,
            params=params,
            input_image=input_image,
            input_mask=input_mask,
            idempotency=idempotency,
            webhook_url=webhook_url,
        )
        limits = dict(max_pending=settings.max_queue_per_model, max_owned=settings.owner_queue_limit)
        try:
            try:
                job = await self._redis(self.store.create(job_id, **create, **limits))
            except QueueFull:
                if not await self._redis(self.store.sweep(model.name, owner)):  # expired ids may hold slots
                    raise
                job = await self._redis(self.store.create(job_id, **create, **limits))
        except QueueFull as full:
            raise self._refusal(full, model) from None
        except IdempotencyConflict as conflict:
            raise Conflict(
                f"Idempotency-Key {idempotency[0]!r} was already used for job {conflict.job_id} with a different "
                "request; a retry must send the same request, a new request needs a new key",
                IDEMPOTENCY_PARAM,
            ) from None
        if job.replayed:
            return job  # its task was sent by the submit that made it
        try:
            await self.tasks.send(model.name)
        except Exception as error:  # noqa: BLE001 - the job is stored and queued: it is accepted all the same
            # Its task is a wake-up call, not the job: the workers' lease keepers top the broker up to one task
            # per queued job every reap_interval_s (services/worker/leases.py), so the job runs once Redis is back.
            log.warning("could not send the task of job %s (%s); the workers' top-up will", job_id, error)
        metrics.record_submission(kind, model.name)
        return job

    def _refusal(self, full: QueueFull, model: ModelInfo) -> RateLimited:
        settings = self.settings
        if full.scope == "model":
            metrics.record_rejection("queue_full")
            message = f"the queue of model {model.name!r} is full ({settings.max_queue_per_model} jobs); retry later"
        else:
            metrics.record_rejection("quota")
            limit = settings.owner_queue_limit
            message = (
                f"this API key already has {limit} {'job' if limit == 1 else 'jobs'} queued or running on model "
                f"{model.name!r}, its share of the model's queue (max_queue_per_key = {limit}); retry when one "
                "of them finishes"
            )
        return RateLimited(message, None, retry_after_s=settings.retry_after_s)

    # ---- reading ---------------------------------------------------------------------------------
    async def job(self, owner: str, job_id: str, *, poll: bool = False) -> JobRecord:
        """The caller's job, or NotFound. `poll`: a client asking for its state (GET /v1/jobs/{id}, GetJob), which
        may be answered from a read of a live job younger than settings.job_poll_max_age_s."""
        max_age_s = self.settings.job_poll_max_age_s if poll else 0.0
        job = await self._redis(self.store.get(job_id, max_age_s)) if job_id else None
        if job is None or job.owner != owner:  # another key's job does not exist for this caller
            raise NotFound(f"no job {shown(job_id)}", "id")
        return job

    async def jobs(
        self,
        owner: str,
        *,
        limit: int = rules.DEFAULT_LIST_LIMIT,
        starting_after: str = "",
        statuses: Iterable[str] = (),
    ) -> tuple[list[JobRecord], str | None]:
        """A page of the caller's jobs of the last result_ttl_s, newest first, after the job `starting_after` (empty:
        from the newest), only those with one of `statuses` if any are given; and the job id the next page starts
        after (None: no more). A page with a filter may hold fewer than `limit` jobs and still have a next one (it
        read its share of the history: rules.LIST_SCAN)."""
        rules.between("limit", limit, 1, rules.MAX_LIST_LIMIT, integer=True)
        statuses = rules.check_statuses(statuses)
        page = self.store.history(
            owner, limit=limit, starting_after=starting_after, statuses=statuses, scan=rules.LIST_SCAN
        )
        try:
            return await self._redis(page)
        except NotInHistory:
            raise InvalidInput(
                f"starting_after must be the id of one of this API key's jobs of the last {self.settings.result_ttl_s} "
                f"s (a page's next_starting_after), got {shown(starting_after)}; leave it out to start from the newest",
                "starting_after",
            ) from None

    async def cancel(self, owner: str, job_id: str) -> JobRecord:
        job = await self.job(owner, job_id)
        outcome = await self._redis(self.store.cancel(job))
        if outcome == "cancelled" and job.status == "queued":  # ended here, never reaching a worker
            metrics.record_queued_cancellation(job.model)
        if outcome in ("succeeded", "failed"):
            raise Conflict(f"job {job_id} already {outcome}; only queued or running jobs can be cancelled", "id")
        return await self.job(owner, job_id)

    async def artifact(self, owner: str, job_id: str, kind: str, index: int) -> tuple[bytes, str]:
        """(bytes, media type) of image or frame `index`. A reverse trajectory's frames answer while it runs,
        as soon as their `frame` event is out, and stay after a cancel or failure (until the job expires); the
        others once the job has succeeded."""
        if kind not in ARTIFACT_KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(ARTIFACT_KINDS)}, got {shown(kind)}", "kind")
        rules.between("index", index, 0, 10**6, integer=True)
        job = await self.job(owner, job_id)
        names = job.images if kind == "image" else [frame["blob"] for frame in job.frames]
        media_type = job.media_type if kind == "image" else "image/png"
        if kind == "frame" and job.status != "succeeded" and index >= len(names):
            # stored as it streams, before the job's record lists it (that happens when the job succeeds)
            data = await self._redis(self.store.blob(job_id, frame_blob_name(job.attempt, index)))
            if data is not None:
                return data, media_type
            if job.status in ("queued", "running"):
                raise NotFound(
                    f"job {job_id} has no frame {index} yet: a frame is there once its frame event is out", "index"
                )
        if index >= len(names):
            raise NotFound(f"job {job_id} has no {kind} {index} (it has {len(names)})", "index")
        data = await self._redis(self.store.blob(job_id, names[index]))
        if data is None:
            raise NotFound(f"{kind} {index} of job {job_id} has expired", "index")
        return data, media_type

    async def follow(
        self, owner: str, job_id: str, after: str = "0", idle_s: float | None = None
    ) -> AsyncIterator[JobEvent | None]:
        """The job's events after `after`, through its terminal event (None every idle_s without one)."""
        async for batch in await self.events(owner, job_id, after, idle_s):
            if not batch:
                yield None
            for event in batch:
                yield event

    async def events(
        self, owner: str, job_id: str, after: str = "0", idle_s: float | None = None
    ) -> AsyncIterator[list[JobEvent]]:
        """NotFound now, or the job's events in batches (all those at hand each time; [] every idle_s without
        one) from the process's one event reader. The owner is checked once per job and process, not once
        per reader: a thousand readers of one job cost one Redis read, not a thousand."""
        if not job_id or await self._redis(self.hub.owner(job_id)) != owner:
            raise NotFound(f"no job {shown(job_id)}", "id")
        return self.hub.follow_batches(job_id, after, idle_s, owner=owner)

    async def wait(self, owner: str, job_id: str, timeout_s: float) -> JobRecord:
        """Wait (without a thread) for the job to end; the final job, or why there is none: Conflict (it was
        cancelled), InvalidInput (the worker refused its request), JobFailed (it failed otherwise), Unavailable
        (timeout)."""
        try:
            async with asyncio.timeout(timeout_s):
                async for _ in self.follow(owner, job_id):
                    pass
        except TimeoutError:
            job = await self.job(owner, job_id)
            await self._redis(self.store.cancel(job))
            raise Unavailable(
                f"job {job_id} did not finish within {timeout_s:g} s (openai_timeout_s); it is cancelled",
                None,
                retry_after_s=self.settings.retry_after_s,
            ) from None
        job = await self.job(owner, job_id)
        if job.status == "cancelled":
            raise Conflict(f"job {job_id} was cancelled before it finished (POST /v1/jobs/{job_id}/cancel)", "id")
        if job.status != "succeeded":
            error = job.error or {}
            message = f"job {job_id} failed: {error.get('message', 'no reason given')}"
            if error.get("type") == InvalidInput.error_type:  # the engine's own check of the request
                raise InvalidInput(message, error.get("param"))
            raise JobFailed(message, error.get("param"))
        return job

    async def blobs(self, job: JobRecord) -> list[bytes]:
        """The stored images of a finished job, in order."""
        return [await self._redis(self.store.blob(job.id, name)) or b"" for name in job.images]

    # ---- errors --------------------------------------------------------------------------------
    async def _redis(self, awaitable: Any) -> Any:
        """Await a job-store call; Redis away becomes 503 with Retry-After, never a 500 or a hang."""
        try:
            return await awaitable
        except redis.exceptions.RedisError as error:
            raise translate_redis_errors(error, self.settings.retry_after_s) from error
