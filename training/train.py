"""Train the default model on the shapes world: data -> AutoencoderKL -> CLIP text encoder + UNet -> folder.

    python -m training.train --out models/shapes-ldm --seed 0

Seeded; runs on the CPU (2 threads) unless --device names a GPU, which only makes it faster. Each
stage logs its loss to training/runs/<stage>.log and checkpoints, so a usable model folder exists
before the end of the run.

The denoiser's loss is the noise-prediction loss of Ho et al. written through v (Salimans & Ho 2022):
the UNet outputs v̂, the noise it implies is ε̂ = √ᾱ_t·v̂ + √(1−ᾱ_t)·x_t, and
‖v − v̂‖² = ‖ε − ε̂‖² / ᾱ_t, i.e. L = ‖ε − ε̂(x_t, t, c)‖² weighted by 1/ᾱ_t. Why v and not a
plain ε output: see training/models.py:build_scheduler.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextModel

from training.models import build_scheduler, build_text_encoder, build_unet, build_vae
from training.shapes import ShapesWorld, training_caption
from training.vocab import write_tokenizer

RUNS_DIR = Path(__file__).resolve().parent / "runs"
KL_WEIGHT = 1e-6
HELD_OUT_PSNR_OFFSET = 10_000  # ShapesWorld(seed + this): the VAE's held-out pictures
BUFFER_OFFSET = 20_000  # ShapesWorld(seed + this): the pictures encoded for the UNet stage


def training_seeds(seed: int) -> set[int]:
    """Every seed a run with --seed `seed` gives a random generator: the VAE stage and the global torch seed
    (seed), the denoiser's torch seed, caption dropout and batch indices (seed + 1, 2, 3), and the two
    picture worlds. training/evaluate.py's held-out noise seeds must stay clear of these."""
    return {seed, seed + 1, seed + 2, seed + 3, seed + HELD_OUT_PSNR_OFFSET, seed + BUFFER_OFFSET}


class StageLog:
    """Loss log for one stage: training/runs/<stage>.log, echoed through tqdm."""

    def __init__(self, runs_dir: Path, stage: str):
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(runs_dir / f"{stage}.log", "w")
        self.stage = stage
        self.started = time.monotonic()

    def write(self, message: str) -> None:
        line = f"[{self.stage} {time.monotonic() - self.started:7.1f}s] {message}"
        tqdm.write(line)
        self.file.write(line + "\n")
        self.file.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def to_model_range(pixels: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of pictures in [-1, 1], measured on the [0, 1] scale."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 2% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(args: argparse.Namespace, log: StageLog) -> AutoencoderKL:
    torch.manual_seed(args.seed)
    world = ShapesWorld(args.seed)
    vae = build_vae().to(args.device)
    # Start the posterior narrow (std ~ e^-4): with the default std ~ 1 the sampled noise swamps the
    # latent and, at this tiny KL weight, the decoder needs thousands of steps to learn around it.
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels :].fill_(-8.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    log.write(f"AutoencoderKL {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    for step in (bar := tqdm(range(args.vae_steps), desc="vae", mininterval=5)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=50)
        pixels, _ = world.batch(args.vae_batch)
        x = to_model_range(pixels, args.device)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # L1 keeps edges and flat colours sharp; MSE is what PSNR measures.
        rec_loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == args.vae_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.write(
                f"step {step} loss {loss.item():.5f} rec {rec_loss.item():.5f} kl {kl.item():.3f} psnr {psnr(reconstruction.detach(), x):.2f}"
            )
    vae.eval()
    return vae


@torch.no_grad()
def held_out_psnr(vae: AutoencoderKL, seed: int, count: int = 512) -> float:
    pixels, _ = ShapesWorld(seed + HELD_OUT_PSNR_OFFSET).batch(count)
    x = to_model_range(pixels, vae.device)
    reconstruction = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in x.split(64)])
    return psnr(reconstruction, x)


