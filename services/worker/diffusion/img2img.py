"""Image to image (SDEdit, Meng et al. 2022) and inpainting: the forward process q(x_t | x0) put to work.

SDEdit: encode a picture to x0, noise it forward to the level of step k of the request's plan,
x_k = √ᾱ_k·x0 + √(1−ᾱ_k)·ε (forward.py; a flow-matching model's straight line x_k = (1 − σ_k)·x0 + σ_k·ε,
flow_matching.py), and run the reverse process from there (steps k..n−1) under the prompt. k comes from
`strength` (services/common/rules.start_step: about the last n·strength steps run, as diffusers' get_timesteps).

Inpainting with an ordinary (4-channel) UNet: after every step, the part to keep (mask m = 0) is replaced by
the original re-noised to the level the step went to, x ← (1 − m)·q(x0 at step i+1; ε) + m·x, with the ε that
noised the start; after the last step the original itself (StableDiffusionInpaintPipeline's blend). A
9-channel inpainting UNet instead reads the mask and the masked picture's latents as extra input channels
(families/stable_diffusion.py).

Notation (<variable name> -> <name in paper>)
- x0 -> x_0, the clean picture's latents (n, C, h, w)
- noise -> ε, the one noise sample of the request (n, C, h, w)
- keep -> 1 − m, the mask at latent size: 1 where the picture is kept (n, 1, h, w)

The sampler's scale: DDIM and DPM-Solver++ hold x_t (variance preserving); the Euler family holds
x_t/√ᾱ_t = x0 + σ̂_t·ε with σ̂ = √((1−ᾱ)/ᾱ) (variance exploding; `Plan.scale_input`). The plan's σ̂_i gives
both: ᾱ_i = 1/(σ̂_i² + 1). A flow plan's σ_i is the flow's own σ (SD3, Flux: StableDiffusion3Img2ImgPipeline,
FluxImg2ImgPipeline and their inpainting pipelines blend the same way with the schedulers' scale_noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.diffusion.flow_matching import flow_q_sample
from services.worker.diffusion.forward import q_sample
from services.worker.diffusion.samplers import Plan, SamplerState


def noised(x0: torch.Tensor, noise: torch.Tensor, plan: Plan, i: int) -> torch.Tensor:
    """x0 noised forward to the level of the sample before step i of the plan, on the sampler's scale (the
    schedulers' add_noise at the plan's timestep i); i = n (after the last step) is x0 itself."""
    if i >= plan.num_steps:
        return x0
    sigma = plan.sigmas[i]
    if plan.flow:  # (1 − σ)·x0 + σ·ε: the flow schedulers' scale_noise
        return flow_q_sample(x0, sigma, noise)
    if plan.scale_input:  # x0 + σ̂·ε
        return (x0.double() + sigma * noise.double()).to(x0.dtype)
    return q_sample(x0, torch.tensor(plan.alpha_bar(i), dtype=torch.float64), noise)


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A binary pixel mask (B, 1, H, W) -> latent size (B, 1, h, w), nearest, as the inpainting pipeline."""
    return F.interpolate(mask, size=latent_size)


@dataclass
class KnownRegion:
    """What an inpainting request with an ordinary UNet keeps: the original's latents, the request's ε, and
    where (keep = 1 − m, latent size)."""

    x0: torch.Tensor  # (n, C, h, w) float32
    noise: torch.Tensor  # (n, C, h, w) float32
    keep: torch.Tensor  # (n, 1, h, w) float32, 0 or 1


def blend_known(x: torch.Tensor, known: KnownRegion, plan: Plan, i: int) -> torch.Tensor:
    """x after a step that went to step i of the plan: the kept part replaced by the original at that level,
    x ← (1 − m)·q(x0 at i; ε) + m·x (m = 1 − keep)."""
    proper = noised(known.x0, known.noise, plan, i)
    return known.keep * proper + (1 - known.keep) * x


def blend_rows(states: list[SamplerState], counts: list[int], x: torch.Tensor) -> torch.Tensor:
    """After one update of every row: each inpainting request's rows blended with its kept region (its state's
    step_index is the step it went to); the other rows as they are. x (R, C, h, w) in state order."""
    if all(state.known is None for state in states):
        return x
    rows, row = [], 0
    for state, count in zip(states, counts):
        part = x[row : row + count]
        row += count
        rows.append(part if state.known is None else blend_known(part, state.known, state.plan, state.step_index))
    return torch.cat(rows)
