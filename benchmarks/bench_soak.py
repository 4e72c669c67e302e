"""Soak: thousands of jobs through the real stack (its own redis-server, one Celery worker, the gateway), with
previews and every trajectory kind, each job's events read to the end over SSE and a picture fetched. Samples
the worker's and the gateway's RSS as the jobs go and reports the growth over the second half of the run
(the issue's goal: under 5 % for the worker once warm).

    python -m benchmarks.bench_soak                  # 600 jobs (a few minutes on 2 cores)
    python -m benchmarks.bench_soak --long           # 3000 jobs
    python -m benchmarks.bench_soak --jobs 1200 --in-flight 16 --steps 10

Prints a table (jobs done, seconds, worker MB, gateway MB) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from scripts import run_stack

PROMPTS = [
    "a large red circle on a white background",
    "a blue square on a gray background",
    "a small yellow triangle on a black background",
    "a green circle on a white background",
]


def job_request(index: int, steps: int) -> tuple[str, dict, str]:
    """(path, body, what to fetch) of job `index`: generations with previews, and every trajectory kind."""
    prompt = PROMPTS[index % len(PROMPTS)]
    kind = index % 8
    if kind == 5:
        return (
            "/v1/trajectories",
            {"kind": "reverse", "prompt": prompt, "num_inference_steps": steps, "trajectory_every": 2, "seed": index},
            "frames/0",
        )
    if kind == 6:
        return (
            "/v1/trajectories",
            {"kind": "forward", "prompt": prompt, "seed": index, "num_inference_steps": steps},
            "frames/1",
        )
    if kind == 7:
        body = {
            "kind": "guidance_sweep",
            "prompt": prompt,
            "guidance_scales": [0, 3, 7.5],
            "num_inference_steps": steps,
            "seed": index,
        }
        return "/v1/trajectories", body, "frames/2"
    body = {"prompt": prompt, "num_inference_steps": steps, "seed": index, "preview_every": 2}
    return "/v1/generations", body, "images/0"


def run_job(client: httpx.Client, index: int, steps: int) -> str:
    path, body, fetch = job_request(index, steps)
    response = client.post(path, json=body)
    response.raise_for_status()
    job_id = response.json()["id"]
    final = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        for line in events.iter_lines():
            if line.startswith("event: ") and line[7:] in ("succeeded", "failed", "cancelled"):
                final = line[7:]
                break
    if final == "succeeded":
        client.get(f"/v1/jobs/{job_id}/{fetch}").raise_for_status()
    return final or "broken"


def rss_mb(proc: psutil.Process) -> float:
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def soak(url: str, worker: psutil.Process, gateway: psutil.Process, jobs: int, in_flight: int, steps: int) -> dict:
    todo: queue.Queue[int] = queue.Queue()
    for index in range(jobs):
        todo.put(index)
    outcomes: dict[str, int] = {}
    done = [0]
    lock = threading.Lock()

    def client_thread() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while True:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                outcome = run_job(client, index, steps)
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    done[0] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    samples = []

    def sample(note: str = "") -> dict:
        row = {
            "jobs": done[0],
            "s": round(time.monotonic() - started, 1),
            "worker_mb": round(rss_mb(worker), 1),
            "gateway_mb": round(rss_mb(gateway), 1),
        }
        samples.append(row)
        print(f"{row['jobs']:>6} {row['s']:>8} {row['worker_mb']:>10} {row['gateway_mb']:>11}  {note}", flush=True)
        return row

    every = max(1, jobs // 20)
    next_at = 0
    while any(thread.is_alive() for thread in threads):
        if done[0] >= next_at:
            sample()
            next_at += every
        time.sleep(0.2)
    end = sample("all done")
    for pause_s in (5, 10):  # then idle: what stays once the last batch's buffers are freed
        time.sleep(pause_s)
        idle = sample("idle")
    half = min(samples, key=lambda row: abs(row["jobs"] - jobs / 2))
    return {
        "jobs": jobs,
        "outcomes": outcomes,
        "wall_s": end["s"],
        "jobs_per_s": round(jobs / end["s"], 2),
        "samples": samples,
        "worker_mb_half_end_idle": [half["worker_mb"], end["worker_mb"], idle["worker_mb"]],
        "gateway_mb_half_end_idle": [half["gateway_mb"], end["gateway_mb"], idle["gateway_mb"]],
        # growth over the second half of the run: from the sample nearest half the jobs to the idle one at the end
        "worker_growth_second_half_pct": round(100 * (idle["worker_mb"] / half["worker_mb"] - 1), 2),
        "gateway_growth_second_half_pct": round(100 * (idle["gateway_mb"] / half["gateway_mb"] - 1), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(run_stack.DEFAULT_MODEL))
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--long", action="store_true", help="3000 jobs")
    parser.add_argument("--in-flight", type=int, default=16, help="clients, each with one job at a time")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, run_stack.interrupted)  # stopped early: its processes go with it
    jobs = 3000 if args.long else args.jobs
    logs = Path(tempfile.mkdtemp(prefix="latentd-soak-"))
    redis_proc, redis_url = run_stack.start_redis()
    procs = [redis_proc]
    try:
        port = run_stack.free_port()
        url = f"http://127.0.0.1:{port}"
        worker = run_stack.start_worker(redis_url, args.model, concurrency=16, log=open(logs / "worker.log", "w"))
        procs.append(worker)
        api = run_stack.start_api(redis_url, port, log=open(logs / "api.log", "w"), max_queue_per_key=64)
        procs.append(api)
        run_stack.wait_ready(url, timeout_s=300, procs=(worker, api))
        print(f"{'jobs':>6} {'seconds':>8} {'worker MB':>10} {'gateway MB':>11}")
        result = soak(url, psutil.Process(worker.pid), psutil.Process(api.pid), jobs, args.in_flight, args.steps)
    finally:
        run_stack.stop(procs)
    result |= {
        "steps": args.steps,
        "in_flight": args.in_flight,
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs",
        "logs": str(logs),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0 if set(result["outcomes"]) == {"succeeded"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
