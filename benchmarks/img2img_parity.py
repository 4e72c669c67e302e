"""Image-to-image and inpainting parity: the engine against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (scheduler swapped as a pipeline user would), alone and batched with
text-to-image requests, on the default model (a 4-channel UNet) and on a tiny 9-channel inpainting UNet built
from config (tests/fixtures/tiny_model.py), and the README's example pictures.

    python -m benchmarks.img2img_parity                     # make img2img-parity
    python -m benchmarks.img2img_parity --examples docs/    # also write docs/img2img.png

For each model, sampler and mode (image to image at strength 0.6; inpainting at strength 0.75 and 1.0), three
requests (seeds 0..2, 2 images each, guidance 7.5) run alone, then all of them together with 6 text-to-image
requests of other samplers, steps and guidance in flight: the lowest PSNR against the pipeline's pictures and the
largest difference in 8-bit levels, over all of them. One markdown table, then a JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from services.common.rules import GUIDED_AT_EVERY_STEP
from services.worker.diffusion.samplers import diffusers_scheduler
from services.worker.engine.engine import Engine
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "shapes-ldm"
SAMPLERS = ("ddim", "dpmpp_2m", "euler", "euler_ancestral")
MODES = (("img2img", 0.6), ("inpaint", 0.75), ("inpaint", 1.0))
SOURCE_PROMPT, SOURCE_SEED = "a large red circle on a white background", 1
PROMPTS = {
    "img2img": "a large blue square on a white background",
    "inpaint": "a large green triangle on a white background",
}
EXAMPLE_STRENGTHS = (0.1, 0.2, 0.4, 0.8)  # image to image at guidance 1: at 7.5 this model redraws from any start


def levels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.int16) for image in images])


def psnr(a, b) -> float:
    mse = float(np.mean(((levels(a) - levels(b)) / 255.0) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def center_mask(width: int, height: int) -> Image.Image:
    """White (repaint) over the middle, 1/8 of each side kept: where the shapes world draws its shape."""
    array = np.zeros((height, width), np.uint8)
    array[height // 8 : 7 * height // 8, width // 8 : 7 * width // 8] = 255
    return Image.fromarray(array)


def source_picture(model: LoadedModel) -> Image.Image:
    """A picture of the model's world to start from: its own text-to-image picture (DDIM 50, seed 1)."""
    engine = Engine(model).start()
    try:
        request = GenerationRequest(request_id="source", prompt=SOURCE_PROMPT, seed=SOURCE_SEED)
        return engine.submit(request).result(600).images[0]
    finally:
        engine.stop()


def pipeline(model: LoadedModel, mode: str, sampler: str):
    import diffusers

    name = "StableDiffusionImg2ImgPipeline" if mode == "img2img" else "StableDiffusionInpaintPipeline"
    pipe = getattr(diffusers, name).from_pretrained(model.path, safety_checker=None)
    pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def requests_for(mode: str, strength: float, sampler: str, image, mask, steps: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            request_id=f"{mode}-{strength}-{sampler}-{seed}",
            prompt=PROMPTS[mode],
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=7.5,
            num_images=2,
            sampler=sampler,
            image=image,
            strength=strength,
            mask=mask if mode == "inpaint" else None,
            **GUIDED_AT_EVERY_STEP,  # as the pipelines, whatever interval the model recommends
        )
        for seed in range(3)
    ]


def text_to_image(steps: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            request_id=f"t2i-{k}",
            prompt=prompt,
            seed=50 + k,
            num_inference_steps=steps - 3 + 2 * k,
            guidance_scale=scale,
            sampler=sampler,
            num_images=1 + k % 2,
        )
        for k, (prompt, scale, sampler) in enumerate(
            [
                ("a small yellow circle on a black background", 7.5, "ddim"),
                ("a blue triangle on a white background", 3.0, "euler_ancestral"),
                ("a large red square on a gray background", 1.0, "dpmpp_2m"),
                ("a green circle on a white background", 7.5, "euler"),
                ("", 0.0, "ddim"),
                ("a small blue square on a black background", 12.0, "dpmpp_2m"),
            ]
        )
    ]


def run(model: LoadedModel, requests: list[GenerationRequest]) -> dict[str, list[Image.Image]]:
    """All requests admitted together (they share every UNet call while they run); pictures by request id."""
    engine = Engine(model)
    handles = [engine.submit(r) for r in requests]
    engine.start()
    try:
        return {h.request_id: h.result(1200).images for h in handles}
    finally:
        engine.stop()


