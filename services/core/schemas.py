"""The request contract as pydantic models: limits, defaults and descriptions live on the fields (from
services/common/rules.py), so /docs documents them and both doors refuse a bad field with the same message.
FastAPI validates REST bodies with these; the gRPC door hands its converted request to `Core.parse`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from services.common.rules import (
    DEFAULT_GUIDANCE_SCALES,
    MAX_CONDITIONING_SIDE,
    MAX_ETA,
    MAX_GUIDANCE,
    MAX_GUIDANCE_FRACTION,
    MAX_GUIDANCE_RESCALE,
    MAX_GUIDANCE_SCALES,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MAX_STRENGTH,
    MAX_TIMESTEPS,
    MAX_WEBHOOK_URL_CHARS,
    MIN_GUIDANCE_FRACTION,
    MIN_GUIDANCE_RESCALE,
    MIN_STRENGTH,
    MIN_TRUE_CFG_SCALE,
    SAMPLERS,
)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["generation", "forward", "reverse", "guidance_sweep"]
OutputFormat = Literal["png", "jpeg", "webp"]


SIZE_DESCRIPTION = (
    "Pixels; null: the model's native {side}. A multiple of the model's size_multiple, at most twice native "
    "(GET /v1/models: native_width, native_height, size_multiple)."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_or_false(cls, value: Any) -> Any:
        """No request field is a boolean, and pydantic's lax mode would read true as 1 (a step count of 1): JSON's
        true and false are refused, alone or in a list (validation.message names what the field takes)."""
        if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
            raise PydanticCustomError("boolean_refused", "true and false are not accepted here")
        return value


class _Sampling(_Strict):
    """How the denoising runs, for every kind of request that denoises."""

    sampler: str | None = Field(
        None,
        description=f"Sampler: one of {', '.join(SAMPLERS)} that the model supports (GET /v1/models lists them); "
        "null: the model's default_sampler.",
    )
    guidance_rescale: float | None = Field(
        None,
        ge=MIN_GUIDANCE_RESCALE,
        le=MAX_GUIDANCE_RESCALE,
        description="Guidance rescale φ (Lin et al. 2024), applied after CFG where guidance_scale > 1; tames the "
        "over-saturation of high scales. null: the model's default_guidance_rescale.",
    )
    guidance_start: float | None = Field(
        None,
        ge=MIN_GUIDANCE_FRACTION,
        le=MAX_GUIDANCE_FRACTION,
        description="Guidance interval (Kynkäänniemi et al. 2024; diffusers' guiders' start and stop): guidance "
        "applies at the steps i of the n the job runs with int(guidance_start·n) <= i < int(guidance_stop·n); at the "
        "others the conditional prediction alone is used (one row per image, not two). 0..1, at most guidance_stop. "
        "null: the model's default_guidance_start (0 where it names none).",
    )
    guidance_stop: float | None = Field(
        None,
        ge=MIN_GUIDANCE_FRACTION,
        le=MAX_GUIDANCE_FRACTION,
        description="End of the guidance interval (see guidance_start), 0..1. null: the model's default_guidance_stop "
        "(1 where it names none: guidance to the last step).",
    )


STEPS_DESCRIPTION = (
    "Denoising steps; null: the model's default_num_inference_steps (GET /v1/models: 50 for SD and SDXL, 28 for SD3 "
    "and Flux). The model's scheduler may allow fewer."
)
GUIDANCE_DESCRIPTION = (
    "Guidance scale: classifier-free guidance for SD, SDXL and SD3 (0 ignores the prompt, 1 is plain conditional; "
    "SDXL and SD3 guide only above 1), the value Flux-dev's transformer embeds, ignored by Flux-schnell "
    "(GET /v1/models guidance_form). null: the model's default_guidance_scale."
)


def _conditioning_side(description: str, low: int = 1):
    return Field(None, ge=low, le=MAX_CONDITIONING_SIDE, description=f"SDXL only: {description}")


class _FamilyFields(_Sampling):
    """Fields of some model families only (GET /v1/models `params`); a model that does not read one refuses it."""

    true_cfg_scale: float | None = Field(
        None,
        ge=MIN_TRUE_CFG_SCALE,
        le=MAX_GUIDANCE,
        description="Flux only: true classifier-free guidance with negative_prompt where > 1 (a second row per image).",
    )
    original_width: int | None = _conditioning_side("the original size conditioning, pixels; null: width.")
    original_height: int | None = _conditioning_side("the original size conditioning, pixels; null: height.")
    crop_top: int | None = _conditioning_side("the crop conditioning's top edge, pixels; null: 0.", low=0)
    crop_left: int | None = _conditioning_side("the crop conditioning's left edge, pixels; null: 0.", low=0)
    target_width: int | None = _conditioning_side("the target size conditioning, pixels; null: width.")
    target_height: int | None = _conditioning_side("the target size conditioning, pixels; null: height.")


class JobImage(_Strict):
    """An earlier job's output image, of the same caller."""

    job_id: str = Field(..., min_length=1, max_length=64, description="The job's id.")
    index: int = Field(0, ge=0, le=MAX_IMAGES - 1, description="Which of its images, from 0.")


