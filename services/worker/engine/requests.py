"""What the engine takes and gives back: the narrow interface between the engine thread and its callers.

The Celery tasks, the benchmarks and the tests talk to the engine only through these types
and `Engine.submit(request) -> RequestHandle`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class GenerationRequest:
    """One text-to-image request. The engine turns it into 1 or 2 UNet rows per image."""

    request_id: str
    prompt: str
    seed: int
    negative_prompt: str = ""
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0  # DDIM's η; > 0 with another sampler is refused
    sampler: str | None = None  # a name of rules.SAMPLERS the model supports; None: the model's default
    guidance_rescale: float | None = None  # φ in [0, 1], applied where guidance_scale > 1; None: the model's default
    width: int | None = None  # None: the model's native size
    height: int | None = None
    num_images: int = 1
    preview_every: int = 0  # 0: no previews; k: a small decoded x0_pred every k steps
    trajectory_every: int = 0  # 0: none; k: keep every k-th step's x_t and x0_pred, decoded


@dataclass
class StepEvent:
    """Emitted once per request per denoising step (one batch of these per engine iteration)."""

    request_id: str
    step: int  # 1-based: the number of sampler updates done so far
    total: int
    timestep: int  # the t that this step denoised from (rounded: Euler on linspace spacing has fractional ones)
    preview: Image.Image | None = None
    frame: TrajectoryFrame | None = None  # the trajectory frame kept at this step, if any


@dataclass
class TrajectoryFrame:
    step: int
    timestep: int
    alpha_bar: float
    x_t: list[Image.Image]  # one per image of the request
    x0_pred: list[Image.Image]
    index: int = 0  # 0, 1, 2, ...: the request's frames in the order they were kept


@dataclass
class GenerationResult:
    request_id: str
    images: list[Image.Image]
    frames: list[TrajectoryFrame] = field(default_factory=list)
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # queue_s, run_s, ...
