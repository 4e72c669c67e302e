"""gRPC transport: requests built and replies read with the services' own protobuf conversions
(services/common/protocol.py), so both ends of the wire convert the same way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlparse

import grpc

from services.common import protocol
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
from .types import Job, JobEvent, Model

# A stream that ends with one of these is resumed (the server restarted, the connection broke).
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)
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
        param=trailers.get(protocol.PARAM_METADATA_KEY) or None,
        retry_after=float(retry) if retry else None,
    )
    return cls(exc.details() or str(exc.code()), **kw)


def _target(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"grpc://{url}")
    return f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 50051}"


def _artifact_request(job_id: str, kind: str, index: int) -> pb.GetArtifactRequest:
    return pb.GetArtifactRequest(job_id=job_id, kind=protocol.ARTIFACT[kind], index=index)


def _with_key(metadata: tuple, idempotency_key: str | None) -> tuple:
    """The REST Idempotency-Key as metadata: a retry with the same key and request returns the first job."""
    return metadata + (("idempotency-key", idempotency_key),) if idempotency_key else metadata


def _stream_request(job_id: str, after: str | None) -> pb.StreamJobEventsRequest:
    return pb.StreamJobEventsRequest(job_id=job_id, after_event_id=after or "")


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

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method, request, idempotency_key: str | None = None):
        try:
            return method(request, metadata=_with_key(self.metadata, idempotency_key), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def submit_generation(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        request = pb.SubmitGenerationRequest(params=protocol.generation_to_proto(body))
        return Job.from_proto(self._unary(self.stub.SubmitGeneration, request, idempotency_key).job)

    def submit_trajectory(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        request = pb.SubmitTrajectoryRequest(params=protocol.trajectory_to_proto(body))
        return Job.from_proto(self._unary(self.stub.SubmitTrajectory, request, idempotency_key).job)

    def get_job(self, job_id: str) -> Job:
        return Job.from_proto(self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id)).job)

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_proto(self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).job)

    def artifact(self, job_id: str, kind: str, index: int) -> tuple[bytes, str]:
        response = self._unary(self.stub.GetArtifact, _artifact_request(job_id, kind, index))
        return response.data, response.media_type

    def models(self) -> list[Model]:
        return [Model.from_proto(m) for m in self._unary(self.stub.ListModels, pb.ListModelsRequest()).models]

    def events(self, job_id: str, after: str | None = None) -> Iterator[JobEvent]:
        """One server stream; StreamDropped when it breaks (the client resumes)."""
        try:  # after a drop the channel reconnects first; a stream opened before would fail at once
            grpc.channel_ready_future(self.channel).result(timeout=self.timeout)
        except grpc.FutureTimeoutError:
            raise StreamDropped(f"no connection to {self.url} within {self.timeout:g} s") from None
        call = self.stub.StreamJobEvents(_stream_request(job_id, after), metadata=self.metadata)
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
        request = pb.SubmitGenerationRequest(params=protocol.generation_to_proto(body))
        return Job.from_proto((await self._unary(self.stub.SubmitGeneration, request, idempotency_key)).job)

    async def submit_trajectory(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        request = pb.SubmitTrajectoryRequest(params=protocol.trajectory_to_proto(body))
        return Job.from_proto((await self._unary(self.stub.SubmitTrajectory, request, idempotency_key)).job)

    async def get_job(self, job_id: str) -> Job:
        return Job.from_proto((await self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job)

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