IMAGE_DESCRIPTION = (
    "Image to image (every family: GET /v1/models `params`): the starting picture, base64 PNG or JPEG (a data: "
    "URL is accepted), or {job_id, index} of an earlier job's image. Its size must be one the model allows; it is "
    "the generated size (width and height, if sent, must equal it)."
)


class _ImageFields(_FamilyFields):
    """Image to image and inpainting (the families that read them: GET /v1/models `params`)."""

    image: str | JobImage | None = Field(None, description=IMAGE_DESCRIPTION)
    strength: float | None = Field(
        None,
        ge=MIN_STRENGTH,
        le=MAX_STRENGTH,
        description="With an image: how far it is noised, as a share of the schedule; the last "
        "int(num_inference_steps × strength) steps run (SD3 and Flux, as their pipelines: "
        "n − int(n − n × strength) of n = num_inference_steps, one more where n × strength has a fraction); at "
        "least 1 must. null: the model's default_strength, or default_inpaint_strength with a mask (GET /v1/models: "
        "its family's image pipelines' defaults, SD 0.8 and 1.0, SDXL 0.3 and 0.9999, SD3 and Flux 0.6).",
    )
    mask: str | JobImage | None = Field(
        None,
        description="Inpainting, with an image: base64 PNG or JPEG of the image's size, white = repaint, black = keep "
        "(grey is cut at 50 %), or {job_id, index}.",
    )


WEBHOOK_DESCRIPTION = (
    f"An absolute http(s) URL (no user:password@, at most {MAX_WEBHOOK_URL_CHARS} characters) that is POSTed the job, "
    "as GET /v1/jobs/{id} shows it, once it succeeds, fails or is cancelled: signed as Standard Webhooks say "
    "(webhook-id, webhook-timestamp, webhook-signature) and retried with backoff until it answers 2xx, 410 Gone, "
    "or the deployment's last attempt (8 by default; docs/api.md, Webhooks). A loopback or private address is refused "
    "unless the deployment allows them. null: no call."
)


def webhook_field():
    return Field(None, max_length=MAX_WEBHOOK_URL_CHARS, description=WEBHOOK_DESCRIPTION)


