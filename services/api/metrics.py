"""Gateway metrics: requests, stream readers, queue depth (jobs submitted and refusals: services/core/metrics.py).

Served by `start_metrics_server(port)` on a port of its own (not the public API port); with several server
processes (LATENTD_PROCESSES), by the parent process in prometheus_client's multiprocess mode
(`serve_multiprocess`): one scrape target per gateway container, summed over its processes. Labels are
bounded sets (route template, method, status, kind, model, reason); never a job id or an API key.
Queue depth is read from Redis at scrape time by `QueueDepthCollector`, so it is exact whenever
Prometheus looks, not whenever a request happened to pass through this process; so is the job store's memory
against its maxmemory (at which Redis refuses writes: new jobs get 503 and results wait, docs/failures.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import metrics_server, workers
from services.common.jobstore import queued_count

DEFAULT_API_METRICS_PORT = 9464
DEFAULT_GRPC_METRICS_PORT = 9466  # the gRPC front door runs as its own process
HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

http_requests_total = Counter(
    "latentd_http_requests_total",
    "HTTP requests answered by the gateway, by route template, method and status code.",
    ["route", "method", "status"],
)
http_request_duration_seconds = Histogram(
    "latentd_http_request_duration_seconds",
    "Time to answer an HTTP request (for SSE: time to the response head).",
    ["route", "method"],
    buckets=HTTP_LATENCY_BUCKETS,
)
# livesum: with several server processes (multiprocess mode), the sum over the processes alive now
sse_readers = Gauge("latentd_sse_readers", "Server-Sent Events streams open now.", multiprocess_mode="livesum")
grpc_stream_readers = Gauge("latentd_grpc_stream_readers", "gRPC event streams open now.", multiprocess_mode="livesum")


def observe_http_request(route: str, method: str, status: int, duration_s: float) -> None:
    """Record one answered request; `route` is the route template, never the raw path."""
    http_requests_total.labels(route=route, method=method, status=str(status)).inc()
    http_request_duration_seconds.labels(route=route, method=method).observe(duration_s)


class QueueDepthCollector(Collector):
    """`latentd_queue_depth{model}` and `latentd_workers_live{model}`, read from Redis at scrape, and the job
    store's `latentd_redis_memory_used_bytes` and `latentd_redis_maxmemory_bytes` (INFO memory; 0: no limit).

    `models` returns the models to report (those workers published). The depth is the jobs queued in Redis, not
    the model's Celery messages (wake-up calls that top-ups add and lost sends remove).
    """

    def __init__(
        self,
        redis_client: Any,
        models: Callable[[], Iterable[str]],
        stale_after_s: float = workers.DEFAULT_STALE_AFTER_S,
    ) -> None:
        self._redis = redis_client
        self._models = models
        self._stale_after_s = stale_after_s

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth, live, used, limit = self._families()
        try:
            models = sorted(set(self._models()))
            serving = workers.live_workers(self._redis, models, self._stale_after_s)
            for model in models:
                depth.add_metric([model], queued_count(self._redis, model))
                live.add_metric([model], len(serving.get(model, ())))
            memory = self._redis.info("memory")
            used.add_metric([], float(memory["used_memory"]))
            limit.add_metric([], float(memory.get("maxmemory", 0)))
        except Exception:  # noqa: BLE001 - Redis down must not break the scrape of other metrics
            return []
        return [depth, live, used, limit]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "latentd_queue_depth", "Jobs of the model queued in Redis, waiting for a worker.", labels=["model"]
            ),
            GaugeMetricFamily(
                "latentd_workers_live",
                "Workers of the model whose consumer proved alive (heartbeat probe consumed).",
                labels=["model"],
            ),
            GaugeMetricFamily("latentd_redis_memory_used_bytes", "Memory the job store (Redis) uses (used_memory)."),
            GaugeMetricFamily(
                "latentd_redis_maxmemory_bytes",
                "The job store's maxmemory (0: no limit); at it, Redis (noeviction) refuses writes.",
            ),
        )


_queue_depth_collector: QueueDepthCollector | None = None


def register_queue_depth(
    redis_client: Any,
    models: Callable[[], Iterable[str]],
    registry: CollectorRegistry = REGISTRY,
) -> QueueDepthCollector:
    """Install (or replace) the queue-depth collector; call once from the API lifespan."""
    global _queue_depth_collector
    if _queue_depth_collector is not None:
        try:
            registry.unregister(_queue_depth_collector)
        except KeyError:
            pass
    _queue_depth_collector = QueueDepthCollector(redis_client, models)
    registry.register(_queue_depth_collector)
    return _queue_depth_collector


def unregister_queue_depth(registry: CollectorRegistry = REGISTRY) -> None:
    global _queue_depth_collector
    if _queue_depth_collector is not None:
        try:
            registry.unregister(_queue_depth_collector)
        except KeyError:
            pass
        _queue_depth_collector = None


def metrics_port_from_env() -> int:
    return int(os.environ.get("LATENTD_API_METRICS_PORT", DEFAULT_API_METRICS_PORT))


def start_metrics_server(port: int | None = None, addr: str = "0.0.0.0") -> int:
    """Serve /metrics on `port` (default $LATENTD_API_METRICS_PORT; 0 picks a free one); returns the bound port."""
    return metrics_server.start(metrics_port_from_env() if port is None else port, addr=addr)


def serve_metrics_from_env(addr: str = "0.0.0.0") -> int | None:
    """Start the metrics server on $LATENTD_API_METRICS_PORT (default {DEFAULT_API_METRICS_PORT}); "off" disables it."""
    return metrics_server.serve_from_env("LATENTD_API_METRICS_PORT", DEFAULT_API_METRICS_PORT, addr=addr)


def serve_multiprocess(redis_client: Any, models: Callable[[], Iterable[str]]) -> int | None:
    """In the parent of several server processes: serve /metrics on $LATENTD_API_METRICS_PORT from the files
    every process writes under $PROMETHEUS_MULTIPROC_DIR (counters and histograms summed, `latentd_sse_readers`
    summed over the live processes), plus the queue depth read from Redis at scrape. The process_* metrics
    are per process and are not exported in this mode."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueDepthCollector(redis_client, models))
    value = os.environ.get("LATENTD_API_METRICS_PORT", str(DEFAULT_API_METRICS_PORT)).strip().lower()
    if value in ("off", "none", "-1", ""):
        return None
    try:
        server, _thread = start_http_server(int(value), addr="0.0.0.0", registry=registry)
        return server.server_address[1]
    except OSError as error:
        import logging

        logging.getLogger(__name__).warning("metrics server not started on port %s: %s", value, error)
        return None


def forget_dead_processes(directory: str) -> list[int]:
    """Drop the live gauges of server processes that have exited (killed, restarted by the supervisor), so
    `latentd_sse_readers` does not count the readers of a process that is gone."""
    from prometheus_client import multiprocess

    gone = set()
    for name in os.listdir(directory):
        if name.startswith("gauge_live") and name.endswith(".db"):
            pid = int(name.rsplit("_", 1)[1][:-3])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                gone.add(pid)
            except PermissionError:
                pass
    for pid in gone:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(gone)
