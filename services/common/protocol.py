"""Conversions between the REST shapes (JSON objects) and latentd.v1 protobuf messages, in one place.

The gRPC door uses them to read requests and write jobs and events; the Python client imports them
to build requests and read replies, so both ends convert the same way. Request conversions keep only
the fields a caller set, so the core resolves the same defaults for both doors. Only protobuf and the
standard library are imported here (the client has neither the core nor torch).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from services.common import rules
from services.common.errors import InvalidInput, unknown_field
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb

# gRPC trailers that carry the REST error body's `param` and `type`, and Retry-After.
PARAM_METADATA_KEY = "latentd-param"
TYPE_METADATA_KEY = "latentd-error-type"
RETRY_AFTER_METADATA_KEY = "retry-after"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

STATUS = {
    "queued": pb.JOB_STATUS_QUEUED,
    "running": pb.JOB_STATUS_RUNNING,
    "succeeded": pb.JOB_STATUS_SUCCEEDED,
    "failed": pb.JOB_STATUS_FAILED,
    "cancelled": pb.JOB_STATUS_CANCELLED,
}
STATUS_NAME = {v: k for k, v in STATUS.items()}
EVENT = {
    "queued": pb.EVENT_TYPE_QUEUED,
    "started": pb.EVENT_TYPE_STARTED,
    "step": pb.EVENT_TYPE_STEP,
    "frame": pb.EVENT_TYPE_FRAME,
    "succeeded": pb.EVENT_TYPE_SUCCEEDED,
    "failed": pb.EVENT_TYPE_FAILED,
    "cancelled": pb.EVENT_TYPE_CANCELLED,
}
EVENT_NAME = {v: k for k, v in EVENT.items()}
FORMAT = {"png": pb.OUTPUT_FORMAT_PNG, "jpeg": pb.OUTPUT_FORMAT_JPEG, "webp": pb.OUTPUT_FORMAT_WEBP}
FORMAT_NAME = {v: k for k, v in FORMAT.items()}
TRAJECTORY = {
    "forward": pb.TRAJECTORY_KIND_FORWARD,
    "reverse": pb.TRAJECTORY_KIND_REVERSE,
    "guidance_sweep": pb.TRAJECTORY_KIND_GUIDANCE_SWEEP,
}
TRAJECTORY_NAME = {v: k for k, v in TRAJECTORY.items()}
SPACE = {"pixel": pb.NOISE_SPACE_PIXEL, "latent": pb.NOISE_SPACE_LATENT}
SPACE_NAME = {v: k for k, v in SPACE.items()}
ARTIFACT = {"image": pb.ARTIFACT_KIND_IMAGE, "frame": pb.ARTIFACT_KIND_FRAME}
ARTIFACT_NAME = {v: k for k, v in ARTIFACT.items()}

# GenerationParams fields that are `optional` scalars in the proto, under the same name as in REST.
GENERATION_SCALARS = (
    "num_inference_steps",
    "guidance_scale",
    "eta",
    "seed",
    "width",
    "height",
    "num_images",
    "preview_every",
    "guidance_rescale",
    "guidance_start",
    "guidance_stop",
    "true_cfg_scale",
    *rules.SIZE_CONDITIONING_PARAMS,
    "strength",
)
# Image to image's pictures: (bytes field, JobImageRef field), under the REST names image and mask
PICTURES = (("image", "image_ref"), ("mask", "mask_ref"))
# The request fields each conversion carries (REST names), and those of the submit beside its params; a body
# with any other field is refused naming it, as REST refuses an unknown field, not sent without it.
GENERATION_FIELDS = frozenset(
    ("model", "prompt", "negative_prompt", "output_format", "sampler", *GENERATION_SCALARS, *(p for p, _ in PICTURES))
)
TRAJECTORY_FIELDS = (GENERATION_FIELDS - {"num_images", "preview_every"}) | {
    "kind",
    "timesteps",
    "guidance_scales",
    "noise_seed",
    "trajectory_every",
    "space",
}
# A param the core names as REST has it, as the gRPC door names it in its trailer (REST's path parameter `id` is
# `job_id` there, a trajectory's `trajectory_every` is TrajectoryParams.every); the message says the REST name, as
# REST's does. The Python client maps them back, so its errors name REST's fields over either transport.
PROTO_PARAMS = {"id": "job_id", "trajectory_every": "every"}
REST_PARAMS = {proto: rest for rest, proto in PROTO_PARAMS.items()}
# Typed frame metadata on Artifact (the rest of a frame's metadata travels in metadata_json).
FRAME_SCALARS = ("timestep", "alpha_bar", "step", "guidance_scale", "sigma")


def f32(value: float) -> float:
    """A float that went through the proto's float32, back to the decimal the caller most likely wrote."""
    return float(f"{value:.7g}")