class GenerationCreate(_ImageFields):
    model: str | None = Field(None, description="Model name from GET /v1/models; default: the service's default model.")
    prompt: str = Field(
        ...,
        max_length=MAX_PROMPT_CHARS,
        description=f"Text to draw; at most {MAX_PROMPT_CHARS} characters and the model's max_prompt_tokens tokens "
        "(start and end included).",
    )
    negative_prompt: str = Field(
        "", max_length=MAX_PROMPT_CHARS, description="Text to steer away from (the unconditional row of CFG)."
    )
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description=STEPS_DESCRIPTION)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, description=GUIDANCE_DESCRIPTION)
    eta: float = Field(
        0.0, ge=0.0, le=MAX_ETA, description="DDIM eta: 0 deterministic, 1 DDPM-like; the ddim sampler only."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; null draws one and reports it.")
    # no bounds here: the model's (rules.check_size) are the ones a refusal names, so it names a range that passes
    width: int | None = Field(None, description=SIZE_DESCRIPTION.format(side="width"))
    height: int | None = Field(None, description=SIZE_DESCRIPTION.format(side="height"))
    num_images: int = Field(
        1, ge=1, le=MAX_IMAGES, description="Pictures from this prompt and seed (the server may allow fewer)."
    )
    output_format: OutputFormat = Field("png", description="Encoding of the stored images.")
    preview_every: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description=(
            "Send a small x0 prediction in every k-th step event (0 = none; at most the steps the job runs: "
            "num_inference_steps, fewer with an image, more with plms and the heun, dpm2 and dpmpp_sde names, which "
            "count model calls)."
        ),
    )
    webhook_url: str | None = webhook_field()


class TrajectoryCreate(_FamilyFields):
    kind: Literal["forward", "reverse", "guidance_sweep"] = Field(..., description="Which trajectory.")
    model: str | None = Field(None, description="Model name; default the service's default model.")
    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="Prompt (reverse, guidance_sweep; forward without an image, which refuses it and the other "
        "generation fields).",
    )
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="Negative prompt.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed; null draws one.")
    num_inference_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Steps (reverse, guidance_sweep, and a forward job's generated image); null: the model's default.",
    )
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=MAX_GUIDANCE,
        description="Guidance scale (reverse, forward's generated image); null: the model's default.",
    )
    eta: float = Field(0.0, ge=0.0, le=MAX_ETA, description="DDIM eta.")
    width: int | None = Field(None, description=SIZE_DESCRIPTION.format(side="width"))
    height: int | None = Field(None, description=SIZE_DESCRIPTION.format(side="height"))
    image: str | JobImage | None = Field(
        None,
        description="forward: the picture to noise; reverse and guidance_sweep: the starting picture of image to "
        "image (with strength, and mask to inpaint). Base64 PNG or JPEG (a data: URL is accepted), or {job_id, "
        "index} of an earlier job's image.",
    )
    timesteps: list[int] | None = Field(
        None,
        max_length=MAX_TIMESTEPS,
        description="forward: paper timesteps t in [0, T]; default 0..1000 by 50 (clipped to T).",
    )
    strength: float | None = Field(
        None,
        ge=MIN_STRENGTH,
        le=MAX_STRENGTH,
        description="reverse and guidance_sweep with an image: start from it noised this far (as a generation's "
        "strength), so a reverse trajectory shows the picture re-imagined from its noised start.",
    )
    mask: str | JobImage | None = Field(
        None,
        description="reverse and guidance_sweep with an image: inpaint (base64 PNG or JPEG, or {job_id, index}; "
        "white = repaint).",
    )
    noise_seed: int = Field(0, ge=0, le=MAX_SEED, description="forward: the one noise sample ε shared by every frame.")
    space: Literal["pixel", "latent"] = Field(
        "latent", description="forward: noise the pixels or the VAE latents (decoded)."
    )
    trajectory_every: int = Field(
        1, ge=1, le=MAX_STEPS, description="reverse: keep every k-th step's x_t and x0 prediction."
    )
    guidance_scales: list[float] = Field(
        default_factory=lambda: list(DEFAULT_GUIDANCE_SCALES),
        min_length=1,
        max_length=MAX_GUIDANCE_SCALES,
        description=f"guidance_sweep: scales, each in [0, {MAX_GUIDANCE:g}].",
    )
    output_format: OutputFormat = Field("png", description="Encoding of the stored images.")
    webhook_url: str | None = webhook_field()


