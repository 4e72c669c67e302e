"""Engine benchmark: diffusers' pipeline against the engine, in one process on one device, one JSON line.

The CPU comparison (`make bench-engine`): A = diffusers' pipeline once per request, B = the engine one at a
time, C = the engine with 16 in flight, all on the same request list (mixed step counts 20-50 and guidance
1 / 3 / 7.5), the engine configured as a worker on this device configures it (settings' defaults).

The GPU arms (`--sd15`, issue 16; `--tiny` runs the same arms on the tiny model on the CPU in seconds):
  (a) diffusers' pipeline with its UNet compiled, one request at a time, on the mixed list;
  (b) the same compiled pipeline called once with a static batch of 16 identical prompts, 50 guided steps;
  (c) the engine with those 16 identical requests in flight;
  (d) the engine with the mixed list, 16 and 32 requests in flight;
  (e) the bare compiled UNet at 32 rows (16 guided images per call): the bound;
  and the engine one request at a time on the mixed list (against (a)), the engine's and the pipeline's
  compile warm-up, and the VAE decode's share of (c). Each arm prints a line as it ends (`# arm ...`).

    python -m benchmarks.bench_engine                 # models/shapes-ldm if present, else a tiny model
    python -m benchmarks.bench_engine --model PATH
    python -m benchmarks.bench_engine --sd15          # SD-1.5-sized random weights, 512x512 fp16 (CUDA)
    python -m benchmarks.bench_engine --tiny          # the --sd15 arms on the tiny model (CPU, compile off)
    python -m benchmarks.bench_engine --sd15 --warm-up-only   # a worker's warm-up alone (again: on warm caches)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from services.common.rules import GUIDED_AT_EVERY_STEP
from services.worker.engine.compiled import SpeedOptions, parse_buckets, resolve_compile_mode, warmup_inputs
from services.worker.engine.engine import Engine
from services.worker.engine.requests import GenerationRequest
from services.worker.loading import load_model

DEFAULT_MODEL = Path("models/shapes-ldm")
# --sd15's folder, built once per machine (random weights from a fixed seed: the same model every time), so a GPU
# session's second stage does not build it again
SD15_FOLDER = Path(tempfile.gettempdir()) / "latentd-sd15-random"


def sd15_folder() -> Path:
    if not (SD15_FOLDER / "model_index.json").is_file():
        building = Path(tempfile.mkdtemp(dir=SD15_FOLDER.parent, prefix=SD15_FOLDER.name + "."))
        build_sd15(building)
        shutil.rmtree(SD15_FOLDER, ignore_errors=True)
        building.rename(SD15_FOLDER)  # whole or not at all: a cut build leaves no folder that looks finished
    return SD15_FOLDER


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
            **GUIDED_AT_EVERY_STEP,  # as the pipeline, whatever the model recommends: both arms do the same work
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


def arm_static_batch(pipe, prompt: str, seeds: list[int], steps: int, device: str) -> float:
    """(b): one pipeline call with len(seeds) identical prompts, guided (7.5), each image its own generator."""
    sync(device)
    started = time.perf_counter()
    pipe(
        [prompt] * len(seeds),
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
    )
    sync(device)
    return time.perf_counter() - started


def time_calls(fn, device: str, repeats: int) -> float:
    """Seconds per call of fn(), after one untimed call."""
    fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - started) / repeats


def report(name: str, value) -> None:
    print(f"# arm {name}: {value}", flush=True)


def run_arms(args, model_path: Path, label: str, dtype: torch.dtype) -> dict:
    """The issue-16 arms (a)-(e) on one model, in one process; images/s per arm and the ratios."""
    from diffusers import StableDiffusionPipeline

    device = args.device
    cuda = device.startswith("cuda")
    compile_mode = resolve_compile_mode(args.compile, device)
    steps = args.static_steps
    static = args.static_batch
    model = load_model(model_path, device=device, dtype=dtype)
    speed = SpeedOptions(
        buckets=parse_buckets(args.buckets) if compile_mode is not None else (),
        compile_mode=compile_mode,
        compile_dynamic=not args.static_graphs,
        channels_last=cuda and compile_mode is not None,
        finite_check_every=8 if cuda else 1,
        output_thread=True,
    )
    engine = Engine(model, max_batch_rows=args.max_batch_rows, **speed.engine_kwargs()).start()
    warm = engine.warm_up()
    report("engine warm-up", warm)
    if args.warm_up_only:  # a worker's start, e.g. again on the compile caches an earlier run left
        engine.stop()
        return {"model": label, "compile": compile_mode, "warm_up_s": {k: round(v, 1) for k, v in warm.items()}}

    pipe = StableDiffusionPipeline.from_pretrained(
        model_path, dtype=dtype, safety_checker=None, requires_safety_checker=False, use_safetensors=True
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    if compile_mode is not None:
        if cuda:
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, dynamic=None if not args.static_graphs else False)
    started = time.perf_counter()
    with torch.inference_mode():  # every shape the pipeline arms use: 1 and 2 rows, and the static batch
        for scale in (1.0, 7.5):
            pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=scale)
        pipe([PROMPTS[0]] * static, num_inference_steps=2, guidance_scale=7.5)
    sync(device)
    pipe_warm_s = time.perf_counter() - started
    report("pipeline warm-up s", round(pipe_warm_s, 1))
    engine_warmup = [
        GenerationRequest(request_id=f"warm-{g}", prompt=PROMPTS[0], seed=0, num_inference_steps=2, guidance_scale=g)
        for g in (1.0, 7.5)
    ]
    arm_engine_sequential(engine, engine_warmup, device)

    mixed = request_list(args.requests, args.seed, args.max_steps)
    mixed32 = request_list(2 * args.requests, args.seed + 1, args.max_steps)
    identical = [
        GenerationRequest(
            request_id=f"same-{i}",
            prompt=PROMPTS[0],
            seed=2000 + i,
            num_inference_steps=steps,
            guidance_scale=7.5,
            **GUIDED_AT_EVERY_STEP,
        )
        for i in range(static)
    ]
    images = lambda requests: sum(r.num_images for r in requests)  # noqa: E731
    rates: dict[str, float] = {}
    with torch.inference_mode():
        rates["a_pipeline_compiled_one_at_a_time"] = images(mixed) / arm_pipeline(pipe, mixed, device)
        report("a", rates["a_pipeline_compiled_one_at_a_time"])
        rates["b_pipeline_compiled_static_batch"] = static / arm_static_batch(
            pipe, PROMPTS[0], [2000 + i for i in range(static)], steps, device
        )
        report("b", rates["b_pipeline_compiled_static_batch"])
    rates["c_engine_identical_in_flight"] = static / arm_engine_in_flight(engine, identical, device)
    report("c", rates["c_engine_identical_in_flight"])
    rates["d_engine_mixed_16_in_flight"] = images(mixed) / arm_engine_in_flight(engine, mixed, device)
    report("d16", rates["d_engine_mixed_16_in_flight"])
    rates["d_engine_mixed_32_in_flight"] = images(mixed32) / arm_engine_in_flight(engine, mixed32, device)
    report("d32", rates["d_engine_mixed_32_in_flight"])
    rates["engine_one_at_a_time"] = images(mixed) / arm_engine_sequential(engine, mixed, device)
    report("engine alone", rates["engine_one_at_a_time"])

    # (e) the bound: the engine's own (compiled) backbone at 2·static rows, 16 guided images per call
    rows = 2 * static
    unet_inputs = warmup_inputs(engine, rows)
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(unet_inputs[0].shape, generator=generator).to(device, dtype)
    timesteps = torch.linspace(999, 1, rows).to(device)
    cond = {
        key: torch.randn(value.shape, generator=generator).to(device, value.dtype)
        for key, value in unet_inputs[2].items()
    }
    shape = model.latent_shape(model.native_width, model.native_height)
    decode_latents = torch.randn((static, *shape), generator=generator).to(device)
    # on the engine thread, where its graphs were compiled (and CUDA graphs captured) at warm-up
    unet_s = engine.call(
        lambda _: time_calls(lambda: engine.backbone(latents, timesteps, cond), device, args.unet_repeats)
    ).result()
    decode_s = engine.call(lambda _: time_calls(lambda: engine.decoder(decode_latents), device, 2)).result()
    rates["e_bare_unet_bound"] = static / (steps * unet_s)
    report("e", rates["e_bare_unet_bound"])
    engine.stop()

    r = {key: round(value, 3) for key, value in rates.items()}
    ratio = lambda x, y: round(rates[x] / rates[y], 2)  # noqa: E731
    return {
        "model": label,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": compile_mode or "off",
        "graphs": "per bucket" if args.static_graphs else "dynamic batch",
        "buckets": list(engine.backbone.sizes),
        "requests": len(mixed),
        "static_batch": static,
        "static_steps": steps,
        "images_per_s": r,
        "ratios": {
            "c_over_b": ratio("c_engine_identical_in_flight", "b_pipeline_compiled_static_batch"),
            "c_over_e": ratio("c_engine_identical_in_flight", "e_bare_unet_bound"),
            "d16_over_a": ratio("d_engine_mixed_16_in_flight", "a_pipeline_compiled_one_at_a_time"),
            "d32_over_a": ratio("d_engine_mixed_32_in_flight", "a_pipeline_compiled_one_at_a_time"),
            "alone_over_a": ratio("engine_one_at_a_time", "a_pipeline_compiled_one_at_a_time"),
        },
        "unet_call_ms_at_rows": {str(rows): round(unet_s * 1000, 2)},
        "vae_decode_ms_per_image": round(decode_s / static * 1000, 2),
        "vae_decode_share_of_c": round(decode_s * rates["c_engine_identical_in_flight"] / static, 3),
        "warm_up_s": {
            "engine": round(warm["total_s"], 1),
            "engine_backbone": round(warm["backbone_s"], 1),
            "engine_decode": round(warm["decode_s"], 1),
            "pipeline": round(pipe_warm_s, 1),
        },
    }


def run_cpu_comparison(args, model_path: Path, label: str, dtype: torch.dtype) -> dict:
    """A, B, C on one request list, the engine as a worker on this device sets it up."""
    from diffusers import StableDiffusionPipeline

    from services.common.settings import Settings

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
    speed = SpeedOptions.from_settings(Settings(), args.device)
    engine = Engine(model, max_batch_rows=args.max_batch_rows, **speed.engine_kwargs()).start()
    engine.warm_up()
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
    a, b, c = images / time_a, images / time_b, images / time_c
    return {
        "model": label,
        "requests": len(requests),
        "images": images,
        "unet_steps": sum(r.num_inference_steps for r in requests),
        "engine": {"compile": speed.compile_mode or "off", "output_thread": speed.output_thread},
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=None, help="diffusers folder (default: models/shapes-ldm or tiny)"
    )
    parser.add_argument("--sd15", action="store_true", help="the GPU arms on an SD-1.5-sized random UNet, 512x512 fp16")
    parser.add_argument("--tiny", action="store_true", help="the GPU arms on the tiny model (a quick CPU check)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=50, help="cap on the 20-50 step counts (quick runs)")
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    parser.add_argument("--seed", type=int, default=0)
    # the arms' options
    parser.add_argument("--compile", default="auto", help="torch.compile mode for the arms (auto: CUDA only)")
    parser.add_argument("--buckets", default="2,4,8,16,32,48,64", help="row buckets when compiled (settings' default)")
    parser.add_argument("--static-graphs", action="store_true", help="one graph per bucket, not a dynamic batch")
    parser.add_argument("--static-batch", type=int, default=16, help="(b), (c), (e): identical prompts")
    parser.add_argument("--static-steps", type=int, default=50, help="(b), (c), (e): guided steps")
    parser.add_argument("--unet-repeats", type=int, default=10, help="(e): timed UNet calls")
    parser.add_argument(
        "--warm-up-only", action="store_true", help="only the engine's warm-up (a worker's start), no arms"
    )
    args = parser.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    cuda = args.device.startswith("cuda")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.float16 if cuda else torch.float32
    )
    if args.sd15:
        if not cuda:
            parser.error("--sd15 needs a CUDA device (512x512 fp16)")
        model_path, label = sd15_folder(), f"sd15-random-512-{args.dtype or 'float16'}"
    elif args.model is not None:
        model_path, label = args.model, str(args.model)
    elif (DEFAULT_MODEL / "model_index.json").is_file() and not args.tiny:
        model_path, label = DEFAULT_MODEL, str(DEFAULT_MODEL)
    else:
        from tests.fixtures.tiny_model import build_tiny_model

        model_path, label = build_tiny_model(Path(tmp.name) / "tiny-sd"), "tiny-sd (built from config)"

    run = run_arms if args.sd15 or args.tiny else run_cpu_comparison
    result = run(args, model_path, label, dtype)
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    result = {"device": f"{args.device} ({device_name}, {torch.get_num_threads()} threads)", **result}
    print(json.dumps(result), flush=True)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
