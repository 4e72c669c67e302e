"""The one set of limits and validation rules: every door (REST, the OpenAI route, gRPC) and the engine's own
guard call these, so a request is refused the same way, with the same message, wherever it comes in.

Rules raise `InvalidInput(message, param)`; the message names the field and the allowed range
("num_inference_steps must be between 1 and 1000, got 0"). Limits that depend on the model (sizes, steps,
prompt tokens) take a `ModelLimits`: the gateway builds one from the model info a worker published, the
engine from the model it loaded.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from services.common.errors import InvalidInput, shown

MAX_STEPS = 1000
MAX_IMAGES = 16  # per job; a deployment may allow fewer (Settings.max_num_images)
MIN_SIDE = 8
MAX_SIDE = 2048
MAX_GUIDANCE = 100.0
MAX_ETA = 1.0
MAX_SEED = 2**63 - 1  # the proto's int64; torch.Generator takes any of these
MAX_PROMPT_CHARS = 4000  # checked before any tokenizing
MAX_TIMESTEPS = 1001
MAX_GUIDANCE_SCALES = 16
DEFAULT_GUIDANCE_SCALES = (0.0, 1.0, 3.0, 7.5, 15.0)
DEFAULT_FORWARD_TIMESTEPS = tuple(range(0, 1001, 50))
OUTPUT_FORMATS = ("png", "jpeg", "webp")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = JOB_STATUSES[2:]  # nothing changes a job after one of these
# A job's webhook (webhook_url): an absolute http(s) URL without credentials, POSTed once the job ends
# (services/core/webhooks.py); tried WEBHOOK_ATTEMPTS times at most, the n-th retry WEBHOOK_RETRY_S · 4^(n-1)
# seconds after the one before (capped at WEBHOOK_MAX_RETRY_S), each call given WEBHOOK_TIMEOUT_S.
MAX_WEBHOOK_URL_CHARS = 2048
# Fields of a submit that belong to the job, not to what it makes: never in its params (REST: in the body; gRPC:
# beside the params in the submit request).
JOB_FIELDS = ("webhook_url",)
WEBHOOK_SCHEMES = ("http", "https")
WEBHOOK_ATTEMPTS, WEBHOOK_RETRY_S, WEBHOOK_MAX_RETRY_S, WEBHOOK_TIMEOUT_S = 8, 5.0, 900.0, 10.0


def webhook_retry_delay_s(attempt: int, base_s: float) -> float:
    """After the `attempt`-th call failed: base · 4^(attempt−1), at most WEBHOOK_MAX_RETRY_S."""
    return min(base_s * 4 ** (attempt - 1), WEBHOOK_MAX_RETRY_S)


def webhook_span_s(attempts: int, base_s: float, timeout_s: float) -> float:
    """How long after its job ends a webhook's calls and backoffs can last, each call at its timeout (the last one
    counted whole, to be safe); a lapsed claim's lease and the sender's polling and backlog come on top. At the
    defaults 3205 s, inside the hour a job's record is kept (RESULT_TTL_S)."""
    return attempts * timeout_s + sum(webhook_retry_delay_s(n, base_s) for n in range(1, attempts))