# ---- requests: REST body <-> params message ---------------------------------------------------
def generation_to_proto(body: dict[str, Any]) -> pb.GenerationParams:
    params = pb.GenerationParams(
        model=body.get("model") or "",
        prompt=body.get("prompt") or "",
        negative_prompt=body.get("negative_prompt") or "",
    )
    for name in GENERATION_SCALARS:
        if body.get(name) is not None:
            setattr(params, name, body[name])
    if body.get("output_format"):
        params.output_format = FORMAT[body["output_format"]]
    if body.get("sampler"):
        params.sampler = body["sampler"]
    for name, ref in PICTURES:
        value = body.get(name)
        if isinstance(value, dict):  # {job_id, index}
            getattr(params, ref).CopyFrom(pb.JobImageRef(job_id=value["job_id"], index=value.get("index", 0)))
        elif value:
            setattr(params, name, _picture_bytes(value))
        if isinstance(body.get(f"{name}_from"), dict):  # a job's params: the job the picture came from
            source = body[f"{name}_from"]
            getattr(params, ref).CopyFrom(pb.JobImageRef(job_id=source["job_id"], index=source.get("index", 0)))
    params.has_image = bool(body.get("has_image"))
    params.has_mask = bool(body.get("has_mask"))
    return params


def check_known_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    """InvalidInput naming the first field of `body` a gRPC request cannot carry (REST's message for it)."""
    for name in body:
        if name not in known and name not in rules.JOB_FIELDS:
            raise InvalidInput(unknown_field(name), name)


def job_fields_to_proto(body: dict[str, Any]) -> dict[str, Any]:
    """The job's own fields of a REST-shaped body (rules.JOB_FIELDS), as a submit request's keyword arguments."""
    return {name: body[name] for name in rules.JOB_FIELDS if body.get(name) is not None}


def job_fields_from_proto(request: Any) -> dict[str, Any]:
    """... and back: the ones a submit request set, as REST carries them in the body."""
    return {name: getattr(request, name) for name in rules.JOB_FIELDS if request.HasField(name)}


def _picture_bytes(value: str | bytes) -> bytes:
    """A picture as REST carries it (base64, a data: URL) or its bytes -> bytes."""
    return base64.b64decode(value.split(",", 1)[-1]) if isinstance(value, str) else bytes(value)


def generation_from_proto(params: pb.GenerationParams) -> dict[str, Any]:
    """Only the fields the caller set, so the core resolves the defaults as it does for REST."""
    body: dict[str, Any] = {"prompt": params.prompt}
    if params.model:
        body["model"] = params.model
    if params.negative_prompt:
        body["negative_prompt"] = params.negative_prompt
    for name in GENERATION_SCALARS:
        if params.HasField(name):
            value = getattr(params, name)
            body[name] = f32(value) if isinstance(value, float) else value
    if params.output_format:
        body["output_format"] = FORMAT_NAME.get(params.output_format, params.output_format)
    if params.sampler:
        body["sampler"] = params.sampler
    for name, ref in PICTURES:
        if getattr(params, name):
            body[name] = base64.b64encode(getattr(params, name)).decode()
        elif params.HasField(ref):
            source = getattr(params, ref)
            body[name] = {"job_id": source.job_id, "index": source.index}
    return body


def trajectory_to_proto(body: dict[str, Any]) -> pb.TrajectoryParams:
    rest = dict(body)
    params = pb.TrajectoryParams(kind=TRAJECTORY[rest.pop("kind")])
    image = rest.pop("image", None)
    if isinstance(image, dict):  # {job_id, index}: the generation's image_ref carries it, as for a generation
        rest["image"] = image
    elif image:
        params.image = _picture_bytes(image)
    params.timesteps.extend(rest.pop("timesteps", None) or [])
    params.guidance_scales.extend(rest.pop("guidance_scales", None) or [])
    if rest.get("noise_seed") is not None:
        params.noise_seed = rest.pop("noise_seed")
    if rest.get("trajectory_every") is not None:
        params.every = rest.pop("trajectory_every")
    if rest.get("space"):
        params.space = SPACE[rest.pop("space")]
    params.has_image = bool(rest.pop("has_image", False))
    params.generation.CopyFrom(generation_to_proto(rest))
    params.generation.has_image = params.has_image and kind_reads_generation_image(params.kind)
    return params


def kind_reads_generation_image(kind: int) -> bool:
    """Whether a trajectory's image is image to image's start (reverse, sweep), not forward's x0."""
    return kind in (pb.TRAJECTORY_KIND_REVERSE, pb.TRAJECTORY_KIND_GUIDANCE_SWEEP)


def trajectory_from_proto(params: pb.TrajectoryParams) -> dict[str, Any]:
    """The REST body of a trajectory request; `kind` is left out when unset (the core says it is required)."""
    body = generation_from_proto(params.generation)
    if not body["prompt"]:
        del body["prompt"]
    if params.kind:
        body["kind"] = TRAJECTORY_NAME.get(params.kind, params.kind)
    if params.image:
        body["image"] = base64.b64encode(params.image).decode()
    if params.timesteps:
        body["timesteps"] = list(params.timesteps)
    if params.guidance_scales:
        body["guidance_scales"] = [f32(g) for g in params.guidance_scales]
    if params.HasField("noise_seed"):
        body["noise_seed"] = params.noise_seed
    if params.HasField("every"):
        body["trajectory_every"] = params.every
    if params.space:
        body["space"] = SPACE_NAME.get(params.space, params.space)
    return body


