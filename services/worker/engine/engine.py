"""The engine: one thread owns the model and denoises every active request together.

Each iteration is schedule -> execute -> update (as vLLM's EngineCore.step):
- schedule: admit waiting requests (text embeddings once, initial latents from the request's own
  seeded generator), drop cancelled ones, and pick requests round-robin (least recently stepped
  first, then oldest) until the row budget `max_batch_rows` is full (lower for a while after a call ran out of
  memory: RowCap); while requests of more than one
  owner (API key) are active, at most `rows_per_owner` rows of each owner go into one call, so on a
  device whose call time grows with rows (a CPU) a flooding key cannot slow another key's steps by more
  than a bounded share;
- execute: one backbone call over all their rows (each row at its own timestep, with its own conditioning);
- update: classifier-free guidance and guidance rescale per row, then one update per sampler for all
  the rows using it (vectorised: requests with different samplers, step counts and guidance share the
  backbone call), a NaN check per request, step events (one `on_step_events` call per iteration and one
  event per request handle), previews and trajectory frames every k steps; then finished requests
  are VAE-decoded in one batch and retired.

The loop is the same for every model family (SD 1.x/2.x, SDXL, SD3, Flux): what differs (text encoding,
per-row conditioning, the backbone call, the sampler math, which rows guidance needs, the VAE's scaling)
is the model's `family` (services/worker/families/), reached through the LoadedModel.

Every random draw of a request comes from its own CPU generator, in diffusers' order (initial latents,
then the noise of each step where its sampler draws any: DDIM with eta > 0, Euler ancestral), so its
pictures do not depend on what it was batched with.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from PIL import Image

from services.common import rules
from services.common.errors import InvalidInput
from services.worker import metrics as worker_metrics
from services.worker.diffusion.img2img import blend_rows
from services.worker.diffusion.samplers import Plan, Sampler, SamplerState, build_samplers, unsupported_samplers
from services.worker.engine import compiled, sources
from services.worker.engine.batch import ActiveRequest, UNetBatch, build_unet_batch, guided_outputs, to_device
from services.worker.engine.compiled import Backbone, Decoder
from services.worker.engine.errors import (
    EngineError,
    EngineStopped,
    InvalidRequestError,
    NonFiniteOutputError,
    RequestCancelled,
    device_lost,
    out_of_memory,
)
from services.worker.engine.finite import FiniteWatch
from services.worker.engine.output import OutputQueue
from services.worker.engine.requests import GenerationRequest, GenerationResult, StepEvent, TrajectoryFrame
from services.worker.loading import LoadedModel, to_pil

log = logging.getLogger(__name__)
T = TypeVar("T")

DECODE_CHUNK = 16  # images per VAE call
PREVIEW_MIN_SIZE = 64  # previews are upscaled (nearest) to at least this many pixels per side
CPU_ROWS_PER_OWNER = 4  # owner_share's "auto" on the CPU: two guided images of each key per UNet call
_END = object()


class RequestHandle:
    """The caller's side of one request: events, the result or its typed error, and cancel."""

    def __init__(self, request_id: str, wake: Callable[[], None], keep_events: bool = True):
        self.request_id = request_id
        self._events: queue.Queue = queue.Queue()
        # False where nobody reads events() (the worker writes steps through on_step_events): a long job with a
        # preview at every step would otherwise hold every StepEvent and preview picture until it ends
        self._keep_events = keep_events
        self._future: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        self._cancel_requested = threading.Event()
        self._wake = wake

    def events(self, timeout: float | None = None) -> Iterator[StepEvent]:
        """Step events as they come; ends when the request ends. timeout: seconds to wait for each event."""
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event for request {self.request_id} within {timeout} s") from None
            if item is _END:
                self._events.put(_END)  # a second reader ends too
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"request {self.request_id} not finished within {timeout} s") from None

    def cancel(self) -> None:
        if not self._future.done():
            self._cancel_requested.set()
            self._wake()

    def done(self) -> bool:
        return self._future.done()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    def _emit(self, event: StepEvent) -> None:
        if self._keep_events:
            self._events.put(event)

    def _finish(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        """The first outcome wins; a later one (a stop whose join timed out racing the engine thread) is dropped."""
        try:
            if error is not None:
                self._future.set_exception(error)
            else:
                self._future.set_result(result)
        except concurrent.futures.InvalidStateError:
            return
        self._events.put(_END)


class UNetTimer:
    """Time of the UNet call: wall time on the CPU; on CUDA, events around the launched kernels, read
    after the step's one wait for the GPU, so timing adds no synchronisation of its own."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        self.started, self.ended = time.monotonic(), None

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record()
        self.ended = time.monotonic()

    def done(self) -> bool:
        """Whether seconds() can be read without waiting for the GPU."""
        return not self.cuda or self.end_event.query()

    def seconds(self) -> float:
        if self.cuda:
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event) / 1000
        return self.ended - self.started


def owner_share(setting: str, device: torch.device) -> int | None:
    """The engine's rows_per_owner from its setting (Settings.rows_per_owner): "auto" is 4 rows on the CPU, where
    a UNet call's time grows with its rows (so a lone 2-row request shares a call with at most 4 rows of each
    other key), and no bound on CUDA, where it is nearly flat; "off" is no bound; a number is itself."""
    if setting == "off" or (setting == "auto" and device.type != "cpu"):
        return None
    return CPU_ROWS_PER_OWNER if setting == "auto" else int(setting)


# Calls at a lowered row cap before the engine tries the next larger one again (RowCap).
RAISE_CAP_AFTER_CALLS = 200


class RowCap:
    """The rows one backbone call takes (the images one VAE decode call takes, for the decode cap): max_rows until a
    call runs out of memory; then the next bucket below (half, without buckets), and so on down to the smallest,
    while the call's requests wait one iteration and step again in smaller calls (a failed call moved nothing of
    theirs; a decode starts over). After RAISE_CAP_AFTER_CALLS calls that fit, the next bucket up is tried again:
    memory another process held may be free by then, and one more failed call is the price when it is not. Only a
    call at the smallest cap that runs out fails its requests."""

    def __init__(self, max_rows: int, sizes: Sequence[int]):
        self.max_rows = max_rows
        self.steps = tuple(sorted(set(sizes) | {max_rows})) if sizes else None
        self.rows = max_rows
        self.calls_since_lowered = 0

    def lower(self, rows: int) -> bool:
        """After a call of `rows` rows ran out of memory: True with the cap lowered, False at the floor."""
        current = min(self.rows, rows)
        below = [s for s in self.steps if s < current] if self.steps else ([current // 2] if current > 1 else [])
        if not below:
            return False
        self.rows, self.calls_since_lowered = below[-1], 0
        return True

    def fitted(self) -> bool:
        """After a call that fit: True where the cap was raised a step."""
        if self.rows >= self.max_rows:
            return False
        self.calls_since_lowered += 1
        if self.calls_since_lowered < RAISE_CAP_AFTER_CALLS:
            return False
        above = [s for s in self.steps if s > self.rows] if self.steps else [min(2 * self.rows, self.max_rows)]
        self.rows, self.calls_since_lowered = above[0], 0
        return True


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_rows: int = 64,
        on_step_events: Callable[[list[StepEvent]], None] | None = None,
        buckets: Sequence[int] = (),
        compile_mode: str | None = None,
        compile_dynamic: bool = True,
        channels_last: bool = False,
        finite_check_every: int = 1,
        output_thread: bool = False,
        rows_per_owner: int | None = None,
    ):
        """buckets: pad each backbone call's rows up to the next of these (compiled.py); compile_mode: a
        torch.compile mode for the backbone and the VAE decoder (None: eager); finite_check_every: read the
        non-finite flags every this many iterations (finite.py); output_thread: step events, decoded pictures
        and results handed over on a thread of their own (output.py). SpeedOptions.from_settings picks them.
        rows_per_owner: while requests of several owners are active, one call takes at most this many rows of
        each (but always one request of each); None: no bound (owner_share picks it from the settings)."""
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
        if rows_per_owner is not None and rows_per_owner < 1:
            raise ValueError(f"rows_per_owner must be at least 1 or None, got {rows_per_owner}")
        self.rows_per_owner = rows_per_owner
        self.model = model
        self.max_batch_rows = max_batch_rows
        self.on_step_events = on_step_events
        if channels_last:
            compiled.to_channels_last(model)
        self.backbone = Backbone(model, compiled.bucket_sizes(buckets, max_batch_rows), compile_mode, compile_dynamic)
        self.row_cap = RowCap(max_batch_rows, self.backbone.sizes)
        worker_metrics.observe_row_cap(model.name, max_batch_rows)
        self.decoder = Decoder(model, compiled.decode_sizes(buckets, DECODE_CHUNK), compile_mode, compile_dynamic)
        self.decode_cap = RowCap(DECODE_CHUNK, self.decoder.sizes)  # images per VAE call, as the row cap
        self._finite = FiniteWatch(finite_check_every)
        self._output = OutputQueue(f"engine-output-{model.name}", threaded=output_thread)
        self._timers: deque[tuple[UNetTimer, int, list[ActiveRequest]]] = deque()
        self.warmup_seconds: dict[str, float] = {}
        self._lock = threading.Condition()
        self._waiting: deque[ActiveRequest] = deque()
        self._calls: deque[tuple[Callable[[LoadedModel], object], concurrent.futures.Future]] = deque()
        self._active: list[ActiveRequest] = []
        self._sequence = itertools.count()
        self._iteration = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._in_iteration: list[ActiveRequest] = []  # the requests an exception in this iteration fails
        self._busy_since: float | None = None  # monotonic start of the iteration under way (stalled_s)
        self.broken: BaseException | None = None  # the error that lost the device (errors.device_lost)
        # one sampler object per name this model's scheduler config supports, bound to it (plans cached per step count)
        self.samplers: dict[str, Sampler] = build_samplers(
            model.scheduler_config, model.alphas_cumprod, model.device, model.family.sampler_options()
        )
        self.unsupported_samplers = unsupported_samplers(model.scheduler_config)
        self._latent_rgb: torch.Tensor | None = None  # (C + 1, 3), fitted on the first preview
        self.last_batch_rows = 0  # rows of the last UNet call, for metrics
        self.last_unet_s = 0.0

    # ---- caller side (any thread) ----

    def start(self) -> Engine:
        if self._thread is None:
            self._output.start()
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.model.name}", daemon=True)
            self._thread.start()
        return self

    def warm_up(self, timeout: float | None = None) -> dict[str, float]:
        """Every row bucket through the backbone and every image bucket through the VAE decoder (compiling them
        where compile is on), before the engine serves. On the engine thread once started (CUDA graphs, under
        "reduce-overhead", belong to the thread that captured them). Seconds per part."""
        if self._thread is not None:
            self.warmup_seconds = self.call(lambda model: compiled.warm_up(self)).result(timeout)
        else:
            self.warmup_seconds = compiled.warm_up(self)
        worker_metrics.observe_warmup(self.model.name, self.warmup_seconds["total_s"])
        return self.warmup_seconds

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._output.close(timeout)
        self._fail_all(EngineStopped("the engine was stopped before the request finished"))

    @property
    def stalled_s(self) -> float:
        """How long the engine thread has been inside one iteration (its calls, a step); 0 between them; infinite
        once its device is lost (`broken`): it will never step again."""
        if self.broken is not None:
            return math.inf
        started = self._busy_since
        return 0.0 if started is None else time.monotonic() - started

    @property
    def active_requests(self) -> int:
        """Requests admitted or waiting, not yet finished."""
        with self._lock:
            return len(self._waiting) + len(self._active)

    def submit(self, request: GenerationRequest, keep_events: bool = True) -> RequestHandle:
        """Validate and queue a request. Raises InvalidRequestError (naming the field) for bad input.
        `keep_events`: the handle's events() yields the step events (False: only on_step_events sees them)."""
        sampler, state, resolved, shape = self._validate(request)
        handle = RequestHandle(request.request_id, self._wake, keep_events)
        active = ActiveRequest(
            request=request,
            handle=handle,
            sequence=next(self._sequence),
            sampler=sampler,
            state=state,
            resolved=resolved,
            rows=self.model.family.rows(resolved.guidance_scale, request.true_cfg_scale),
            latent_shape=shape,
            submitted_at=time.monotonic(),
        )
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is stopped")
            self._waiting.append(active)
            self._lock.notify_all()
        return handle

    def call(self, fn: Callable[[LoadedModel], T]) -> concurrent.futures.Future[T]:
        """Run fn(model) on the engine thread between iterations (e.g. VAE work for forward trajectories)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is stopped")
            self._calls.append((fn, future))
            self._lock.notify_all()
        return future

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    @property
    def default_sampler(self) -> str:
        return self.model.default_sampler

    def _validate(
        self, request: GenerationRequest
    ) -> tuple[Sampler, SamplerState, rules.Resolved, tuple[int, int, int]]:
        """The service's rules (services/common/rules.py, the same the doors apply), then the sampler's plan."""
        if not isinstance(request.request_id, str) or not request.request_id:
            raise InvalidRequestError("request_id must be a non-empty string", "request_id")
        try:
            resolved = rules.check_generation(
                self.limits,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                eta=request.eta,
                seed=request.seed,
                width=request.width,
                height=request.height,
                num_images=request.num_images,
                preview_every=request.preview_every,
                trajectory_every=request.trajectory_every,
                sampler=request.sampler,
                guidance_rescale=request.guidance_rescale,
                guidance_start=request.guidance_start,
                guidance_stop=request.guidance_stop,
                true_cfg_scale=request.true_cfg_scale,
                original_width=request.original_width,
                original_height=request.original_height,
                crop_top=request.crop_top,
                crop_left=request.crop_left,
                target_width=request.target_width,
                target_height=request.target_height,
                image_size=_size(request.image, "image"),
                mask_size=_size(request.mask, "mask"),
                strength=request.strength,
            )
        except InvalidInput as error:
            raise InvalidRequestError(error.message, error.param) from None
        sampler = self.samplers[resolved.sampler]
        shape = self.model.latent_shape(resolved.width, resolved.height)
        start = (
            0
            if resolved.strength is None
            else rules.start_step(resolved.num_inference_steps, resolved.strength, resolved.sampler)
        )
        try:
            seq_len = self.model.family.image_seq_len(self.model, shape)
            plan = sampler.plan_for(resolved.num_inference_steps, seq_len, start)
        except ValueError as error:
            raise InvalidRequestError(f"{error} (sampler {resolved.sampler})", "num_inference_steps") from None
        state = SamplerState(plan=plan, eta=float(request.eta), step_index=start, start_index=start, seed=request.seed)
        return sampler, state, resolved, shape

    @functools.cached_property
    def limits(self) -> rules.ModelLimits:
        model = self.model
        return rules.ModelLimits(
            name=model.name,
            native_width=model.native_width,
            native_height=model.native_height,
            size_multiple=self.size_multiple,
            max_inference_steps=self.samplers[self.default_sampler].max_steps(),
            max_prompt_tokens=model.max_prompt_tokens,
            count_tokens=model.count_prompt_tokens,
            samplers=tuple(self.samplers),
            default_sampler=self.default_sampler,
            sampler_max_steps={name: sampler.max_steps() for name, sampler in self.samplers.items()},
            default_guidance_rescale=model.default_guidance_rescale,
            default_guidance_start=model.default_guidance_start,
            default_guidance_stop=model.default_guidance_stop,
            unsupported_samplers=dict(self.unsupported_samplers),
            family=model.family.name,
            params=model.facts.params,
            default_num_inference_steps=model.default_num_inference_steps,
            default_guidance_scale=model.default_guidance_scale,
            default_strength=model.default_strength,
            default_inpaint_strength=model.default_inpaint_strength,
        )

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: the VAE's factor times the backbone's downsampling (or patch)."""
        return self.model.size_multiple

    # ---- engine thread ----

    def _run(self) -> None:
        if self.model.device.type == "cuda":
            # this thread's kernels, streams and events on the model's card (cuda:N too: an event recorded on
            # another card's stream would say a copy from this one had ended before it had)
            torch.cuda.set_device(self.model.device)
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stopping or self._waiting or self._calls or self._active):
                        self._lock.wait()
                    if self._stopping:
                        return
                    calls = list(self._calls)
                    self._calls.clear()
                self._busy_since = time.monotonic()
                for fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(self.model))
                        except BaseException as error:  # noqa: BLE001 - handed to the caller
                            future.set_exception(error)
                try:
                    self.step()
                except Exception as error:
                    if device_lost(error):
                        self._lose_device(error)
                        return
                    # only the requests of the failed iteration fail; the rest go on
                    log.exception("engine iteration failed")
                    for active in self._in_iteration:
                        self._fail(active, error)
                finally:
                    self._in_iteration = []
                    self._busy_since = None

    def _lose_device(self, error: BaseException) -> None:
        """Nothing more will run on this device: fail nothing (no request is at fault), step no more; the worker
        treats the engine as hung (stalled_s), its jobs run again elsewhere, and it exits for a fresh process
        (services/worker/leases.py, exit_if_hung)."""
        log.critical("the device is lost (%s): the engine stops; its jobs run again elsewhere", error)
        self.broken = error

    def step(self) -> None:
        """One iteration: schedule -> execute -> update."""
        self._admit()
        self._drop_cancelled()
        members = self._schedule()
        if not members:
            return
        self._in_iteration = members
        self._iteration += 1
        batch = build_unet_batch(members, self.model.dtype)
        timer = UNetTimer(self.model.device)
        try:
            model_output = self._execute(batch)
        except Exception as error:
            if not self.lowered_after(error, self.row_cap, "backbone", batch.num_rows):
                raise
            return  # the members step at the next iteration, in smaller calls, first in line as they were
        timer.stop()
        for member in members:
            member.last_served = self._iteration
        if self.row_cap.fitted():
            log.info("%s: trying %d rows per backbone call again", self.model.name, self.row_cap.rows)
            worker_metrics.observe_row_cap(self.model.name, self.row_cap.rows)
        self._timers.append((timer, batch.num_rows, members))
        events = self._update(batch, model_output)  # reads the GPU only when the finiteness check is due
        self.last_batch_rows = batch.num_rows
        self._read_timers()
        worker_metrics.record_steps(self.model.name, len(events))
        if events:
            if self.on_step_events is not None:
                self._output.submit(self._write_events, events)
            for member, event in events_by_member(members, events):
                member.handle._emit(event)
        self._finish([m for m in members if m.finished and m in self._active])

    def lowered_after(self, error: BaseException, cap: RowCap, part: str, rows: int) -> bool:
        """After a `part` call ("backbone", "vae") of `rows` rows failed with `error`: True where it ran out of
        memory and its cap is now lower (run it again, smaller); False otherwise or at the floor (let it fail)."""
        if not out_of_memory(error):
            return False
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        lowered = cap.lower(rows)
        worker_metrics.record_out_of_memory(self.model.name, part)
        if part == "backbone":
            worker_metrics.observe_row_cap(self.model.name, cap.rows)
        if lowered:
            log.warning(
                "%s: a %s call of %d rows ran out of memory; %d per call from now on (%s)",
                self.model.name,
                part,
                rows,
                cap.rows,
                str(error).splitlines()[0][:200],
            )
        return lowered

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pictures of `latents`, in VAE calls of the decode cap's images (fewer after one ran out of memory;
        the decode then starts over at the lower cap)."""
        while True:
            chunk = self.decode_cap.rows
            try:
                pixels = torch.cat([self.decoder(latents[i : i + chunk]) for i in range(0, latents.shape[0], chunk)])
            except Exception as error:
                if not self.lowered_after(error, self.decode_cap, "vae", latents.shape[0]):
                    raise
                continue
            self.decode_cap.fitted()
            return pixels

    def _read_timers(self) -> None:
        """UNet call times whose end the GPU has passed (all of them after a finiteness check), without waiting."""
        while self._timers and self._timers[0][0].done():
            timer, rows, members = self._timers.popleft()
            self.last_unet_s = timer.seconds()
            worker_metrics.observe_unet_call(self.model.name, rows, self.last_unet_s)
            for member in members:
                member.unet_s += self.last_unet_s

    def _write_events(self, events: list[StepEvent]) -> None:
        try:
            self.on_step_events(events)
        except Exception:
            log.exception("on_step_events failed")

    def _admit(self) -> None:
        with self._lock:
            admitted = list(self._waiting)
            self._waiting.clear()
        admitted = [a for a in admitted if not self._cancelled(a)]
        if not admitted:
            return
        self._in_iteration = admitted
        model = self.model
        prompts = []
        for active in admitted:
            if active.rows.cond:
                prompts.append(active.request.prompt)
            if active.rows.uncond:  # whether or not its first step is within its guidance interval
                prompts.append(active.request.negative_prompt)
        encoded = self._encode(list(dict.fromkeys(prompts)))
        for active in admitted:  # one request that cannot start (its prompt, its picture) fails alone
            n = active.num_images
            request = active.request
            try:
                used = ([request.prompt] if active.rows.cond else []) + (
                    [request.negative_prompt] if active.rows.uncond else []
                )
                for prompt in used:
                    if isinstance(encoded[prompt], BaseException):
                        raise encoded[prompt]
                active.latents, extra = self._initial_latents(active)
                own = model.family.row_conditioning(model, request, active.resolved) | extra  # time ids, guidance...
                if active.rows.cond:
                    active.cond = rows_of(encoded[request.prompt] | own, n)
                if active.rows.uncond:
                    negative = model.uncond_conditioning(request.negative_prompt, encoded[request.negative_prompt])
                    active.uncond = rows_of(negative | own, n)
            except Exception as error:
                log.exception("request %s could not start", active.request_id)
                self._fail(active, error)
                continue
            active.admitted_at = time.monotonic()
            self._active.append(active)

    def _encode(self, prompts: list[str]) -> dict[str, dict[str, torch.Tensor] | BaseException]:
        """{prompt: its text conditioning} in one text-encoder call; where that call fails, each prompt alone, so a
        prompt that breaks the encoder (or a batch of them that runs out of memory) costs only its own requests:
        the error stands in for what it would have been."""
        try:
            return dict(zip(prompts, self.model.encode_prompts(prompts)))
        except Exception:
            if len(prompts) == 1:
                raise
            log.warning("encoding %d prompts together failed; encoding each alone", len(prompts), exc_info=True)
        encoded: dict[str, dict[str, torch.Tensor] | BaseException] = {}
        for prompt in prompts:
            try:
                encoded[prompt] = self.model.encode_prompts([prompt])[0]
            except Exception as error:  # noqa: BLE001 - the requests with this prompt fail with it
                encoded[prompt] = error
        return encoded

    def _fail(self, active: ActiveRequest, error: BaseException) -> None:
        self._retire(
            active,
            error=EngineError(f"request {active.request_id} failed in the engine: {type(error).__name__}: {error}"),
        )

    def _initial_latents(self, active: ActiveRequest) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x at the request's first step (n, C, h, w), float32 on the model's device, on its sampler's scale, and
        any conditioning its start adds (sources.py). As diffusers' prepare_latents: randn on the request's own
        CPU generator in the model dtype, then to the device, × the plan's init_noise_sigma (1; σ̂_max for the
        Euler family); with an image, its VAE posterior sample first and the image noised to the start step.
        The generator stays with the request for the noise its sampler draws later."""
        request = active.request
        active.generator = torch.Generator("cpu").manual_seed(request.seed)
        begin = sources.start(
            self.model,
            active.state,
            active.generator,
            active.num_images,
            active.latent_shape,
            image=request.image,
            mask=request.mask,
            strength=active.resolved.strength,
        )
        return begin.latents, begin.conditioning

    def _cancelled(self, active: ActiveRequest) -> bool:
        if active.handle.cancel_requested:
            self._retire(
                active,
                error=RequestCancelled(
                    f"request {active.request_id} was cancelled after {active.steps_done} of {active.total_steps} steps"
                ),
            )
            return True
        return False

    def _drop_cancelled(self) -> None:
        for active in list(self._active):
            self._cancelled(active)
        with self._lock:
            waiting = list(self._waiting)
        for active in waiting:
            if active.handle.cancel_requested:
                with self._lock:
                    if active in self._waiting:
                        self._waiting.remove(active)
                self._cancelled(active)

    def _schedule(self) -> list[ActiveRequest]:
        """Round-robin by rows: least recently stepped first (then oldest), same latent shape as the first,
        until the row cap (max_batch_rows, less after running out of memory). A long request thus takes its turn
        like any other and cannot starve short ones.
        With requests of several owners active, each owner adds rows only up to rows_per_owner (its first
        request always fits): the share of a call, and so of a step's time, one owner can take."""
        candidates = sorted((a for a in self._active if not a.finished), key=lambda a: (a.last_served, a.sequence))
        if not candidates:
            return []
        shape = candidates[0].latent_shape
        shared = self.rows_per_owner is not None and len({a.request.owner for a in candidates}) > 1
        chosen, rows, owner_rows = [], 0, Counter()
        for active in candidates:
            if active.latent_shape != shape:
                continue
            if chosen and rows + active.num_rows > self.row_cap.rows:
                continue
            owner = active.request.owner
            if shared and owner_rows[owner] and owner_rows[owner] + active.num_rows > self.rows_per_owner:
                continue
            chosen.append(active)
            rows += active.num_rows
            owner_rows[owner] += active.num_rows
        return chosen  # their turn is counted once their call has run (step): one that ran out of memory keeps it

    def _execute(self, batch: UNetBatch) -> torch.Tensor:
        """One backbone call over all rows (in chunks of the row cap if one request alone needs more)."""
        outputs, cap = [], self.row_cap.rows
        for start in range(0, batch.num_rows, cap):
            rows = slice(start, start + cap)
            cond = {key: value[rows] for key, value in batch.cond.items()}
            outputs.append(self.backbone(batch.latents[rows], batch.timesteps[rows], cond))
        return torch.cat(outputs).float()  # (R, C, h, w)

    def _update(self, batch: UNetBatch, model_output: torch.Tensor) -> list[StepEvent]:
        members = batch.members
        guided = guided_outputs(batch, model_output)  # (N, C, h, w)
        x_t = torch.cat([m.latents for m in members])  # (N, C, h, w)
        device = x_t.device
        noise = None
        if any(m.sampler.draws_noise(m.state) for m in members):
            # each request's step noise from its own generator (randn of its latents' shape, in the dtype its
            # sampler's scheduler draws in: the model's unless the sampler says), drawn only where its sampler
            # draws, as diffusers' schedulers do
            noise = torch.cat(
                [
                    torch.randn(
                        m.latents.shape, generator=m.generator, dtype=m.sampler.noise_dtype or self.model.dtype
                    ).float()
                    if m.sampler.draws_noise(m.state)
                    else torch.zeros(m.latents.shape)
                    for m in members
                ]
            )
            noise = to_device(noise, device)
        # what each member's step was, read before the samplers advance the states: (updates done, plan step index,
        # t, input scale)
        before = [(m.steps_done, m.step_index, m.timestep, m.input_scale) for m in members]
        x_prev, x0_pred = self._step_samplers(members, guided, x_t, noise)
        # non-finite rows: flagged on the device now, read every few iterations and before any decode (finite.py)
        self._finite.observe(members, [m.num_images for m in members], [done + 1 for done, *_ in before], x_prev)
        if self._finite.due(force=any(m.finished for m in members)):
            for member, step in self._finite.check():
                if member in self._active:
                    self._retire(
                        member,
                        error=NonFiniteOutputError(
                            f"request {member.request_id}: latents became non-finite at step {step} "
                            f"of {member.total_steps} "
                            f"(timestep {round(member.state.plan.timesteps[member.state.start_index + step - 1])})"
                        ),
                    )
        events, row = [], 0
        for member, (done, index, timestep, input_scale) in zip(members, before):
            rows = slice(row, row + member.num_images)
            row += member.num_images
            member_x_prev, member_x0_pred = x_prev[rows], x0_pred[rows]
            step = done + 1
            if member not in self._active:  # retired above (non-finite) or earlier
                continue
            request = member.request
            frame = None
            if request.trajectory_every and step % request.trajectory_every == 0:
                # x_t as the UNet saw it (the DDPM scale, whatever the sampler's)
                x_in = member.latents if input_scale == 1.0 else (member.latents.double() * input_scale).float()
                frame = self._trajectory_frame(step, timestep, member.state.plan, index, x_in, member_x0_pred)
                frame.index = len(member.frames)
                member.frames.append(frame)
            preview = None
            if request.preview_every and step % request.preview_every == 0:
                preview = self._preview(member_x0_pred)
            member.latents = member_x_prev
            events.append(
                StepEvent(
                    request_id=member.request_id,
                    step=step,
                    total=member.total_steps,
                    timestep=timestep,
                    preview=preview,
                    frame=frame,
                )
            )
        return events

    def _step_samplers(
        self, members: list[ActiveRequest], model_output: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One update of every row, grouped by sampler: each sampler steps all its rows at once; then the
        inpainting requests' kept regions are blended back in (img2img.blend_rows). Returns (x_prev, x0_pred)
        (N, C, h, w) in member order; advances every member's sampler state."""
        x_prev, x0_pred = self._sampler_updates(members, model_output, x_t, noise)
        return blend_rows([m.state for m in members], [m.num_images for m in members], x_prev), x0_pred

    def _sampler_updates(
        self, members: list[ActiveRequest], model_output: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        groups: dict[str, list[int]] = {}
        for k, member in enumerate(members):
            groups.setdefault(member.sampler.name, []).append(k)
        if len(groups) == 1:
            sampler = members[0].sampler
            return sampler.step([m.state for m in members], [m.num_images for m in members], model_output, x_t, noise)
        starts = [0]
        for member in members:
            starts.append(starts[-1] + member.num_images)
        x_prev, x0_pred = torch.empty_like(x_t), torch.empty_like(x_t)
        for name, ks in groups.items():
            rows = to_device(torch.cat([torch.arange(starts[k], starts[k + 1]) for k in ks]), x_t.device)
            group_noise = None
            if noise is not None and any(members[k].sampler.draws_noise(members[k].state) for k in ks):
                group_noise = noise.index_select(0, rows)
            out_x, out_x0 = self.samplers[name].step(
                [members[k].state for k in ks],
                [members[k].num_images for k in ks],
                model_output.index_select(0, rows),
                x_t.index_select(0, rows),
                group_noise,
            )
            x_prev.index_copy_(0, rows, out_x)
            x0_pred.index_copy_(0, rows, out_x0)
        return x_prev, x0_pred

    def _trajectory_frame(
        self, step: int, timestep: int, plan: Plan, index: int, x_t: torch.Tensor, x0_pred: torch.Tensor
    ) -> TrajectoryFrame:
        """x_t (n, C, h, w) and x̂0, decoded, with x_t's noise level (ᾱ, or σ for flow matching)."""
        n = x_t.shape[0]
        pixels = self.model.decode_latents(torch.cat([x_t, x0_pred]))  # (2n, 3, H, W)
        images = to_pil(torch.nan_to_num(pixels))
        return TrajectoryFrame(
            step=step, timestep=timestep, x_t=images[:n], x0_pred=images[n:], **plan.noise_level(index)
        )

    def _preview(self, x0_pred: torch.Tensor) -> Image.Image:
        """x̂0 at latent resolution through a linear latent -> RGB map (no VAE call), images side by side."""
        if self._latent_rgb is None:
            self._latent_rgb = fit_latent_rgb(self.model)
        weights = self._latent_rgb.to(x0_pred.device)
        n, C, h, w = x0_pred.shape
        flat = torch.cat(
            [x0_pred.permute(0, 2, 3, 1).reshape(-1, C), torch.ones(n * h * w, 1, device=x0_pred.device)], 1
        )
        rgb = (flat @ weights).reshape(n, h, w, 3).permute(0, 3, 1, 2)  # (n, 3, h, w) in [-1, 1]
        rgb = torch.nan_to_num((rgb / 2 + 0.5).clamp(0, 1))
        scale = max(1, math.ceil(PREVIEW_MIN_SIZE / max(h, w)))
        rgb = F.interpolate(rgb, scale_factor=scale, mode="nearest")
        tiled = torch.cat(list(rgb), dim=2).unsqueeze(0)  # (1, 3, h·s, n·w·s)
        return to_pil(tiled)[0]

    def _finish(self, finished: list[ActiveRequest]) -> None:
        """Decode every finished request's latents in one batch (chunked) and retire them."""
        if not finished:
            return
        for member in finished:
            self._active.remove(member)  # retired now; their results are delivered by the output queue
        timer = UNetTimer(self.model.device)  # the decode's time, read on the output thread
        try:
            pixels = self._decode(torch.cat([m.latents for m in finished]))
        except Exception as error:
            if device_lost(error):
                raise  # the engine stops (_run); no request is at fault
            # only the requests being decoded fail: the iteration's others go on denoising
            log.exception("decoding %d finished request(s) failed", len(finished))
            for member in finished:
                self._fail(member, error)
            return
        timer.stop()
        if pixels.device.type == "cuda":
            # to pinned host memory behind the decode, without waiting: the output thread waits for the event
            host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            pixels = host
        else:
            copied = None
        self._output.submit(self._deliver, finished, pixels, copied, timer)

    def _deliver(
        self, finished: list[ActiveRequest], pixels: torch.Tensor, copied: torch.cuda.Event | None, timer: UNetTimer
    ) -> None:
        """On the output queue: the decoded pictures (B, 3, H, W) of `finished` -> checked PIL images, results."""
        try:
            self._deliver_pictures(finished, pixels, copied, timer)
        except Exception as error:  # no request of the batch may be left waiting
            if device_lost(error):  # the decode's kernels failed, seen as their pictures are read
                self._lose_device(error)
                for member in finished:
                    member.handle._finish(error=EngineStopped(f"the device is lost: {error}"))
                return
            log.exception("delivering decoded pictures failed")
            for member in finished:
                member.handle._finish(
                    error=EngineError(
                        f"request {member.request_id} failed in the engine: {type(error).__name__}: {error}"
                    )
                )

    def _deliver_pictures(
        self, finished: list[ActiveRequest], pixels: torch.Tensor, copied: torch.cuda.Event | None, timer: UNetTimer
    ) -> None:
        if copied is not None:
            copied.synchronize()
        decode_s = timer.seconds()
        worker_metrics.observe_vae_decode(self.model.name, decode_s)
        finite = torch.isfinite(pixels).flatten(1).all(1).tolist()
        row = 0
        for member in finished:
            member_pixels = pixels[row : row + member.num_images]
            ok = all(finite[row : row + member.num_images])
            row += member.num_images
            if not ok:
                member.handle._finish(
                    error=NonFiniteOutputError(f"request {member.request_id}: the decoded image is non-finite")
                )
                continue
            result = GenerationResult(
                request_id=member.request_id,
                images=to_pil(member_pixels),
                frames=member.frames,
                seed=member.request.seed,
                timings={
                    "queue_s": member.admitted_at - member.submitted_at,
                    "run_s": member.elapsed(),
                    "unet_s": member.unet_s,
                    "decode_s": decode_s,
                    "steps": float(member.total_steps),
                },
            )
            worker_metrics.record_images(self.model.name, len(result.images))
            member.handle._finish(result)

    def _retire(
        self, active: ActiveRequest, result: GenerationResult | None = None, error: BaseException | None = None
    ) -> None:
        """Out of the batch now; the caller hears after every event queued before (the output queue's order)."""
        if active in self._active:
            self._active.remove(active)
        self._output.submit(active.handle._finish, result, error)

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            pending = list(self._waiting) + list(self._active)
            self._waiting.clear()
            calls = list(self._calls)
            self._calls.clear()
        self._active = []
        for active in pending:
            active.handle._finish(error=error)
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)


def _size(image: Image.Image | None, field: str) -> tuple[int, int] | None:
    """A picture's (width, height), or None; InvalidRequestError naming the field for what is not a picture."""
    if image is None:
        return None
    if not isinstance(image, Image.Image):
        raise InvalidRequestError(f"{field} must be a picture (PIL.Image), got {type(image).__name__}", field)
    return image.size


def rows_of(conditioning: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """One prompt's (or request's) conditioning, each tensor without a batch dimension -> n rows (n, ...)."""
    return {key: value.unsqueeze(0).expand(n, *value.shape) for key, value in conditioning.items()}


def events_by_member(members: list[ActiveRequest], events: list[StepEvent]):
    by_id = {m.request_id: m for m in members}
    return [(by_id[e.request_id], e) for e in events]


@torch.no_grad()
def fit_latent_rgb(model: LoadedModel, num_images: int = 8, seed: int = 0) -> torch.Tensor:
    """Least-squares linear map [latent, 1] -> RGB (C + 1, 3) for this model's VAE, from blocky random
    pictures encoded once: previews then cost one small matmul instead of a VAE decode."""
    generator = torch.Generator("cpu").manual_seed(seed)
    H, W, f = model.native_height, model.native_width, model.vae_scale_factor
    blocks = torch.rand((num_images, 3, 4, 4), generator=generator) * 2 - 1
    pixels = F.interpolate(blocks, size=(H, W), mode="nearest")  # (B, 3, H, W) in [-1, 1]
    latents = model.encode_images(pixels).float().cpu()  # (B, C, h, w)
    target = F.avg_pool2d(pixels, f)  # (B, 3, h, w)
    C = latents.shape[1]
    design = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, C), torch.ones(latents.numel() // C, 1)], 1)
    return torch.linalg.lstsq(design.double(), target.permute(0, 2, 3, 1).reshape(-1, 3).double()).solution.float()