# A page of a key's jobs (GET /v1/jobs, ListJobs): newest first, at most MAX_LIST_LIMIT; a page reads at most
# LIST_SCAN entries of the key's history, so a status filter that matches little still costs a bounded read.
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, LIST_SCAN = 20, 100, 1000
# DDIM (Song et al. 2021); PLMS (Liu et al. 2022, SD 1.x's PNDM scheduler: n + 1 model calls for n steps);
# DPM-Solver++(2M) (Lu et al. 2022) on the scheduler's timesteps, and on Karras et al.'s σ spacing, each also as its
# SDE variant (one noise draw per step); UniPC (Zhao et al. 2023); Euler (Karras et al. 2022), linear multistep
# (LMS, k-diffusion's), Heun's method (Karras et al. 2022) and DPM-Solver-2 (Lu et al. 2022), the last two with two
# model calls per step, each also on Karras σ; Euler ancestral (k-diffusion); LCM's multistep consistency sampling
# (Luo et al. 2023) for latent consistency models; each as its diffusers scheduler configured from the model's
# scheduler config; and flow_euler, flow matching's Euler step on the shifted σ schedule of a flow model (SD3, Flux:
# FlowMatchEulerDiscreteScheduler), the only one those take.
# A model supports these less the ones its scheduler config rules out (GET /v1/models lists them).
DDPM_SAMPLERS: tuple[str, ...] = (
    "ddim",
    "plms",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "unipc",
    "euler",
    "euler_karras",
    "lms",
    "lms_karras",
    "heun",
    "heun_karras",
    "dpm2",
    "dpm2_karras",
    "dpm2_ancestral",
    "dpm2_ancestral_karras",
    "dpmpp_sde",
    "dpmpp_sde_karras",
    "euler_ancestral",
    "lcm",
)
FLOW_SAMPLERS: tuple[str, ...] = ("flow_euler",)
# samplers that make more than one model call per step (a job's progress counts the calls: steps_run)
DOUBLED_FIRST_STEP: tuple[str, ...] = ("plms",)  # its first step twice: n + 1 calls (1 for 1 step)
# every step but the last twice: 2n − 1 calls (Heun's method, DPM-Solver-2, DPM-Solver++ SDE, each variant)
TWO_CALLS_PER_STEP: tuple[str, ...] = tuple(
    name for name in DDPM_SAMPLERS if name.startswith(("heun", "dpm2", "dpmpp_sde"))
)
SAMPLERS: tuple[str, ...] = DDPM_SAMPLERS + FLOW_SAMPLERS
# a model's default sampler: latentd.json's, else the one its folder's scheduler is (loading.read_defaults), else this
DEFAULT_SAMPLER = "ddim"
ETA_SAMPLERS: tuple[str, ...] = ("ddim",)  # eta > 0 is refused with any other sampler (field `eta`)
MIN_GUIDANCE_RESCALE, MAX_GUIDANCE_RESCALE = 0.0, 1.0  # φ of Lin et al. 2024; applied where guidance_scale > 1
# The guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
# Distribution Quality in Diffusion Models"), as diffusers' guiders (`ClassifierFreeGuidance(start, stop)`) count
# it: guidance_start and guidance_stop are fractions of the steps a job runs; the mix is applied at the steps i
# with int(start·n) <= i < int(stop·n), and elsewhere a row that mixes is its conditional prediction alone (its
# unconditional row is not computed). 0 and 1 (the default where a model names none): every step.
MIN_GUIDANCE_FRACTION, MAX_GUIDANCE_FRACTION = 0.0, 1.0
EVERY_STEP = (MIN_GUIDANCE_FRACTION, MAX_GUIDANCE_FRACTION)  # guidance at every step, as diffusers' pipelines guide
GUIDED_AT_EVERY_STEP = {"guidance_start": EVERY_STEP[0], "guidance_stop": EVERY_STEP[1]}  # ... as request fields
DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_GUIDANCE_SCALE = 50, 7.5  # a model that names none (SD 1.x/2.x pipelines')
MIN_TRUE_CFG_SCALE = 1.0  # Flux's true CFG: 1 is off (its pipeline guides where true_cfg_scale > 1)
MAX_CONDITIONING_SIDE = 8192  # SDXL's size conditioning (original and target size, crop offsets), in pixels
# The model families (services/worker/families/): Stable Diffusion 1.x/2.x, SDXL, SD3, Flux.
FAMILIES: tuple[str, ...] = ("sd", "sdxl", "sd3", "flux")
# Request fields every family reads; the rest apply only where a model lists them (ModelLimits.params,
# GET /v1/models `params`) and are refused by name elsewhere.
COMMON_PARAMS: tuple[str, ...] = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "width",
    "height",
    "num_images",
    "preview_every",
    "sampler",
    "guidance_start",
    "guidance_stop",
)
SIZE_CONDITIONING_PARAMS: tuple[str, ...] = (  # SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2)
    "original_width",
    "original_height",
    "crop_top",
    "crop_left",
    "target_width",
    "target_height",
)
DEFAULT_PARAMS: tuple[str, ...] = (*COMMON_PARAMS, "eta", "guidance_rescale")  # a model that does not say (SD)
# Image to image (SDEdit, Meng et al. 2022) and inpainting: a starting picture noised to the timestep `strength`
# selects, and a mask (white = repaint). Read by every family (a 9-channel inpainting UNet: SD 1.x/2.x only).
IMAGE_PARAMS: tuple[str, ...] = ("image", "strength", "mask")
MIN_STRENGTH, MAX_STRENGTH = 0.0, 1.0
# a model that names none (SD): StableDiffusionImg2ImgPipeline's default, and StableDiffusionInpaintPipeline's with a
# mask (the masked part from pure noise); each family's image pipelines have their own (ModelLimits)
DEFAULT_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0
TRAJECTORY_KINDS = ("forward", "reverse", "guidance_sweep")
NOISE_SPACES = ("pixel", "latent")
# The trajectory fields only some kinds read: sent to another kind (other than at its default) they are refused by
# name, not ignored, as a generation's fields a model does not read are
TRAJECTORY_FIELD_KINDS: dict[str, tuple[str, ...]] = {
    "timesteps": ("forward",),
    "noise_seed": ("forward",),
    "space": ("forward",),
    "trajectory_every": ("reverse",),
    "guidance_scales": ("guidance_sweep",),
    "guidance_scale": ("forward", "reverse"),  # a sweep's scales are its guidance_scales
    "strength": ("reverse", "guidance_sweep"),
    "mask": ("reverse", "guidance_sweep"),
}
# What only a forward trajectory reads: how it noises its picture (the rest describe a picture to generate).
FORWARD_ONLY_FIELDS = tuple(name for name, kinds in TRAJECTORY_FIELD_KINDS.items() if kinds == ("forward",))
# Every trajectory reads these; its other fields describe a generation (reverse, guidance_sweep, forward from a prompt).
TRAJECTORY_OWN_FIELDS = ("kind", "model", "image", *JOB_FIELDS)
# A forward trajectory of a given picture generates nothing: its params say what is noised (the picture, resized to
# width × height) and how, no more.
FORWARD_OF_IMAGE_PARAMS = ("kind", "model", "width", "height", "timesteps", "noise_seed", "space", "has_image")


