"""The measurements behind docs/model.md's "what was measured" (tuning seeds, never the held-out ones).

    python -m training.levers sweep --model models/shapes-ldm '[{"rescale": 0.7}, {"sampler": "dpmpp_2m", "steps": 20}]'
    python -m training.levers pair --model models/shapes-ldm '[[{"sampler": "dpmpp_2m", "steps": 20}, {"sampler": "dpmpp_2m", "steps": 20, "rescale": 0.3}]]'
    python -m training.levers dpm-orders --model models/shapes-ldm   # DPM-Solver++ 2M at 20 with the order forced per step
    python -m training.levers vae-squares --model models/shapes-ldm  # does the VAE keep small shapes readable?
    python -m training.levers step-time                              # a UNet training step with and without 16x16 attention

`sweep` takes a JSON list of settings: sampler, steps (50), scale (7.5), rescale (0), interval (the guidance
interval [start, stop], fractions of the steps; [0, 1]: every step, whatever the model's latentd.json says), config
(scheduler config keys laid over the model's, e.g. {"lambda_min_clipped": -5.1}); each prints one JSON line with the
share right over the 162 captions, noise seed --seed + caption index (default: the tuning seeds). `pair` takes a
list of [first, second] settings and counts the pictures each gets right that the other does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from services.common.rules import EVERY_STEP, GUIDED_AT_EVERY_STEP
from training.evaluate import TUNING_SEED, ShapesModel, eval_captions, sample, score


def sample_setting(model: ShapesModel, base: dict, captions: list[str], seed: int, setting: dict) -> np.ndarray:
    """The pictures of one sweep setting (sampler, steps, scale, rescale, interval, config) over the captions."""
    from diffusers import DDIMScheduler

    model.scheduler = DDIMScheduler.from_config({**base, **setting.get("config", {})})
    scale = setting.get("scale", 7.5)
    pixels, _ = sample(
        model,
        captions,
        [scale] * len(captions),
        [seed + i for i in range(len(captions))],
        setting.get("steps", 50),
        sampler=setting.get("sampler", "ddim"),
        guidance_rescale=setting.get("rescale", 0.0),
        guidance_interval=tuple(setting.get("interval", EVERY_STEP)),
    )
    return pixels


def sweep(model_dir: Path, seed: int, settings: list[dict], captions_kind: str = "full") -> None:
    model = ShapesModel.load(model_dir)
    base = dict(model.scheduler.config)
    captions = eval_captions(captions_kind)
    for setting in settings:
        started = time.monotonic()
        pixels = sample_setting(model, base, captions, seed, setting)
        right = {k: round(v * 100, 1) for k, v in score(captions, pixels).items()}
        print(json.dumps({**setting, "seed": seed, **right, "s": round(time.monotonic() - started)}), flush=True)


def pair(model_dir: Path, seed: int, pairs: list[list[dict]]) -> None:
    """Two settings on the same pictures (same captions and noise): the share right under each, and how many
    pictures the second gets right that the first does not (gained) and the reverse (lost). A difference of a few
    pictures with both counts large is noise; see docs/model.md."""
    model = ShapesModel.load(model_dir)
    base = dict(model.scheduler.config)
    captions = eval_captions("full")
    for first, second in pairs:
        started = time.monotonic()
        right = [
            [score([caption], picture[None])["all"] == 1 for caption, picture in zip(captions, pixels)]
            for pixels in (sample_setting(model, base, captions, seed, setting) for setting in (first, second))
        ]
        gained = sum(not a and b for a, b in zip(*right))
        lost = sum(a and not b for a, b in zip(*right))
        shares = [round(100 * sum(r) / len(captions), 1) for r in right]
        out = {"first": first, "second": second, "seed": seed, "all": shares, "gained": gained, "lost": lost}
        print(json.dumps({**out, "s": round(time.monotonic() - started)}), flush=True)


def dpm_orders(model_dir: Path, seed: int, steps: int = 20) -> None:
    """DPM-Solver++ 2M through the engine with its per-step order forced: as planned (2M), first order
    everywhere (= DDIM), 2M in the first half only, in the second half only."""
    from services.worker.engine.engine import Engine
    from services.worker.engine.requests import GenerationRequest
    from services.worker.loading import load_model
    from training.readback import read_back
    from training.shapes import parse_caption

    captions = eval_captions("full")
    for mode in ("as planned", "first order everywhere", "2M in the first half", "2M in the second half"):
        engine = Engine(load_model(model_dir)).start()
        sampler = engine.samplers["dpmpp_2m"]
        planned = sampler._plan

        def plan(n, planned=planned, mode=mode):
            p = planned(n)
            if mode == "first order everywhere":
                return dataclasses.replace(p, orders=(1,) * n)
            if mode == "2M in the first half":
                return dataclasses.replace(p, orders=tuple(o if i < n // 2 else 1 for i, o in enumerate(p.orders)))
            if mode == "2M in the second half":
                return dataclasses.replace(p, orders=tuple(o if i >= n // 2 else 1 for i, o in enumerate(p.orders)))
            return p

        sampler.plan = functools.lru_cache(maxsize=None)(plan)
        handles = [
            engine.submit(
                GenerationRequest(
                    request_id=str(i),
                    prompt=c,
                    seed=seed + i,
                    num_inference_steps=steps,
                    sampler="dpmpp_2m",
                    **GUIDED_AT_EVERY_STEP,  # as measured before the model had an interval
                )
            )
            for i, c in enumerate(captions)
        ]
        right = 0
        for caption, handle in zip(captions, handles):
            wanted, got = parse_caption(caption), read_back(handle.result().images[0])
            right += (got.colour, got.shape, got.background) == (
                wanted["colour"],
                wanted["shape"],
                wanted["background"],
            )
        engine.stop()
        print(json.dumps({"dpmpp_2m": steps, "orders": mode, "all": round(100 * right / len(captions), 1)}), flush=True)


def vae_squares(model_dir: Path, count: int = 100, seed: int = 777) -> None:
    """Share of pictures whose shape reads back right before and after a VAE round trip, per size and shape."""
    from diffusers import AutoencoderKL

    from training.readback import read_back
    from training.shapes import SHAPES, SIZES, random_scene, render
    from training.train import to_model_range

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    rng = random.Random(seed)
    for size in SIZES:
        for shape in SHAPES:
            pixels = np.stack([np.asarray(render(random_scene(rng, size=size, shape=shape))) for _ in range(count)])
            with torch.no_grad():
                x = to_model_range(pixels)
                out = vae.decode(vae.encode(x).latent_dist.mode()).sample
            out = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            before = np.mean([read_back(p).shape == shape for p in pixels])
            after = np.mean([read_back(p).shape == shape for p in out])
            print(json.dumps({"size": size, "shape": shape, "right_before": before, "right_after_vae": after}))


def step_time(repeats: int = 5) -> None:
    """Seconds per training step (batch 64, forward + backward + AdamW) of the shipped UNet config and of the
    same with cross-attention blocks at the 16x16 level too."""
    from diffusers import UNet2DConditionModel

    def unet(down, up):
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=16,
            norm_num_groups=16,
        )

    variants = {
        "shipped": unet(
            ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "attention at 16x16 too": unet(("CrossAttnDownBlock2D",) * 3, ("CrossAttnUpBlock2D",) * 3),
    }
    for name, model in variants.items():
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        x, t, c = torch.randn(64, 4, 16, 16), torch.randint(0, 1000, (64,)), torch.randn(64, 16, 64)
        for i in range(repeats + 1):
            if i == 1:
                started = time.perf_counter()
            loss = model(x, t, c).sample.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        per_step = (time.perf_counter() - started) / repeats
        print(
            json.dumps(
                {
                    "unet": name,
                    "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                    "s_per_step": round(per_step, 3),
                }
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("sweep", "pair", "dpm-orders", "vae-squares", "step-time"))
    parser.add_argument(
        "settings", nargs="?", default="[{}]", help="sweep: a JSON list of settings; pair: a list of [first, second]"
    )
    parser.add_argument("--model", type=Path, default=Path("models/shapes-ldm"))
    parser.add_argument("--seed", type=int, default=TUNING_SEED, help="picture i uses noise seed seed + i")
    # intermixed: the settings may follow --model, as the docstring's commands write them (plain parse_args
    # fills the optional positional with its default at `sweep` and then rejects the JSON as unrecognised)
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(2)
    if args.what == "sweep":
        sweep(args.model, args.seed, json.loads(args.settings))
    elif args.what == "pair":
        pair(args.model, args.seed, json.loads(args.settings))
    elif args.what == "dpm-orders":
        dpm_orders(args.model, args.seed)
    elif args.what == "vae-squares":
        vae_squares(args.model)
    else:
        step_time()


if __name__ == "__main__":
    main()
