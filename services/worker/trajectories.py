"""Generation and trajectory jobs on top of the engine: what each job kind submits and what it keeps.

- generation: one request; its images.
- reverse: one request with trajectory_every = k; each kept step's x_t and x0 prediction, decoded.
- guidance_sweep: one request per scale, submitted together so they share UNet batches.
- forward: x0 (uploaded, or generated from prompt and seed), noised to every t with one ε fixed by noise_seed
  (x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; for flow-matching models x_σ = (1 − σ)·x0 + σ·ε with σ = t/T, σ in the
  frame's metadata instead of ᾱ), in pixel or latent space; the VAE work runs on the engine thread (Engine.call).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import torch
from PIL import Image

from services.common.jobstore import INPUT_BLOB, MASK_BLOB
from services.common.rules import SIZE_CONDITIONING_PARAMS
from services.worker.diffusion.flow_matching import flow_forward_trajectory
from services.worker.diffusion.forward import alpha_bars_paper, forward_trajectory
from services.worker.engine.engine import Engine
from services.worker.engine.errors import (
    EngineError,
    EngineStopped,
    InvalidRequestError,
    NonFiniteOutputError,
    RequestCancelled,
)
from services.worker.engine.requests import GenerationRequest, GenerationResult
from services.worker.loading import LoadedModel, to_pil
from services.worker.runtime import JobRun, request_id, reverse_frame_entries

log = logging.getLogger(__name__)

# request fields of some families only (services/common/rules.py): a job's params carry them, None where unset
FAMILY_FIELDS = ("true_cfg_scale", *SIZE_CONDITIONING_PARAMS)


class InputExpired(Exception):
    """An input picture of the job is gone or unreadable: the job fails naming the field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def input_picture(run: JobRun, blob: str, field: str) -> Image.Image:
    data = run.store.blob(run.job_id, blob)
    if data is None:
        raise InputExpired(f"the uploaded {field} has expired", field)
    try:
        with Image.open(io.BytesIO(data)) as picture:
            return picture.convert("L" if field == "mask" else "RGB")
    except Exception as error:  # noqa: BLE001 - a picture PIL cannot read is the caller's error
        raise InputExpired(f"{field} could not be decoded: {error}", field) from None


def generation_request(run: JobRun, index: int | None = None, **overrides) -> GenerationRequest:
    """The engine request of a generation job (or of a reverse or sweep trajectory): its params, and for image
    to image its starting picture and mask (InputExpired where they are gone)."""
    p = run.params
    pictures = {}
    if p.get("has_image") and run.job.kind != "forward":
        pictures["image"] = input_picture(run, INPUT_BLOB, "image")
        if p.get("has_mask"):
            pictures["mask"] = input_picture(run, MASK_BLOB, "mask")
    fields = dict(
        prompt=p.get("prompt") or "",
        seed=int(p["seed"]),
        negative_prompt=p.get("negative_prompt", ""),
        num_inference_steps=p["num_inference_steps"],
        guidance_scale=p.get("guidance_scale"),  # a sweep has none: each of its requests gets one of its scales
        eta=p["eta"],
        sampler=p.get("sampler"),  # absent in jobs from before samplers: the model's default
        guidance_rescale=p.get("guidance_rescale"),
        guidance_start=p.get("guidance_start"),  # absent in jobs from before the guidance interval: the model's
        guidance_stop=p.get("guidance_stop"),
        width=p["width"],
        height=p["height"],
        num_images=p.get("num_images", 1),
        preview_every=p.get("preview_every", 0),
        **{name: p.get(name) for name in FAMILY_FIELDS},  # absent in older jobs: None
        strength=p.get("strength"),
        owner=run.job.owner,
        **pictures,
    )
    fields.update(overrides)
    return GenerationRequest(request_id=request_id(run.job_id, run.attempt, index), **fields)


def _left_to_run_again(run: JobRun) -> None:
    """The engine stopped under the job (a cold shutdown, a lost device): not the job's failure. Its lease, no longer
    renewed, lapses and a reaper runs it again elsewhere."""
    log.warning("job %s attempt %d: the engine stopped under it; left to run again", run.job_id, run.attempt)


def run_requests(run: JobRun, requests: Callable[[], list[GenerationRequest]]) -> list[GenerationResult] | None:
    """Build the requests, submit them together, wait for all; on a typed engine error (or an input picture
    gone), finish the job and return None."""
    engine = run.engine()
    handles = []
    try:
        try:
            requests = requests()
        except InputExpired as error:
            run.fail("invalid_request_error", str(error), error.field)
            return None
        for request in requests:
            handles.append(engine.submit(request, keep_events=False))  # its steps go to Redis, on_step_events
            run.runtime.track(handles[-1])
        return [handle.result() for handle in handles]
    except InvalidRequestError as error:
        run.fail("invalid_request_error", str(error), error.field)
    except RequestCancelled:
        run.cancelled()
    except NonFiniteOutputError as error:
        run.fail("non_finite_output", str(error))
    except EngineStopped:
        _left_to_run_again(run)
    except EngineError as error:
        run.fail(type(error).__name__, str(error))
    finally:
        for handle in handles:
            handle.cancel() if not handle.done() else None
            run.runtime.untrack(handle)
    return None


