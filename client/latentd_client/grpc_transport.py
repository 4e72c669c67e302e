"""gRPC transport and the proto <-> REST-JSON conversions (shared with services/api/grpc_server.py,
so both front doors speak the same job record)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlparse

import grpc

from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc

from .errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    LatentdError,
    NotFoundError,
    RateLimitError,
    UnavailableError,
)
from .types import JobEvent

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
PARAM_METADATA_KEY = "latentd-param"
TYPE_METADATA_KEY = "latentd-error-type"

STATUS = {
    "queued": pb.JOB_STATUS_QUEUED,
    "running": pb.JOB_STATUS_RUNNING,
    "succeeded": pb.JOB_STATUS_SUCCEEDED,
    "failed": pb.JOB_STATUS_FAILED,
    "cancelled": pb.JOB_STATUS_CANCELLED,
}
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

_GEN_OPTIONAL = (
    "num_inference_steps",
    "guidance_scale",
    "eta",
    "seed",
    "width",
    "height",
    "num_images",
    "preview_every",
)


# ---- request bodies -------------------------------------------------------------------------
def generation_to_proto(body: dict[str, Any]) -> pb.GenerationParams:
    params = pb.GenerationParams(
        model=body.get("model") or "",
        prompt=body.get("prompt") or "",
        negative_prompt=body.get("negative_prompt") or "",
    )
    for name in _GEN_OPTIONAL:
        if body.get(name) is not None:
            setattr(params, name, body[name])
    if body.get("output_format"):
        params.output_format = FORMAT[body["output_format"]]
    return params


def generation_from_proto(params: pb.GenerationParams) -> dict[str, Any]:
    """Only the fields the caller set, so the gateway resolves the same defaults as for REST."""
    body: dict[str, Any] = {"prompt": params.prompt}
    if params.model:
        body["model"] = params.model
    if params.negative_prompt:
        body["negative_prompt"] = params.negative_prompt
    for name in _GEN_OPTIONAL:
        if params.HasField(name):
            value = getattr(params, name)
            body[name] = round(value, 6) if isinstance(value, float) else value
    if params.output_format:
        body["output_format"] = FORMAT_NAME[params.output_format]
    return body


def trajectory_to_proto(body: dict[str, Any]) -> pb.TrajectoryParams:
    rest = dict(body)
    params = pb.TrajectoryParams(kind=TRAJECTORY[rest.pop("kind")])
    if rest.get("image"):
        image = rest.pop("image")
        params.image = base64.b64decode(image.split(",", 1)[-1]) if isinstance(image, str) else image
    params.timesteps.extend(rest.pop("timesteps", None) or [])
    params.guidance_scales.extend(rest.pop("guidance_scales", None) or [])
    if rest.get("noise_seed") is not None:
        params.noise_seed = rest.pop("noise_seed")
    if rest.get("trajectory_every") is not None:
        params.every = rest.pop("trajectory_every")
    if rest.get("space"):
        params.space = SPACE[rest.pop("space")]
    params.generation.CopyFrom(generation_to_proto(rest))
    return params


def trajectory_from_proto(params: pb.TrajectoryParams) -> dict[str, Any]:
    if params.kind not in TRAJECTORY_NAME:
        raise ValueError("kind must be one of forward, reverse, guidance_sweep")
    body = generation_from_proto(params.generation)
    if not body["prompt"]:
        del body["prompt"]
    body["kind"] = TRAJECTORY_NAME[params.kind]
    if params.image:
        body["image"] = base64.b64encode(params.image).decode()
    if params.timesteps:
        body["timesteps"] = list(params.timesteps)
    if params.guidance_scales:
        body["guidance_scales"] = [round(g, 6) for g in params.guidance_scales]
    if params.HasField("noise_seed"):
        body["noise_seed"] = params.noise_seed
    if params.HasField("every"):
        body["trajectory_every"] = params.every
    if params.space:
        body["space"] = SPACE_NAME[params.space]
    return body


# ---- responses ------------------------------------------------------------------------------
def job_to_proto(record: dict[str, Any]) -> pb.Job:
    from .types import Job

    job = Job.from_dict(record)

    def artifacts(items):
        return [
            pb.Artifact(
                index=a.index,
                url=a.url,
                media_type=a.media_type,
                metadata_json=json.dumps(a.metadata) if a.metadata else "",
            )
            for a in items
        ]

    message = pb.Job(
        id=job.id,
        kind=pb.JOB_KIND_TRAJECTORY if job.kind == "trajectory" else pb.JOB_KIND_GENERATION,
        status=STATUS.get(job.status, pb.JOB_STATUS_UNSPECIFIED),
        model=job.model,
        params_json=json.dumps(job.params),
        step=job.step,
        total_steps=job.total_steps,
        created_at=job.created_at or 0,
        started_at=job.started_at or 0,
        finished_at=job.finished_at or 0,
        images=artifacts(job.images),
        frames=artifacts(job.frames),
        raw_json=json.dumps(record),
    )
    if job.error:
        message.error.CopyFrom(
            pb.JobError(
                type=str(job.error.get("type") or ""),
                message=str(job.error.get("message") or ""),
                param=str(job.error.get("param") or ""),
            )
        )
    return message


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    message = pb.JobEvent(
        id=event.id, type=EVENT.get(event.type, pb.EVENT_TYPE_UNSPECIFIED), data_json=json.dumps(event.data)
    )
    for name in ("step", "total", "timestep"):
        if isinstance(event.data.get(name), int):
            setattr(message, name, event.data[name])
    if isinstance(event.preview, str):
        try:
            message.preview_png = base64.b64decode(event.preview.split(",", 1)[-1])
        except ValueError:
            pass
    return message


def event_from_proto(message: pb.JobEvent) -> JobEvent:
    return JobEvent(message.id, EVENT_NAME.get(message.type, "message"), json.loads(message.data_json or "{}"))


def model_to_proto(record: dict[str, Any]) -> pb.Model:
    from .types import Model

    model = Model.from_dict(record)
    return pb.Model(
        name=model.name,
        native_width=model.native_width,
        native_height=model.native_height,
        scheduler=model.scheduler,
        workers=int(record.get("workers") or 0),
        raw_json=json.dumps(record),
    )


# ---- errors ---------------------------------------------------------------------------------
_CODE_ERRORS = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def error_from_rpc(exc: grpc.RpcError) -> LatentdError:
    trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    cls = _CODE_ERRORS.get(exc.code(), LatentdError)
    return cls(
        exc.details() or str(exc.code()),
        type=trailers.get(TYPE_METADATA_KEY),
        param=trailers.get(PARAM_METADATA_KEY) or None,
    )


def _target(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"grpc://{url}")
    return f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 50051}"


_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class GrpcTransport:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.url, self.timeout = url, timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.channel = (
            grpc.secure_channel(_target(url), grpc.ssl_channel_credentials(), _OPTIONS)
            if url.startswith("grpcs://")
            else grpc.insecure_channel(_target(url), _OPTIONS)
        )
        self.stub = pb_grpc.LatentdServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method, request):
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def submit_generation(self, body):
        response = self._unary(self.stub.SubmitGeneration, pb.SubmitGenerationRequest(params=generation_to_proto(body)))
        return json.loads(response.job.raw_json)

    def submit_trajectory(self, body):
        response = self._unary(self.stub.SubmitTrajectory, pb.SubmitTrajectoryRequest(params=trajectory_to_proto(body)))
        return json.loads(response.job.raw_json)

    def get_job(self, job_id):
        return json.loads(self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id)).job.raw_json)

    def cancel_job(self, job_id):
        return json.loads(self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).job.raw_json)

    def artifact(self, job_id, kind, index):
        response = self._unary(
            self.stub.GetArtifact, pb.GetArtifactRequest(job_id=job_id, kind=ARTIFACT[kind], index=index)
        )
        return response.data, response.media_type

    def models(self):
        return [json.loads(m.raw_json) for m in self._unary(self.stub.ListModels, pb.ListModelsRequest()).models]

    def events(self, job_id: str, after: str | None = None) -> Iterator[JobEvent]:
        """One server stream; a dropped connection raises grpc.RpcError(UNAVAILABLE) (Client resumes)."""
        stream = self.stub.StreamJobEvents(
            pb.StreamJobEventsRequest(job_id=job_id, after_event_id=after or ""), metadata=self.metadata
        )
        try:
            for message in stream:
                yield event_from_proto(message.event)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED):
                raise
            raise error_from_rpc(exc) from None
        finally:
            stream.cancel()


class AsyncGrpcTransport:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.url, self.timeout = url, timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.channel = (
            grpc.aio.secure_channel(_target(url), grpc.ssl_channel_credentials(), _OPTIONS)
            if url.startswith("grpcs://")
            else grpc.aio.insecure_channel(_target(url), _OPTIONS)
        )
        self.stub = pb_grpc.LatentdServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method, request):
        try:
            return await method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def submit_generation(self, body):
        r = await self._unary(self.stub.SubmitGeneration, pb.SubmitGenerationRequest(params=generation_to_proto(body)))
        return json.loads(r.job.raw_json)

    async def submit_trajectory(self, body):
        r = await self._unary(self.stub.SubmitTrajectory, pb.SubmitTrajectoryRequest(params=trajectory_to_proto(body)))
        return json.loads(r.job.raw_json)

    async def get_job(self, job_id):
        return json.loads((await self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job.raw_json)

    async def cancel_job(self, job_id):
        return json.loads((await self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))).job.raw_json)

    async def artifact(self, job_id, kind, index):
        r = await self._unary(
            self.stub.GetArtifact, pb.GetArtifactRequest(job_id=job_id, kind=ARTIFACT[kind], index=index)
        )
        return r.data, r.media_type

    async def models(self):
        return [
            json.loads(m.raw_json) for m in (await self._unary(self.stub.ListModels, pb.ListModelsRequest())).models
        ]

    async def events(self, job_id: str, after: str | None = None) -> AsyncIterator[JobEvent]:
        call = self.stub.StreamJobEvents(
            pb.StreamJobEventsRequest(job_id=job_id, after_event_id=after or ""), metadata=self.metadata
        )
        try:
            async for message in call:
                yield event_from_proto(message.event)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                raise
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()
