"""Parity and batching figures for each model family, on the tiny fixtures (tests/fixtures/tiny_families.py) or on
folders you pass: the engine against the family's diffusers pipeline (one request alone), batched against alone,
and images/s one request at a time against all in flight.

    python -m benchmarks.family_parity                      # builds the tiny SDXL, SD3, Flux and Flux-schnell
    python -m benchmarks.family_parity --model /path/to/flux-folder --steps 4 --size 512

For each family it prints one markdown row per measure and a JSON line at the end:
- alone vs pipeline: the final latents' largest absolute difference and how many requests' latents are equal bit
  for bit, the pictures' largest difference in 8-bit levels and their lowest PSNR, over four requests: seeds 0..2
  at the family's default guidance, and seed 3 with a negative prompt (SDXL with eta 0.5, Flux with true CFG 2:
  its two rows share one call where the pipeline makes two, so it agrees to rounding, not bit for bit);
- batched vs alone: 8 requests with different seeds, steps (4..11), guidance and image counts submitted together,
  each against itself alone (latents and 8-bit levels);
- images/s: the same 8 requests one at a time (B) and all in flight (C);
- from a picture vs pipeline: image to image at strength 0.6 and inpainting (a mask over the middle) at 0.6 and 1.0,
  seeds 0..2 at the family's default guidance, against the family's image-to-image and inpainting pipelines
  (`Family.image_pipelines`); the same figures as alone vs pipeline. StableDiffusion3InpaintPipeline decodes
  without the VAE's shift_factor (diffusers issue #13611), so its pictures are compared decoded as its other
  pipelines decode them (latentd's decode of its latents).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.worker.engine.engine import Engine
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import LoadedModel, load_model, to_pil

PROMPT = "a red circle on a white background"
PICTURE_MODES = (("img2img", 0.6), ("inpaint", 0.6), ("inpaint", 1.0))
DECODES_WITHOUT_SHIFT = ("StableDiffusion3InpaintPipeline",)  # diffusers issue #13611 (fixed by pull request #14671)


class RecordingEngine(Engine):
    """The engine, keeping each finished request's final latents (what it hands to the VAE)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.final_latents: dict[str, torch.Tensor] = {}

    def _finish(self, finished):
        for member in finished:
            self.final_latents[member.request_id] = member.latents.detach().cpu().clone()
        super()._finish(finished)