def generation(run: JobRun) -> None:
    results = run_requests(run, lambda: [generation_request(run)])
    if results:
        run.succeed(results[0].images)


def reverse(run: JobRun) -> None:
    results = run_requests(
        run, lambda: [generation_request(run, num_images=1, trajectory_every=run.params["trajectory_every"])]
    )
    if not results:
        return
    frames = [(meta, image) for frame in results[0].frames for _, meta, image in reverse_frame_entries(frame)]
    run.succeed(results[0].images, frames, frames_streamed=True)


def guidance_sweep(run: JobRun) -> None:
    scales = run.params["guidance_scales"]
    results = run_requests(
        run,
        lambda: [
            generation_request(run, index, num_images=1, guidance_scale=scale) for index, scale in enumerate(scales)
        ],
    )
    if results:
        frames = [({"guidance_scale": scale}, result.images[0]) for scale, result in zip(scales, results)]
        run.succeed([frame[1] for frame in frames], frames)


def _pixels(picture: Image.Image, width: int, height: int) -> torch.Tensor:
    image = picture.convert("RGB").resize((width, height), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)  # (1, 3, H, W) in [-1, 1]


def noise_levels(model: LoadedModel, timesteps: list[int]) -> list[dict[str, float]]:
    """Each forward frame's noise level: {"alpha_bar": ᾱ_t}, or {"sigma": t/T} for a flow-matching model."""
    if model.family.flow:
        return [{"sigma": t / model.num_train_timesteps} for t in timesteps]
    return [{"alpha_bar": a} for a in alpha_bars_paper(model.alphas_cumprod, timesteps).tolist()]


def _noised(model: LoadedModel, x0: torch.Tensor, timesteps: list[int], noise_seed: int) -> torch.Tensor:
    """x0 at every t, one ε: q(x_t | x0) of DDPM, or the straight line of flow matching."""
    if model.family.flow:
        return flow_forward_trajectory(x0, timesteps, model.num_train_timesteps, noise_seed)[0]
    return forward_trajectory(x0, timesteps, model.alphas_cumprod, noise_seed)


def _noise_frames(
    model: LoadedModel, pixels: torch.Tensor, timesteps: list[int], noise_seed: int, space: str
) -> list[Image.Image]:
    """Runs on the engine thread: x0 -> x_t for every t, decoded to pictures."""
    with torch.inference_mode():
        if space == "latent":
            x0 = model.encode_images(pixels)  # (1, C, h, w)
            x_t = _noised(model, x0, timesteps, noise_seed)  # (N, C, h, w)
            images = [model.decode_latents(x_t[i : i + 8]) for i in range(0, x_t.shape[0], 8)]
            return to_pil(torch.cat(images))
        x_t = _noised(model, pixels.to(model.device), timesteps, noise_seed)  # (N, 3, H, W)
        return to_pil((x_t / 2 + 0.5).clamp(0, 1))


def forward(run: JobRun) -> None:
    p = run.params
    if p.get("has_image"):
        data = run.store.blob(run.job_id, INPUT_BLOB)
        if data is None:
            run.fail("invalid_request_error", "the uploaded image has expired", "image")
            return
        try:
            pixels = _pixels(Image.open(io.BytesIO(data)), p["width"], p["height"])
        except Exception as error:  # noqa: BLE001 - a picture PIL cannot read is the caller's error
            run.fail("invalid_request_error", f"image could not be decoded: {error}", "image")
            return
        source = None
    else:
        results = run_requests(run, lambda: [generation_request(run, num_images=1)])
        if not results:
            return
        source = results[0].images[0]
        pixels = _pixels(source, p["width"], p["height"])
    engine: Engine = run.engine()
    timesteps = p["timesteps"]
    try:
        images = engine.call(
            lambda model: _noise_frames(model, pixels, timesteps, p["noise_seed"], p["space"])
        ).result()
        levels = noise_levels(engine.model, timesteps)
    except EngineStopped:
        _left_to_run_again(run)
        return
    except (ValueError, EngineError) as error:
        run.fail("invalid_request_error", str(error), "timesteps")
        return
    frames = [
        ({"timestep": t, **level, "space": p["space"]}, image) for t, level, image in zip(timesteps, levels, images)
    ]
    run.succeed([source] if source is not None else [], frames)


KINDS = {"generation": generation, "reverse": reverse, "guidance_sweep": guidance_sweep, "forward": forward}
