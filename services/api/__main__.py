"""python -m services.api: serve the gateway with uvicorn; with no API keys configured, loopback only.

`LATENTD_PROCESSES` (or --processes) server processes on the one port: 1 by default, 0 for one per CPU the
container may use (the gateway image's default)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import shutil
import sys
import tempfile
import threading
import time

import uvicorn

from services.common.settings import Settings, get_settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_bind_refusal(settings: Settings, host: str, what: str = "the gateway") -> str | None:
    """Why `host` may not be bound (no API keys, not loopback), in the words the README uses; None if it may."""
    if settings.key_hashes() or is_loopback(host):
        return None
    return (
        f"refusing to bind to {host}: no API keys are configured (set LATENTD_API_KEYS to comma-separated keys, "
        f"or LATENTD_API_KEY_HASHES to their SHA-256 hex digests), so {what} serves open on loopback only"
    )


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by the cgroup's CPU quota (a container's --cpus)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def serve_processes(host: str, port: int, processes: int) -> None:
    """Several uvicorn server processes on one port (the kernel spreads connections), each with its own core
    (Redis pool, event reader). This process supervises them (one that dies is started again) and serves
    their metrics, summed, from prometheus_client's multiprocess files."""
    directory = tempfile.mkdtemp(prefix="latentd-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # before any metric exists, here and in the children

    from services.api import metrics
    from services.common.jobstore import MODELS_KEY, sync_client

    scrape_redis = sync_client(get_settings().redis_url, 2)
    metrics.serve_multiprocess(scrape_redis, lambda: [name.decode() for name in scrape_redis.hkeys(MODELS_KEY)])

    def prune() -> None:
        while True:
            time.sleep(10)
            metrics.forget_dead_processes(directory)

    threading.Thread(target=prune, daemon=True, name="latentd-metrics-prune").start()
    try:
        uvicorn.run(
            "services.api.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=processes,
            log_level="warning",
            timeout_keep_alive=30,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument(
        "--processes", type=int, default=settings.processes, help="server processes; 0: one per CPU (default 1)"
    )
    args = parser.parse_args(argv)
    refusal = open_bind_refusal(settings, args.host)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    processes = args.processes if args.processes > 0 else available_cpus()
    if processes > 1:
        serve_processes(args.host, args.port, processes)
        return 0
    from services.api.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
