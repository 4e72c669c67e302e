"""Evaluate the default model on the shapes world: sample captions at several guidance scales,
read colour, shape and background back from the pixels (training/readback.py), and report.

    python -m training.evaluate --model models/shapes-ldm

Prints the table, writes it into docs/model.md (between the eval markers) and writes the
contact sheet docs/contact_sheet.png (captions x scales).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTokenizer

from training.readback import read_back
from training.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, caption_for, parse_caption

GUIDANCE_SCALES = (0.0, 1.0, 3.0, 7.5, 15.0)
# A channel value counts as clipped when the decoder puts it this far outside [0, 1].
CLIP_MARGIN = 8 / 255
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
EVAL_START, EVAL_END = "<!-- eval:start -->", "<!-- eval:end -->"
# A quick check that needs few pictures: every colour, shape and background at least once.
SPOT_CHECK_CAPTIONS = [
    "a large red circle on a white background",
    "a large green square on a black background",
    "a large blue triangle on a gray background",
    "a yellow square on a black background",
    "a large purple circle on a gray background",
    "a orange triangle on a white background",
]


@dataclass
class ShapesModel:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler

    @classmethod
    def load(cls, folder: str | Path) -> ShapesModel:
        folder = Path(folder)
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
            unet=UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
            scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
        )

    def to(self, device: str | torch.device) -> ShapesModel:
        for part in (self.text_encoder, self.unet, self.vae):
            part.to(device)
        return self

    def embed(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.unet.device))[0]  # (B, L, D)


@torch.no_grad()
def sample(
    model: ShapesModel,
    captions: list[str],
    guidance_scales: list[float],
    seeds: list[int],
    num_inference_steps: int = 50,
    chunk_rows: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """One picture per row: classifier-free guidance out = out_u + s (out_c - out_u) on the UNet's
    output (ε or v: the mix is linear in either) at every scale (s = 0 is the unconditional model,
    s = 1 the conditional one), DDIM with eta = 0. The noise comes from CPU generators, as in
    diffusers, whatever device the model is on.

    Returns (pixels uint8 (N, H, W, 3), unclipped decoder output float (N, 3, H, W) on [0, 1]).
    """
    unet, vae = model.unet, model.vae
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    size = unet.config.sample_size
    latents = (
        torch.stack(
            [
                torch.randn((unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
                for seed in seeds
            ]
        ).to(unet.device)
        * scheduler.init_noise_sigma
    )  # (N, C, h, w)
    cond = model.embed(captions)
    uncond = model.embed([""]).expand_as(cond)
    scale = torch.tensor(guidance_scales, dtype=latents.dtype, device=latents.device)[:, None, None, None]
    for t in scheduler.timesteps:
        model_output = torch.empty_like(latents)
        for start in range(0, len(captions), chunk_rows):
            rows = slice(start, start + chunk_rows)
            x = latents[rows]
            out_uncond, out_cond = unet(torch.cat([x, x]), t, torch.cat([uncond[rows], cond[rows]])).sample.chunk(2)
            model_output[rows] = out_uncond + scale[rows] * (out_cond - out_uncond)
        latents = scheduler.step(model_output, t, latents).prev_sample
    decoded = torch.cat([vae.decode(chunk / vae.config.scaling_factor).sample for chunk in latents.split(256)])
    unclipped = (decoded + 1) / 2  # (N, 3, H, W)
    pixels = (unclipped.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return pixels, unclipped.cpu().numpy()


def eval_captions(kind: str = "full") -> list[str]:
    """full: every caption of the grammar (108 with a size word) plus the 54 without;
    short: one size word per colour/shape/background (alternating) plus the 54 without;
    sized: only the 54 with the alternating size word."""
    captions = []
    for i, (colour, shape, background) in enumerate((c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS):
        sizes = list(SIZES) if kind == "full" else [list(SIZES)[i % 2]]
        captions += [caption_for(colour, shape, background, size) for size in sizes]
        if kind != "sized":
            captions.append(caption_for(colour, shape, background))
    return captions


def score(captions: list[str], pixels: np.ndarray) -> dict[str, float]:
    right = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    for caption, picture in zip(captions, pixels):
        wanted = parse_caption(caption)
        matches = read_back(picture).matches(wanted["colour"], wanted["shape"], wanted["background"])
        for key, ok in matches.items():
            right[key] += ok
        right["all"] += all(matches.values())
    return {key: value / len(captions) for key, value in right.items()}


def chance_levels() -> dict[str, float]:
    colour, shape, background = 1 / len(COLOURS), 1 / len(SHAPES), 1 / len(BACKGROUNDS)
    return {"colour": colour, "shape": shape, "background": background, "all": colour * shape * background}


def contact_sheet(captions: list[str], pixels_by_scale: dict[float, np.ndarray], rows: list[int], path: Path) -> None:
    thumb, pad, label_width, header = 64, 2, 330, 18
    scales = list(pixels_by_scale)
    sheet = Image.new(
        "RGB", (label_width + len(scales) * (thumb + pad), header + len(rows) * (thumb + pad)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for column, scale in enumerate(scales):
        draw.text((label_width + column * (thumb + pad) + 4, 3), f"w = {scale:g}", fill=(0, 0, 0))
    for row, index in enumerate(rows):
        top = header + row * (thumb + pad)
        draw.text((4, top + thumb // 2 - 6), captions[index], fill=(0, 0, 0))
        for column, scale in enumerate(scales):
            sheet.paste(Image.fromarray(pixels_by_scale[scale][index]), (label_width + column * (thumb + pad), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def markdown_table(results: dict[float, dict[str, float]], saturation: dict[float, float], count: int) -> str:
    chance = chance_levels()
    lines = [
        "| guidance | colour right | shape right | background right | all three right | clipped channel values |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scale, result in results.items():
        lines.append(
            f"| {scale:g} | {result['colour']:.1%} | {result['shape']:.1%} | {result['background']:.1%} "
            f"| **{result['all']:.1%}** | {saturation[scale]:.2%} |"
        )
    lines.append(
        f"| chance | {chance['colour']:.1%} | {chance['shape']:.1%} | {chance['background']:.1%} | {chance['all']:.1%} | |"
    )
    return "\n".join(lines) + f"\n\n{count} pictures per scale."


def write_docs(doc_path: Path, section: str) -> None:
    text = doc_path.read_text() if doc_path.exists() else f"# The default model\n\n{EVAL_START}\n{EVAL_END}\n"
    if EVAL_START not in text:
        text += f"\n{EVAL_START}\n{EVAL_END}\n"
    before, rest = text.split(EVAL_START, 1)
    after = rest.split(EVAL_END, 1)[1] if EVAL_END in rest else ""
    doc_path.write_text(f"{before}{EVAL_START}\n{section}\n{EVAL_END}{after}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/shapes-ldm"))
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=1234, help="picture i uses noise seed seed + i")
    parser.add_argument(
        "--captions",
        choices=("full", "short", "sized"),
        default="full",
        help="full: 108 with size + 54 without; short: 54 with one size word + 54 without; sized: the 54 with a size word",
    )
    parser.add_argument("--docs", type=Path, default=DOCS_DIR, help="where model.md and contact_sheet.png go")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to go faster")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    started = time.monotonic()
    model = ShapesModel.load(args.model).to(args.device)
    captions = eval_captions(args.captions)
    rows = [(caption, scale, args.seed + i) for scale in GUIDANCE_SCALES for i, caption in enumerate(captions)]
    pixels, unclipped = sample(model, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], args.steps)
    results, saturation, pixels_by_scale = {}, {}, {}
    for k, scale in enumerate(GUIDANCE_SCALES):
        part = slice(k * len(captions), (k + 1) * len(captions))
        pixels_by_scale[scale] = pixels[part]
        results[scale] = score(captions, pixels[part])
        outside = (unclipped[part] < -CLIP_MARGIN) | (unclipped[part] > 1 + CLIP_MARGIN)
        saturation[scale] = float(outside.mean())
    elapsed = time.monotonic() - started
    command = f"python -m training.evaluate --model {args.model} --captions {args.captions}"
    where = "a 2-core CPU" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    table = markdown_table(results, saturation, len(captions))
    section = (
        f"Made by `{command}` (DDIM {args.steps} steps, eta 0, noise seed {args.seed} + caption index, the same "
        f"noise at every scale; {len(rows)} pictures in {elapsed / 60:.1f} min on {where}). "
        f"A picture is right when the read-back of training/readback.py (docs/shapes.md) matches its caption; "
        f"'clipped' is the share of decoder channel values more than 8/255 outside [0, 1].\n\n{table}\n\n"
        f"![contact sheet](contact_sheet.png)"
    )
    print(table)
    print(f"{len(rows)} pictures in {elapsed:.0f} s")
    if not args.no_docs:
        # One row per colour x shape (18), the background and the size word (small, large, none) rotating.
        per_combo = len(captions) // 54
        sheet_rows = [j * per_combo + (j // 3) % per_combo for j in range(54) if j % 3 == (j // 3) % 3]
        contact_sheet(captions, pixels_by_scale, sheet_rows, args.docs / "contact_sheet.png")
        write_docs(args.docs / "model.md", section)
        print(f"wrote {args.docs / 'model.md'} and {args.docs / 'contact_sheet.png'}")


if __name__ == "__main__":
    main()
