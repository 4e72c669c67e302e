"""gRPC transport: requests built and replies read with the services' own protobuf conversions
(services/common/protocol.py), so both ends of the wire convert the same way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import grpc
from google.protobuf.descriptor import FieldDescriptor

from services.common import protocol, rules
from services.common.errors import InvalidInput, shown
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc

from .errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    LatentdError,
    NotFoundError,
    RateLimitError,
    StreamDropped,
    UnavailableError,
)
from .types import Job, JobEvent, JobPage, Model

# A stream that ends with one of these is resumed (the server restarted, the connection broke).
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_CODE_ERRORS = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}
_OPTIONS = [
    ("grpc.max_receive_message_length", protocol.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", protocol.MAX_MESSAGE_BYTES),
    # a dropped connection is dialled again soon (gRPC's default waits 1 s, then up to 2 minutes)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


def error_from_rpc(exc: grpc.RpcError) -> LatentdError:
    trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    retry = trailers.get(protocol.RETRY_AFTER_METADATA_KEY)
    cls = _CODE_ERRORS.get(exc.code(), LatentdError)
    kw = dict(
        type=trailers.get(protocol.TYPE_METADATA_KEY),
        param=_rest_param(trailers.get(protocol.PARAM_METADATA_KEY)),
        retry_after=float(retry) if retry else None,
    )
    return cls(exc.details() or str(exc.code()), **kw)


# What a proto integer field can carry: a value past it makes protobuf raise ValueError("Value out of range").
_WIRE_RANGE = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
# The model-independent bounds of the rules (and the REST schemas) for the integer fields, so a value the wire
# cannot carry is refused as the server refuses it over REST; a model may allow less (the server says so then).
_RULE_BOUNDS = {
    "num_inference_steps": (1, rules.MAX_STEPS),
    "seed": (0, rules.MAX_SEED),
    "noise_seed": (0, rules.MAX_SEED),
    "width": (rules.MIN_SIDE, rules.MAX_SIDE),
    "height": (rules.MIN_SIDE, rules.MAX_SIDE),
    "num_images": (1, rules.MAX_IMAGES),
    "preview_every": (0, rules.MAX_STEPS),
    "trajectory_every": (1, rules.MAX_STEPS),
    "image.index": (0, rules.MAX_IMAGES - 1),
    "mask.index": (0, rules.MAX_IMAGES - 1),
    **{
        name: (0 if name.startswith("crop_") else 1, rules.MAX_CONDITIONING_SIDE)
        for name in rules.SIZE_CONDITIONING_PARAMS
    },
}
_GENERATION_FIELDS = pb.GenerationParams.DESCRIPTOR.fields_by_name
_TRAJECTORY_FIELDS = pb.TrajectoryParams.DESCRIPTOR.fields_by_name


def _sent_values(body: dict[str, Any]) -> Iterator[tuple[str, str, Any, FieldDescriptor]]:
    """(field name, param, value, proto field) of each number the conversions in protocol.py write."""
    fields = [(name, name, _GENERATION_FIELDS[name]) for name in protocol.GENERATION_SCALARS]
    fields += [("noise_seed", "noise_seed", _TRAJECTORY_FIELDS["noise_seed"])]
    fields += [("trajectory_every", "trajectory_every", _TRAJECTORY_FIELDS["every"])]
    for name, param, field in fields:
        if body.get(name) is not None:
            yield name, param, body[name], field
    for name in ("timesteps", "guidance_scales"):
        for i, value in enumerate(body.get(name) or ()):
            yield name, f"{name}.{i}", value, _TRAJECTORY_FIELDS[name]
    for name, _ref in protocol.PICTURES:
        if isinstance(body.get(name), dict) and "index" in body[name]:
            ref = f"{name}.index"
            yield ref, ref, body[name]["index"], pb.JobImageRef.DESCRIPTOR.fields_by_name["index"]


def _as_client_error(refused: InvalidInput) -> InvalidRequestError:
    """A rule's refusal, checked here before sending, as the error the server's refusal would have raised."""
    return InvalidRequestError(refused.message, type=refused.error_type, param=refused.param)


def _refusal(body: dict[str, Any], cause: Exception) -> InvalidRequestError:
    """The error the server would give for the field protobuf could not take (a number past its type, a string
    for a number), naming the field and the range the rules allow."""
    for name, param, value, field in _sent_values(body):
        wire = _WIRE_RANGE.get(field.cpp_type)
        if wire is None:  # a float field: any number fits (float32 rounds it; the server checks its range)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return InvalidRequestError(
                    f"{name} must be a number, got {shown(value)}", type=InvalidInput.error_type, param=param
                )
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not wire[0] <= value <= wire[1]:
            low, high = _RULE_BOUNDS.get(name, wire)
            try:
                rules.between(name, value, low, high, integer=True, param=param)
            except InvalidInput as refused:
                return _as_client_error(refused)
    return InvalidRequestError(f"the request cannot be sent over gRPC: {cause}", type=InvalidInput.error_type)


def _rest_param(param: str | None) -> str | None:
    """The field an error names, as REST names it (the client's interface), from the door's trailer."""
    return protocol.REST_PARAMS.get(param, param) if param else None


def _params(convert: Callable[[dict[str, Any]], Any], body: dict[str, Any], known: frozenset[str]):
    """`convert(body)` (a protocol.py conversion); InvalidRequestError, not protobuf's ValueError or TypeError, for
    a value the proto cannot carry, and for a field it has none for (a misspelt one would be dropped, and the job run
    on its default): over REST the server refuses either with the same message."""
    try:
        protocol.check_known_fields(body, known)
    except InvalidInput as refused:
        raise _as_client_error(refused) from None
    try:
        return convert(body)
    except (ValueError, TypeError) as exc:
        raise _refusal(body, exc) from None


def _target(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"grpc://{url}")
    return f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 50051}"


def _list_request(limit: int | None, starting_after: str | None, status: list[str]) -> pb.ListJobsRequest:
    """ListJobs's request; a status name the proto has no value for, or a limit it may not carry, is refused here
    by the rule the server applies, with its message."""
    try:
        rules.check_statuses(status)
        if limit is not None:
            rules.between("limit", limit, 1, rules.MAX_LIST_LIMIT, integer=True)
    except InvalidInput as refused:
        raise _as_client_error(refused) from None
    request = pb.ListJobsRequest(starting_after=starting_after or "", status=[protocol.STATUS[s] for s in status])
    if limit is not None:
        request.limit = limit
    return request


def _artifact_request(job_id: str, kind: str, index: int) -> pb.GetArtifactRequest:
    return pb.GetArtifactRequest(job_id=job_id, kind=protocol.ARTIFACT[kind], index=index)


def _with_key(metadata: tuple, idempotency_key: str | None) -> tuple:
    """The REST Idempotency-Key as metadata: a retry with the same key and request returns the first job."""
    return metadata + (("idempotency-key", idempotency_key),) if idempotency_key else metadata


def _stream_request(job_id: str, after: str | None) -> pb.StreamJobEventsRequest:
    return pb.StreamJobEventsRequest(job_id=job_id, after_event_id=after or "")


def _generation_request(body: dict[str, Any]) -> pb.SubmitGenerationRequest:
    params = _params(protocol.generation_to_proto, body, protocol.GENERATION_FIELDS)
    return pb.SubmitGenerationRequest(params=params, **protocol.job_fields_to_proto(body))


def _trajectory_request(body: dict[str, Any]) -> pb.SubmitTrajectoryRequest:
    params = _params(protocol.trajectory_to_proto, body, protocol.TRAJECTORY_FIELDS)
    return pb.SubmitTrajectoryRequest(params=params, **protocol.job_fields_to_proto(body))


class GrpcTransport:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.url, self.timeout = url, timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        target = _target(url)
        self.channel = (
            grpc.secure_channel(target, grpc.ssl_channel_credentials(), _OPTIONS)
            if url.startswith("grpcs://")
            else grpc.insecure_channel(target, _OPTIONS)
        )
        self.stub = pb_grpc.LatentdServiceStub(self.channel)
        self._health_check = self.channel.unary_unary(HEALTH_CHECK)  # bytes in, bytes out: no generated code

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method, request, idempotency_key: str | None = None):
        try:
            return method(request, metadata=_with_key(self.metadata, idempotency_key), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def submit_generation(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        request = _generation_request(body)
        return Job.from_proto(self._unary(self.stub.SubmitGeneration, request, idempotency_key).job)

    def submit_trajectory(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        request = _trajectory_request(body)
        return Job.from_proto(self._unary(self.stub.SubmitTrajectory, request, idempotency_key).job)

    def get_job(self, job_id: str) -> Job:
        return Job.from_proto(self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id)).job)

    def list_jobs(self, limit: int | None, starting_after: str | None, status: list[str]) -> JobPage:
        return JobPage.from_proto(self._unary(self.stub.ListJobs, _list_request(limit, starting_after, status)))

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_proto(self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).job)

    def artifact(self, job_id: str, kind: str, index: int) -> tuple[bytes, str]:
        response = self._unary(self.stub.GetArtifact, _artifact_request(job_id, kind, index))
        return response.data, response.media_type

    def models(self) -> list[Model]:
        return [Model.from_proto(m) for m in self._unary(self.stub.ListModels, pb.ListModelsRequest()).models]

    def _connect(self) -> None:
        """Wait up to the timeout for the channel: after a drop it reconnects first, and a stream opened before
        would fail at once. A call with wait_for_ready waits, and leaves no thread behind: the polling thread of
        grpc.channel_ready_future outlived close() and printed "Cannot invoke RPC: Channel closed!" (grpc/grpc
        #18995). The call is grpc.health.v1's Check, the smallest there is (a few bytes each way, no key, no
        Redis); whatever it answers, even UNIMPLEMENTED, the channel is connected."""
        try:
            self._health_check(b"", timeout=self.timeout, wait_for_ready=True)  # b"": HealthCheckRequest(service="")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise StreamDropped(f"no connection to {self.url} within {self.timeout:g} s") from None
            if exc.code() in RESUMABLE:
                raise StreamDropped(exc.details() or str(exc.code())) from None

    def events(self, job_id: str, after: str | None = None) -> Iterator[JobEvent]:
        """One server stream; StreamDropped when it breaks (the client resumes)."""
        self._connect()
        call = self.stub.StreamJobEvents(_stream_request(job_id, after), metadata=self.metadata, wait_for_ready=True)
        try:
            for message in call:
                yield JobEvent.from_proto(message.event)
        except grpc.RpcError as exc:
            if exc.code() in RESUMABLE:
                raise StreamDropped(exc.details() or str(exc.code())) from None
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()


class AsyncGrpcTransport:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.url, self.timeout = url, timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        target = _target(url)
        self.channel = (
            grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), _OPTIONS)
            if url.startswith("grpcs://")
            else grpc.aio.insecure_channel(target, _OPTIONS)
        )
        self.stub = pb_grpc.LatentdServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method, request, idempotency_key: str | None = None):
        try:
            return await method(request, metadata=_with_key(self.metadata, idempotency_key), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def submit_generation(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        request = _generation_request(body)
        return Job.from_proto((await self._unary(self.stub.SubmitGeneration, request, idempotency_key)).job)

    async def submit_trajectory(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        request = _trajectory_request(body)
        return Job.from_proto((await self._unary(self.stub.SubmitTrajectory, request, idempotency_key)).job)

    async def get_job(self, job_id: str) -> Job:
        return Job.from_proto((await self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job)

    async def list_jobs(self, limit: int | None, starting_after: str | None, status: list[str]) -> JobPage:
        request = _list_request(limit, starting_after, status)
        return JobPage.from_proto(await self._unary(self.stub.ListJobs, request))

    async def cancel_job(self, job_id: str) -> Job:
        return Job.from_proto((await self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))).job)

    async def artifact(self, job_id: str, kind: str, index: int) -> tuple[bytes, str]:
        response = await self._unary(self.stub.GetArtifact, _artifact_request(job_id, kind, index))
        return response.data, response.media_type

    async def models(self) -> list[Model]:
        reply = await self._unary(self.stub.ListModels, pb.ListModelsRequest())
        return [Model.from_proto(m) for m in reply.models]

    async def events(self, job_id: str, after: str | None = None) -> AsyncIterator[JobEvent]:
        try:  # after a drop the channel reconnects first; a stream opened before would fail at once
            await asyncio.wait_for(self.channel.channel_ready(), self.timeout)
        except TimeoutError:
            raise StreamDropped(f"no connection to {self.url} within {self.timeout:g} s") from None
        call = self.stub.StreamJobEvents(_stream_request(job_id, after), metadata=self.metadata)
        try:
            async for message in call:
                yield JobEvent.from_proto(message.event)
        except grpc.RpcError as exc:
            if exc.code() in RESUMABLE:
                raise StreamDropped(exc.details() or str(exc.code())) from None
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()
