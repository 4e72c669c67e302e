"""Engine benchmark: diffusers' pipeline vs the engine one at a time vs the engine with 16 in flight.

All three arms run the same request list (mixed step counts 20-50 and guidance 1 / 3 / 7.5) on the
same model in one process, and the script prints images/s per arm and the ratios as one JSON line.

    python -m benchmarks.bench_engine                 # models/shapes-ldm if present, else a tiny model
    python -m benchmarks.bench_engine --model PATH
    python -m benchmarks.bench_engine --sd15          # SD-1.5-sized random weights, 512x512 fp16 (CUDA)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from services.worker.engine.engine import Engine
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import load_model

DEFAULT_MODEL = Path("models/shapes-ldm")
PROMPTS = [
    "a large red circle on a white background",
    "a blue square on a gray background",
    "a small yellow triangle on a black background",
    "a green circle on a white background",
]


def request_list(count: int, seed: int, max_steps: int) -> list[GenerationRequest]:
    rng = random.Random(seed)
    return [
        GenerationRequest(
            request_id=f"bench-{i}",
            prompt=PROMPTS[i % len(PROMPTS)],
            seed=1000 + i,
            num_inference_steps=min(max_steps, rng.randint(20, 50)),
            guidance_scale=(1.0, 3.0, 7.5)[i % 3],
        )
        for i in range(count)
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def arm_pipeline(pipe, requests: list[GenerationRequest], device: str) -> float:
    sync(device)
    started = time.perf_counter()
    for r in requests:
        pipe(
            r.prompt,
            negative_prompt=r.negative_prompt or None,
            num_inference_steps=r.num_inference_steps,
            guidance_scale=r.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(r.seed),
        )
    sync(device)
    return time.perf_counter() - started


def arm_engine_sequential(engine: Engine, requests: list[GenerationRequest], device: str) -> float:
    sync(device)
    started = time.perf_counter()
    for r in requests:
        engine.submit(r).result()
    sync(device)
    return time.perf_counter() - started


def arm_engine_in_flight(engine: Engine, requests: list[GenerationRequest], device: str) -> float:
    sync(device)
    started = time.perf_counter()
    handles = [engine.submit(r) for r in requests]
    for handle in handles:
        handle.result()
    sync(device)
    return time.perf_counter() - started


def build_sd15(folder: Path) -> Path:
    """An SD-1.5-sized model (UNet 860M, ViT-L/14 text encoder, SD VAE) from config, random weights, fp16."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.fixtures.tiny_model import write_tiny_tokenizer

    write_tiny_tokenizer(folder / "tokenizer")
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = 77
    config_path.write_text(json.dumps(config))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=None, help="diffusers folder (default: models/shapes-ldm or tiny)"
    )
    parser.add_argument("--sd15", action="store_true", help="SD-1.5-sized random UNet at 512x512 fp16 on CUDA")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=50, help="cap on the 20-50 step counts (quick runs)")
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    tmp = tempfile.TemporaryDirectory()
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    if args.sd15:
        if not args.device.startswith("cuda"):
            parser.error("--sd15 needs a CUDA device (512x512 fp16)")
        model_path = build_sd15(Path(tmp.name) / "sd15-random")
    elif args.model is not None:
        model_path = args.model
    elif (DEFAULT_MODEL / "model_index.json").is_file():
        model_path = DEFAULT_MODEL
    else:
        from tests.fixtures.tiny_model import build_tiny_model

        model_path = build_tiny_model(Path(tmp.name) / "tiny-sd")

    model = load_model(model_path, device=args.device, dtype=dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        model_path, dtype=dtype, safety_checker=None, requires_safety_checker=False, use_safetensors=True
    )
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)

    requests = request_list(args.requests, args.seed, args.max_steps)
    # both row shapes (guidance 1: one row, else two) for both arms, so no arm pays first-call setup
    warmup = [
        GenerationRequest(
            request_id=f"warmup-{scale}", prompt=PROMPTS[0], seed=0, num_inference_steps=2, guidance_scale=scale
        )
        for scale in (1.0, 7.5)
    ]
    engine = Engine(model, max_batch_rows=args.max_batch_rows).start()
    with torch.inference_mode():
        arm_pipeline(pipe, warmup, args.device)
    arm_engine_sequential(engine, warmup, args.device)

    # The CPU here is shared (a model trains beside it), so load drifts over a run: A and B alternate
    # request by request (and which goes first), and C runs once before and once after them (mean).
    time_c_before = arm_engine_in_flight(engine, requests, args.device)
    time_a = time_b = 0.0
    for i, r in enumerate(requests):
        for arm in ("a", "b") if i % 2 == 0 else ("b", "a"):
            if arm == "a":
                with torch.inference_mode():
                    time_a += arm_pipeline(pipe, [r], args.device)
            else:
                time_b += arm_engine_sequential(engine, [r], args.device)
    time_c = (time_c_before + arm_engine_in_flight(engine, requests, args.device)) / 2
    engine.stop()

    images = sum(r.num_images for r in requests)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    a, b, c = images / time_a, images / time_b, images / time_c
    print(
        json.dumps(
            {
                "model": "sd15-random-512-fp16"
                if args.sd15
                else str(model_path if args.model or model_path == DEFAULT_MODEL else "tiny-sd (built from config)"),
                "device": f"{args.device} ({device_name}, {torch.get_num_threads()} threads)",
                "requests": len(requests),
                "images": images,
                "unet_steps": sum(r.num_inference_steps for r in requests),
                "a_pipeline_sequential_images_per_s": round(a, 3),
                "b_engine_one_at_a_time_images_per_s": round(b, 3),
                "c_engine_16_in_flight_images_per_s": round(c, 3),
                "b_over_a": round(b / a, 2),
                "c_over_a": round(c / a, 2),
                "seconds": {
                    "a": round(time_a, 2),
                    "b": round(time_b, 2),
                    "c": round(time_c, 2),
                    "c_before_ab": round(time_c_before, 2),
                },
            }
        )
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