class OpenAIImageRequest(_Sampling):
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, description="Text to draw.")
    model: str | None = Field(None, description="Model name; default the service's default model.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of images.")
    size: str | None = Field(
        None,
        pattern=r"^([0-9]{1,5}x[0-9]{1,5}|auto)$",  # ASCII digits: \d would take other scripts' digits, which int() reads
        description='"WIDTHxHEIGHT", e.g. "64x64", or "auto" (as null: the model\'s native size).',
    )
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="Inline base64 or a URL to the image.")
    quality: str | None = Field(None, description="Accepted for compatibility; ignored.")
    style: str | None = Field(None, description="Accepted for compatibility; ignored.")
    user: str | None = Field(None, description="Accepted for compatibility; ignored.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description=STEPS_DESCRIPTION)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, description=GUIDANCE_DESCRIPTION)
    eta: float = Field(0.0, ge=0.0, le=MAX_ETA)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    output_format: OutputFormat = "png"

    @field_validator("n", "response_format", "output_format", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info) -> Any:
        """OpenAI's API takes null for these, as leaving them out (its SDK sends n=None when asked to)."""
        return cls.model_fields[info.field_name].default if value is None else value


class OpenAIImageEditRequest(OpenAIImageRequest):
    """The form fields of POST /v1/images/edits (the files `image` and `mask` come beside them)."""

    strength: float | None = Field(
        None,
        ge=MIN_STRENGTH,
        le=MAX_STRENGTH,
        description="How far the image is noised before it is redrawn (latentd's; null: the model's "
        "default_strength, or default_inpaint_strength with a mask).",
    )
    background: str | None = Field(None, description="Accepted for compatibility; ignored.")
    input_fidelity: str | None = Field(None, description="Accepted for compatibility; ignored.")


class Job(BaseModel):
    """A job as GET /v1/jobs/{id} shows it (services.common.jobs.JobRecord.view)."""

    id: str
    kind: JobKind
    model: str
    status: JobStatus
    params: dict[str, Any] = Field(description="The resolved parameters: seed, size and model filled in.")
    progress: dict[str, Any] = Field(default_factory=dict, description="step and total while it runs.")
    timings: dict[str, Any] = Field(
        default_factory=dict, description="queued_at, started_at, finished_at (unix s), queue_s, run_s."
    )
    images: list[str] = Field(default_factory=list, description="URLs of the output images.")
    frames: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Trajectory frames: url and metadata; a reverse trajectory's as each is stored (while it runs, and "
        "after a cancel or failure), the others once the job has succeeded.",
    )
    error: dict[str, Any] | None = Field(None, description="type, message and param when the job failed.")
    attempt: int = Field(0, description="The worker attempt that ran it: more than 1 after a failover.")
    created_at: float
    webhook_url: str | None = Field(None, description="The URL POSTed once the job ends; null when none.")


class JobList(BaseModel):
    """A page of the caller's jobs (GET /v1/jobs), newest first."""

    jobs: list[Job]
    has_more: bool = Field(description="Whether older jobs follow: ask again with starting_after.")
    next_starting_after: str | None = Field(
        description="The starting_after of the next page (null when has_more is false). With a status filter a "
        "page may hold fewer jobs than its limit and still have a next one."
    )


class ErrorDetail(BaseModel):
    type: str = Field(
        description="invalid_request_error (400, 422), authentication_error (401), not_found_error (404), "
        "conflict_error (409), payload_too_large (413), rate_limit_error (429), service_unavailable (503), "
        "server_error (500: a synchronous OpenAI call whose job failed), internal_error (500: a bug)."
    )
    message: str = Field(description="What is wrong; for a bad field, its name and the allowed range.")
    param: str | None = Field(
        description="The field at fault as a path (num_inference_steps, image.index, Idempotency-Key), or null."
    )


class ErrorResponse(BaseModel):
    """Every error of the API, whatever its status (services.common.errors)."""

    error: ErrorDetail
