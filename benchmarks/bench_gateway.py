"""Gateway load benchmark (issue 12): the gateway under many readers, greedy tenants, huge bodies. One run
starts its own stack (redis-server, one Celery worker as `make run` starts it, the gateway under test) and
prints one JSON line with every figure:

- fanout: N SSE readers (raw sockets) on a few running jobs: readers that got every event and the terminal
  one, events delivered, the gateway's TCP connections to Redis (max, sampled from /proc) and Redis's count
  of all its clients;
- reads: `wrk -t2 -c100` on GET /livez, on GET /v1/jobs/{id} of a succeeded job (settled: read from Redis once
  per gateway process) and of a queued one (read from Redis every time), alternated, in the same run (needs
  `wrk`, Debian package wrk): requests/s, p50/p99, and their ratios to /livez;
- waiters: 100 OpenAI calls (POST /v1/images/generations) waiting for their jobs while POST /v1/generations
  is timed, with the gateway's thread count;
- flood: one key submits 100 jobs as fast as it can, another key then submits one: accepted/refused, the
  429's message, and the quiet key's job time against the same job on an idle service (queue wait and run
  time apart);
- bodies: 20 parallel chunked (no Content-Length) 64 MiB bodies and one with a Content-Length: statuses, the
  time to answer, and the gateway's resident memory growth (peak and after).

    python -m benchmarks.bench_gateway                  # make bench-gateway
    python -m benchmarks.bench_gateway --only fanout,reads --readers 1000 --processes 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import redis

from benchmarks import gateway_load as load
from benchmarks.bench_service import model_or_tiny
from scripts import run_stack
from services.common.settings import hash_key

SECTIONS = ("flood", "fanout", "reads", "waiters", "bodies")
KEYS = ("bench-a", "bench-b", "bench-flood", "bench-quiet")
PROMPT = "a large red circle on a white background"


class Gateway:
    def __init__(self, redis_url: str, log_dir: Path, name: str, **settings):
        self.port = run_stack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"gateway-{name}.log", "w")
        keys = ",".join(hash_key(k) for k in KEYS)
        self.proc = run_stack.start_api(
            redis_url, self.port, log=self.log, api_key_hashes=keys, api_metrics_port="off", **settings
        )

    def wait(self, procs) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/livez", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            for proc in (self.proc, *procs):
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[:4]} exited before the gateway was up")
            time.sleep(0.2)
        raise RuntimeError("gateway not up")


def submit(url: str, key: str, body: dict, path: str = "/v1/generations") -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def wait_job(url: str, key: str, job_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in load.TERMINAL:
                return job
            time.sleep(0.05)
    raise TimeoutError(job_id)


# ---- sections ------------------------------------------------------------------------------------------------
def bench_flood(gateway: Gateway, model: str, steps: int, flood: int, redis_url: str) -> dict:
    """The quiet key's single job alone, then right after another key tried to queue `flood` jobs."""
    body = {"prompt": PROMPT, "num_inference_steps": steps, "seed": 7}

    def quiet_job() -> dict:
        started = time.perf_counter()
        job = submit(gateway.url, "bench-quiet", body)
        assert job.status_code == 202, job.text
        final = wait_job(gateway.url, "bench-quiet", job.json()["id"])
        return {"s": time.perf_counter() - started, **final["timings"], "status": final["status"]}

    quiet_job()  # warm: the first job pays for compiled kernels and caches
    idle = quiet_job()

    async def flood_now() -> list[tuple[int, dict, bytes]]:
        host, port = "127.0.0.1", gateway.port
        return await asyncio.gather(
            *(load.request(host, port, "POST", "/v1/generations", "bench-flood", body) for _ in range(flood))
        )

    answers = asyncio.run(flood_now())
    under = quiet_job()
    accepted = [json.loads(b)["id"] for s, _, b in answers if s == 202]
    refused = [(h, json.loads(b)) for s, h, b in answers if s == 429]
    client = redis.Redis.from_url(redis_url)
    for job_id in accepted:  # the flood has made its point: free the worker for the next section
        httpx.post(f"{gateway.url}/v1/jobs/{job_id}/cancel", headers={"Authorization": "Bearer bench-flood"})
    deadline = time.monotonic() + 300
    while client.scard(f"latentd:pending:{model}") and time.monotonic() < deadline:
        time.sleep(0.2)
    return {
        "flood_submitted": flood,
        "flood_accepted": len(accepted),
        "flood_refused_429": len(refused),
        "flood_429_retry_after": refused[0][0].get("retry-after") if refused else None,
        "flood_429_message": refused[0][1]["error"]["message"] if refused else None,
        "quiet_status": under["status"],
        "quiet_idle_s": round(idle["s"], 3),
        "quiet_idle_queue_s": round(idle.get("queue_s", 0), 3),
        "quiet_idle_run_s": round(idle.get("run_s", 0), 3),
        "quiet_under_flood_s": round(under["s"], 3),
        "quiet_under_flood_queue_s": round(under.get("queue_s", 0), 3),
        "quiet_under_flood_run_s": round(under.get("run_s", 0), 3),
        "quiet_ratio": round(under["s"] / idle["s"], 2),
    }


