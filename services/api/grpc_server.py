"""The gRPC front door (latentd.v1.LatentdService): a thin adapter over the application core, like the REST
routers, never a client of them.

    python -m services.api.grpc_server [--port 50051]

It runs on grpc.aio in its own process (one Core: its own Redis pool and event hub), or inside another
asyncio program with `start_server(core, ...)`. Each RPC authenticates the `authorization: Bearer <key>`
metadata, converts the request (services/common/protocol.py), calls the core and converts the answer;
errors become status codes in one place (`_STATUS_OF`). Also served: grpc.health.v1 ("" and the service
follow the core's readiness; `latentd.v1.LatentdService/<model>` that model's live workers) and
server reflection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import grpc
import redis.exceptions
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from services.api import metrics
from services.common import protocol, rules
from services.common.errors import (
    Conflict,
    InternalError,
    InvalidInput,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    Unauthorized,
    Unavailable,
)
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from services.common.jobstore import cancel_and_wait
from services.common.metrics_server import serve_from_env
from services.core import Core
from services.core import metrics as core_metrics
from services.core.core import translate_redis_errors
from services.core.events import StreamBroken

log = logging.getLogger("latentd.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LatentdService"].full_name
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9466
# the REST Idempotency-Key header, as metadata: the same key and request within the result TTL return the
# job the first call made (GenerateStream follows it from its first event); another request is FAILED_PRECONDITION
IDEMPOTENCY_METADATA_KEY = "idempotency-key"

grpc_requests_total = Counter(
    "latentd_grpc_requests_total", "gRPC calls answered, by method and status code.", ["method", "code"]
)
grpc_request_duration_seconds = Histogram(
    "latentd_grpc_request_duration_seconds",
    "Time to answer a unary gRPC call (streams: not observed).",
    ["method"],
    buckets=metrics.HTTP_LATENCY_BUCKETS,
)

# The one place where errors become status codes.
_STATUS_OF: dict[type[ServiceError], grpc.StatusCode] = {
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    JobFailed: grpc.StatusCode.ABORTED,
    InternalError: grpc.StatusCode.INTERNAL,
}


def _as_service_error(exc: Exception, retry_after_s: float) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, redis.exceptions.RedisError):
        return translate_redis_errors(exc, retry_after_s)
    if isinstance(exc, StreamBroken):
        return Unavailable(str(exc), None, retry_after_s=1)
    log.error("unexpected error in a gRPC handler", exc_info=exc)
    return InternalError(f"internal error: {type(exc).__name__}", None)


# The status details travel percent-encoded in a trailer, which a client refuses past 16 KiB: 1000 characters are
# 12,000 bytes at most (4-byte UTF-8), where a longer message would reach the caller as RESOURCE_EXHAUSTED.
MAX_DETAILS_CHARS = 1000


async def _abort(
    context: grpc.aio.ServicerContext, method: str, error: ServiceError, *, submission: bool = False
) -> None:
    code = _STATUS_OF.get(type(error), grpc.StatusCode.INTERNAL)
    trailers = [(protocol.TYPE_METADATA_KEY, error.error_type)]
    if error.param:
        trailers.append((protocol.PARAM_METADATA_KEY, protocol.PROTO_PARAMS.get(error.param, error.param)))
    if error.retry_after_s:
        trailers.append((protocol.RETRY_AFTER_METADATA_KEY, str(max(1, round(error.retry_after_s)))))
    core_metrics.record_refusal(error, submission=submission)
    grpc_requests_total.labels(method, code.name).inc()
    details = error.message if len(error.message) <= MAX_DETAILS_CHARS else error.message[: MAX_DETAILS_CHARS - 1] + "…"
    await context.abort(code, details, trailing_metadata=tuple(trailers))


class MalformedRequest:
    """What a request that is not its method's message parses to (`TolerantParsing`), so that `edge` refuses it as
    INVALID_ARGUMENT in the caller's words, where grpcio would answer UNKNOWN naming a Python exception."""

    def __init__(self, message_name: str, reason: str):
        self.message = f"the request is not a {message_name} message in protobuf's binary encoding ({reason})"


# each method's request message, by the method's path (the proto's names, whatever protobuf's backend)
_REQUEST_OF = {
    f"/{SERVICE_NAME}/{method.name}": method.input_type.full_name
    for method in pb.DESCRIPTOR.services_by_name["LatentdService"].methods
}


def _tolerant(parse: Callable, name: str) -> Callable:
    def tolerant(data: bytes):
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError) as error:  # the latter: protobuf's pure-Python backend
            # upb says "Error parsing message with type 'X': why"; the why is the caller's to read
            reason = str(error).rpartition(": ")[2] or "it does not parse"
            return MalformedRequest(name, reason[:1].lower() + reason[1:])

    return tolerant