@torch.no_grad()
def encode_buffer(vae: AutoencoderKL, seed: int, count: int, log: StageLog) -> dict:
    """Posterior mean/std of `count` fresh pictures, with their scenes for captions."""
    world = ShapesWorld(seed + BUFFER_OFFSET)
    means, stds, scenes = [], [], []
    for _ in tqdm(range(0, count, 128), desc="encode", mininterval=5):
        pixels, batch_scenes = world.batch(128)
        posterior = vae.encode(to_model_range(pixels, vae.device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        scenes += batch_scenes
    buffer = {"mean": torch.cat(means)[:count], "std": torch.cat(stds)[:count], "scenes": scenes[:count]}
    log.write(f"encoded {count} pictures to latents {tuple(buffer['mean'].shape)}")
    return buffer


def latent_scaling_factor(buffer: dict, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    mean, std = buffer["mean"][:4096].cpu(), buffer["std"][:4096].cpu()
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    return float(1.0 / sample.std())


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet) -> None:
    """Write the diffusers folder atomically (tmp folder, then rename): safetensors only."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(staging, safe_serialization=True)
    # The tokenizer folder also carries the slow-tokenizer files.
    write_tokenizer(staging / "tokenizer")
    # A part loaded with --init-from remembers where it came from: no local paths in a shipped folder.
    for config_path in staging.glob("*/config.json"):
        config = json.loads(config_path.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def train_denoiser(args: argparse.Namespace, vae: AutoencoderKL, buffer: dict, tokenizer, log: StageLog) -> None:
    torch.manual_seed(args.seed + 1)
    caption_rng = random.Random(args.seed + 2)
    index_generator = torch.Generator().manual_seed(args.seed + 3)
    scaling_factor = vae.config.scaling_factor
    latent_size = buffer["mean"].shape[-1]
    device = args.device
    if args.init_from:
        text_encoder = CLIPTextModel.from_pretrained(args.init_from / "text_encoder").to(device).train()
        unet = UNet2DConditionModel.from_pretrained(args.init_from / "unet").to(device).train()
    else:
        text_encoder = build_text_encoder(tokenizer).to(device)
        unet = build_unet(latent_size).to(device)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text_encoder = copy.deepcopy(text_encoder).requires_grad_(False)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.unet_lr, weight_decay=1e-2)
    log.write(
        f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M parameters, "
        f"latent scaling factor {scaling_factor:.4f}"
    )
    alphas_cumprod = build_scheduler().alphas_cumprod.to(device)  # (T,) ᾱ_t, float32 as the samplers read it
    token_cache: dict[str, torch.Tensor] = {}

    def token_ids(captions: list[str]) -> torch.Tensor:
        for caption in captions:
            if caption not in token_cache:
                token_cache[caption] = tokenizer(
                    caption,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
        return torch.stack([token_cache[caption] for caption in captions]).to(device)

    count = buffer["mean"].shape[0]
    running = None
    for step in (bar := tqdm(range(args.unet_steps), desc="unet", mininterval=5)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=100)
        rows = torch.randint(0, count, (args.unet_batch,), generator=index_generator)
        captions = [training_caption(buffer["scenes"][row], caption_rng) for row in rows.tolist()]
        rows = rows.to(device)
        x0 = (buffer["mean"][rows] + buffer["std"][rows] * torch.randn_like(buffer["mean"][rows])) * scaling_factor
        encoder_hidden_states = text_encoder(token_ids(captions))[0]  # (B, L, D), as the pipeline reads it
        t = torch.randint(0, len(alphas_cumprod), (args.unet_batch,), device=device)
        alpha_bar_t = alphas_cumprod[t][:, None, None, None]
        noise = torch.randn_like(x0)
        x_t = alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise  # q(x_t | x_0)
        v = alpha_bar_t.sqrt() * noise - (1 - alpha_bar_t).sqrt() * x0  # the UNet's target
        v_pred = unet(x_t, t, encoder_hidden_states).sample
        loss = F.mse_loss(v_pred, v)  # = mean ‖ε − ε̂‖² / ᾱ_t, see the module docstring
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_model, model in ((ema_unet, unet), (ema_text_encoder, text_encoder)):
                for ema_param, param in zip(ema_model.parameters(), model.parameters()):
                    ema_param.lerp_(param, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == args.unet_steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
            log.write(
                f"step {step} loss {loss.item():.5f} ema_loss {running:.5f} lr {optimizer.param_groups[0]['lr']:.2e}"
            )
        last = step == args.unet_steps - 1
        if last or (args.checkpoint_every and (step + 1) % args.checkpoint_every == 0):
            save_pipeline(args.out, vae, ema_text_encoder, tokenizer, ema_unet)
            log.write(f"saved {'final model' if last else 'checkpoint'} at step {step + 1} to {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (diffusers format)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="loss logs and stage checkpoints")
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--latent-pictures", type=int, default=16384, help="pictures encoded once for the UNet stage")
    parser.add_argument("--unet-steps", type=int, default=7000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--checkpoint-every", type=int, default=500, help="UNet steps between model-folder saves")
    parser.add_argument(
        "--reuse-vae", action="store_true", help="load <runs-dir>/vae and its latents instead of training"
    )
    parser.add_argument("--device", default="cpu", help="cpu (the reference run), or cuda to go faster")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (1 wastes less on a CPU other jobs share)"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a model folder to go on training: its VAE is kept (pictures re-encoded with --seed), "
        "its UNet and text encoder start the denoiser stage",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    vae_dir = args.runs_dir / "vae"
    log = StageLog(args.runs_dir, "vae")
    if args.init_from:
        vae = AutoencoderKL.from_pretrained(args.init_from / "vae").to(args.device).eval()
        log.write(f"kept the VAE of {args.init_from}")
        buffer = encode_buffer(vae, args.seed, args.latent_pictures, log)
    elif args.reuse_vae:
        vae = AutoencoderKL.from_pretrained(vae_dir).to(args.device).eval()
        buffer = torch.load(args.runs_dir / "latents.pt", weights_only=False, map_location=args.device)
        log.write(f"reused {vae_dir} and its latent buffer")
    else:
        vae = train_vae(args, log)
        timings["vae_train_s"] = log.elapsed()
        started = time.monotonic()
        buffer = encode_buffer(vae, args.seed, args.latent_pictures, log)
        vae.register_to_config(scaling_factor=latent_scaling_factor(buffer, args.seed))
        timings["encode_s"] = time.monotonic() - started
        held_out = held_out_psnr(vae, args.seed)
        timings["vae_psnr_db"] = held_out
        log.write(f"held-out PSNR {held_out:.2f} dB; scaling_factor {vae.config.scaling_factor:.4f}")
        vae.save_pretrained(vae_dir, safe_serialization=True)
        torch.save(buffer, args.runs_dir / "latents.pt")

    tokenizer = write_tokenizer(args.runs_dir / "tokenizer")
    log = StageLog(args.runs_dir, "unet")
    train_denoiser(args, vae, buffer, tokenizer, log)
    timings["unet_train_s"] = log.elapsed()
    (args.runs_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    log.write(f"done: {json.dumps(timings)}")


if __name__ == "__main__":
    main()
