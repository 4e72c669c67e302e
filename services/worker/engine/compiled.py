"""The backbone and the VAE decoder as a GPU wants them: a few batch shapes, compiled once, warm before serving.

Row-count buckets: a backbone call of n rows is padded up to the next bucket (by default 2, 4, 8, 16, 32, 48, 64)
with copies of its last row, and the padding is dropped from the output. The backbone treats rows independently
(convolutions, group norm and attention per sample), so a request's rows give what they give unpadded: the
padding cannot change a picture (tests/worker/test_compiled.py: padded against unpadded within the batch
invariance bound). A compiled backbone then sees len(buckets) batch shapes and no other, so no request mix makes
it compile while serving.

torch.compile (`compile_mode`): the backbone module and the VAE's decode are compiled, either as one graph with a
dynamic batch dimension (`compile_dynamic`: a bucket then costs no new graph, only its CUDA graph capture under
"reduce-overhead") or one graph per bucket. `warm_up` runs every bucket once at load, before the worker publishes
the model (so before it takes jobs), and reports how long that took (log and `latentd_warmup_seconds`).
`compile_cache_dir` keeps Inductor's and Triton's caches on disk so a restarted worker reuses them.

Everything here runs on the CPU too (padding with compile off; compile with Inductor's C++ backend where a C
compiler exists), so the logic is tested without a GPU.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from services.worker.engine.requests import GenerationRequest

if TYPE_CHECKING:
    from services.common.settings import Settings
    from services.worker.engine.engine import Engine
    from services.worker.loading import LoadedModel

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # Inductor replays CUDA graphs under these
DECODE_BUCKETS = (1, 2, 4, 8, 16)  # images per VAE decode call (the engine decodes in chunks of 16)


def parse_buckets(text: str | Iterable[int] | None) -> tuple[int, ...]:
    """ "1,2,4" -> (1, 2, 4); "", "off" or None -> () (no padding)."""
    if text is None:
        return ()
    if isinstance(text, str):
        if text.strip().lower() in ("", "off", "none"):
            return ()
        values = [int(part) for part in text.split(",") if part.strip()]
    else:
        values = [int(v) for v in text]
    if any(v < 1 for v in values):
        raise ValueError(f"batch buckets must be positive row counts, got {values}")
    return tuple(sorted(set(values)))


def bucket_sizes(buckets: Iterable[int], max_rows: int) -> tuple[int, ...]:
    """The buckets a backbone call can take under max_rows: those below it, and max_rows itself (a call never
    has more rows: the engine chunks at max_rows). () stays () (no padding)."""
    buckets = tuple(buckets)
    if not buckets:
        return ()
    return tuple(sorted({b for b in buckets if b < max_rows} | {max_rows}))


def decode_sizes(buckets: Iterable[int], chunk: int) -> tuple[int, ...]:
    """The VAE decode's image buckets under `chunk` images per call: 1, 2, 4, 8, 16 from the row buckets' smallest
    on (no 1 where the rows have none: one graph, not a specialised 1-image one besides); () without buckets."""
    buckets = tuple(buckets)
    if not buckets:
        return ()
    return bucket_sizes([b for b in DECODE_BUCKETS if b >= min(buckets)], chunk)


def bucket_for(rows: int, sizes: Sequence[int]) -> int:
    """The smallest bucket holding `rows` (rows itself without buckets, or past the largest)."""
    if not sizes:
        return rows
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else rows


def pad_rows(values: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, ...) -> (rows, ...): copies of the last row appended (a real row: finite where the batch is)."""
    n = values.shape[0]
    if n == rows:
        return values
    return torch.cat([values, values[-1:].expand(rows - n, *values.shape[1:])])


def resolve_compile_mode(mode: str | None, device: torch.device | str) -> str | None:
    """The setting -> a torch.compile mode, or None for eager. "auto": "default" on CUDA, eager elsewhere."""
    mode = (mode or "off").strip().lower()
    if mode == "auto":
        return "default" if torch.device(device).type == "cuda" else None
    if mode in ("off", "none", "eager", ""):
        return None
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be auto, off or one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def configure_compile_cache(folder: str) -> None:
    """Inductor's FX graph and kernel caches and Triton's under `folder`, kept between worker starts."""
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")


def _mark_batch_dynamic(values: Iterable[Any]) -> None:
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim:
            torch._dynamo.maybe_mark_dynamic(value, 0)


