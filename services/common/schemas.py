"""The REST contract as pydantic models: limits, defaults and descriptions live on the fields,
so /docs documents them and validation errors name the field and its range."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_SIDE = 2048
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
OutputFormat = Literal["png", "jpeg", "webp"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationCreate(_Strict):
    model: str | None = Field(None, description="Model name from GET /v1/models; default: the service's default model.")
    prompt: str = Field(
        ..., description="Text to draw; at most the model's max_prompt_tokens tokens (start/end included)."
    )
    negative_prompt: str = Field("", description="Text to steer away from (the unconditional row of CFG).")
    num_inference_steps: int = Field(50, ge=1, le=MAX_STEPS, description="DDIM steps.")
    guidance_scale: float = Field(
        7.5,
        ge=0.0,
        le=MAX_GUIDANCE,
        description="Classifier-free guidance: 0 ignores the prompt, 1 is plain conditional.",
    )
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta: 0 deterministic, 1 DDPM-like.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; null draws one and reports it.")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="Pixels; default the model's native width.")
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="Pixels; default the model's native height.")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="Pictures from this prompt and seed.")
    output_format: OutputFormat = Field("png", description="Encoding of the stored images.")
    preview_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Send a small decoded x0 prediction in every k-th step event; 0 = none."
    )


class TrajectoryCreate(_Strict):
    kind: Literal["forward", "reverse", "guidance_sweep"] = Field(..., description="Which trajectory.")
    model: str | None = Field(None, description="Model name; default the service's default model.")
    prompt: str | None = Field(None, description="Prompt (reverse, guidance_sweep; forward without an image).")
    negative_prompt: str = Field("", description="Negative prompt.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed; null draws one.")
    num_inference_steps: int = Field(
        50, ge=1, le=MAX_STEPS, description="DDIM steps (reverse, guidance_sweep, and a forward job's generated image)."
    )
    guidance_scale: float = Field(
        7.5, ge=0.0, le=MAX_GUIDANCE, description="Guidance scale (reverse, forward's generated image)."
    )
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta.")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="Pixels; default native.")
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="Pixels; default native.")
    image: str | None = Field(
        None, description="forward: the picture to noise, base64 PNG or JPEG (a data: URL is accepted)."
    )
    timesteps: list[int] | None = Field(
        None, max_length=1001, description="forward: paper timesteps t in [0, T]; default 0..1000 by 50 (clipped to T)."
    )
    noise_seed: int = Field(0, ge=0, le=MAX_SEED, description="forward: the one noise sample ε shared by every frame.")
    space: Literal["pixel", "latent"] = Field(
        "latent", description="forward: noise the pixels or the VAE latents (decoded)."
    )
    trajectory_every: int = Field(
        1, ge=1, le=MAX_STEPS, description="reverse: keep every k-th step's x_t and x0 prediction."
    )
    guidance_scales: list[float] = Field(
        default_factory=lambda: [0.0, 1.0, 3.0, 7.5, 15.0],
        min_length=1,
        max_length=16,
        description="guidance_sweep: scales, each in [0, 100].",
    )
    output_format: OutputFormat = Field("png", description="Encoding of the stored images.")


class OpenAIImageRequest(_Strict):
    prompt: str = Field(..., description="Text to draw.")
    model: str | None = Field(None, description="Model name; default the service's default model.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of images.")
    size: str | None = Field(None, pattern=r"^\d{1,5}x\d{1,5}$", description='"WIDTHxHEIGHT", e.g. "64x64".')
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="Inline base64 or a URL to the image.")
    quality: str | None = Field(None, description="Accepted for compatibility; ignored.")
    style: str | None = Field(None, description="Accepted for compatibility; ignored.")
    user: str | None = Field(None, description="Accepted for compatibility; ignored.")
    negative_prompt: str = ""
    num_inference_steps: int = Field(50, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    output_format: OutputFormat = "png"


class Job(BaseModel):
    id: str
    kind: str
    model: str
    status: JobStatus
    params: dict[str, Any]
    progress: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, Any] = Field(default_factory=dict)
    images: list[str] = Field(default_factory=list, description="URLs of the output images.")
    frames: list[dict[str, Any]] = Field(default_factory=list, description="Trajectory frames: url and metadata.")
    error: dict[str, Any] | None = None
    attempt: int = 0
    created_at: float


class ModelInfo(BaseModel):
    name: str
    native_width: int
    native_height: int
    scheduler: str
    max_prompt_tokens: int
    num_train_timesteps: int
    size_multiple: int
    max_inference_steps: int = 1000
    workers: int = 0
