"""Failover and drain with the deploy settings (lease 15 s, reap every 2 s, drain grace 45 s), on the real stack:
its own redis-server, two Celery workers, the gateway.

1. failover: 16 long jobs in flight on two workers (16 task threads each, so the survivor has room); SIGKILL the
   one holding more; the seconds until every job it held is requeued, has started its next attempt on the other
   (the issue's goal: within 30 s), and until all 16 succeed.
2. drain: 16 long jobs on one worker; SIGTERM it and start its replacement; the seconds until it exits (its
   code, which must be 0), how many jobs it requeued, and until the 16 succeed.

    python -m benchmarks.bench_failover                      # the deploy defaults (about 6 minutes on 2 cores)
    python -m benchmarks.bench_failover --lease 3 --reap 0.5 --grace 5

Prints one JSON line. tests/faults/ checks the same behaviour with short settings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import redis

from scripts import run_stack
from services.common import workers
from services.common.jobstore import events_key, job_key

MODEL = run_stack.DEFAULT_MODEL


class Bench:
    def __init__(self, redis_url: str, url: str, logs: Path, settings: dict):
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.redis_url, self.url, self.logs, self.settings = redis_url, url, logs, settings
        self.procs: list = []

    def start_worker(self):
        log = open(self.logs / f"worker-{len(self.procs)}.log", "w")
        proc = run_stack.start_worker(self.redis_url, MODEL, concurrency=16, log=log, **self.settings)
        self.procs.append(proc)
        return proc

    def wait(self, what: str, check, timeout_s: float = 600.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise SystemExit(f"not within {timeout_s:.0f} s: {what}")

    def wait_live(self, procs) -> None:
        pids = {p.pid for p in procs}
        self.wait(
            "workers live",
            lambda: (
                pids
                <= {
                    int(w.rsplit("-", 1)[1])
                    for w in workers.live_workers(self.redis, [MODEL.name], 30).get(MODEL.name, [])
                }
            ),
        )

    def submit(self, n: int, steps: int, guidance: float = 1.0) -> list[str]:
        body = {
            "prompt": "a red circle on a white background",
            "num_inference_steps": steps,
            "guidance_scale": guidance,
        }
        return [httpx.post(f"{self.url}/v1/generations", json=body | {"seed": i}).json()["id"] for i in range(n)]

    def field(self, job_id: str, name: str) -> str | None:
        return self.redis.hget(job_key(job_id), name)

    def running(self, ids: list[str]) -> bool:
        return all(self.field(j, "status") == "running" for j in ids)

    def done(self, ids: list[str]) -> bool:
        return all(self.field(j, "status") in ("succeeded", "failed", "cancelled") for j in ids)

    def outcomes(self, ids: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in ids:
            out[self.field(j, "status")] = out.get(self.field(j, "status"), 0) + 1
        return out

    def requeued_at(self, job_id: str) -> float | None:
        """When the job's first requeue was written (its `queued` event's emitted_at), or None."""
        for _, f in self.redis.xrange(events_key(job_id)):
            data = json.loads(f["data"])
            if f["event"] == "queued" and data.get("requeued"):
                return data["emitted_at"]
        return None

    def started(self, job_id: str, attempt: int) -> bool:
        return any(
            f["event"] == "started" and json.loads(f["data"])["attempt"] == attempt
            for _, f in self.redis.xrange(events_key(job_id))
        )

    def holder(self, job_id: str) -> int:
        return int(self.field(job_id, "worker").rsplit("-", 1)[1])


def failover(bench: Bench, steps: int) -> dict:
    a, b = bench.start_worker(), bench.start_worker()
    bench.wait_live([a, b])
    ids = bench.submit(16, steps)
    bench.wait("16 running", lambda: bench.running(ids))
    held: dict[int, list[str]] = {}
    for j in ids:
        held.setdefault(bench.holder(j), []).append(j)
    victim, orphans = max(held.items(), key=lambda item: len(item[1]))
    killed, killed_wall = time.monotonic(), time.time()
    os.kill(victim, signal.SIGKILL)
    bench.wait("orphans running again", lambda: all(bench.started(j, 2) for j in orphans))
    running_again_s = time.monotonic() - killed
    requeued_s = max(bench.requeued_at(j) for j in orphans) - killed_wall
    bench.wait("all done", lambda: bench.done(ids))
    result = {
        "orphans": len(orphans),
        "requeued_s": round(requeued_s, 1),
        "running_again_s": round(running_again_s, 1),
        "all_done_s": round(time.monotonic() - killed, 1),
        "outcomes": bench.outcomes(ids),
    }
    for proc in (a, b):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    return result


def drain(bench: Bench, steps: int) -> dict:
    worker = bench.start_worker()
    bench.wait_live([worker])
    ids = bench.submit(16, steps, guidance=7.5)  # 32 rows: longer than the grace
    bench.wait("16 running", lambda: bench.running(ids))
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    replacement = bench.start_worker()
    worker.wait()
    exit_s = time.monotonic() - signalled
    bench.wait("all done", lambda: bench.done(ids))
    result = {
        "exit_code": worker.returncode,
        "exit_s": round(exit_s, 1),
        "requeued": sum(bench.field(j, "attempt") == "2" for j in ids),
        "all_done_s": round(time.monotonic() - signalled, 1),
        "outcomes": bench.outcomes(ids),
    }
    replacement.send_signal(signal.SIGTERM)
    replacement.wait()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease", type=float, default=15.0)
    parser.add_argument("--reap", type=float, default=2.0)
    parser.add_argument("--grace", type=float, default=45.0)
    parser.add_argument("--steps", type=int, default=1000, help="steps of each job: long enough to outlast the grace")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, run_stack.interrupted)  # stopped early: its processes go with it
    settings = dict(lease_s=args.lease, reap_interval_s=args.reap, drain_grace_s=args.grace, worker_torch_threads=1)
    logs = Path(tempfile.mkdtemp(prefix="latentd-failover-"))
    redis_proc, redis_url = run_stack.start_redis()
    port = run_stack.free_port()
    url = f"http://127.0.0.1:{port}"
    api = run_stack.start_api(redis_url, port, log=open(logs / "api.log", "w"), max_queue_per_key=64)
    bench = Bench(redis_url, url, logs, settings)
    try:
        result = {"settings": settings, "failover": failover(bench, args.steps), "drain": drain(bench, args.steps)}
    finally:
        run_stack.stop([redis_proc, api, *bench.procs])
    print(json.dumps(result | {"logs": str(logs)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
