"""Service benchmark: the same 16 concurrent generation jobs once through the engine in-process and once
through REST -> Redis -> Celery -> engine -> SSE (and the image fetched), in one run. Prints one JSON line:
images/s of both and their ratio (goal >= 0.9), the added latency per job (p50, p95), and the lag from the
engine emitting a step event (its `emitted_at`, stamped on the engine thread) to the SSE reader receiving it.

    python -m benchmarks.bench_service                      # models/shapes-ldm if present, else a tiny model
    python -m benchmarks.bench_service --model PATH --jobs 16 --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from scripts import run_stack

DEFAULT_MODEL = run_stack.DEFAULT_MODEL
PROMPTS = [
    "a large red circle on a white background",
    "a blue square on a gray background",
    "a small yellow triangle on a black background",
    "a green circle on a white background",
]


def job_body(index: int, steps: int) -> dict:
    return {
        "prompt": PROMPTS[index % len(PROMPTS)],
        "seed": 1000 + index,
        "num_inference_steps": steps,
        "guidance_scale": 7.5,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_engine(model_path: Path, jobs: int, steps: int) -> dict:
    from services.worker.engine.engine import Engine
    from services.worker.engine.requests import GenerationRequest
    from services.worker.loading import load_model

    engine = Engine(load_model(model_path), max_batch_rows=64).start()
    try:
        engine.submit(GenerationRequest(request_id="warm", **job_body(0, 2))).result()
        started = time.perf_counter()
        handles = [engine.submit(GenerationRequest(request_id=f"b{i}", **job_body(i, steps))) for i in range(jobs)]
        latencies = []
        for handle in handles:
            handle.result()
            latencies.append(time.perf_counter() - started)
        wall = time.perf_counter() - started
    finally:
        engine.stop()
    return {"wall_s": wall, "latencies": latencies}


def run_one(url: str, body: dict, out: dict, barrier: threading.Barrier) -> None:
    barrier.wait()
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as client:
        job = client.post("/v1/generations", json=body).json()
        lags, terminal = [], None
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "step":
                        lags.append(time.time() - data["emitted_at"])
                    if event in ("succeeded", "failed", "cancelled"):
                        terminal = event
                        break
        image = client.get(f"/v1/jobs/{job['id']}/images/0") if terminal == "succeeded" else None
        timings = client.get(f"/v1/jobs/{job['id']}").json()["timings"]
    out.update(
        queue_s=timings.get("queue_s", 0.0),
        run_s=timings.get("run_s", 0.0),
        latency=time.perf_counter() - started,
        lags=lags,
        status=terminal,
        ok=image is not None and image.status_code == 200,
    )


def bench_service(model_path: Path, jobs: int, steps: int) -> dict:
    procs = []
    try:
        redis_proc, redis_url = run_stack.start_redis()
        procs.append(redis_proc)
        procs.append(run_stack.start_worker(redis_url, model_path, concurrency=max(32, jobs * 2)))
        port = run_stack.free_port()
        procs.append(run_stack.start_api(redis_url, port))
        url = f"http://127.0.0.1:{port}"
        run_stack.wait_ready(url, timeout_s=300, procs=tuple(procs))
        warm = {}
        run_one(url, job_body(0, 2), warm, threading.Barrier(1))
        outs = [{} for _ in range(jobs)]
        barrier = threading.Barrier(jobs + 1)
        threads = [
            threading.Thread(target=run_one, args=(url, job_body(i, steps), outs[i], barrier)) for i in range(jobs)
        ]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        run_stack.stop(procs)
    failed = [o for o in outs if not o.get("ok")]
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not succeed: {failed[:2]}")
    return {
        "wall_s": wall,
        "latencies": [o["latency"] for o in outs],
        "queue_s": [o["queue_s"] for o in outs],
        "run_s": [o["run_s"] for o in outs],
        "lags": [lag for o in outs for lag in o["lags"]],
    }


def model_or_tiny(model: Path | None) -> Path:
    """The model a service benchmark runs: the one named, else the default model, else (a checkout without it)
    a tiny random-weight model built from config."""
    if model is not None:
        return model
    if (DEFAULT_MODEL / "model_index.json").exists():
        return DEFAULT_MODEL
    from tests.fixtures.tiny_model import build_tiny_model

    return build_tiny_model(Path(tempfile.mkdtemp(prefix="latentd-bench-")) / "tiny")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    model = model_or_tiny(args.model)
    engine = bench_engine(model, args.jobs, args.steps)
    service = bench_service(model, args.jobs, args.steps)
    engine_ips, service_ips = args.jobs / engine["wall_s"], args.jobs / service["wall_s"]
    result = {
        "bench": "service",
        "model": Path(model).resolve().name,
        "jobs": args.jobs,
        "steps": args.steps,
        "machine": platform.processor() or platform.machine(),
        "engine_images_per_s": round(engine_ips, 3),
        "service_images_per_s": round(service_ips, 3),
        "ratio": round(service_ips / engine_ips, 3),
        "added_latency_p50_s": round(percentile(service["latencies"], 0.5) - percentile(engine["latencies"], 0.5), 3),
        "added_latency_p95_s": round(percentile(service["latencies"], 0.95) - percentile(engine["latencies"], 0.95), 3),
        "step_event_lag_p50_ms": round(1000 * statistics.median(service["lags"]), 2),
        "step_event_lag_p95_ms": round(1000 * percentile(service["lags"], 0.95), 2),
        "step_events": len(service["lags"]),
        "service_queue_wait_p50_s": round(percentile(service["queue_s"], 0.5), 3),
        "service_queue_wait_max_s": round(max(service["queue_s"]), 3),
        "service_run_p50_s": round(percentile(service["run_s"], 0.5), 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