@dataclass(frozen=True)
class ModelLimits:
    """What a model allows. `count_tokens` is None where the tokenizer is not at hand (then the engine counts)."""

    name: str
    native_width: int
    native_height: int
    size_multiple: int
    max_inference_steps: int
    max_prompt_tokens: int
    count_tokens: Callable[[str], int] | None = None
    samplers: tuple[str, ...] = (DEFAULT_SAMPLER,)
    default_sampler: str = DEFAULT_SAMPLER
    sampler_max_steps: Mapping[str, int] = field(default_factory=dict)  # where a sampler allows fewer steps
    default_guidance_rescale: float = 0.0
    default_guidance_start: float = MIN_GUIDANCE_FRACTION
    default_guidance_stop: float = MAX_GUIDANCE_FRACTION
    unsupported_samplers: Mapping[str, str] = field(default_factory=dict)  # name -> why this model rules it out
    family: str = "sd"
    params: tuple[str, ...] = DEFAULT_PARAMS  # the request fields this model reads
    default_num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    default_strength: float = DEFAULT_STRENGTH  # a request with an image and no strength
    default_inpaint_strength: float = DEFAULT_INPAINT_STRENGTH  # ... with a mask too

    @property
    def max_width(self) -> int:
        return 2 * self.native_width

    @property
    def max_height(self) -> int:
        return 2 * self.native_height


