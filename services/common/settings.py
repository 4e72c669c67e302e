"""Settings of the gateway and the worker: read once from the environment (prefix LATENTD_) and injected."""

from __future__ import annotations

import hashlib
from functools import lru_cache

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common import rules


def hash_key(key: str) -> str:
    """API keys are kept only as SHA-256 hex digests."""
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENTD_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("LATENTD_REDIS_URL", "REDIS_URL", "redis_url")
    )
    host: str = "127.0.0.1"
    port: int = 8000
    # server processes of the REST gateway on its one port; 0: one per CPU the container may use
    processes: int = 1
    # Comma-separated SHA-256 hex digests of the accepted API keys (or plain keys in api_keys, hashed on read).
    api_key_hashes: str = ""
    api_keys: str = ""
    default_model: str = ""
    max_body_bytes: int = 8 * 1024 * 1024  # per request, chunked or not
    # request bodies one gateway process holds in memory at once; 0: 4 x max_body_bytes
    max_body_buffer_bytes: int = 0
    max_num_images: int = 8
    max_queue_per_model: int = 64
    # one API key's share of a model's queue (queued + running); 0: a quarter of max_queue_per_model
    max_queue_per_key: int = 0
    retry_after_s: int = 2
    # A poll of a queued or running job (GET /v1/jobs/{id}, gRPC GetJob) may be answered from this process's
    # newest read of it when that was asked for less than this many seconds ago (and after the last event of the
    # job this process has seen): a hundred clients polling a job cost a few Redis reads per interval. It must be
    # several turns of a loaded event loop long: under wrk's 100 connections a read takes longer than 50 ms to
    # come back, and a shorter max age leaves many polls waiting for one. Everything that acts on a job (cancel,
    # pictures, the OpenAI route's wait) reads Redis. 0: every poll reads Redis. Settled jobs are read once.
    job_poll_max_age_s: float = Field(0.25, ge=0, le=5)
    result_ttl_s: int = 3600
    sse_keepalive_s: float = 15.0
    openai_timeout_s: float = 600.0
    # The URL clients reach the gateway at (its ingress), for the absolute image URLs of the OpenAI route's
    # response_format "url"; "": the request's own, which its Host header names (set this behind a proxy, or where
    # a caller could choose the Host another client is handed)
    public_url: str = ""
    # Webhooks (services/core/webhooks.py): every gateway process (REST and gRPC) sends the due calls, unless off.
    # The secret signs them (Standard Webhooks: "whsec_" + base64 of the key, or any other string as the key
    # itself); "": unsigned. Private targets (loopback, RFC 1918, link-local, ...): refused unless allowed, so a
    # caller cannot make the gateway probe the network it runs in.
    webhooks: bool = True
    webhook_secret: str = ""
    webhook_allow_private: bool = False
    webhook_attempts: int = Field(rules.WEBHOOK_ATTEMPTS, ge=1, le=100)
    webhook_retry_s: float = Field(rules.WEBHOOK_RETRY_S, gt=0, le=3600)
    webhook_timeout_s: float = Field(rules.WEBHOOK_TIMEOUT_S, gt=0, le=120)
    worker_stale_after_s: float = 30.0
    # the gateway's Redis pool: short commands share it (opened as needed, up to this many); the event hub holds one
    # connection for its reads. A request waits up to redis_pool_wait_s for a free one: on a busy CPU a burst of
    # submits holds every connection for a while (tests/load: 40 at once beside a running worker), which is load to
    # ride out, not Redis away (that is redis_timeout_s, on every command)
    redis_max_connections: int = 32
    redis_pool_wait_s: float = Field(10.0, gt=0, le=60)
    redis_timeout_s: float = 2.0
    # worker side
    worker_models: str = "models/shapes-ldm"  # comma-separated model folders
    worker_device: str = "cpu"
    # the backbone's and text encoders' dtype on CUDA: float16, bfloat16 or float32; "" is the family's own
    # (float16 for SD and SDXL, bfloat16 for SD3 and Flux, whose activations overflow float16); CPU is float32
    worker_dtype: str = ""
    max_batch_rows: int = 64
    # Fair share inside the engine: while jobs of more than one API key are on a worker, one UNet call takes at
    # most this many rows of each key (a guided image is 2 rows), so a flooding key cannot slow another key's
    # steps by more than that; a key alone uses every row. "auto": 4 on the CPU, where a call's time grows with
    # its rows, none on CUDA, where it is nearly flat at these sizes (the bound would only cost throughput);
    # "off": none; or a number of rows
    rows_per_owner: str = "auto"
    # torch's CPU threads in a worker; 0: torch's default (one per core). Several workers on one CPU host each
    # want cores / workers, or they thrash: two workers of two threads on 2 cores ran 16 jobs about 5x slower
    worker_torch_threads: int = 0
    # The GPU path (services/worker/engine/compiled.py, docs/engine.md "The GPU path").
    # Row-count buckets: a backbone call's rows are padded up to the next bucket (padding rows are copies of a
    # real row, dropped after the call), so a compiled backbone sees these few batch shapes and no others;
    # buckets above max_batch_rows are dropped and max_batch_rows is always one. "" or "off": no padding.
    # No 1: under a dynamic batch dimension one row specialises into a graph (a compile) of its own, for the
    # only call with one row: a lone one-image request at guidance 0 or 1 (padded to 2 instead).
    batch_buckets: str = "2,4,8,16,32,48,64"
    # torch.compile of the backbone and the VAE decoder: "auto" (on for CUDA with mode "default", off on the
    # CPU), "off", or a torch.compile mode ("default", "reduce-overhead" (CUDA graphs per bucket),
    # "max-autotune", "max-autotune-no-cudagraphs"). Every bucket is compiled at load, before the worker serves.
    compile_mode: str = "auto"
    # one graph with a dynamic batch dimension (then one per bucket is only CUDA graphs or nothing) rather
    # than one graph per bucket: minutes less warm-up per bucket on an SD-sized UNet
    compile_dynamic: bool = True
    # torch's compile caches (Inductor's FX graph and kernel caches, Triton's) on disk between worker starts;
    # "" leaves torch's default (a folder under /tmp, lost with the container)
    compile_cache_dir: str = ""
    # channels_last memory format for the backbone and the VAE on CUDA when compiled (eager it was slower)
    channels_last: bool = True
    # the engine checks its latents for NaN/inf every this many iterations on CUDA (each check waits for the
    # GPU once; a non-finite row still fails, naming the step it went bad); every iteration on the CPU
    finite_check_every: int = 8
    # step events, Redis writes, image hand-off and results on a thread of their own, off the engine thread
    output_thread: bool = True
    # the broker's redelivery of an unacknowledged task: only a backstop, leases requeue lost jobs first
    visibility_timeout_s: int = 3600
    lease_s: float = 15.0  # a lost worker's jobs are requeued within lease_s + reap_interval_s
    reap_interval_s: float = 2.0
    max_lost: int = 3  # a job whose worker was lost this many times fails instead of looping
    # an engine iteration (a backbone call, a decode) running this long is a hung device: the worker stops renewing
    # its jobs' leases (they run again elsewhere), takes no new job, and its heartbeat goes stale. Far above any
    # step: a 1024x1024 SDXL call of 64 rows on a CPU is minutes.
    engine_stall_s: float = Field(600.0, gt=0)
    # ... and once it has been stalled this much longer, the worker hands back its other models' jobs and exits
    # (status 70) for its restart policy to start a fresh one: nothing frees a thread stuck in a kernel, and compose
    # never restarts a container for failing its health check. 0: it stays (the liveness probe, or a debugger)
    engine_stall_exit_s: float = Field(60.0, ge=0)
    drain_grace_s: float = 45.0  # on SIGTERM: finish what the engine holds for this long, requeue the rest
    # a worker retries a job's start and result writes this long while Redis is unreachable or full (then the job
    # runs again once Redis takes writes: a start's lease lapses, a result's attempt is handed back)
    redis_retry_s: float = 60.0
    # tests only (tests/faults): the worker SIGKILLs itself right after a job's result is written, before the
    # broker hears the task's ack, to show that a redelivered task never gives a job a second result
    fault_kill_after_result: bool = False
    # tests only (tests/faults): the first backbone call of a request whose prompt holds this text never returns
    # (a hung device), in the one worker that removes this file first
    fault_hang_file: str = ""

    @field_validator("rows_per_owner")
    @classmethod
    def _rows_per_owner(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "off") and not (value.isdigit() and int(value) >= 1):
            raise ValueError(f"LATENTD_ROWS_PER_OWNER must be auto, off or a whole number >= 1, got {value!r}")
        return value

    @property
    def webhook_span_s(self) -> float:
        return rules.webhook_span_s(self.webhook_attempts, self.webhook_retry_s, self.webhook_timeout_s)

    @model_validator(mode="after")
    def _webhooks_outlive_no_job(self) -> Settings:
        """A webhook tried after its job's record expired finds nothing to send (it is counted expired): retries
        asked for explicitly must fit the TTL. (With the webhook settings at their defaults and the TTL lowered, the
        sender warns at start instead: the TTL was the setting meant.)"""
        asked = self.model_fields_set & {"webhook_attempts", "webhook_retry_s", "webhook_timeout_s"}
        span = self.webhook_span_s
        if self.webhooks and asked and span > self.result_ttl_s:
            raise ValueError(
                f"LATENTD_WEBHOOK_ATTEMPTS={self.webhook_attempts} with LATENTD_WEBHOOK_RETRY_S={self.webhook_retry_s:g} "
                f"and LATENTD_WEBHOOK_TIMEOUT_S={self.webhook_timeout_s:g} try a webhook for up to {span:.0f} s after "
                f"its job ends, past LATENTD_RESULT_TTL_S={self.result_ttl_s}, when the job's record expires: lower "
                "the attempts or the retry base, or raise the TTL"
            )
        return self

    @property
    def owner_queue_limit(self) -> int:
        return self.max_queue_per_key or max(1, self.max_queue_per_model // 4)

    def key_hashes(self) -> set[str]:
        hashes = {h.strip().lower() for h in self.api_key_hashes.split(",") if h.strip()}
        hashes |= {hash_key(k.strip()) for k in self.api_keys.split(",") if k.strip()}
        return hashes


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
