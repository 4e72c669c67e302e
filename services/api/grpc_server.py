"""The gRPC front door (latentd.v1.LatentdService), beside the REST gateway.

    python -m services.api.grpc_server [--port 50051] [--rest-url http://127.0.0.1:8000]

Every RPC goes through the REST gateway's own endpoints (same job store, Redis event stream,
API keys, quotas and validation), so the two front doors cannot drift apart: the gRPC server
translates messages and status codes and never touches Redis or a model itself.
The caller's `authorization: Bearer <key>` metadata is forwarded as the HTTP header.

Also served: grpc.health.v1 (NOT_SERVING while the gateway reports Redis or every worker of the
model away, polled from /readyz and /v1/models) and server reflection.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from client.latentd_client import errors
from client.latentd_client import grpc_transport as conv
from client.latentd_client.rest import SseParser, raise_for_response
from services.api import metrics
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc

log = logging.getLogger("latentd.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LatentdService"].full_name
DEFAULT_PORT = 50051
MAX_MESSAGE_BYTES = conv.MAX_MESSAGE_BYTES

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
_STATUS_OF_ERROR: dict[type, grpc.StatusCode] = {
    errors.AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RateLimitError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def _abort(context: grpc.ServicerContext, exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, errors.LatentdError):
        code = next((c for cls, c in _STATUS_OF_ERROR.items() if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
        trailers = [(k, v) for k, v in ((conv.PARAM_METADATA_KEY, exc.param), (conv.TYPE_METADATA_KEY, exc.type)) if v]
        if exc.retry_after:
            trailers.append(("retry-after", str(int(exc.retry_after))))
        message = exc.message
    elif isinstance(exc, (ValueError, KeyError)):
        code, trailers, message = grpc.StatusCode.INVALID_ARGUMENT, [], str(exc).strip("'\"")
    else:
        log.exception("unexpected error in gRPC handler")
        code, trailers, message = grpc.StatusCode.INTERNAL, [], "internal error"
    if trailers:
        context.set_trailing_metadata(trailers)
    grpc_requests_total.labels(context_method(context), code.name).inc()
    context.abort(code, message)


def context_method(context: grpc.ServicerContext) -> str:
    return getattr(context, "_latentd_method", "unknown")


def mapped_errors(handler: Callable) -> Callable:
    """Map exceptions to status codes at the edge, for unary and streaming handlers alike."""
    name = handler.__name__
    if getattr(handler, "_streaming", False):

        @functools.wraps(handler)
        def stream(self, request, context):
            context._latentd_method = name
            metrics.grpc_stream_readers.inc()
            try:
                yield from handler(self, request, context)
                grpc_requests_total.labels(name, "OK").inc()
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                if context.is_active():
                    _abort(context, exc)
                grpc_requests_total.labels(name, "CANCELLED").inc()
            finally:
                metrics.grpc_stream_readers.dec()

        return stream

    @functools.wraps(handler)
    def unary(self, request, context):
        context._latentd_method = name
        started = time.perf_counter()
        try:
            reply = handler(self, request, context)
            grpc_requests_total.labels(name, "OK").inc()
            return reply
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            _abort(context, exc)
        finally:
            grpc_request_duration_seconds.labels(name).observe(time.perf_counter() - started)

    return unary


def streaming(handler: Callable) -> Callable:
    handler._streaming = True
    return handler


def _auth_header(context: grpc.ServicerContext) -> dict[str, str]:
    for key, value in context.invocation_metadata():
        if key == "authorization":
            return {"authorization": value}
    return {}


def _require_id(job_id: str) -> str:
    if not job_id:
        raise errors.InvalidRequestError("job_id is required", param="job_id")
    return job_id


class Gateway:
    """The REST gateway seen from here: one pooled HTTP client, the caller's key per call."""

    def __init__(self, rest_url: str, timeout: float = 30.0):
        self.rest_url = rest_url.rstrip("/")
        self.timeout = timeout
        self.http = httpx.Client(
            base_url=self.rest_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    def call(self, context, method: str, path: str, **kw) -> httpx.Response:
        try:
            response = self.http.request(method, path, headers=_auth_header(context), **kw)
        except httpx.TransportError as exc:
            raise errors.UnavailableError(f"REST gateway at {self.rest_url} unreachable: {exc}") from exc
        raise_for_response(response)
        return response

    def events(self, context, job_id: str, after: str):
        """Yields the job's SSE events; stops (and closes the HTTP stream) when the gRPC client goes away."""
        headers = _auth_header(context) | {"accept": "text/event-stream"}
        if after:
            headers["last-event-id"] = after
        stream_http = httpx.Client(base_url=self.rest_url, timeout=httpx.Timeout(self.timeout, read=None))
        context.add_callback(stream_http.close)  # client gone or RPC over: unblock the read, free the reader
        metrics.grpc_stream_readers.inc()
        try:
            with stream_http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for_response(response)
                parser = SseParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                    if not context.is_active():
                        return
        except (httpx.TransportError, RuntimeError) as exc:
            if context.is_active():
                raise errors.UnavailableError(f"event stream of job {job_id} broke: {exc}") from exc
        finally:
            metrics.grpc_stream_readers.dec()
            stream_http.close()


class LatentdServicer(pb_grpc.LatentdServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    @mapped_errors
    def SubmitGeneration(self, request, context):
        body = conv.generation_from_proto(request.params)
        job = self.gateway.call(context, "POST", "/v1/generations", json=body).json()
        return pb.SubmitGenerationResponse(job=conv.job_to_proto(job))

    @mapped_errors
    def SubmitTrajectory(self, request, context):
        if request.params.kind == pb.TRAJECTORY_KIND_UNSPECIFIED:
            raise errors.InvalidRequestError("kind must be one of forward, reverse, guidance_sweep", param="kind")
        body = conv.trajectory_from_proto(request.params)
        job = self.gateway.call(context, "POST", "/v1/trajectories", json=body).json()
        return pb.SubmitTrajectoryResponse(job=conv.job_to_proto(job))

    @mapped_errors
    def GetJob(self, request, context):
        job = self.gateway.call(context, "GET", f"/v1/jobs/{_require_id(request.job_id)}").json()
        return pb.GetJobResponse(job=conv.job_to_proto(job))

    @mapped_errors
    def CancelJob(self, request, context):
        job = self.gateway.call(context, "POST", f"/v1/jobs/{_require_id(request.job_id)}/cancel").json()
        return pb.CancelJobResponse(job=conv.job_to_proto(job))

    @mapped_errors
    def GetArtifact(self, request, context):
        if request.kind not in conv.ARTIFACT_NAME:
            raise errors.InvalidRequestError("kind must be ARTIFACT_KIND_IMAGE or ARTIFACT_KIND_FRAME", param="kind")
        if request.index < 0:
            raise errors.InvalidRequestError(f"index must be >= 0, got {request.index}", param="index")
        kind = conv.ARTIFACT_NAME[request.kind]
        response = self.gateway.call(context, "GET", f"/v1/jobs/{_require_id(request.job_id)}/{kind}s/{request.index}")
        return pb.GetArtifactResponse(
            data=response.content, media_type=response.headers.get("content-type", "image/png")
        )

    @mapped_errors
    def ListModels(self, request, context):
        body = self.gateway.call(context, "GET", "/v1/models").json()
        models = body.get("models", body.get("data", [])) if isinstance(body, dict) else body
        return pb.ListModelsResponse(models=[conv.model_to_proto(m) for m in models])

    @mapped_errors
    @streaming
    def StreamJobEvents(self, request, context):
        for event in self.gateway.events(context, _require_id(request.job_id), request.after_event_id):
            yield pb.StreamJobEventsResponse(event=conv.event_to_proto(event))
            if event.terminal:
                return

    @mapped_errors
    @streaming
    def GenerateStream(self, request, context):
        body = conv.generation_from_proto(request.params)
        job = self.gateway.call(context, "POST", "/v1/generations", json=body).json()
        finished = threading.Event()

        def cancel_if_abandoned():  # the caller left mid-stream: its job should not keep the GPU busy
            if not finished.is_set():
                try:
                    self.gateway.call(context, "POST", f"/v1/jobs/{job['id']}/cancel")
                except errors.LatentdError:
                    pass  # already finished meanwhile

        context.add_callback(cancel_if_abandoned)
        yield pb.GenerateStreamResponse(job=conv.job_to_proto(job))
        for event in self.gateway.events(context, job["id"], ""):
            if event.terminal:
                finished.set()
            yield pb.GenerateStreamResponse(event=conv.event_to_proto(event))
            if event.terminal:
                return


class HealthWatcher(threading.Thread):
    """Mirrors the gateway's readiness into grpc.health.v1: "" and the service name follow /readyz;
    `latentd.v1.LatentdService/<model>` follows that model's live workers."""

    def __init__(self, gateway: Gateway, servicer: health.HealthServicer, interval_s: float = 1.0):
        super().__init__(name="latentd-grpc-health", daemon=True)
        self.gateway, self.servicer, self.interval_s = gateway, servicer, interval_s
        self.stopped = threading.Event()
        self.known_models: set[str] = set()

    def check_once(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            ready = self.gateway.http.get("/readyz", timeout=2.0)
            ok, details = ready.status_code == 200, ready.json()
        except (httpx.HTTPError, ValueError):
            ok, details = False, {}
        for name in ("", SERVICE_NAME):
            self.servicer.set(name, serving if ok else not_serving)
        # /readyz: {"status": "ready", "redis": true, "workers": {"<model>": <live workers>}}
        workers = details.get("workers") if isinstance(details, dict) else None
        live = {m for m, n in (workers or {}).items() if n} if ok else set()
        self.known_models |= live
        for model in self.known_models:
            self.servicer.set(f"{SERVICE_NAME}/{model}", serving if model in live else not_serving)

    def run(self) -> None:
        while not self.stopped.wait(0 if not hasattr(self, "_ran") else self.interval_s):
            self._ran = True
            try:
                self.check_once()
            except Exception:
                log.warning("health check failed", exc_info=True)


def build_server(
    rest_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_workers: int = 64,
    health_interval_s: float = 1.0,
) -> tuple[grpc.Server, int, HealthWatcher]:
    """The configured, not yet started server; returns (server, bound port, health watcher)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="latentd-grpc"), options=options
    )
    gateway = Gateway(rest_url)
    pb_grpc.add_LatentdServiceServicer_to_server(LatentdServicer(gateway), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"cannot bind gRPC server to {host}:{port}")
    return server, bound, HealthWatcher(gateway, health_servicer, health_interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="latentd gRPC front door")
    parser.add_argument(
        "--host",
        default=os.environ.get("LATENTD_GRPC_HOST", "127.0.0.1"),
        help="bind address (default 127.0.0.1; 0.0.0.0 only with API keys configured)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("LATENTD_GRPC_PORT", DEFAULT_PORT)))
    parser.add_argument(
        "--rest-url",
        default=os.environ.get("LATENTD_REST_URL", "http://127.0.0.1:8000"),
        help="the REST gateway this server fronts",
    )
    args = parser.parse_args(argv)
    from services.api.__main__ import is_loopback
    from services.common.settings import get_settings

    if not get_settings().key_hashes() and not is_loopback(args.host):
        print(
            f"refusing to bind to {args.host}: no API keys are configured (set LATENTD_API_KEY_HASHES), "
            "so latentd serves open on loopback only",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied call is noise
    server, port, watcher = build_server(args.rest_url, host=args.host, port=args.port)
    metrics_port = os.environ.get("LATENTD_GRPC_METRICS_PORT", str(metrics.DEFAULT_GRPC_METRICS_PORT)).strip().lower()
    if metrics_port not in ("off", "none", "-1", ""):
        try:
            log.info("metrics on :%d/metrics", metrics.start_metrics_server(int(metrics_port)))
        except OSError as exc:  # a second process on the host: serve jobs anyway
            log.warning("metrics server not started on port %s: %s", metrics_port, exc)
    server.start()
    watcher.start()
    metrics.start_metrics_server(int(os.environ.get("LATENTD_GRPC_METRICS_PORT", metrics.DEFAULT_GRPC_METRICS_PORT)))
    log.info("gRPC on %s:%d, fronting %s", args.host, port, args.rest_url)
    print(json.dumps({"grpc_port": port}), flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    watcher.stopped.set()
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