def measure(model: LoadedModel, label: str, image, mask, steps: int, samplers, modes=MODES) -> list[dict]:
    rows = []
    for mode, strength in modes:
        for sampler in samplers:
            started = time.perf_counter()
            pipe = pipeline(model, mode, sampler)
            requests = requests_for(mode, strength, sampler, image, mask, steps)
            expected = {}
            for r in requests:
                kwargs = dict(mask_image=mask) if mode == "inpaint" else {}
                expected[r.request_id] = pipe(
                    r.prompt,
                    image=image,
                    strength=strength,
                    num_inference_steps=steps,
                    guidance_scale=7.5,
                    num_images_per_prompt=2,
                    generator=torch.Generator("cpu").manual_seed(r.seed),
                    **kwargs,
                ).images
            alone = {}
            for r in requests:
                alone |= run(model, [r])
            batched = run(model, text_to_image(steps) + requests)
            row = {"model": label, "mode": mode, "strength": strength, "sampler": sampler, "steps": steps}
            for arm, pictures in (("alone", alone), ("batched", batched)):
                row[f"{arm}_psnr_db"] = min(psnr(pictures[k], expected[k]) for k in expected)
                row[f"{arm}_max_levels"] = int(
                    max(np.abs(levels(pictures[k]) - levels(expected[k])).max() for k in expected)
                )
            row["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def fmt_db(value: float) -> str:
    return "equal" if value == float("inf") else f"{value:.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | mode | strength | sampler | alone: lowest PSNR dB (max levels) | batched with text to image |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['strength']:g} | {r['sampler']} | "
            f"{fmt_db(r['alone_psnr_db'])} ({r['alone_max_levels']}) | "
            f"{fmt_db(r['batched_psnr_db'])} ({r['batched_max_levels']}) |"
        )
    return "\n".join(lines)


def examples(model: LoadedModel, source: Image.Image, out_dir: Path) -> Path:
    """The README's pictures: the source, image to image at four strengths (guidance 1), the mask, the inpainted
    picture (guidance 7.5, strength 1); the same requests as the `latentd generate` commands in the README (seed 1,
    DDIM 50)."""
    w, h = source.size
    mask = center_mask(w, h)
    requests = [
        GenerationRequest(
            request_id=f"i2i-{s}", prompt=PROMPTS["img2img"], seed=1, image=source, strength=s, guidance_scale=1.0
        )
        for s in EXAMPLE_STRENGTHS
    ] + [GenerationRequest(request_id="inpaint", prompt=PROMPTS["inpaint"], seed=1, image=source, mask=mask)]
    pictures = run(model, requests)
    out_dir.mkdir(parents=True, exist_ok=True)
    source.save(out_dir / "img2img-source.png")
    mask.save(out_dir / "img2img-mask.png")
    panels = [("source", source)]
    panels += [(f"strength {s}", pictures[f"i2i-{s}"][0]) for s in EXAMPLE_STRENGTHS]
    panels += [("mask", mask.convert("RGB")), ("inpainted", pictures["inpaint"][0])]
    scale = 3
    strip = Image.new("RGB", (len(panels) * w * scale, h * scale + 14), "white")
    draw = ImageDraw.Draw(strip)
    for i, (label, picture) in enumerate(panels):
        strip.paste(picture.convert("RGB").resize((w * scale, h * scale), Image.NEAREST), (i * w * scale, 0))
        draw.text((i * w * scale + 3, h * scale + 1), label, fill="black")
    path = out_dir / "img2img.png"
    strip.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a 4-channel SD model folder")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps of the parity requests")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--examples", type=Path, help="write the README's pictures to this folder and stop")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    source = source_picture(model)
    if args.examples:
        print(examples(model, source, args.examples))
        return 0
    samplers = tuple(args.samplers.split(","))
    mask = center_mask(*source.size)
    rows = measure(model, Path(args.model).name, source, mask, args.steps, samplers)
    with tempfile.TemporaryDirectory(prefix="latentd-inpaint-") as tmp:
        from tests.fixtures.tiny_model import NATIVE_SIZE, build_tiny_model

        tiny = load_model(build_tiny_model(Path(tmp) / "tiny-inpaint-9ch", seed=4, inpainting=True))
        picture = source.resize((NATIVE_SIZE, NATIVE_SIZE), Image.BICUBIC)
        mask = center_mask(NATIVE_SIZE, NATIVE_SIZE)
        inpainting = tuple(m for m in MODES if m[0] == "inpaint")  # its image to image is inpainting, mask white
        rows += measure(tiny, "tiny 9-channel inpainting UNet", picture, mask, args.steps, samplers, inpainting)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