def bench_fanout(gateway: Gateway, redis_url: str, readers: int, jobs: int, steps: int) -> dict:
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    client = redis.Redis.from_url(redis_url)
    ids = []
    for index in range(jobs):
        job = submit(gateway.url, "bench-a", {"prompt": PROMPT, "num_inference_steps": steps, "seed": index})
        assert job.status_code == 202, job.text
        ids.append(job.json()["id"])

    async def run() -> list[load.ReaderResult]:
        tasks = []
        for index in range(readers):
            tasks.append(
                asyncio.ensure_future(load.sse_reader("127.0.0.1", gateway.port, ids[index % jobs], "bench-a"))
            )
            if index % 50 == 49:
                await asyncio.sleep(0)  # let the first ones connect while the others are opened
        return await asyncio.gather(*tasks)

    started = time.perf_counter()
    with (
        load.Sampler(lambda: load.tcp_connections_to(gateway.proc.pid, redis_port), 0.1) as connections,
        load.Sampler(lambda: len(client.client_list()), 0.25) as clients,
    ):
        results = asyncio.run(run())
    wall = time.perf_counter() - started
    expected = {job_id: client.xlen(f"latentd:job:{job_id}:events") for job_id in ids}
    every = sum(1 for i, r in enumerate(results) if r.complete and r.events == expected[ids[i % jobs]])
    errors: dict[str, int] = {}
    for r in results:
        if not r.complete:
            errors[r.error or f"status {r.status}"] = errors.get(r.error or f"status {r.status}", 0) + 1
    delivered = sum(r.events for r in results)
    return {
        "fanout_readers": readers,
        "fanout_jobs": jobs,
        "fanout_events_per_job": sorted(set(expected.values())),
        "fanout_readers_with_every_event": every,
        "fanout_readers_with_terminal": sum(1 for r in results if r.terminal),
        "fanout_errors": errors,
        "fanout_events_delivered": delivered,
        "fanout_wall_s": round(wall, 2),
        "fanout_events_per_s": round(delivered / wall),
        "fanout_gateway_redis_connections_max": connections.max,
        "fanout_redis_clients_max": clients.max,
    }


