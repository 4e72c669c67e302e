"""Images/s through the engine, 16 requests in flight, for each sampler configuration of the quality-per-cost
table (COST_CONFIGS: DDIM 50, DPM-Solver++(2M) at 20 and at 10, ..., DPM++ SDE at 10 and 15; guidance 7.5, the
default model's evaluation captions), at the model's defaults (its guidance interval included). `make eval-model` runs this after
the accuracy columns and prints both in one JSON line. Alone it also measures, interleaved, the same
configurations guided at every step (guidance_start 0, guidance_stop 1): the baseline the interval's saving is
read against.

    python -m benchmarks.bench_samplers                 # models/shapes-ldm
    python -m benchmarks.bench_samplers --model PATH --requests 16
    python -m benchmarks.bench_samplers --brownian      # DPM++ SDE's Brownian paths: torchsde's cache, ours vs its own
    python -m benchmarks.bench_samplers --sensitivity   # how far a 1e-6 change of the starting noise moves a picture

--sensitivity measures, per sampler, diffusers' own pipeline (float32, CPU) on the model against itself from starting
noise scaled by 1 + 1e-6, at 20 steps guided at 7.5 at every step, over the model's guidance interval, and unguided: a
sampler whose picture moves far from so small a change cannot be compared with another implementation (another
rounding) by PSNR there (tests/gpu); and the PSNR of two different starting noises, which any bound must clear.

--brownian times one request's Brownian path alone (its 2n − 1 queries, as the sampler makes them on a Karras-like
σ̂ schedule) at torchsde's default cache of 45 intervals and at dpmpp_sde.CACHE_SIZE, interleaved, for 10 to 50 steps
and 16×16 and 64×64 latents, and checks the two give the same noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from services.common.rules import EVERY_STEP
from services.worker.diffusion import dpmpp_sde
from services.worker.engine.engine import Engine
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import load_model

DEFAULT_MODEL = Path("models/shapes-ldm")
# (sampler, steps): the configurations the README compares
COST_CONFIGS: tuple[tuple[str, int], ...] = (
    ("ddim", 50),
    ("dpmpp_2m", 20),
    ("dpmpp_2m", 10),
    ("dpmpp_2m_sde", 30),
    ("unipc", 20),
    ("euler", 30),
    ("euler_ancestral", 30),
    ("dpmpp_sde", 10),
    ("dpmpp_sde", 15),
    ("dpmpp_sde_karras", 15),
)
PROMPTS = (
    "a large red circle on a white background",
    "a small blue square on a gray background",
    "a green triangle on a black background",
    "a small yellow square on a white background",
)


def engine_images_per_second(
    engine: Engine,
    sampler: str,
    steps: int,
    requests: int = 16,
    guidance_scale: float = 7.5,
    seed: int = 0,
    prompts: tuple[str, ...] = PROMPTS,
    interval: tuple[float, float] | None = None,
) -> float:
    """Submit `requests` one-image requests at once (all in flight together) and time them to the last."""
    batch = [
        GenerationRequest(
            request_id=f"bench-{sampler}-{steps}-{i}",
            prompt=prompts[i % len(prompts)],
            seed=seed + i,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            **({} if interval is None else {"guidance_start": interval[0], "guidance_stop": interval[1]}),
        )
        for i in range(requests)
    ]
    started = time.perf_counter()
    handles = [engine.submit(r) for r in batch]
    for handle in handles:
        handle.result()
    return requests / (time.perf_counter() - started)


def sampler_throughput(
    model_path: Path,
    configs=COST_CONFIGS,
    requests: int = 16,
    device: str = "cpu",
    repeats: int = 3,
    every_step: bool = False,
) -> dict[str, float]:
    """{"<sampler> <steps>": images/s} through one engine on the model at its defaults, and with `every_step`
    {"<sampler> <steps> guided at every step": ...} too (the best of `repeats` runs each, runs interleaved across
    configurations, so a burst of load on a shared machine hits all of them alike)."""
    model = load_model(model_path, device=device)
    engine = Engine(model, max_batch_rows=64).start()
    try:
        for sampler, _ in configs:  # warm-up: first-call costs of each row count and sampler
            engine_images_per_second(engine, sampler, 2, requests=2)
        best: dict[str, float] = {}
        intervals = {"": None} | ({" guided at every step": EVERY_STEP} if every_step else {})
        for _ in range(repeats):
            for sampler, steps in configs:
                for suffix, interval in intervals.items():
                    key = f"{sampler} {steps}{suffix}"
                    speed = engine_images_per_second(engine, sampler, steps, requests, interval=interval)
                    best[key] = max(best.get(key, 0.0), speed)
        return best
    finally:
        engine.stop()


TORCHSDE_CACHE_SIZE = 45  # BrownianInterval's default, as diffusers' BrownianTreeNoiseSampler makes it


def brownian_path_ms(steps: int, side: int, cache_size: int, paths: int = 10) -> tuple[float, torch.Tensor]:
    """Milliseconds per request's Brownian path of `steps` steps over (1, 4, side, side) latents, and the noise of
    its last path (to compare)."""
    sigmas = np.exp(np.linspace(np.log(14.6), np.log(0.03), steps)).astype(np.float32).tolist()
    started = time.perf_counter()
    for seed in range(paths):
        path = dpmpp_sde.BrownianNoise(torch.zeros(1, 4, side, side), sigmas[-1], sigmas[0], seed, cache_size)
        noise = [
            path.step_noise(sigmas[i], sigmas[i + 1], halfway) for i in range(steps - 1) for halfway in (True, False)
        ]
    return (time.perf_counter() - started) / paths * 1000, torch.stack(noise)


def brownian_figures(repeats: int = 3) -> dict[str, dict[str, float]]:
    """{"<steps> steps, <side>x<side>": {"torchsde default (45) ms": ..., "ours (N) ms": ..., "speed-up": ...}}, the
    best of `repeats` interleaved runs; raises if the two caches give different noise."""
    figures = {}
    for steps in (10, 15, 30, 50):
        for side in (16, 64):
            best = {TORCHSDE_CACHE_SIZE: float("inf"), dpmpp_sde.CACHE_SIZE: float("inf")}
            noises = {}
            for _ in range(repeats):
                for size in best:
                    ms, noises[size] = brownian_path_ms(steps, side, size)
                    best[size] = min(best[size], ms)
            if not torch.equal(*noises.values()):
                raise AssertionError(f"the cache changed the noise at {steps} steps, {side}x{side}")
            figures[f"{steps} steps, {side}x{side}"] = {
                f"torchsde default ({TORCHSDE_CACHE_SIZE}) ms": round(best[TORCHSDE_CACHE_SIZE], 1),
                f"ours ({dpmpp_sde.CACHE_SIZE}) ms": round(best[dpmpp_sde.CACHE_SIZE], 1),
                "speed-up": round(best[TORCHSDE_CACHE_SIZE] / best[dpmpp_sde.CACHE_SIZE], 2),
            }
    return figures


def sensitivity(model: Path, samplers: tuple[str, ...] = ("ddim", "plms", "unipc", "euler_ancestral")) -> dict:
    """PSNR (dB) of the pipeline's picture (float32, CPU, 20 steps) against the same with its starting noise scaled
    by 1 + 1e-6: guided at 7.5 at every step, over the model's guidance interval, and unguided; and, for scale, against
    the picture of another starting noise (guided over the interval)."""
    from diffusers import StableDiffusionPipeline

    from services.worker.diffusion.samplers import diffusers_scheduler
    from tests.fixtures.guidance import pipeline_images_with_interval
    from tests.fixtures.pictures import pixels, psnr

    loaded = load_model(model)
    interval = (loaded.default_guidance_start, loaded.default_guidance_stop)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    shape = (1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    noise, other = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in (1234, 1235))

    def picture(latents, start: float, stop: float, guidance: float = 7.5):
        return pixels(
            pipeline_images_with_interval(
                pipe, PROMPTS[0], steps=20, seed=0, guidance_scale=guidance, start=start, stop=stop, latents=latents
            )
        )

    def shown(measured: float):
        return round(measured, 1) if np.isfinite(measured) else "identical"

    figures = {}
    for sampler in samplers:
        pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
        for label, (start, stop, guidance) in {
            "guided at every step": (0.0, 1.0, 7.5),
            f"guided over {interval[0]:g}-{interval[1]:g}": (*interval, 7.5),
            "unguided": (0.0, 1.0, 1.0),
        }.items():
            base = picture(noise, start, stop, guidance)
            figures[f"{sampler} {label}"] = shown(psnr(base, picture(noise * (1 + 1e-6), start, stop, guidance)))
            if label.startswith("guided over"):
                figures[f"{sampler} {label}, another noise"] = shown(psnr(base, picture(other, start, stop, guidance)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--brownian", action="store_true", help="time DPM++ SDE's Brownian paths only")
    parser.add_argument("--sensitivity", action="store_true", help="PSNR after a 1e-6 change of the starting noise")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.brownian:
        print(json.dumps({"brownian_path": brownian_figures(), "load_average_1min": round(os.getloadavg()[0], 2)}))
        return
    if args.sensitivity:
        print(json.dumps({"model": str(args.model), "psnr_db_float32_cpu": sensitivity(args.model)}))
        return
    figures = sampler_throughput(args.model, requests=args.requests, device=args.device, every_step=True)
    print(
        json.dumps(
            {
                "model": str(args.model),
                "device": args.device,
                "requests_in_flight": args.requests,
                "guidance_scale": 7.5,
                "engine_images_per_s": {k: round(v, 3) for k, v in figures.items()},
                "load_average_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