def _step_begin(compile_mode: str | None) -> None:
    """Under CUDA graphs a replay reuses its output buffers: say a new step begins (every output of the last one
    has been copied out by then: Backbone clones its output, and the decoder's is rescaled into a new tensor)."""
    if compile_mode in CUDAGRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def _allow_graphs(count: int) -> None:
    """One compiled graph per bucket and latent size: raise dynamo's per-function recompile limit to fit."""
    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), count))


class Backbone:
    """The model's backbone call (its family's forward), padded to row buckets, compiled where asked."""

    def __init__(
        self,
        model: LoadedModel,
        sizes: Sequence[int] = (),
        compile_mode: str | None = None,
        dynamic: bool = True,
        backend: Any = "inductor",
    ):
        """backend: torch.compile's (tests count graphs with a backend of their own)."""
        self.model = model
        self.sizes = tuple(sizes)
        self.compile_mode = compile_mode
        self.dynamic = dynamic
        self._model = model  # the LoadedModel whose backbone is called: a copy holding the compiled module
        if compile_mode is not None:
            _allow_graphs(4 * max(1, len(self.sizes)))
            options = {"mode": compile_mode} if backend == "inductor" else {}
            module = torch.compile(model.backbone, backend=backend, dynamic=None if dynamic else False, **options)
            self._model = dataclasses.replace(model, components={**model.components, model.family.backbone: module})

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        n = latents.shape[0]
        rows = bucket_for(n, self.sizes)
        if rows != n:
            latents, timesteps = pad_rows(latents, rows), pad_rows(timesteps, rows)
            cond = {key: pad_rows(value, rows) for key, value in cond.items()}
        if self.compile_mode is not None and self.dynamic:
            _mark_batch_dynamic((latents, timesteps, *cond.values()))
        _step_begin(self.compile_mode)
        output = self._model.forward(latents, timesteps, cond)  # the family's forward on (a copy of) the model
        output = output[:n] if rows != n else output
        # a CUDA graph's output buffer is overwritten by its next replay (the next chunk of a call over
        # max_batch_rows): copy it out (latents-sized, small next to the call)
        return output.clone() if self.compile_mode in CUDAGRAPH_MODES else output


class _CompiledVAE:
    """What LoadedModel.decode_latents reads of the VAE (`decode(z).sample`), with decode compiled."""

    def __init__(self, vae, compile_mode: str, dynamic: bool):
        self._vae = vae
        self._decode = torch.compile(
            lambda z: vae.decode(z, return_dict=False)[0], mode=compile_mode, dynamic=None if dynamic else False
        )
        self.dynamic = dynamic
        self.compile_mode = compile_mode

    def decode(self, z: torch.Tensor):
        if self.dynamic:
            _mark_batch_dynamic((z,))
        _step_begin(self.compile_mode)
        return SimpleNamespace(sample=self._decode(z))

    def __getattr__(self, name):
        return getattr(self._vae, name)


class Decoder:
    """LoadedModel.decode_latents padded to image buckets (1, 2, 4, 8, 16) and compiled where asked."""

    def __init__(
        self, model: LoadedModel, sizes: Sequence[int] = (), compile_mode: str | None = None, dynamic: bool = True
    ):
        self.model = model
        self.sizes = tuple(sizes)
        self.compile_mode = compile_mode
        self._model = model
        if compile_mode is not None:
            vae = _CompiledVAE(model.vae, compile_mode, dynamic)
            self._model = dataclasses.replace(model, components={**model.components, "vae": vae})

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        rows = bucket_for(n, self.sizes)
        pixels = self._model.decode_latents(pad_rows(latents, rows))
        return pixels[:n] if rows != n else pixels


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
    """The engine's GPU-path options, resolved for one device (Engine(**options.engine_kwargs()))."""

    buckets: tuple[int, ...] = ()  # row buckets (padding); () = none
    compile_mode: str | None = None  # torch.compile mode; None = eager
    compile_dynamic: bool = True
    channels_last: bool = False
    finite_check_every: int = 1
    output_thread: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device | str) -> SpeedOptions:
        """Buckets pad, and channels_last applies, only where the backbone is compiled (eager, padding is wasted
        work); the finiteness check waits for the device, so it is deferred on CUDA only."""
        device = torch.device(device)
        compile_mode = resolve_compile_mode(settings.compile_mode, device)
        configure_compile_cache(settings.compile_cache_dir)
        cuda = device.type == "cuda"
        return cls(
            buckets=parse_buckets(settings.batch_buckets) if compile_mode is not None else (),
            compile_mode=compile_mode,
            compile_dynamic=settings.compile_dynamic,
            # eager, channels_last made the SD UNet slower on an H200 (104 vs 95 ms per call, issue 16)
            channels_last=cuda and settings.channels_last and compile_mode is not None,
            finite_check_every=max(1, settings.finite_check_every) if cuda else 1,
            output_thread=settings.output_thread,
        )

    def engine_kwargs(self) -> dict[str, Any]:
        return {
            "buckets": self.buckets,
            "compile_mode": self.compile_mode,
            "compile_dynamic": self.compile_dynamic,
            "channels_last": self.channels_last,
            "finite_check_every": self.finite_check_every,
            "output_thread": self.output_thread,
        }


