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
    num_inference_steps: int | None = None  # None: the model's default (50 for SD and SDXL, 28 for SD3 and Flux)
    guidance_scale: float | None = None  # None: the model's default (7.5 SD, 5 SDXL, 7 SD3, 3.5 Flux)
    eta: float = 0.0  # DDIM's η; > 0 with another sampler is refused
    sampler: str | None = None  # a name of rules.SAMPLERS the model supports; None: the model's default
    guidance_rescale: float | None = None  # φ in [0, 1], applied where guidance_scale > 1; None: the model's default
    # the guidance interval: fractions of the steps the request runs where the mix applies (rules.py); None: the
    # model's default (0 and 1 where it names none: every step)
    guidance_start: float | None = None
    guidance_stop: float | None = None
    width: int | None = None  # None: the model's native size
    height: int | None = None
    num_images: int = 1
    preview_every: int = 0  # 0: no previews; k: a small decoded x0_pred every k steps
    trajectory_every: int = 0  # 0: none; k: keep every k-th step's x_t and x0_pred, decoded
    # the fields of some families only (None elsewhere; a value where the model's family does not read it is refused)
    true_cfg_scale: float | None = None  # Flux: true classifier-free guidance with the negative prompt where > 1
    original_width: int | None = None  # SDXL's size conditioning, in pixels; None: the generated size
    original_height: int | None = None
    crop_top: int | None = None  # SDXL's crop conditioning; None: 0
    crop_left: int | None = None
    target_width: int | None = None  # None: the generated size
    target_height: int | None = None
    # image to image and inpainting (families that read them: rules.IMAGE_PARAMS)
    image: Image.Image | None = None  # the starting picture; width and height default to its size
    strength: float | None = None  # None: 0.8, or 1 with a mask; the last int(steps·strength) steps run
    mask: Image.Image | None = None  # white = repaint; the image's size
    # who asked: the job's owner (its API key's hash; "" without keys). When several owners have requests in
    # the engine, each UNet call takes a bounded share of each one's rows (Engine's rows_per_owner)
    owner: str = ""


@dataclass
class StepEvent:
    """Emitted once per request per denoising step (one batch of these per engine iteration)."""

    request_id: str
    step: int  # 1-based: the number of sampler updates done so far
    total: int  # the updates the request makes (fewer than its steps for image to image)
    timestep: int  # the t that this step denoised from (rounded: Euler on linspace spacing has fractional ones)
    preview: Image.Image | None = None
    frame: TrajectoryFrame | None = None  # the trajectory frame kept at this step, if any


@dataclass
class TrajectoryFrame:
    step: int
    timestep: int
    x_t: list[Image.Image]  # one per image of the request
    x0_pred: list[Image.Image]
    alpha_bar: float | None = None  # x_t's ᾱ (DDPM-family models)
    sigma: float | None = None  # x_t's σ (flow-matching models: x_σ = (1 − σ)·x0 + σ·ε)
    index: int = 0  # 0, 1, 2, ...: the request's frames in the order they were kept

    @property
    def noise_level(self) -> dict[str, float]:
        """{"alpha_bar": ᾱ} or {"sigma": σ}, as frame metadata carries it."""
        return {"sigma": self.sigma} if self.sigma is not None else {"alpha_bar": self.alpha_bar}


@dataclass
class GenerationResult:
    request_id: str
    images: list[Image.Image]
    frames: list[TrajectoryFrame] = field(default_factory=list)
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # queue_s, run_s, ...