def _wrk(url: str, key: str, seconds: int, connections: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Authorization: Bearer {key}", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def latency(q: str) -> float:
        value, unit = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rate,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def bench_reads(gateway: Gateway, jobs: dict[str, str], seconds: int, rounds: int, connections: int) -> dict:
    """/livez and GET /v1/jobs/{id} for each of `jobs` ({label: job id}), alternated round by round."""
    if not shutil.which("wrk"):
        return {"reads_skipped": "no wrk: apt-get install wrk"}
    _wrk(f"{gateway.url}/livez", "bench-a", 2, connections)  # warm
    livez: list[dict] = []
    reads: dict[str, list[dict]] = {label: [] for label in jobs}
    for _ in range(rounds):
        livez.append(_wrk(f"{gateway.url}/livez", "bench-a", seconds, connections))
        for label, job_id in jobs.items():
            reads[label].append(_wrk(f"{gateway.url}/v1/jobs/{job_id}", "bench-a", seconds, connections))
    result = {
        "reads_connections": connections,
        "reads_livez_rps": [round(r["rps"]) for r in livez],
        "reads_livez_p99_ms": [r["p99_ms"] for r in livez],
    }
    for label, runs in reads.items():
        result[f"reads_{label}_rps"] = [round(r["rps"]) for r in runs]
        result[f"reads_{label}_ratio"] = [round(j["rps"] / max(lz["rps"], 1e-9), 2) for j, lz in zip(runs, livez)]
        result[f"reads_{label}_p50_ms"] = [r["p50_ms"] for r in runs]
        result[f"reads_{label}_p99_ms"] = [r["p99_ms"] for r in runs]
    every = livez + [r for runs in reads.values() for r in runs]
    result["reads_errors"] = sum(r["non_2xx"] for r in every)
    result["reads_socket_errors"] = sorted({r["socket_errors"] for r in every if r["socket_errors"]})
    return result


def threads_of(pid: int) -> int:
    total = 0
    for member in load.process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                total += int(line.split()[1])
    return total


def bench_waiters(gateway: Gateway, redis_url: str, model: str, waiters: int, probes: int) -> dict:
    client = redis.Redis.from_url(redis_url)
    before = client.scard(f"latentd:pending:{model}")
    threads_before = threads_of(gateway.proc.pid)

    async def run() -> dict:
        host, port = "127.0.0.1", gateway.port
        body = {"prompt": PROMPT, "num_inference_steps": 50, "size": None}
        body.pop("size")
        calls = [
            asyncio.ensure_future(load.request(host, port, "POST", "/v1/images/generations", "bench-a", body))
            for _ in range(waiters)
        ]
        deadline = time.monotonic() + 60
        while client.scard(f"latentd:pending:{model}") < before + waiters and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        waiting = client.scard(f"latentd:pending:{model}") - before
        threads = threads_of(gateway.proc.pid)
        latencies, statuses = [], []
        for index in range(probes):
            started = time.perf_counter()
            status, _, _ = await load.request(
                host, port, "POST", "/v1/generations", "bench-b", {"prompt": PROMPT, "seed": index}
            )
            latencies.append(1000 * (time.perf_counter() - started))
            statuses.append(status)
        pending = [m.decode() for m in client.smembers(f"latentd:pending:{model}")]
        for job_id in pending:  # end the waits: each OpenAI call answers with its cancelled job
            for key in ("bench-a", "bench-b"):
                await load.request(host, port, "POST", f"/v1/jobs/{job_id}/cancel", key)
        answers = await asyncio.gather(*calls, return_exceptions=True)
        return {
            "waiters": waiters,
            "waiters_waiting_when_probed": waiting,
            "waiters_gateway_threads_before": threads_before,
            "waiters_gateway_threads_while_waiting": threads,
            "waiters_submit_statuses": sorted(set(statuses)),
            "waiters_submit_ms_p50": round(load.percentile(latencies, 0.5), 1),
            "waiters_submit_ms_p95": round(load.percentile(latencies, 0.95), 1),
            "waiters_submit_ms_max": round(max(latencies), 1),
            "waiters_answered": sum(1 for a in answers if not isinstance(a, BaseException)),
        }

    return asyncio.run(run())


def bench_bodies(gateway: Gateway, uploads: int, mib: int) -> dict:
    pid = gateway.proc.pid
    time.sleep(0.5)
    baseline = load.rss_bytes(pid)

    async def run():
        host, port = "127.0.0.1", gateway.port
        chunked = [
            load.endless_upload(host, port, "/v1/generations", "bench-a", total=mib << 20) for _ in range(uploads)
        ]
        sized = load.endless_upload(host, port, "/v1/generations", "bench-a", total=mib << 20, chunked=False)
        return await asyncio.gather(*chunked, sized)

    started = time.perf_counter()
    with load.Sampler(lambda: load.rss_bytes(pid), 0.02) as rss:
        results = asyncio.run(run())
        wall = time.perf_counter() - started
        time.sleep(1.0)
    chunked, sized = results[:-1], results[-1]
    mb = 1e6
    return {
        "bodies_chunked": uploads,
        "bodies_mib_each": mib,
        "bodies_chunked_statuses": sorted({r.status for r in chunked}),
        "bodies_chunked_413": sum(1 for r in chunked if r.status == 413),
        "bodies_chunked_sent_mib_max": round(max(r.sent for r in chunked) / (1 << 20), 1),
        "bodies_content_length_status": sized.status,
        "bodies_wall_s": round(wall, 2),
        "bodies_rss_before_mb": round(baseline / mb, 1),
        "bodies_rss_growth_peak_mb": round((rss.max - baseline) / mb, 1),
        "bodies_rss_growth_after_mb": round((rss.last - baseline) / mb, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--processes", type=int, default=1, help="gateway server processes (LATENTD_PROCESSES)")
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=4, help="running jobs the readers watch")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--wrk-rounds", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=100)
    parser.add_argument("--waiters", type=int, default=100)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--flood", type=int, default=100)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--upload-mib", type=int, default=64)
    parser.add_argument("--worker-concurrency", type=int, default=32, help="as make run starts the worker")
    parser.add_argument("--worker-batch-rows", type=int, default=0, help="LATENTD_MAX_BATCH_ROWS (0: the default)")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    model = model_or_tiny(args.model)
    name = Path(model).resolve().name
    log_dir = Path(tempfile.mkdtemp(prefix="latentd-bench-gateway-"))
    result: dict = {
        "bench": "gateway",
        "model": name,
        "gateway_processes": args.processes,
        "worker_concurrency": args.worker_concurrency,
        "worker_batch_rows": args.worker_batch_rows or "default",
        "logs": str(log_dir),
    }
    procs = []
    try:
        redis_proc, redis_url = run_stack.start_redis()
        procs.append(redis_proc)
        rows = {"max_batch_rows": args.worker_batch_rows} if args.worker_batch_rows else {}
        worker = run_stack.start_worker(
            redis_url, model, concurrency=args.worker_concurrency, log=open(log_dir / "worker.log", "w"), **rows
        )
        procs.append(worker)
        # the flood runs on the default limits (a model queue of 64, a quarter of it per key); the other
        # sections need more room: 100 waiters and the probes are more than one key's share
        defaults = Gateway(redis_url, log_dir, "defaults", processes=args.processes)
        roomy = Gateway(
            redis_url, log_dir, "roomy", processes=args.processes, max_queue_per_model=4096, max_queue_per_key=4096
        )
        procs += [defaults.proc, roomy.proc]
        run_stack.wait_ready(defaults.url, timeout_s=300, procs=tuple(procs))
        roomy.wait(procs)
        if "flood" in only:
            result.update(bench_flood(defaults, name, args.steps, args.flood, redis_url))
        finished = None
        if "fanout" in only:
            result.update(bench_fanout(roomy, redis_url, args.readers, args.jobs, args.steps))
        if {"reads", "waiters"} & set(only):
            finished = submit(roomy.url, "bench-a", {"prompt": PROMPT, "num_inference_steps": 2}).json()["id"]
            wait_job(roomy.url, "bench-a", finished)
            run_stack.stop([worker])  # from here jobs stay queued: the waiters wait, the CPU is the gateway's
        if "reads" in only:
            queued = submit(roomy.url, "bench-a", {"prompt": PROMPT, "num_inference_steps": 2}).json()["id"]
            jobs = {"succeeded": finished, "queued": queued}
            result.update(bench_reads(roomy, jobs, args.wrk_seconds, args.wrk_rounds, args.wrk_connections))
        if "waiters" in only:
            result.update(bench_waiters(roomy, redis_url, name, args.waiters, args.probes))
        if "bodies" in only:
            result.update(bench_bodies(roomy, args.uploads, args.upload_mib))
    finally:
        run_stack.stop(procs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