class TolerantParsing(grpc.aio.ServerInterceptor):
    """The service's methods parse their requests with `_tolerant` (health and reflection keep grpcio's parsing)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        name = _REQUEST_OF.get(details.method)
        if handler is None or handler.request_deserializer is None or name is None:
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer, name))


def _well_formed(request):
    if isinstance(request, MalformedRequest):
        raise InvalidInput(request.message, None)
    return request


def edge(handler: Callable) -> Callable:
    """Authenticate, time and count the call, and map every error to a status code, for unary and streaming
    handlers alike. The handler gets the caller's owner id after the request. A refusal of a `submitting` handler
    before its first reply refused a new job (GenerateStream's first reply is the queued job)."""
    method = handler.__name__
    submits = getattr(handler, "_submitting", False)

    if getattr(handler, "_streaming", False):

        @functools.wraps(handler)
        async def stream(self: LatentdServicer, request, context):
            metrics.grpc_stream_readers.inc()
            replied = False
            try:
                owner = self.core.authenticate(_authorization(context))
                async for reply in handler(self, _well_formed(request), context, owner):
                    yield reply
                    replied = True
                grpc_requests_total.labels(method, "OK").inc()
            except asyncio.CancelledError:
                grpc_requests_total.labels(method, "CANCELLED").inc()
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                error = _as_service_error(exc, self.core.settings.retry_after_s)
                await _abort(context, method, error, submission=submits and not replied)
            finally:
                metrics.grpc_stream_readers.dec()

        return stream

    @functools.wraps(handler)
    async def unary(self: LatentdServicer, request, context):
        started = time.perf_counter()
        try:
            owner = self.core.authenticate(_authorization(context))
            reply = await handler(self, _well_formed(request), context, owner)
            grpc_requests_total.labels(method, "OK").inc()
            return reply
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await _abort(context, method, _as_service_error(exc, self.core.settings.retry_after_s), submission=submits)
        finally:
            grpc_request_duration_seconds.labels(method).observe(time.perf_counter() - started)

    return unary


def streaming(handler: Callable) -> Callable:
    handler._streaming = True
    return handler


def submitting(handler: Callable) -> Callable:
    """A handler that queues a job: its refusals before it answers are counted by reason (core metrics)."""
    handler._submitting = True
    return handler


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    return next((value for key, value in context.invocation_metadata() or () if key == name), None)


def _params(request):
    """A submit's params, which it must carry: a request without them would otherwise run every default on an
    empty prompt (REST's empty body is refused the same way)."""
    if not request.HasField("params"):
        raise InvalidInput("params is required", "params")
    return request.params


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return _metadata(context, "authorization")


def _enum_name(enum, number: int) -> str:
    """A proto enum value's name, or the number itself for one the proto does not define."""
    return enum.Name(number) if number in enum.values() else str(number)


class LatentdServicer(pb_grpc.LatentdServiceServicer):
    def __init__(self, core: Core):
        self.core = core
        self._cancels: set[asyncio.Task] = set()

    @edge
    @submitting
    async def SubmitGeneration(self, request, context, owner):
        body = protocol.generation_from_proto(_params(request)) | protocol.job_fields_from_proto(request)
        job = await self.core.submit_generation(owner, body, _metadata(context, IDEMPOTENCY_METADATA_KEY))
        return pb.SubmitGenerationResponse(job=job.to_proto())

    @edge
    @submitting
    async def SubmitTrajectory(self, request, context, owner):
        body = protocol.trajectory_from_proto(_params(request)) | protocol.job_fields_from_proto(request)
        job = await self.core.submit_trajectory(owner, body, _metadata(context, IDEMPOTENCY_METADATA_KEY))
        return pb.SubmitTrajectoryResponse(job=job.to_proto())

    @edge
    async def GetJob(self, request, context, owner):
        return pb.GetJobResponse(job=(await self.core.job(owner, _job_id(request), poll=True)).to_proto())

    @edge
    async def ListJobs(self, request, context, owner):
        limit = request.limit if request.HasField("limit") else rules.DEFAULT_LIST_LIMIT
        # a number that is no status (UNSPECIFIED, or one this server does not know) is refused naming it
        statuses = [protocol.STATUS_NAME.get(s) or _enum_name(pb.JobStatus, s) for s in request.status]
        jobs, after = await self.core.jobs(owner, limit=limit, starting_after=request.starting_after, statuses=statuses)
        return pb.ListJobsResponse(
            jobs=[job.to_proto() for job in jobs], has_more=after is not None, next_starting_after=after or ""
        )

    @edge
    async def CancelJob(self, request, context, owner):
        return pb.CancelJobResponse(job=(await self.core.cancel(owner, _job_id(request))).to_proto())

    @edge
    async def GetArtifact(self, request, context, owner):
        if request.kind not in protocol.ARTIFACT_NAME:
            raise InvalidInput("kind must be ARTIFACT_KIND_IMAGE or ARTIFACT_KIND_FRAME", "kind")
        kind = protocol.ARTIFACT_NAME[request.kind]
        data, media_type = await self.core.artifact(owner, _job_id(request), kind, request.index)
        return pb.GetArtifactResponse(data=data, media_type=media_type)

    @edge
    async def ListModels(self, request, context, owner):
        return pb.ListModelsResponse(models=[served.to_proto() for served in await self.core.live_models()])

    @edge
    @streaming
    async def StreamJobEvents(self, request, context, owner):
        after = rules.check_event_id(request.after_event_id or "0", "after_event_id")  # as REST's Last-Event-ID
        async for event in self.core.follow(owner, _job_id(request), after):
            yield pb.StreamJobEventsResponse(event=event.to_proto())

    @edge
    @streaming
    @submitting
    async def GenerateStream(self, request, context, owner):
        body = protocol.generation_from_proto(_params(request)) | protocol.job_fields_from_proto(request)
        job = await self.core.submit_generation(owner, body, _metadata(context, IDEMPOTENCY_METADATA_KEY))
        yield pb.GenerateStreamResponse(job=job.to_proto())
        finished = False
        try:
            async for event in self.core.follow(owner, job.id):
                finished = event.terminal
                yield pb.GenerateStreamResponse(event=event.to_proto())
        finally:
            if not finished:  # the caller left mid-stream: its job should not keep the GPU busy
                task = asyncio.get_running_loop().create_task(self._cancel_quietly(owner, job.id))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)

    async def _cancel_quietly(self, owner: str, job_id: str) -> None:
        with contextlib.suppress(ServiceError):
            await self.core.cancel(owner, job_id)