def images_allowed(max_num_images: int) -> int:
    """Pictures per job a deployment allows: its setting, never past MAX_IMAGES."""
    return min(max_num_images, MAX_IMAGES)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def between(field: str, value: Any, low: float, high: float, *, integer: bool = False, param: str | None = None) -> Any:
    """`value` if it is a number (an int where `integer`) in [low, high]; else InvalidInput naming the field."""
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok:
        noun = "an integer" if integer else "a number"
        raise InvalidInput(
            f"{field} must be {noun} between {_fmt(low)} and {_fmt(high)}, got {shown(value)}", param or field
        )
    if not (isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
        raise InvalidInput(f"{field} must be between {_fmt(low)} and {_fmt(high)}, got {_fmt(value)}", param or field)
    return value


def check_size(
    limits: ModelLimits, width: int | None, height: int | None, *, param: str | None = None
) -> tuple[int, int]:
    """The pixel size, the model's native one where None: a multiple of size_multiple up to twice native."""
    sizes = []
    for name, value, native, high in (
        ("width", width, limits.native_width, limits.max_width),
        ("height", height, limits.native_height, limits.max_height),
    ):
        value = native if value is None else value
        multiple = limits.size_multiple
        if isinstance(value, bool) or not isinstance(value, int) or value % multiple or not multiple <= value <= high:
            raise InvalidInput(
                f"{name} must be a multiple of {multiple} between {multiple} and {high}, got {value}", param or name
            )
        sizes.append(value)
    return sizes[0], sizes[1]


def check_sampler(limits: ModelLimits, sampler: str | None) -> str:
    """The sampler's name, the model's default where None; one of those the model supports."""
    name = limits.default_sampler if sampler is None else sampler
    if name not in limits.samplers:
        why = f" ({limits.unsupported_samplers[name]})" if name in limits.unsupported_samplers else ""
        raise InvalidInput(
            f"sampler must be one of {', '.join(limits.samplers)} for model {limits.name!r}, got {shown(name)}{why}",
            "sampler",
        )
    return name


def check_steps(limits: ModelLimits, steps: int, sampler: str | None = None) -> int:
    """1..MAX_STEPS, and no more than the model's scheduler allows with this sampler (leading spacing with an
    offset allows fewer)."""
    between("num_inference_steps", steps, 1, MAX_STEPS, integer=True)
    limit = limits.sampler_max_steps.get(sampler, limits.max_inference_steps) if sampler else limits.max_inference_steps
    if steps > limit:
        with_sampler = f" with sampler {sampler!r}" if limit != limits.max_inference_steps else ""
        raise InvalidInput(
            f"num_inference_steps must be between 1 and {limit} for model {limits.name!r}{with_sampler}, got {steps}",
            "num_inference_steps",
        )
    return steps


def check_every(field: str, value: int, steps: int, low: int = 0, steps_are: str = "num_inference_steps") -> int:
    """preview_every, trajectory_every: 0 (or `low`) .. the job's step count (`steps_are` names it)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > steps and value <= MAX_STEPS:
        raise InvalidInput(f"{field} must be between {low} and {steps_are} ({steps}), got {value}", field)
    return between(field, value, low, steps, integer=True)


def check_prompt(limits: ModelLimits, field: str, text: Any) -> str:
    """A string of at most MAX_PROMPT_CHARS characters (checked first, cheaply) and the model's token limit."""
    if not isinstance(text, str):
        raise InvalidInput(f"{field} must be a string", field)
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"{field} must be at most {MAX_PROMPT_CHARS} characters, got {len(text)}", field)
    if text and limits.count_tokens is not None:
        tokens = limits.count_tokens(text)
        if tokens > limits.max_prompt_tokens:
            raise InvalidInput(
                f"{field} is {tokens} tokens long; model {limits.name!r} takes at most "
                f"{limits.max_prompt_tokens} (start and end tokens included)",
                field,
            )
    return text


def check_applies(limits: ModelLimits, field: str, value: Any) -> None:
    """A field this model does not read must be left out (None): refused by name, with the families it is for."""
    if value is not None and field not in limits.params:
        raise InvalidInput(
            f"{field} does not apply to model {limits.name!r} ({limits.family} family); leave it out",
            field,
        )


