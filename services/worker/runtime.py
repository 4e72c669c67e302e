"""The worker process's runtime: one engine per model (loaded once, started with the worker) and the
Redis step-event writer, which runs on the engine thread once per iteration with one round trip for all jobs.

Request ids are "<job id>:<attempt>[:<index>]", so the writer knows each event's job and fence without a lookup.
The same round trip reads every stepped job's cancel flag and current attempt (JobStore.write_steps): a
cancelled job, or an attempt superseded by a redelivered copy, leaves the batch at the next step.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from services.common.jobs import JobRecord
from services.common.jobstore import (
    JobStore,
    StepWrite,
    frame_meta,
    image_blob_name,
    redis_away_or_full,
    redis_full,
    redis_version_problem,
)
from services.common.models import ModelInfo
from services.common.settings import Settings
from services.worker import metrics as worker_metrics
from services.worker.engine.compiled import SpeedOptions
from services.worker.engine.engine import Engine, RequestHandle, owner_share
from services.worker.engine.requests import StepEvent, TrajectoryFrame
from services.worker.heartbeat import worker_id
from services.worker.loading import LoadedModel, load_model, resolve_dtype

log = logging.getLogger(__name__)

# The worker's exit status when it cannot serve at all: a model folder it cannot load, a Redis too old, Redis away
# as it starts (EX_CONFIG). Its restart policy starts it again; its log's last line says why.
EXIT_CANNOT_SERVE = 78
T = TypeVar("T")


def request_id(job_id: str, attempt: int, index: int | None = None) -> str:
    return f"{job_id}:{attempt}" if index is None else f"{job_id}:{attempt}:{index}"


def parse_request_id(rid: str) -> tuple[str, int, int | None]:
    parts = rid.split(":")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None


def png_b64(image) -> str:
    return base64.b64encode(encode_image(image, "png")).decode()


def encode_image(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buffer.getvalue()


def scheduler_description(config: dict) -> str:
    """The scheduler class and its training schedule: "DDIMScheduler / scaled_linear" ("/ scaled_linear, zero
    terminal SNR" where it rescales its betas so), or for flow matching "FlowMatchEulerDiscreteScheduler / shift 3"
    (or "/ dynamic shift 0.5..1.15")."""
    name = config.get("_class_name", "DDIMScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        zero_snr = ", zero terminal SNR" if config.get("rescale_betas_zero_snr") else ""
        return f"{name} / {config.get('beta_schedule', '?')}{zero_snr}"
    if config.get("use_dynamic_shifting"):
        return f"{name} / dynamic shift {config.get('base_shift', 0.5):g}..{config.get('max_shift', 1.15):g}"
    return f"{name} / shift {float(config.get('shift', 1.0)):g}"


def model_info(model: LoadedModel, engine: Engine) -> ModelInfo:
    config = model.scheduler_config
    flow = model.family.flow
    return ModelInfo(
        name=model.name,
        native_width=model.native_width,
        native_height=model.native_height,
        scheduler=scheduler_description(config),
        max_prompt_tokens=model.max_prompt_tokens,
        num_train_timesteps=model.num_train_timesteps,
        size_multiple=engine.size_multiple,
        max_inference_steps=engine.limits.max_inference_steps,  # the default sampler's
        tokenizer_path=str(Path(model.path) / model.facts.tokenizer),
        tokenizer_class=model.facts.tokenizer_class,
        samplers=list(engine.limits.samplers),
        default_sampler=engine.limits.default_sampler,
        sampler_max_inference_steps=dict(engine.limits.sampler_max_steps),
        default_guidance_rescale=engine.limits.default_guidance_rescale,
        default_guidance_start=engine.limits.default_guidance_start,
        default_guidance_stop=engine.limits.default_guidance_stop,
        family=model.family.name,
        pipeline=model.family.pipeline,
        prediction_type=model.prediction_type,
        flow_shift=float(config.get("shift", 1.0)) if flow and not config.get("use_dynamic_shifting") else None,
        dynamic_shift=bool(flow and config.get("use_dynamic_shifting")),
        guidance_form=model.facts.guidance_form,
        true_cfg=model.family.true_cfg,
        default_guidance_scale=model.default_guidance_scale,
        default_num_inference_steps=model.default_num_inference_steps,
        default_strength=model.default_strength,
        default_inpaint_strength=model.default_inpaint_strength,
        params=list(model.facts.params),
        created=int((Path(model.path) / "model_index.json").stat().st_mtime),
    )


def reverse_frame_entries(frame: TrajectoryFrame) -> list[tuple[int, dict, object]]:
    """A kept reverse-trajectory step as the job's frames: (index, metadata, image) for x_t, then x̂0."""
    return [
        (
            2 * frame.index + k,
            {"step": frame.step, "timestep": frame.timestep, **frame.noise_level, "what": what},
            images[0],
        )
        for k, (what, images) in enumerate((("x_t", frame.x_t), ("x0_pred", frame.x0_pred)))
    ]


class StepEventWriter:
    """on_step_events for one engine: one Redis round trip per iteration."""

    def __init__(self, store: JobStore, runtime: Runtime):
        self.store, self.runtime = store, runtime

    def __call__(self, events: list[StepEvent]) -> None:
        emitted_at = time.time()
        writes = []
        for event in events:
            job_id, attempt, index = parse_request_id(event.request_id)
            data = {
                "step": event.step,
                "total": event.total,
                "timestep": event.timestep,
                "attempt": attempt,
                "emitted_at": emitted_at,
            }
            if index is not None:
                data["index"] = index
            if event.preview is not None:
                data["preview"] = png_b64(event.preview)
            frames = []
            if event.frame is not None:  # a reverse trajectory's frame: stored and announced now, not at the end
                frames = [
                    (i, meta, encode_image(image, "png")) for i, meta, image in reverse_frame_entries(event.frame)
                ]
            progress = {"step": event.step, "total": event.total}
            writes.append(StepWrite(job_id, attempt, data, progress, frames))
        try:
            controls = self.store.write_steps(writes)
        except Exception as error:
            if redis_away_or_full(error):  # these steps' events are lost, the jobs go on
                log.warning("step events not written (Redis %s): %s", "full" if redis_full(error) else "away", error)
            else:
                log.exception("step-event write failed")
            return
        for event, (cancel, superseded) in zip(events, controls):
            if cancel or superseded:
                handle = self.runtime.handle(event.request_id)
                if handle is not None:
                    handle.cancel()


class Runtime:
    """Per-process singleton: the models this worker serves, their engines, the open request handles."""

    def __init__(self, settings: Settings, worker: str | None = None):
        self.settings = settings
        self.worker = worker or worker_id()
        self.store = JobStore.from_url(settings.redis_url, settings.result_ttl_s, settings.redis_timeout_s)
        self.engines: dict[str, Engine] = {}
        self._handles: dict[str, RequestHandle] = {}
        self._held: dict[str, dict[str, int]] = {}  # model -> {job id: attempt} this worker runs
        self._lock = threading.Lock()
        self.draining = threading.Event()  # SIGTERM: take no new job (services/worker/leases.py, drain)
        self._stalled: set[str] = set()  # models whose engine stalled() last reported (logged once each)
        # attempts whose result Redis would not take within redis_retry_s (away or full): still held (their leases
        # renewed once Redis takes writes), for the lease keeper to hand back then (LeaseKeeper.hand_back_unwritten)
        self._unwritten: set[tuple[str, str, int]] = set()

    def load(self, paths: list[str]) -> None:
        """Load and publish each model folder; raises (ModelLoadError naming the folder and what is wrong,
        RuntimeError for a Redis too old, RedisError for one away past redis_retry_s) where the worker cannot
        serve."""
        problem = redis_version_problem(self.retry(self.store.redis.info, "server"))
        if problem:
            raise RuntimeError(problem)
        if self.settings.worker_torch_threads > 0:
            import torch

            torch.set_num_threads(self.settings.worker_torch_threads)
        for path in paths:
            dtype = resolve_dtype(self.settings.worker_dtype)
            model = load_model(path, device=self.settings.worker_device, dtype=dtype)
            speed = SpeedOptions.from_settings(self.settings, model.device)
            engine = Engine(
                model,
                max_batch_rows=self.settings.max_batch_rows,
                rows_per_owner=owner_share(self.settings.rows_per_owner, model.device),
                on_step_events=StepEventWriter(self.store, self),
                **speed.engine_kwargs(),
            )
            engine.start()
            engine.warm_up()  # every bucket compiled before the model is published (before any job is taken)
            if self.settings.fault_hang_file:
                hang_once(engine, self.settings.fault_hang_file)
            self.engines[model.name] = engine
            worker_metrics.track_engine(
                model.name, lambda engine=engine: engine.active_requests, lambda engine=engine: engine.stalled_s
            )
            worker_metrics.track_gpu_memory(model.name, model.device)
            self.retry(self.store.publish_model, model_info(model, engine))  # a load's minutes are not lost to a blip
            log.info("serving model %s from %s", model.name, model.path)

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()

    def engine(self, model: str) -> Engine:
        return self.engines[model]

    def stalled(self) -> list[str]:
        """The models whose engine has been inside one iteration longer than engine_stall_s: a hung device. Their
        jobs' leases are not renewed (they run again on another worker), no job of theirs is taken, the heartbeat
        stops saying this worker consumes (its liveness probe fails), and engine_stall_exit_s later the worker exits
        (LeaseKeeper.exit_if_hung)."""
        stalled = [name for name, engine in self.engines.items() if engine.stalled_s > self.settings.engine_stall_s]
        for name in set(stalled) - self._stalled:
            if self.engines[name].broken is not None:
                log.error("engine of %s lost its device: %s", name, self.engines[name].broken)
            else:
                log.error(
                    "engine of %s stalled %.0f s in one iteration: a hung device", name, self.engines[name].stalled_s
                )
        self._stalled = set(stalled)
        return stalled

    def track(self, handle: RequestHandle) -> None:
        with self._lock:
            self._handles[handle.request_id] = handle

    def untrack(self, handle: RequestHandle) -> None:
        with self._lock:
            self._handles.pop(handle.request_id, None)

    def handle(self, rid: str) -> RequestHandle | None:
        with self._lock:
            return self._handles.get(rid)

    def hold(self, model: str, job_id: str, attempt: int) -> None:
        with self._lock:
            self._held.setdefault(model, {})[job_id] = attempt

    def release(self, model: str, job_id: str, attempt: int) -> None:
        """Stop holding (renewing the lease of) `attempt` of the job: only that one. A newer attempt of the same job
        may run on this worker already (its lease lapsed while this one still ran, and a reaper requeued it)."""
        with self._lock:
            held = self._held.get(model, {})
            if held.get(job_id) == attempt:
                del held[job_id]

    def leave_unwritten(self, model: str, job_id: str, attempt: int) -> None:
        """The attempt ran but Redis took no result: keep holding it until the lease keeper hands it back."""
        with self._lock:
            self._unwritten.add((model, job_id, attempt))

    def unwritten(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return sorted(self._unwritten)

    def forget_unwritten(self, model: str, job_id: str, attempt: int) -> None:
        with self._lock:
            self._unwritten.discard((model, job_id, attempt))
        self.release(model, job_id, attempt)

    def held(self) -> dict[str, list[tuple[str, int]]]:
        """{model: [(job id, attempt)]} of the attempts this worker runs now (their leases to renew)."""
        with self._lock:
            return {model: list(jobs.items()) for model, jobs in self._held.items() if jobs}

    def retry(self, call: Callable[..., T], *args, **kwargs) -> T:
        """`call` again while Redis is unreachable (a restart, a failover) or full (at its maxmemory), for up to
        redis_retry_s; then the error. A result must not be lost to a short outage: a lost write would cost the
        job a whole new run."""
        deadline = time.monotonic() + self.settings.redis_retry_s
        pause = 0.1
        while True:
            try:
                return call(*args, **kwargs)
            except redis.RedisError as error:
                if not redis_away_or_full(error) or time.monotonic() + pause > deadline:
                    raise
                log.warning("Redis %s; retrying in %.1f s", "full" if redis_full(error) else "unreachable", pause)
                time.sleep(pause)
                pause = min(2 * pause, 2.0)

    def cancel_job(self, job_id: str, attempt: int) -> None:
        """Drop every engine request of this attempt of the job (superseded or requeued), not a newer one's."""
        with self._lock:
            handles = [h for rid, h in self._handles.items() if parse_request_id(rid)[:2] == (job_id, attempt)]
        for handle in handles:
            handle.cancel()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from services.common.settings import get_settings

            _runtime = Runtime(settings or get_settings())
        return _runtime


# ---- running one job (the Celery tasks call these) ----


class JobRun:
    """One claimed attempt of one job: taken in fair order with a lease, finished exactly once (or left to
    the attempt that superseded it)."""

    def __init__(self, runtime: Runtime, job_id: str, attempt: int):
        self.runtime, self.store, self.job_id, self.attempt = runtime, runtime.store, job_id, attempt
        self.job: JobRecord | None = None
        self.started_at = 0.0

    @classmethod
    def take(cls, runtime: Runtime, model: str) -> JobRun | None:
        """The model's next job in fair order, claimed with a lease and started; None when none waits (or
        the worker drains, or the model's engine has stalled)."""
        if runtime.draining.is_set() or model in runtime.stalled():
            return None
        taken = runtime.store.take(model, runtime.settings.lease_s, runtime.worker)
        if taken is None:
            return None
        run = cls(runtime, *taken)
        runtime.hold(model, run.job_id, run.attempt)
        try:
            run.job = runtime.retry(runtime.store.get, run.job_id)
            if run.job is None:  # expired in the instant between
                runtime.release(model, run.job_id, run.attempt)
                return None
            run.started_at = time.time()
            queued_at = run.job.timings.get("queued_at", run.started_at)
            run.job.timings |= {"started_at": run.started_at, "queue_s": run.started_at - queued_at}
            if not runtime.retry(run.store.started, run.job_id, run.attempt, run.job.timings):
                log.warning(
                    "job %s attempt %d was requeued or cancelled before it started: leaving it", run.job_id, run.attempt
                )
                runtime.release(model, run.job_id, run.attempt)
                return None
        except Exception as error:
            if redis_away_or_full(error):  # past the retry budget: handed back once Redis takes writes, not a loss
                runtime.leave_unwritten(model, run.job_id, run.attempt)
            else:
                runtime.release(model, run.job_id, run.attempt)
            raise
        if run.attempt == 1:  # a later attempt's wait would count its earlier attempts' runs too
            worker_metrics.observe_queue_wait(run.job.model, queued_at, run.started_at)
        return run

    def release(self) -> None:
        self.runtime.release(self.job.model, self.job_id, self.attempt)

    @property
    def params(self) -> dict:
        return self.job.params

    def engine(self) -> Engine:
        return self.runtime.engine(self.job.model)

    def _timings(self) -> dict:
        finished = time.time()
        return self.job.timings | {"finished_at": finished, "run_s": finished - self.started_at}

    def succeed(self, images: list, frames: list[tuple[dict, object]] = (), frames_streamed: bool = False) -> bool:
        """Write the result once. `frames_streamed`: the step writer already stored the frames and sent
        their events (a reverse trajectory); only their TTL is renewed to match the job's."""
        fmt = self.params.get("output_format", "png")
        blobs, names = {}, []
        for index, image in enumerate(images):
            names.append(image_blob_name(self.attempt, index))
            blobs[names[-1]] = encode_image(image, fmt)
        metas = [frame_meta(self.attempt, index, meta) for index, (meta, _) in enumerate(frames)]
        # written with the result's retry budget: a blip of Redis here must not cost the job a whole new run
        if frames_streamed:
            self.runtime.retry(self.store.renew_blobs, self.job_id, [meta["blob"] for meta in metas])
        elif frames:  # frames (pictures, then events; not terminal) before the write-once result
            pictures = [(i, meta, encode_image(image, "png")) for i, (meta, image) in enumerate(frames)]
            self.runtime.retry(self.store.add_frames, self.job_id, self.attempt, pictures)
        steps = self.job.total_steps
        done = {"id": self.job_id, "images": len(names), "frames": len(metas), "emitted_at": time.time()}
        fields = {
            "images": names,
            "frames": metas,
            "timings": self._timings(),
            "progress": {"step": steps, "total": steps, "done": True},
        }
        return self.runtime.retry(
            self.store.finish, self.job, self.attempt, "succeeded", fields, ("succeeded", done), blobs
        )

    def fail(self, error_type: str, message: str, param: str | None = None) -> bool:
        error = {"type": error_type, "message": message, "param": param}
        return self.runtime.retry(
            self.store.finish,
            self.job,
            self.attempt,
            "failed",
            {"error": error, "timings": self._timings()},
            ("failed", dict(error, emitted_at=time.time())),
        )

    def cancelled(self) -> bool:
        if not self.runtime.retry(self.store.holds, self.job_id, self.attempt):
            return False  # requeued meanwhile: the attempt that takes it over finishes it, not us
        return self.runtime.retry(
            self.store.finish,
            self.job,
            self.attempt,
            "cancelled",
            {"timings": self._timings()},
            ("cancelled", {"id": self.job_id, "emitted_at": time.time()}),
        )


def hang_once(engine: Engine, marker_file: str) -> None:
    """The fault suite's hung device (LATENTD_FAULT_HANG_FILE): the first backbone call of a request whose prompt
    holds "hang" never returns, in the one worker that removes `marker_file` first. Never set in service."""
    backbone = engine.backbone

    def call(latents, timesteps, cond):
        if any("hang" in member.request.prompt for member in engine._in_iteration):
            try:
                os.remove(marker_file)
            except FileNotFoundError:
                pass
            else:
                threading.Event().wait()  # as a kernel that never completes
        return backbone(latents, timesteps, cond)

    engine.backbone = call
