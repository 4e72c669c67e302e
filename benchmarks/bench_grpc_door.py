"""What the gRPC door adds on top of the REST gateway, before and after it became an adapter over the core.

    python -m benchmarks.bench_grpc_door [--baseline-ref ac2864b] [--rounds 60]

One stack (Redis, a worker on the default model, the REST gateway) serves three ways in at once: REST
itself; the gRPC door of this checkout (over the core, no HTTP); and the gRPC door of `--baseline-ref`
(an HTTP client of the REST gateway), run from a temporary git worktree of that commit against the same
gateway. Interleaved rounds time (a) a submit and (b) the first event of a job's stream through each; the
door's added latency is its time minus REST's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

from scripts import run_stack
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"


def old_door(ref: str, folder: Path, rest_url: str, redis_url: str, port: int, log) -> subprocess.Popen:
    """The gRPC door of commit `ref`, from a worktree, fronting this checkout's REST gateway."""
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), ref], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "scripts.gen_proto"], cwd=folder, check=True, capture_output=True)
    # a free metrics port: that door crashed with "off" (one of the defects its successor fixed)
    env = run_stack.child_env(redis_url, api_keys=KEY, grpc_metrics_port=run_stack.free_port())
    env["PYTHONPATH"] = str(folder)
    command = [sys.executable, "-m", "services.api.grpc_server", "--rest-url", rest_url, "--port", str(port)]
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline-ref", default="ac2864b", help="commit whose gRPC door proxied to REST")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--model", default=str(run_stack.DEFAULT_MODEL))
    args = parser.parse_args(argv)

    procs: list[subprocess.Popen] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-grpc-door-"))
    baseline_tree = workdir / "baseline"
    try:
        redis_proc, redis_url = run_stack.start_redis()
        procs.append(redis_proc)
        procs.append(run_stack.start_worker(redis_url, Path(args.model), log=open(workdir / "worker.log", "w")))
        api_port, new_port, old_port = run_stack.free_port(), run_stack.free_port(), run_stack.free_port()
        rest = f"http://127.0.0.1:{api_port}"
        settings = dict(api_keys=KEY, max_queue_per_model=10_000)
        procs.append(run_stack.start_api(redis_url, api_port, log=open(workdir / "api.log", "w"), **settings))
        procs.append(
            run_stack.start_grpc(
                redis_url, new_port, log=open(workdir / "grpc.log", "w"), grpc_metrics_port="off", **settings
            )
        )
        procs.append(
            old_door(args.baseline_ref, baseline_tree, rest, redis_url, old_port, open(workdir / "old.log", "w"))
        )
        run_stack.wait_ready(rest, timeout_s=300, procs=tuple(procs))
        metadata = (("authorization", f"Bearer {KEY}"),)
        http = httpx.Client(base_url=rest, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        doors = {"after": f"127.0.0.1:{new_port}", "before": f"127.0.0.1:{old_port}"}
        channels = {name: grpc.insecure_channel(target) for name, target in doors.items()}
        stubs = {name: pb_grpc.LatentdServiceStub(channel) for name, channel in channels.items()}
        for channel in channels.values():
            grpc.channel_ready_future(channel).result(timeout=120)
        body = {"prompt": "a red circle on a white background", "num_inference_steps": 1, "seed": 1}
        params = pb.GenerationParams(prompt=body["prompt"], num_inference_steps=1, seed=1)
        submit = {"rest": [], "before": [], "after": []}
        first_event = {"rest": [], "before": [], "after": []}
        job_id = http.post("/v1/generations", json=body).json()["id"]
        for round_index in range(args.rounds + 5):  # the first 5 rounds warm every path up
            timings = {}
            started = time.perf_counter()
            job_id = http.post("/v1/generations", json=body).json()["id"]
            timings["rest"] = (time.perf_counter() - started, None)
            for name, stub in stubs.items():
                started = time.perf_counter()
                stub.SubmitGeneration(pb.SubmitGenerationRequest(params=params), metadata=metadata)
                timings[name] = (time.perf_counter() - started, None)
            for name, (seconds, _) in timings.items():
                if round_index >= 5:
                    submit[name].append(seconds)
            started = time.perf_counter()
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                next(line for line in response.iter_lines() if line.startswith("event:"))
            rest_first = time.perf_counter() - started
            for name, stub in stubs.items():
                started = time.perf_counter()
                call = stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job_id), metadata=metadata)
                next(call)
                seconds = time.perf_counter() - started
                call.cancel()
                if round_index >= 5:
                    first_event[name].append(seconds)
            if round_index >= 5:
                first_event["rest"].append(rest_first)
        result = {"rounds": args.rounds, "baseline_ref": args.baseline_ref}
        for what, samples in (("submit", submit), ("first_event", first_event)):
            result[what] = {name: percentiles(values) for name, values in samples.items()}
            rest_p50 = result[what]["rest"]["p50_ms"]
            result[what]["added_p50_ms"] = {
                door: round(result[what][door]["p50_ms"] - rest_p50, 2) for door in ("before", "after")
            }
        print(json.dumps(result))
        for channel in channels.values():
            channel.close()
        return 0
    finally:
        run_stack.stop(procs)
        if baseline_tree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline_tree)], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main())