class Resolved(NamedTuple):
    """What a request leaves to the model's defaults, filled in."""

    width: int
    height: int
    sampler: str
    guidance_rescale: float
    num_inference_steps: int
    guidance_scale: float
    strength: float | None = None  # with an image only: the share of the schedule that runs
    guidance_start: float = MIN_GUIDANCE_FRACTION  # the guidance interval, fractions of the steps the job runs
    guidance_stop: float = MAX_GUIDANCE_FRACTION

    def guides_at(self, step: int, steps: int) -> bool:
        """Whether the guidance mix applies at the job's step `step` (0-based) of the `steps` it runs."""
        first, end = guidance_window(self.guidance_start, self.guidance_stop, steps)
        return first <= step < end


def guidance_window(start: float, stop: float, steps: int) -> tuple[int, int]:
    """The steps [first, end) of a job's `steps` where guidance applies: int(start·n), int(stop·n), as diffusers'
    guiders (`BaseGuidance._is_cfg_enabled`)."""
    return int(start * steps), int(stop * steps)


def check_guidance_interval(start: Any, stop: Any) -> tuple[float, float]:
    """guidance_start and guidance_stop: each in [0, 1], start <= stop."""
    between("guidance_start", start, MIN_GUIDANCE_FRACTION, MAX_GUIDANCE_FRACTION)
    between("guidance_stop", stop, MIN_GUIDANCE_FRACTION, MAX_GUIDANCE_FRACTION)
    if start > stop:
        raise InvalidInput(
            f"guidance_stop must be between guidance_start ({_fmt(float(start))}) and 1, got {_fmt(float(stop))}",
            "guidance_stop",
        )
    return float(start), float(stop)


def start_step(num_inference_steps: int, strength: float, sampler: str = DEFAULT_SAMPLER) -> int:
    """The step of the plan an image-to-image request starts at, as diffusers' pipelines' get_timesteps count it
    (all steps run at strength 1), from an image noised to that step's level. The DDPM-family pipelines (SD,
    SDXL) run the last int(steps·strength) steps; the flow-matching ones (SD3, Flux: the flow samplers) start at
    int(steps − steps·strength), so a fractional steps·strength runs one step more (20 at 0.63: 12 and 13)."""
    n = num_inference_steps
    if sampler in FLOW_SAMPLERS:
        return int(max(n - min(n * strength, n), 0))
    return n - min(int(n * strength), n)


def check_image_inputs(
    limits: ModelLimits,
    *,
    image_size: tuple[int, int] | None,
    mask_size: tuple[int, int] | None,
    strength: float | None,
    width: int | None,
    height: int | None,
    num_inference_steps: int,
    sampler: str = DEFAULT_SAMPLER,
) -> tuple[int | None, int | None, float | None]:
    """An image-to-image or inpainting request's picture, mask and strength: (width, height, strength) with the
    picture's size and the model's default strength filled in. The picture must be a size the model allows (and the
    width and height, where given, its size); the mask the picture's size; strength in [0, 1] and large enough
    for at least one step of num_inference_steps."""
    for name, value in (("image", image_size), ("mask", mask_size), ("strength", strength)):
        check_applies(limits, name, value)
    if image_size is None:
        for name, value in (("mask", mask_size), ("strength", strength)):
            if value is not None:
                raise InvalidInput(f"{name} applies to image to image only: send an image with it", name)
        return width, height, None
    image_w, image_h = image_size
    try:
        check_size(limits, image_w, image_h)
    except InvalidInput as error:
        raise InvalidInput(f"image is {image_w}x{image_h}: {error.message}", "image") from None
    for name, value, own in (("width", width, image_w), ("height", height, image_h)):
        if value is not None and value != own:
            raise InvalidInput(
                f"{name} must be the image's {name} ({own}) or left out, got {value} (the image is {image_w}x{image_h})",
                name,
            )
    if mask_size is not None and tuple(mask_size) != (image_w, image_h):
        raise InvalidInput(
            f"mask must be the image's size ({image_w}x{image_h}), got {mask_size[0]}x{mask_size[1]}", "mask"
        )
    if strength is None:
        strength = limits.default_inpaint_strength if mask_size is not None else limits.default_strength
    between("strength", strength, MIN_STRENGTH, MAX_STRENGTH)
    if steps_run(num_inference_steps, strength, sampler) < 1:
        raise InvalidInput(
            f"strength must leave at least one of the num_inference_steps ({num_inference_steps}) to run: "
            f"{_fmt(float(strength))} leaves none; raise strength to at least {_fmt(1 / num_inference_steps)} "
            "or the steps",
            "strength",
        )
    return image_w, image_h, float(strength)


