"""Evaluate the default model on the shapes world: sample captions at several guidance scales and with
several samplers, read colour, shape and background back from the pixels (training/readback.py), time
the same samplers through the engine, and report.

    python -m training.evaluate --model models/shapes-ldm      # make eval-model

Prints the tables and one JSON line, writes them into docs/model.md and README.md (between the eval
markers) and writes the contact sheet docs/contact_sheet.png (captions x scales).

Noise seeds: picture i (caption index i) uses seed HELD_OUT_SEED + i, a range that training never uses
(training/train.py:training_seeds) and that no model or default was chosen on; tuning looks at
TUNING_SEED + i (`--seed 1234`), the range the figures were reported on before samplers landed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTokenizer

from services.common.rules import EVERY_STEP, guidance_window
from services.worker.diffusion.samplers import diffusers_scheduler
from training.readback import read_back
from training.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, caption_for, parse_caption

GUIDANCE_SCALES = (0.0, 1.0, 3.0, 7.5, 15.0)
TUNING_SEED = 1234  # noise seeds TUNING_SEED + i: what models, recipes and defaults were chosen on
HELD_OUT_SEED = 500_000  # noise seeds HELD_OUT_SEED + i: the reported figures; never trained or tuned on
COST_SCALE = 7.5  # the guidance scale of the quality-per-cost rows
# A channel value counts as clipped when the decoder puts it this far outside [0, 1].
CLIP_MARGIN = 8 / 255
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
README = Path(__file__).resolve().parent.parent / "README.md"
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


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """diffusers' rescale_noise_cfg (Lin et al. 2024, sec. 3.4): the guided output's per-row std pulled
    back towards the conditional one's, by the factor guidance_rescale."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


@torch.no_grad()
def sample(
    model: ShapesModel,
    captions: list[str],
    guidance_scales: list[float],
    seeds: list[int],
    num_inference_steps: int = 50,
    chunk_rows: int = 512,
    sampler: str = "ddim",
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] = EVERY_STEP,
) -> tuple[np.ndarray, np.ndarray]:
    """One picture per row: classifier-free guidance out = out_u + s (out_c - out_u) on the UNet's
    output (ε or v: the mix is linear in either) at every scale (s = 0 is the unconditional model,
    s = 1 the conditional one), then guidance rescale on the rows with s > 1 (as diffusers' pipeline),
    then one step of the sampler's diffusers scheduler (DDIM with eta = 0). The mix applies within the
    guidance interval (start, stop) only, at the steps int(start·n) <= i < int(stop·n) as diffusers'
    guiders count them; at the other steps a row with s ≠ 0 takes out_c alone. The noise (initial
    latents, and the step noise of Euler ancestral and the SDE solvers) comes from one CPU generator per row, seeded
    with its seed, as in diffusers, whatever device the model is on.

    Returns (pixels uint8 (N, H, W, 3), unclipped decoder output float (N, 3, H, W) on [0, 1]).
    """
    unet, vae = model.unet, model.vae
    scheduler = diffusers_scheduler(sampler, model.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    size = unet.config.sample_size
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    noise = [torch.randn((unet.config.in_channels, size, size), generator=generator) for generator in generators]
    latents = torch.stack(noise).to(unet.device) * float(scheduler.init_noise_sigma)  # (N, C, h, w)
    cond = model.embed(captions)
    uncond = model.embed([""]).expand_as(cond)
    scale = torch.tensor(guidance_scales, dtype=latents.dtype, device=latents.device)[:, None, None, None]
    rescaled_rows = (scale.flatten() > 1) & (guidance_rescale > 0)  # (N,)
    # the per-row generators go to every scheduler whose step takes one, as the pipelines' prepare_extra_step_kwargs
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generators} if takes_generator else {}
    if hasattr(scheduler, "noise_sampler_seed"):  # DPM++ SDE: a Brownian path per row, seeded as the engine's
        scheduler.noise_sampler_seed = list(seeds)
    first, end = guidance_window(*guidance_interval, len(scheduler.timesteps))
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        model_output = torch.empty_like(latents)
        guiding = first <= i < end
        for start in range(0, len(captions), chunk_rows):
            rows = slice(start, start + chunk_rows)
            x = model_input[rows]
            unguided = scale[rows] == 0  # s = 0: the unconditional model at every step
            if not guiding and not unguided.any():
                model_output[rows] = unet(x, t, cond[rows]).sample
                continue
            out_uncond, out_cond = unet(torch.cat([x, x]), t, torch.cat([uncond[rows], cond[rows]])).sample.chunk(2)
            if not guiding:
                model_output[rows] = torch.where(unguided, out_uncond, out_cond)
                continue
            guided = out_uncond + scale[rows] * (out_cond - out_uncond)
            if rescaled_rows[rows].any():
                rescaled = rescale_guidance(guided, out_cond, guidance_rescale)
                guided = torch.where(rescaled_rows[rows, None, None, None], rescaled, guided)
            model_output[rows] = guided
        latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
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


