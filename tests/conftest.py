"""Shared fixtures: the model folder (the trained default model when it exists, else the tiny one) and a real
stack (its own redis-server, a Celery worker subprocess on the threads pool, the gateway under uvicorn and the
gRPC door, each started as deploy/ starts them)."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts import run_stack

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "shapes-ldm"
API_KEYS = ("key-alice", "key-bob")
# Short leases, so a job whose worker was SIGKILLed runs again within a few seconds (deploy: 15 s and 2 s).
# the test stacks' doors sign webhooks with this, call receivers on loopback, and retry a failed call soon
WEBHOOK_SECRET = "whsec_" + "dGVzdC13ZWJob29rLXNpZ25pbmcta2V5LTMyYnl0ZXM="
WEBHOOK_SETTINGS = dict(webhook_secret=WEBHOOK_SECRET, webhook_allow_private=1, webhook_retry_s=0.3)
LEASE_S = 3.0
REAP_INTERVAL_S = 0.5


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    """models/shapes-ldm once it has landed; until then the tiny diffusers model built from config."""
    if (DEFAULT_MODEL / "model_index.json").exists() and not os.environ.get("LATENTD_TEST_TINY_MODEL"):
        return DEFAULT_MODEL
    from tests.fixtures.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory) -> dict[str, Path]:
    """Tiny SDXL, SD3, Flux(-dev) and Flux-schnell folders built from config (tests/fixtures/tiny_families.py)."""
    from tests.fixtures.tiny_families import build_tiny_families

    return build_tiny_families(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def own_redis():
    proc, url = run_stack.start_redis()
    yield url
    run_stack.stop([proc])


@pytest.fixture(scope="module")
def fillable_redis():
    """A redis-server of the module's own, whose maxmemory a test may set below its use (Redis full): the session's
    own_redis serves stacks whose writes must not be refused meanwhile."""
    proc, url = run_stack.start_redis()
    yield url
    run_stack.stop([proc])


@dataclass
class Stack:
    url: str
    redis_url: str
    model_path: Path | list[Path]  # the worker serves one folder, or several
    model: str
    keys: tuple = API_KEYS
    log_dir: Path = None
    worker: subprocess.Popen = None
    api: subprocess.Popen = None
    grpc: subprocess.Popen = None
    grpc_target: str = ""
    grpc_metrics_port: int = 0
    workers_started: int = 0
    settings: dict = field(default_factory=dict)

    def headers(self, key: str = API_KEYS[0]) -> dict:
        return {"Authorization": f"Bearer {key}"}

    def start_worker(self) -> None:
        self.workers_started += 1
        log = open(self.log_dir / f"worker-{self.workers_started}.log", "w")
        self.worker = run_stack.start_worker(
            self.redis_url, self.model_path, concurrency=16, log=log, lease_s=LEASE_S, reap_interval_s=REAP_INTERVAL_S
        )

    def kill_worker(self) -> None:
        os.kill(self.worker.pid, signal.SIGKILL)
        self.worker.wait()


@pytest.fixture(scope="session")
def real_stack(own_redis, model_path, tmp_path_factory) -> Stack:
    import redis

    stack = start_stack(own_redis, model_path, model_path.resolve().name, tmp_path_factory.mktemp("stack-logs"))
    yield stack
    run_stack.stop([stack.worker, stack.api, stack.grpc])
    redis.Redis.from_url(own_redis).flushdb()


def start_stack(redis_url: str, model_path, model: str, log_dir: Path) -> Stack:
    """Worker, gateway and gRPC door on `redis_url`, with the test API keys; ready when it returns."""
    from services.common.settings import hash_key

    port = run_stack.free_port()
    stack = Stack(
        url=f"http://127.0.0.1:{port}", redis_url=redis_url, model_path=model_path, model=model, log_dir=log_dir
    )
    stack.start_worker()
    hashes = ",".join(hash_key(k) for k in API_KEYS)
    stack.api = run_stack.start_api(
        redis_url,
        port,
        log=open(log_dir / "api.log", "w"),
        api_key_hashes=hashes,
        sse_keepalive_s=1,
        public_url=f"http://localhost:{port}",  # another name for the same address: the URLs it gives say which
        **WEBHOOK_SETTINGS,
    )
    grpc_port, stack.grpc_metrics_port = run_stack.free_port(), run_stack.free_port()
    stack.grpc_target = f"127.0.0.1:{grpc_port}"
    stack.grpc = run_stack.start_grpc(
        redis_url,
        grpc_port,
        log=open(log_dir / "grpc.log", "w"),
        api_key_hashes=hashes,
        grpc_metrics_port=stack.grpc_metrics_port,
        **WEBHOOK_SETTINGS,
    )
    try:
        run_stack.wait_ready(stack.url, timeout_s=180, procs=(stack.worker, stack.api, stack.grpc))
    except RuntimeError:
        for log in sorted(log_dir.iterdir()):
            print(log.name, log.read_text()[-3000:])
        run_stack.stop([stack.worker, stack.api, stack.grpc])
        raise
    return stack


@pytest.fixture(scope="session")
def families_stack(own_redis, family_paths, tmp_path_factory) -> Stack:
    """A second stack on Redis database 1 of the same server: one worker serving the tiny SDXL, SD3 and Flux
    folders (one engine each), its own gateway and gRPC door. Requests name their model."""
    import redis

    redis_url = own_redis.rsplit("/", 1)[0] + "/1"
    paths = [family_paths[name] for name in ("sdxl", "sd3", "flux")]
    stack = start_stack(redis_url, paths, paths[0].name, tmp_path_factory.mktemp("families-stack-logs"))
    yield stack
    run_stack.stop([stack.worker, stack.api, stack.grpc])
    redis.Redis.from_url(redis_url).flushdb()