def to_channels_last(model: LoadedModel) -> None:
    """The backbone's and the VAE's weights in channels_last (NHWC), the layout cuDNN's and Inductor's
    convolutions run fastest in on tensor cores. Numerically the same model."""
    for module in (model.backbone, model.vae):
        module.to(memory_format=torch.channels_last)


def warmup_inputs(engine: Engine, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A backbone call's inputs of `rows` rows at the model's native size: the empty prompt's conditioning
    with the family's own per-row conditioning, zero latents at the first timestep of the default plan."""
    from services.worker.engine import sources
    from services.worker.engine.engine import rows_of

    model = engine.model
    request = GenerationRequest(request_id="warm-up", prompt="", seed=0, num_inference_steps=1, guidance_scale=1.0)
    sampler, state, resolved, shape = engine._validate(request)
    encoded = model.encode_prompts([""])[0]
    start = sources.start(model, state, torch.Generator("cpu").manual_seed(0), 1, shape)  # a 9-channel UNet's extra
    cond = rows_of(encoded | model.family.row_conditioning(model, request, resolved) | start.conditioning, rows)
    cond = {key: value.contiguous() for key, value in cond.items()}
    latents = torch.zeros((rows, *shape), dtype=model.dtype, device=model.device)
    timesteps = torch.full((rows,), state.plan.timesteps[0], dtype=torch.float32, device=model.device)
    return latents, timesteps, cond


def _warm_buckets(engine: Engine, sizes: Sequence[int], run: Callable[[int], Any], part: str) -> None:
    """`run` each bucket, smallest first; one that runs out of memory lowers the part's cap below it, and the
    buckets above stay cold. Under CUDA graphs each bucket runs twice: Inductor's graph trees run a new shape eagerly
    once and record its graph (and its memory pool) at the second call, which would otherwise be a live one."""
    cap = engine.row_cap if part == "backbone" else engine.decode_cap
    runs = 2 if engine.backbone.compile_mode in CUDAGRAPH_MODES else 1
    for rows in sizes or (1,):
        try:
            for _ in range(runs):
                run(rows)
        except Exception as error:
            if not engine.lowered_after(error, cap, part, rows):
                raise
            return


@torch.inference_mode()
def warm_up(engine: Engine) -> dict[str, float]:
    """Run every row bucket through the backbone and every image bucket through the decoder once at the native
    size (compiling them where compile is on), before the engine serves. A bucket that runs out of memory lowers
    the engine's cap below it (the buckets above are left cold): the worker serves with fewer rows per call rather
    than fail to start. Returns seconds per part."""
    model = engine.model
    started = time.monotonic()
    _warm_buckets(engine, engine.backbone.sizes, lambda rows: engine.backbone(*warmup_inputs(engine, rows)), "backbone")
    backbone_s = time.monotonic() - started
    decode_started = time.monotonic()
    shape = model.latent_shape(model.native_width, model.native_height)
    _warm_buckets(
        engine,
        engine.decoder.sizes,
        lambda rows: engine.decoder(torch.zeros((rows, *shape), device=model.device)),
        "vae",
    )
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = {
        "backbone_s": backbone_s,
        "decode_s": time.monotonic() - decode_started,
        "total_s": time.monotonic() - started,
    }
    log.info(
        "model %s warm in %.1f s (backbone %.1f s over row buckets %s, VAE decode %.1f s over %s; compile %s)",
        model.name,
        seconds["total_s"],
        backbone_s,
        list(engine.backbone.sizes) or [1],
        seconds["decode_s"],
        list(engine.decoder.sizes) or [1],
        engine.backbone.compile_mode or "off",
    )
    return seconds