def markdown_table(rows: list[tuple[str, int, float, dict[str, float], float]], count: int) -> str:
    """rows: (sampler, steps, guidance scale, scores, clipped share)."""
    chance = chance_levels()
    lines = [
        "| sampler | steps | guidance | colour right | shape right | background right | all three right "
        "| clipped channel values |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for sampler, steps, scale, result, clipped in rows:
        lines.append(
            f"| {sampler} | {steps} | {scale:g} | {result['colour']:.1%} | {result['shape']:.1%} "
            f"| {result['background']:.1%} | **{result['all']:.1%}** | {clipped:.2%} |"
        )
    lines.append(
        f"| chance | | | {chance['colour']:.1%} | {chance['shape']:.1%} | {chance['background']:.1%} "
        f"| {chance['all']:.1%} | |"
    )
    return "\n".join(lines) + f"\n\n{count} pictures per row."


def cost_table(rows: list[tuple[str, int, float, float | None]]) -> str:
    """rows: (sampler, steps, all three right at COST_SCALE, engine images/s or None)."""
    lines = [
        f"| sampler | steps | all three right at guidance {COST_SCALE:g} | engine images/s, 16 in flight |",
        "| --- | ---: | ---: | ---: |",
    ]
    for sampler, steps, right, speed in rows:
        lines.append(f"| {sampler} | {steps} | **{right:.1%}** | {'' if speed is None else f'{speed:.2f}'} |")
    return "\n".join(lines)


def write_docs(doc_path: Path, section: str) -> None:
    text = doc_path.read_text() if doc_path.exists() else f"# The default model\n\n{EVAL_START}\n{EVAL_END}\n"
    if EVAL_START not in text:
        text += f"\n{EVAL_START}\n{EVAL_END}\n"
    before, rest = text.split(EVAL_START, 1)
    after = rest.split(EVAL_END, 1)[1] if EVAL_END in rest else ""
    doc_path.write_text(f"{before}{EVAL_START}\n{section}\n{EVAL_END}{after}")


def evaluate(
    model: ShapesModel,
    captions: list[str],
    seed: int,
    sampler: str,
    steps: int,
    scales: tuple[float, ...],
    guidance_rescale: float,
    guidance_interval: tuple[float, float] = EVERY_STEP,
) -> tuple[dict[float, dict[str, float]], dict[float, float], dict[float, np.ndarray]]:
    """Scores, clipped share and pixels per scale: every caption at every scale, noise seed seed + caption index."""
    rows = [(caption, scale, seed + i) for scale in scales for i, caption in enumerate(captions)]
    pixels, unclipped = sample(
        model,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        steps,
        sampler=sampler,
        guidance_rescale=guidance_rescale,
        guidance_interval=guidance_interval,
    )
    results, clipped, pixels_by_scale = {}, {}, {}
    for k, scale in enumerate(scales):
        part = slice(k * len(captions), (k + 1) * len(captions))
        pixels_by_scale[scale] = pixels[part]
        results[scale] = score(captions, pixels[part])
        outside = (unclipped[part] < -CLIP_MARGIN) | (unclipped[part] > 1 + CLIP_MARGIN)
        clipped[scale] = float(outside.mean())
    return results, clipped, pixels_by_scale


def main(argv: list[str] | None = None) -> None:
    from benchmarks.bench_samplers import COST_CONFIGS, sampler_throughput
    from services.worker.loading import read_defaults

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/shapes-ldm"))
    parser.add_argument("--sampler", default="ddim", help="the sampler of the guidance table")
    parser.add_argument("--steps", type=int, default=50, help="its steps")
    parser.add_argument(
        "--seed", type=int, default=HELD_OUT_SEED, help=f"picture i uses noise seed seed + i (tuning: {TUNING_SEED})"
    )
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="φ where guidance > 1 (default: the model's latentd.json default, else 0)",
    )
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("START", "STOP"),
        default=None,
        help="guidance_start and guidance_stop (default: the model's latentd.json defaults, else 0 1)",
    )
    parser.add_argument(
        "--captions",
        choices=("full", "short", "sized"),
        default="full",
        help="full: 108 with size + 54 without; short: 54 with one size word + 54 without; sized: the 54 with a size word",
    )
    parser.add_argument("--no-cost", action="store_true", help="skip the other samplers and the engine timing")
    parser.add_argument("--docs", type=Path, default=DOCS_DIR, help="where model.md and contact_sheet.png go")
    parser.add_argument("--readme", type=Path, default=README, help="the README whose eval section is rewritten")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to go faster")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    started = time.monotonic()
    scheduler_config = json.loads((args.model / "scheduler" / "scheduler_config.json").read_text())
    defaults = read_defaults(args.model, scheduler_config)
    rescale = defaults["default_guidance_rescale"] if args.guidance_rescale is None else args.guidance_rescale
    interval = args.guidance_interval or (defaults["default_guidance_start"], defaults["default_guidance_stop"])
    interval = (float(interval[0]), float(interval[1]))
    model = ShapesModel.load(args.model).to(args.device)
    captions = eval_captions(args.captions)
    results, clipped, pixels_by_scale = evaluate(
        model, captions, args.seed, args.sampler, args.steps, GUIDANCE_SCALES, rescale, interval
    )
    rows = [(args.sampler, args.steps, scale, results[scale], clipped[scale]) for scale in GUIDANCE_SCALES]
    cost_rows: list[tuple[str, int, float, float | None]] = []
    speeds: dict[str, float] = {}
    if not args.no_cost:
        for sampler, steps in COST_CONFIGS:
            if (sampler, steps) == (args.sampler, args.steps):
                right = results[COST_SCALE]["all"]
            else:
                other, other_clipped, _ = evaluate(
                    model, captions, args.seed, sampler, steps, (COST_SCALE,), rescale, interval
                )
                rows.append((sampler, steps, COST_SCALE, other[COST_SCALE], other_clipped[COST_SCALE]))
                right = other[COST_SCALE]["all"]
            cost_rows.append((sampler, steps, right, None))
    pictures = sum(len(captions) for _ in rows)
    sampled_s = time.monotonic() - started
    if not args.no_cost:
        speeds = sampler_throughput(args.model, device=args.device)
        cost_rows = [(sampler, steps, right, speeds[f"{sampler} {steps}"]) for sampler, steps, right, _ in cost_rows]
    command = "python -m training.evaluate" + (
        "" if args.model == Path("models/shapes-ldm") else f" --model {args.model}"
    )
    where = "a 2-core CPU" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    table = markdown_table(rows, len(captions))
    rescale_note = f"guidance rescale {rescale:g} where guidance > 1" if rescale else "no guidance rescale"
    if interval != EVERY_STEP:
        rescale_note += (
            f", guidance interval [{interval[0]:g}, {interval[1]:g}): the mix at steps int({interval[0]:g}·n) <= i < "
            f"int({interval[1]:g}·n) of a job's n, the conditional prediction alone at the others"
        )
    section = (
        f"Made by `{command}` (`make eval-model`): {len(captions)} captions ({args.captions} grammar), noise seed "
        f"{args.seed} + caption index (held out: never used to train or tune), the same noise in every row, "
        f"eta 0, {rescale_note}; {pictures} pictures in {sampled_s / 60:.1f} min on {where}. A picture is right "
        f"when the read-back of training/readback.py (docs/shapes.md) matches its caption; 'clipped' is the share of decoder "
        f"channel values more than 8/255 outside [0, 1].\n\n{table}"
    )
    if cost_rows:
        section += (
            "\n\nQuality per cost, from the same run: images/s through the engine with 16 one-image requests in "
            f"flight (guidance {COST_SCALE:g}, `benchmarks/bench_samplers.py`, best of 3; 1-minute load average "
            f"{os.getloadavg()[0]:.1f} at the end on a CPU shared with other work, so expect ±30 %):\n\n"
            f"{cost_table(cost_rows)}"
        )
    print(table)
    if cost_rows:
        print(cost_table(cost_rows))
    print(
        json.dumps(
            {
                "model": str(args.model),
                "seed": args.seed,
                "guidance_rescale": rescale,
                "guidance_interval": interval,
                "all_three_right": {f"{s} {n} @{g:g}": round(r["all"], 4) for s, n, g, r, _ in rows},
                "engine_images_per_s_16_in_flight": {k: round(v, 3) for k, v in speeds.items()},
                "sampling_s": round(sampled_s, 1),
            }
        )
    )
    if not args.no_docs:
        # One row per colour x shape (18), the background and the size word (small, large, none) rotating.
        per_combo = len(captions) // 54
        sheet_rows = [j * per_combo + (j // 3) % per_combo for j in range(54) if j % 3 == (j // 3) % 3]
        contact_sheet(captions, pixels_by_scale, sheet_rows, args.docs / "contact_sheet.png")
        write_docs(args.docs / "model.md", section + "\n\n![contact sheet](contact_sheet.png)")
        if args.readme.exists() and EVAL_START in args.readme.read_text():
            write_docs(
                args.readme, section + "\n\n![contact sheet: captions × guidance scales](docs/contact_sheet.png)"
            )
        print(f"wrote {args.docs / 'model.md'}, {args.readme} and {args.docs / 'contact_sheet.png'}")


if __name__ == "__main__":
    main()