def _job_id(request) -> str:
    if not request.job_id:
        raise InvalidInput("job_id is required", "job_id")
    return request.job_id


async def watch_health(core: Core, servicer: health.aio.HealthServicer, interval_s: float = 1.0) -> None:
    """Mirror the core's readiness into grpc.health.v1 (no HTTP: the same Redis reads as /readyz)."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    known: set[str] = set()
    while True:
        readiness = await core.readiness()
        ready = readiness["status"] == "ready"
        for name in ("", SERVICE_NAME):
            await servicer.set(name, serving if ready else not_serving)
        live = set(readiness.get("workers") or {}) if ready else set()
        known |= live
        for model in known:
            await servicer.set(f"{SERVICE_NAME}/{model}", serving if model in live else not_serving)
        await asyncio.sleep(interval_s)


async def start_server(
    core: Core, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, health_interval_s: float = 1.0
) -> tuple[grpc.aio.Server, int, asyncio.Task]:
    """A started server over `core`: (server, bound port, health task). Stop with `stop_server`."""
    options = [
        ("grpc.max_receive_message_length", protocol.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", protocol.MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    server = grpc.aio.server(options=options, interceptors=[TolerantParsing()])
    pb_grpc.add_LatentdServiceServicer_to_server(LatentdServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    await server.start()
    watcher = asyncio.get_running_loop().create_task(watch_health(core, health_servicer, health_interval_s))
    return server, bound, watcher


async def stop_server(server: grpc.aio.Server, watcher: asyncio.Task, grace_s: float | None = 5.0) -> None:
    await cancel_and_wait(watcher)
    await server.stop(grace_s)


async def serve(host: str, port: int) -> int:
    from services.common.settings import get_settings

    core = await Core.open(get_settings())
    server, bound, watcher = await start_server(core, host=host, port=port)
    # a taken port or "off" must not stop the door from serving jobs (deploy/README)
    metrics_port = serve_from_env("LATENTD_GRPC_METRICS_PORT", DEFAULT_METRICS_PORT)
    log.info("gRPC on %s:%d; metrics on %s", host, bound, metrics_port or "no port")
    print(json.dumps({"grpc_port": bound}), flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await stop_server(server, watcher)
    await core.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from services.api.__main__ import open_bind_refusal
    from services.common.settings import get_settings

    parser = argparse.ArgumentParser(description="latentd gRPC front door")
    parser.add_argument(
        "--host",
        default=os.environ.get("LATENTD_GRPC_HOST", "127.0.0.1"),
        help="bind address (default 127.0.0.1; 0.0.0.0 only with API keys configured)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("LATENTD_GRPC_PORT", DEFAULT_PORT)))
    args = parser.parse_args(argv)
    refusal = open_bind_refusal(get_settings(), args.host, "the gRPC door")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    raise SystemExit(main())
