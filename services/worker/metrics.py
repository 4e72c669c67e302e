"""Worker metrics: queue wait, run time, UNet step time, rows per UNet call, VAE, outcomes.

One worker is one process (Celery threads pool) with one engine thread per model, so the
default registry of prometheus_client (thread-safe, no multiprocess mode) is exact: task
threads observe wait/run/outcomes, the engine thread observes step time and batch rows.
Served by `start_metrics_server(port)` on a port of its own. Labels are bounded: model, kind,
error_type; never a job id.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import metrics_server

DEFAULT_WORKER_METRICS_PORT = 9465

# Waits run from milliseconds (idle worker) to many minutes (a deep queue).
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# One UNet forward: sub-millisecond for tiny test models, ~1 s for SDXL at a big batch.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
VAE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

queue_wait_seconds = Histogram(
    "latentd_queue_wait_seconds",
    "Time from enqueue (job record) to a worker starting the job's first attempt.",
    ["model"],
    buckets=WAIT_BUCKETS,
)
job_run_seconds = Histogram(
    "latentd_job_run_seconds",
    "Time from start to the end of a job on the worker, whatever the outcome.",
    ["model", "kind"],
    buckets=RUN_BUCKETS,
)
unet_step_seconds = Histogram(
    "latentd_unet_step_seconds",
    "One batched UNet forward (all rows of one engine iteration).",
    ["model"],
    buckets=STEP_BUCKETS,
)
batch_rows = Histogram(
    "latentd_batch_rows",
    "Rows per UNet call (a guided image takes two rows).",
    ["model"],
    buckets=ROW_BUCKETS,
)
vae_decode_seconds = Histogram(
    "latentd_vae_decode_seconds",
    "One batched VAE decode of finished latents.",
    ["model"],
    buckets=VAE_BUCKETS,
)
steps_total = Counter("latentd_steps_total", "Denoising steps completed, summed over requests.", ["model"])
images_total = Counter("latentd_images_total", "Images produced.", ["model"])
job_failures_total = Counter(
    "latentd_job_failures_total",
    "Jobs that failed, by error type (exception class name or a stable code).",
    ["model", "error_type"],
)
cancellations_total = Counter("latentd_cancellations_total", "Jobs cancelled while queued or running.", ["model"])
warmup_seconds = Gauge(
    "latentd_warmup_seconds",
    "Time the model's engine took at load to run (and compile, where compile is on) every row bucket of the "
    "backbone and every image bucket of the VAE decoder, before the worker served it.",
    ["model"],
)
engine_active_requests = Gauge("latentd_engine_active_requests", "Requests in the engine's batch now.", ["model"])
engine_iteration_seconds = Gauge(
    "latentd_engine_iteration_seconds",
    "How long the engine has been inside its current iteration (0 between iterations); past LATENTD_ENGINE_STALL_S "
    "the worker counts its device as hung and hands its jobs back.",
    ["model"],
)
out_of_memory_total = Counter(
    "latentd_out_of_memory_total",
    "Backbone (part=backbone) or VAE decode (part=vae) calls that ran out of device memory; the engine then "
    "lowers that part's rows per call (latentd_row_cap for the backbone) and runs them again.",
    ["model", "part"],
)
row_cap = Gauge(
    "latentd_row_cap",
    "Rows per backbone call the engine takes now: LATENTD_MAX_BATCH_ROWS, lower after running out of memory.",
    ["model"],
)


def observe_queue_wait(model: str, enqueued_at: float, started_at: float | None = None) -> None:
    """Wait = started - enqueued (unix seconds, from the job record); clock skew clamps to 0."""
    started_at = time.time() if started_at is None else started_at
    queue_wait_seconds.labels(model=model).observe(max(0.0, started_at - enqueued_at))


def observe_job_run(model: str, kind: str, seconds: float) -> None:
    job_run_seconds.labels(model=model, kind=kind).observe(seconds)


def observe_unet_call(model: str, rows: int, seconds: float) -> None:
    unet_step_seconds.labels(model=model).observe(seconds)
    batch_rows.labels(model=model).observe(rows)


def observe_row_cap(model: str, rows: int) -> None:
    row_cap.labels(model=model).set(rows)


def record_out_of_memory(model: str, part: str) -> None:
    out_of_memory_total.labels(model=model, part=part).inc()


def observe_vae_decode(model: str, seconds: float) -> None:
    vae_decode_seconds.labels(model=model).observe(seconds)


def observe_warmup(model: str, seconds: float) -> None:
    warmup_seconds.labels(model=model).set(seconds)


def record_steps(model: str, count: int = 1) -> None:
    if count:
        steps_total.labels(model=model).inc(count)


def record_images(model: str, count: int) -> None:
    if count:
        images_total.labels(model=model).inc(count)


def record_failure(model: str, error: BaseException | str) -> None:
    error_type = error if isinstance(error, str) else type(error).__name__
    job_failures_total.labels(model=model, error_type=error_type).inc()


def record_cancellation(model: str) -> None:
    cancellations_total.labels(model=model).inc()


def observe_job_end(model: str, kind: str, status: str, error_type: str | None, run_s: float) -> None:
    """One job attempt ended on this worker: run time, and a failure or cancellation if it was one."""
    observe_job_run(model, kind, run_s)
    if status == "failed":
        record_failure(model, error_type or "unknown")
    elif status == "cancelled":
        record_cancellation(model)


def track_engine(model: str, active_requests: Callable[[], int], stalled_s: Callable[[], float] | None = None) -> None:
    """Read the engine's active request count (e.g. `lambda: engine.active_requests`) and how long its current
    iteration has run at scrape time."""
    engine_active_requests.labels(model=model).set_function(lambda: float(active_requests()))
    if stalled_s is not None:
        engine_iteration_seconds.labels(model=model).set_function(stalled_s)


class GpuMemoryCollector(Collector):
    """`latentd_gpu_memory_bytes{model,kind=allocated|reserved}` from torch.cuda at scrape time."""

    def __init__(self) -> None:
        self._devices: dict[str, Any] = {}

    def track(self, model: str, device: Any) -> None:
        self._devices[model] = device

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = self._family()
        cuda_devices = {m: d for m, d in self._devices.items() if str(d).startswith("cuda")}
        if cuda_devices:
            import torch  # the worker has torch; imported lazily so this module stays light

            for model, device in sorted(cuda_devices.items()):
                family.add_metric([model, "allocated"], torch.cuda.memory_allocated(device))
                family.add_metric([model, "reserved"], torch.cuda.memory_reserved(device))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "latentd_gpu_memory_bytes",
            "CUDA memory held by torch for the model's device.",
            labels=["model", "kind"],
        )


gpu_memory = GpuMemoryCollector()
REGISTRY.register(gpu_memory)


def track_gpu_memory(model: str, device: Any) -> None:
    """Report CUDA memory of `device` under `model`; a CPU device reports nothing."""
    gpu_memory.track(model, device)


def metrics_port_from_env() -> int:
    return int(os.environ.get("LATENTD_WORKER_METRICS_PORT", DEFAULT_WORKER_METRICS_PORT))


def start_metrics_server(port: int | None = None, addr: str = "0.0.0.0") -> int:
    """Serve /metrics on `port` (default $LATENTD_WORKER_METRICS_PORT; 0 picks a free one); returns the bound port."""
    return metrics_server.start(metrics_port_from_env() if port is None else port, addr=addr)


def serve_metrics_from_env(addr: str = "0.0.0.0") -> int | None:
    """Start the metrics server on $LATENTD_WORKER_METRICS_PORT (default {DEFAULT_WORKER_METRICS_PORT}); "off" disables it."""
    return metrics_server.serve_from_env("LATENTD_WORKER_METRICS_PORT", DEFAULT_WORKER_METRICS_PORT, addr=addr)