# ---- a job's resolved params <-> the typed fields of Job --------------------------------------
def params_to_proto(kind: str, params: dict[str, Any], message: pb.Job) -> None:
    """Fill Job.generation or Job.trajectory (and trajectory_kind) from a job's resolved params."""
    if kind == "generation":
        message.generation.CopyFrom(generation_to_proto(params))
        return
    message.trajectory_kind = TRAJECTORY[kind]
    message.trajectory.CopyFrom(trajectory_to_proto(dict(params, kind=kind)))


def params_from_proto(message: pb.Job) -> dict[str, Any]:
    """A job's resolved params as REST shows them, from the typed fields."""
    if message.kind != pb.JOB_KIND_TRAJECTORY:
        params = generation_from_proto(message.generation)
        params |= _pictures_view(message.generation, params)
        return {"model": message.generation.model, "negative_prompt": message.generation.negative_prompt} | params
    trajectory = message.trajectory
    params = generation_from_proto(trajectory.generation)
    params |= {
        "kind": TRAJECTORY_NAME[message.trajectory_kind],
        "model": trajectory.generation.model,
        "negative_prompt": trajectory.generation.negative_prompt,
        "timesteps": list(trajectory.timesteps) if message.trajectory_kind == pb.TRAJECTORY_KIND_FORWARD else None,
        "noise_seed": trajectory.noise_seed,
        "space": SPACE_NAME.get(trajectory.space, "latent"),
        "trajectory_every": trajectory.every,
        "guidance_scales": [f32(g) for g in trajectory.guidance_scales],
        "has_image": trajectory.has_image,
    }
    if trajectory.generation.has_mask:
        params["has_mask"] = True
    return rules.trajectory_params(params["kind"], params, from_image=trajectory.has_image)


def _pictures_view(generation: pb.GenerationParams, params: dict[str, Any]) -> dict[str, Any]:
    """A generation job's pictures as REST shows them: has_image, has_mask and where they came from."""
    if not generation.has_image:
        return {}
    view: dict[str, Any] = {"has_image": True, "has_mask": generation.has_mask}
    for name, _ in PICTURES:
        if isinstance(params.get(name), dict):
            view[f"{name}_from"] = params.pop(name)
    return view


# ---- artifacts and events ---------------------------------------------------------------------
def artifact_to_proto(index: int, url: str, media_type: str, metadata: dict[str, Any] | None = None) -> pb.Artifact:
    metadata = metadata or {}
    message = pb.Artifact(
        index=index,
        url=url,
        media_type=media_type,
        metadata_json=json.dumps(metadata) if metadata else "",
        what=str(metadata.get("what") or ""),
        space=SPACE.get(metadata.get("space") or "", pb.NOISE_SPACE_UNSPECIFIED),
    )
    for name in FRAME_SCALARS:
        if metadata.get(name) is not None:
            setattr(message, name, metadata[name])
    return message


def artifact_metadata(message: pb.Artifact) -> dict[str, Any]:
    """A frame's metadata from the typed fields (images have none)."""
    metadata: dict[str, Any] = {}
    for name in FRAME_SCALARS:
        if message.HasField(name):
            value = getattr(message, name)
            metadata[name] = f32(value) if name == "guidance_scale" else value
    if message.what:
        metadata["what"] = message.what
    if message.space:
        metadata["space"] = SPACE_NAME[message.space]
    return metadata


def error_to_proto(error: dict[str, Any]) -> pb.JobError:
    return pb.JobError(
        type=str(error.get("type") or ""), message=str(error.get("message") or ""), param=str(error.get("param") or "")
    )


def event_to_proto(event_id: str, name: str, data: dict[str, Any]) -> pb.JobEvent:
    message = pb.JobEvent(id=event_id, type=EVENT.get(name, pb.EVENT_TYPE_UNSPECIFIED), data_json=json.dumps(data))
    for field in ("step", "total", "timestep", "attempt"):
        if isinstance(data.get(field), int):
            setattr(message, field, data[field])
    if isinstance(data.get("preview"), str):
        message.preview_png = base64.b64decode(data["preview"].split(",", 1)[-1])
    if name == "frame":
        meta = {k: v for k, v in data.items() if k not in ("index", "url", "attempt", "emitted_at")}
        message.frame.CopyFrom(
            artifact_to_proto(int(data.get("index", 0)), str(data.get("url", "")), "image/png", meta)
        )
    if name == "failed":
        message.error.CopyFrom(error_to_proto(data))
    return message


def event_from_proto(message: pb.JobEvent) -> tuple[str, str, dict[str, Any]]:
    """(id, name, data): the same triple an SSE reader gets."""
    data = json.loads(message.data_json) if message.data_json else {}
    return message.id, EVENT_NAME.get(message.type, "message"), data if isinstance(data, dict) else {"data": data}