def steps_run(num_inference_steps: int, strength: float | None, sampler: str = DEFAULT_SAMPLER) -> int:
    """The denoising steps a request runs, as its progress counts them (one model call each): all of them, or with
    an image those from its start step on; for the samplers that make more than one call per step, the calls, as
    their diffusers schedulers list the timesteps: PLMS one more (its first step twice), the two-call samplers (Heun, DPM2, DPM++ SDE) 2·runs − 1."""
    runs = num_inference_steps
    if strength is not None:
        runs -= start_step(num_inference_steps, strength, sampler)
    if sampler in DOUBLED_FIRST_STEP and runs > 1:
        return runs + 1
    if sampler in TWO_CALLS_PER_STEP:
        return 2 * runs - 1
    return runs


def steps_run_label(strength: float | None, sampler: str) -> str:
    """What steps_run counts, as an error message names it."""
    if strength is not None:
        return "the steps it runs at its strength"
    if sampler in DOUBLED_FIRST_STEP:
        return f"the steps it runs ({sampler}: num_inference_steps + 1)"
    if sampler in TWO_CALLS_PER_STEP:
        return f"the steps it runs ({sampler}: 2·num_inference_steps − 1)"
    return "num_inference_steps"


def check_generation(
    limits: ModelLimits,
    *,
    prompt: str,
    negative_prompt: str = "",
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    seed: int,
    width: int | None,
    height: int | None,
    num_images: int = 1,
    max_num_images: int = MAX_IMAGES,
    preview_every: int = 0,
    trajectory_every: int = 0,
    sampler: str | None = None,
    guidance_rescale: float | None = None,
    guidance_start: float | None = None,
    guidance_stop: float | None = None,
    true_cfg_scale: float | None = None,
    original_width: int | None = None,
    original_height: int | None = None,
    crop_top: int | None = None,
    crop_left: int | None = None,
    target_width: int | None = None,
    target_height: int | None = None,
    images_field: str = "num_images",
    image_size: tuple[int, int] | None = None,
    mask_size: tuple[int, int] | None = None,
    strength: float | None = None,
) -> Resolved:
    """Every rule of one generation request; returns the size, sampler, guidance rescale, steps, guidance
    scale and guidance interval it resolves to (None: the model's default). Fields the model's family does not
    read are refused."""
    sampler = check_sampler(limits, sampler)
    steps = limits.default_num_inference_steps if num_inference_steps is None else num_inference_steps
    check_steps(limits, steps, sampler)
    guidance_scale = limits.default_guidance_scale if guidance_scale is None else guidance_scale
    between("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE)
    between("eta", eta, 0.0, MAX_ETA)
    if eta > 0 and sampler not in ETA_SAMPLERS:
        raise InvalidInput(
            f"eta applies to the {', '.join(ETA_SAMPLERS)} sampler only; got eta {_fmt(eta)} with sampler {sampler!r}",
            "eta",
        )
    check_applies(limits, "guidance_rescale", guidance_rescale or None)  # 0 is "none" wherever it is not read
    rescale = limits.default_guidance_rescale if guidance_rescale is None else guidance_rescale
    between("guidance_rescale", rescale, MIN_GUIDANCE_RESCALE, MAX_GUIDANCE_RESCALE)
    interval = check_guidance_interval(
        limits.default_guidance_start if guidance_start is None else guidance_start,
        limits.default_guidance_stop if guidance_stop is None else guidance_stop,
    )
    check_applies(limits, "true_cfg_scale", true_cfg_scale)
    if true_cfg_scale is not None:
        between("true_cfg_scale", true_cfg_scale, MIN_TRUE_CFG_SCALE, MAX_GUIDANCE)
    for name, value, low in (
        ("original_width", original_width, 1),
        ("original_height", original_height, 1),
        ("crop_top", crop_top, 0),
        ("crop_left", crop_left, 0),
        ("target_width", target_width, 1),
        ("target_height", target_height, 1),
    ):
        check_applies(limits, name, value)
        if value is not None:
            between(name, value, low, MAX_CONDITIONING_SIDE, integer=True)
    between("seed", seed, 0, MAX_SEED, integer=True)
    between(images_field, num_images, 1, images_allowed(max_num_images), integer=True)
    width, height, strength = check_image_inputs(
        limits,
        image_size=image_size,
        mask_size=mask_size,
        strength=strength,
        width=width,
        height=height,
        num_inference_steps=steps,
        sampler=sampler,
    )
    runs, label = steps_run(steps, strength, sampler), steps_run_label(strength, sampler)
    check_every("preview_every", preview_every, runs, steps_are=label)
    check_every("trajectory_every", trajectory_every, runs, steps_are=label)
    size = check_size(limits, width, height)
    check_prompt(limits, "prompt", prompt)
    check_prompt(limits, "negative_prompt", negative_prompt)
    return Resolved(size[0], size[1], sampler, float(rescale), steps, float(guidance_scale), strength, *interval)


def check_trajectory_fields(kind: str, sent: Iterable[str], *, from_image: bool = False) -> None:
    """The fields a trajectory request set (away from their defaults) must be ones its kind reads. A forward
    trajectory of a given picture (`from_image`) generates nothing, so it reads none of the generation's fields."""
    generates = kind != "forward" or not from_image
    for name in sent:
        if not _kind_reads(kind, name):
            kinds = TRAJECTORY_FIELD_KINDS[name]
            raise InvalidInput(
                f"{name} applies to {' and '.join(kinds)} trajectories only, not {kind}; leave it out", name
            )
        if not generates and name not in (*FORWARD_ONLY_FIELDS, *TRAJECTORY_OWN_FIELDS):
            raise InvalidInput(
                f"{name} describes the picture a forward trajectory generates from a prompt; a forward trajectory "
                f"of an image noises that image as it is: leave {name} out",
                name,
            )


def trajectory_params(kind: str, params: Mapping[str, Any], *, from_image: bool) -> dict[str, Any]:
    """A trajectory job's params as both doors show them: without the fields its kind does not read (those
    check_trajectory_fields refuses when set), and for a forward trajectory of a given picture only
    FORWARD_OF_IMAGE_PARAMS."""
    if kind == "forward" and from_image:
        return {name: value for name, value in params.items() if name in FORWARD_OF_IMAGE_PARAMS}
    return {name: value for name, value in params.items() if _kind_reads(kind, name)}


def _kind_reads(kind: str, name: str) -> bool:
    """Whether a trajectory of `kind` reads the field or param `name` (TRAJECTORY_FIELD_KINDS; any other, every kind)."""
    return kind in TRAJECTORY_FIELD_KINDS.get(name, TRAJECTORY_KINDS)


def check_timesteps(num_train_timesteps: int, timesteps: Iterable[int]) -> list[int]:
    """Forward-trajectory timesteps: the paper's t in [0, T], at least one, at most MAX_TIMESTEPS."""
    timesteps = list(timesteps)
    if not 1 <= len(timesteps) <= MAX_TIMESTEPS:
        raise InvalidInput(
            f"timesteps must hold between 1 and {MAX_TIMESTEPS} values, got {len(timesteps)}", "timesteps"
        )
    for index, t in enumerate(timesteps):
        between("timesteps", t, 0, num_train_timesteps, integer=True, param=f"timesteps.{index}")
    return timesteps


def default_timesteps(num_train_timesteps: int) -> list[int]:
    """0..1000 by 50, clipped to the model's T."""
    return sorted({min(t, num_train_timesteps) for t in DEFAULT_FORWARD_TIMESTEPS})


def check_guidance_scales(scales: Iterable[float]) -> list[float]:
    scales = list(scales)
    if not 1 <= len(scales) <= MAX_GUIDANCE_SCALES:
        raise InvalidInput(
            f"guidance_scales must hold between 1 and {MAX_GUIDANCE_SCALES} values, got {len(scales)}",
            "guidance_scales",
        )
    for index, scale in enumerate(scales):
        between("guidance_scales", scale, 0.0, MAX_GUIDANCE, param=f"guidance_scales.{index}")
    return scales


# A job event's id as Redis gives it to its stream entries: "<ms>-<seq>", each an unsigned 64-bit integer, or
# "<ms>" alone (seq 0). ASCII digits only ([0-9], not \d: int() reads other scripts' digits, Redis does not), at
# most 20 of them (2**64 - 1 has 20), so a long one is refused before int() reads it.
_EVENT_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
MAX_EVENT_ID_PART = 2**64 - 1


def check_event_id(value: str, field: str, param: str | None = None) -> str:
    """An event id to resume a job's events after (SSE Last-Event-ID, gRPC after_event_id): a Redis stream entry
    id, checked before it reaches Redis or the event log's ordering (services.common.jobs.stream_id), which
    would fail on anything else."""
    match = _EVENT_ID.fullmatch(value)
    if match is None or any(int(part) > MAX_EVENT_ID_PART for part in match.groups("0")):
        raise InvalidInput(f"{field} must be an event id like 1700000000000-0, got {shown(value)}", param or field)
    return value


def check_statuses(statuses: Iterable[str]) -> list[str]:
    """A job-status filter: each one of JOB_STATUSES."""
    statuses = list(statuses)
    for status in statuses:
        if status not in JOB_STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(JOB_STATUSES)}, got {shown(status)}", "status")
    return statuses


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    """A job's webhook_url: absolute http or https, a host name that can be looked up, no user:password@ (its
    length: the schema's MAX_WEBHOOK_URL_CHARS). Unless the deployment allows private targets, a literal
    loopback, private, link-local or reserved address is refused here (a host name that resolves to one is refused
    when the call is made: services/core/webhooks.py)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a port that is no number or out of range
    except ValueError as error:
        raise InvalidInput(f"webhook_url is not a URL ({error}), got {shown(url)}", "webhook_url") from None
    if parts.scheme.lower() not in WEBHOOK_SCHEMES or not host:
        raise InvalidInput(f"webhook_url must be an absolute http or https URL, got {shown(url)}", "webhook_url")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("webhook_url must not carry a user name or password", "webhook_url")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise InvalidInput(
            f"webhook_url must be printable ASCII without spaces (percent-encode the rest), got {shown(url)}",
            "webhook_url",
        )
    if _literal_address(host) is None:
        try:
            host.encode("idna")  # what a lookup does first: "a..com" or a label past 63 characters fails here
        except UnicodeError:
            raise InvalidInput(f"webhook_url's host {shown(host)} is not a valid host name", "webhook_url") from None
    if not allow_private and not public_address(host):
        raise InvalidInput(
            f"webhook_url must reach a public address; {shown(host)} is loopback, private, link-local or reserved",
            "webhook_url",
        )
    return url


# IPv6 prefixes that carry an IPv4 address a gateway would reach through a translator: NAT64 (RFC 6052, 8215).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # the deprecated ::a.b.c.d


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def public_address(host: str) -> bool:
    """False for a literal IP address that is not globally routable (loopback, private, link-local, reserved,
    multicast), an IPv6 address that carries such an IPv4 address (mapped, 6to4, Teredo, NAT64, ::a.b.c.d), and
    "localhost"; True for any other host name (resolved and checked again at call time)."""
    if host.lower().rstrip(".") == "localhost" or host.lower().rstrip(".").endswith(".localhost"):
        return False
    address = _literal_address(host)
    if address is None:
        return True
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, address.teredo and address.teredo[1]]
        if any(address in network for network in (*_NAT64, _IPV4_COMPATIBLE)):
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(public_address(str(inner)) for inner in embedded if inner is not None)
    return True