def pipeline_for(model: LoadedModel, class_name: str | None = None):
    import diffusers

    pipe = getattr(diffusers, class_name or model.family.pipeline).from_pretrained(model.path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_run(pipe, model: LoadedModel, request: GenerationRequest) -> tuple[torch.Tensor, list]:
    """The pipeline on the same request (with its picture, mask and strength): (latents (n, C, h, w), pictures)."""
    kwargs = dict(
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale if request.guidance_scale is not None else model.default_guidance_scale,
        num_images_per_prompt=request.num_images,
        height=request.height or model.native_height,
        width=request.width or model.native_width,
    )
    family = model.family.name
    if family in ("sd3", "flux"):
        kwargs["max_sequence_length"] = model.max_prompt_tokens
    if request.negative_prompt and (family != "flux" or request.true_cfg_scale):
        kwargs["negative_prompt"] = request.negative_prompt
    if request.true_cfg_scale:
        kwargs["true_cfg_scale"] = request.true_cfg_scale
    if request.eta:
        kwargs["eta"] = request.eta
    if request.image is not None:
        kwargs |= {"image": request.image, "strength": request.strength}
    if request.mask is not None:
        kwargs["mask_image"] = request.mask
    outputs = {}
    for output_type in ("latent", "pil"):
        generator = torch.Generator("cpu").manual_seed(request.seed)
        outputs[output_type] = pipe(request.prompt, generator=generator, output_type=output_type, **kwargs).images
    latents = outputs["latent"]
    if family == "flux":
        latents = pipe._unpack_latents(latents, kwargs["height"], kwargs["width"], pipe.vae_scale_factor)
    if type(pipe).__name__ in DECODES_WITHOUT_SHIFT:
        outputs["pil"] = to_pil(model.decode_latents(latents))
    return latents.float().cpu(), outputs["pil"]


def levels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def psnr(a, b) -> float:
    mse = float(np.mean(((levels(a) - levels(b)) / 255.0) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def run_alone(model: LoadedModel, request: GenerationRequest) -> tuple[torch.Tensor, list, float]:
    engine = RecordingEngine(model).start()
    try:
        started = time.perf_counter()
        result = engine.submit(request).result(600)
        return engine.final_latents[request.request_id], result.images, time.perf_counter() - started
    finally:
        engine.stop()


def parity_requests(model: LoadedModel, steps: int, size: int | None) -> list[GenerationRequest]:
    extra = {"sdxl": {"eta": 0.5}, "flux": {"true_cfg_scale": 2.0}}.get(model.family.name, {})
    requests = [
        GenerationRequest(
            request_id=f"p{seed}", prompt=PROMPT, seed=seed, num_inference_steps=steps, width=size, height=size
        )
        for seed in range(3)
    ]
    requests.append(
        GenerationRequest(
            request_id="p-negative",
            prompt=PROMPT,
            negative_prompt="blue",
            seed=3,
            num_inference_steps=steps,
            width=size,
            height=size,
            **{k: v for k, v in extra.items() if k in model.facts.params},
        )
    )
    return requests


def batch_requests(model: LoadedModel, size: int | None, n: int = 8) -> list[GenerationRequest]:
    guidance = [1.0, 3.0, model.default_guidance_scale, 7.5]
    return [
        GenerationRequest(
            request_id=f"b{i}",
            prompt=PROMPT,
            seed=100 + i,
            num_inference_steps=4 + i,
            guidance_scale=guidance[i % len(guidance)] if "guidance_scale" in model.facts.params else None,
            num_images=1 + i % 2,
            width=size,
            height=size,
        )
        for i in range(n)
    ]


def against_pipeline(model: LoadedModel, pipe, requests: list[GenerationRequest]) -> dict:
    """Each request alone against the pipeline: the largest differences and the lowest PSNR over them."""
    rows = []
    for request in requests:
        ours_latents, ours_images, _ = run_alone(model, request)
        theirs_latents, theirs_images = pipeline_run(pipe, model, request)
        rows.append(
            {
                "latents_max_abs": float((ours_latents - theirs_latents).abs().max()),
                "latents_equal": bool(torch.equal(ours_latents, theirs_latents)),
                "levels_max": int(np.abs(levels(ours_images) - levels(theirs_images)).max()),
                "psnr_db": psnr(ours_images, theirs_images),
            }
        )
    return {
        "requests": len(rows),
        "latents_max_abs": max(r["latents_max_abs"] for r in rows),
        "latents_equal": sum(r["latents_equal"] for r in rows),
        "levels_max": max(r["levels_max"] for r in rows),
        "psnr_db_min": min(r["psnr_db"] for r in rows),
    }


def picture_and_mask(model: LoadedModel, size: int | None) -> tuple[Image.Image, Image.Image]:
    """A picture of the model's own (seed 7, its defaults) and a mask over its middle third (white = repaint)."""
    width, height = size or model.native_width, size or model.native_height
    _, images, _ = run_alone(
        model, GenerationRequest(request_id="source", prompt=PROMPT, seed=7, width=width, height=height)
    )
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 3, height // 3, 2 * width // 3, 2 * height // 3))
    return images[0], mask


def from_picture(model: LoadedModel, steps: int, size: int | None) -> list[dict]:
    picture, mask = picture_and_mask(model, size)
    rows = []
    for mode, strength in PICTURE_MODES:
        pipe = pipeline_for(model, model.family.image_pipelines[mode == "inpaint"])
        requests = [
            GenerationRequest(
                request_id=f"{mode}-{strength}-{seed}",
                prompt="a blue square on a white background",
                seed=seed,
                num_inference_steps=steps,
                image=picture,
                strength=strength,
                mask=mask if mode == "inpaint" else None,
            )
            for seed in range(3)
        ]
        rows.append(
            {"mode": mode, "strength": strength, "pipeline": type(pipe).__name__}
            | against_pipeline(model, pipe, requests)
        )
    return rows


def measure(model: LoadedModel, steps: int, size: int | None) -> dict:
    alone = against_pipeline(model, pipeline_for(model), parity_requests(model, steps, size))
    batch = batch_requests(model, size)
    alone_latents, alone_images, alone_s = {}, {}, 0.0
    for request in batch:
        latents, images, seconds = run_alone(model, request)
        alone_latents[request.request_id], alone_images[request.request_id] = latents, images
        alone_s += seconds
    engine = RecordingEngine(model).start()
    try:
        started = time.perf_counter()
        handles = [engine.submit(request) for request in batch]
        results = {h.request_id: h.result(600) for h in handles}
        together_s = time.perf_counter() - started
    finally:
        engine.stop()
    images = sum(r.num_images for r in batch)
    return {
        "model": model.name,
        "family": model.family.name,
        "alone_vs_pipeline": alone,
        "batched_vs_alone": {
            "requests": len(batch),
            "latents_max_abs": max(
                float((engine.final_latents[rid] - alone_latents[rid]).abs().max()) for rid in alone_latents
            ),
            "levels_max": max(
                int(np.abs(levels(results[rid].images) - levels(alone_images[rid])).max()) for rid in alone_images
            ),
        },
        "images_per_s": {"one_at_a_time": images / alone_s, "all_in_flight": images / together_s},
        "from_picture_vs_pipeline": from_picture(model, steps, size),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | alone vs pipeline: max abs Δ latents | latents bit for bit | max Δ levels | min PSNR dB "
        "| batched vs alone: max abs Δ latents | max Δ levels | img/s one at a time | img/s all in flight |",
        "| --- | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        a, b, s = r["alone_vs_pipeline"], r["batched_vs_alone"], r["images_per_s"]
        lines.append(
            f"| {r['model']} ({r['family']}) | {a['latents_max_abs']:.1e} | {a['latents_equal']}/{a['requests']} "
            f"| {a['levels_max']} | {a['psnr_db_min']:.1f} | {b['latents_max_abs']:.1e} | {b['levels_max']} "
            f"| {s['one_at_a_time']:.2f} | {s['all_in_flight']:.2f} |"
        )
    lines += [
        "",
        "| model | from a picture | strength | pipeline | max abs Δ latents | latents bit for bit | max Δ levels "
        "| min PSNR dB |",
        "| --- | --- | ---: | --- | ---: | :---: | ---: | ---: |",
    ]
    for r in rows:
        for p in r["from_picture_vs_pipeline"]:
            lines.append(
                f"| {r['model']} ({r['family']}) | {p['mode']} | {p['strength']:g} | {p['pipeline']} "
                f"| {p['latents_max_abs']:.1e} | {p['latents_equal']}/{p['requests']} | {p['levels_max']} "
                f"| {p['psnr_db_min']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="a model folder (repeat); default: the tiny fixtures")
    parser.add_argument("--steps", type=int, default=8, help="steps of the parity requests")
    parser.add_argument("--size", type=int, help="pixels per side (default: each model's native size)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="latentd-families-") as tmp:
        paths = args.model
        if not paths:
            from tests.fixtures.tiny_families import build_tiny_families

            paths = list(build_tiny_families(Path(tmp)).values())
        rows = []
        for path in paths:
            rows.append(measure(load_model(path), args.steps, args.size))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
