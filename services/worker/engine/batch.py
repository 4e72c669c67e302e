"""The batch algebra of continuous batching: per-request state, and rows in / rows out of one backbone call.

A request of n images takes n conditional rows, n unconditional rows, or both (unconditional first, as in
diffusers' pipelines): which ones, and the scale that mixes them, its model's family says (`Family.rows`: SD
mixes at every scale but 0 and 1, SDXL and SD3 only above 1, Flux by true_cfg_scale), and a request that mixes
does so only within its guidance interval: at its other steps it takes the conditional rows alone, the
unconditional ones are not computed, and its output is the conditional prediction. `build_unet_batch`
concatenates the rows of the chosen requests (each scaled for the backbone as its sampler says, at its own
timestep, with its own conditioning: a dict of tensors the family reads); `guided_outputs` splits the output
back and applies each request's guidance and guidance rescale, one output row per image, in member order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.rules import Resolved
from services.worker.diffusion.guidance import classifier_free_guidance, rescale_guidance
from services.worker.diffusion.samplers import Sampler, SamplerState
from services.worker.engine.requests import GenerationRequest, TrajectoryFrame
from services.worker.families import Conditioning, Rows
from services.worker.transfer import to_device  # a per-row tensor built on the host, sent without waiting


@dataclass
class ActiveRequest:
    request: GenerationRequest
    handle: Any  # RequestHandle
    sequence: int  # arrival order, for fairness ties
    sampler: Sampler
    state: SamplerState  # the request's plan, its position in it, and its multistep history
    resolved: Resolved  # size, sampler, guidance rescale φ and interval, steps and scale, the model's defaults in
    rows: Rows  # which rows it may need per image, and the scale that mixes them (its family's rule)
    latent_shape: tuple[int, int, int]  # (C, h, w)
    submitted_at: float
    admitted_at: float = 0.0
    generator: torch.Generator | None = None
    latents: torch.Tensor | None = None  # (n, C, h, w) float32: x before step `step_index`, on the sampler's scale
    cond: Conditioning | None = None  # the conditional rows' conditioning, each tensor (n, ...); None if unneeded
    uncond: Conditioning | None = None  # the unconditional rows' (the negative prompt's)
    last_served: int = -1  # engine iteration of the last step, for round-robin
    frames: list[TrajectoryFrame] = field(default_factory=list)
    unet_s: float = 0.0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_images(self) -> int:
        return self.request.num_images

    @property
    def guidance_rescale(self) -> float:
        return self.resolved.guidance_rescale

    @property
    def cfg_scale(self) -> float:
        """The scale of x_uncond + s·(x_cond − x_uncond) (guidance_scale, or Flux's true_cfg_scale)."""
        return self.rows.scale

    @property
    def mixes(self) -> bool:
        """Whether the step that runs next mixes conditional and unconditional rows: the family's rule asks for
        both and the step is within the request's guidance interval."""
        return self.rows.cond and self.rows.uncond and self.resolved.guides_at(self.steps_done, self.total_steps)

    @property
    def needs_cond(self) -> bool:
        return self.rows.cond

    @property
    def needs_uncond(self) -> bool:
        """Whether the step that runs next needs the unconditional rows (outside the guidance interval a request
        that mixes takes its conditional rows alone)."""
        return self.rows.uncond and (not self.rows.cond or self.mixes)

    @property
    def num_rows(self) -> int:
        return self.num_images * (int(self.needs_cond) + int(self.needs_uncond))

    @property
    def step_index(self) -> int:
        """Sampler updates done (the plan's step that runs next)."""
        return self.state.step_index

    @property
    def steps_done(self) -> int:
        return self.state.steps_done

    @property
    def total_steps(self) -> int:
        """The updates this request makes (from its start step: fewer than the plan's for image to image)."""
        return self.state.num_steps

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def model_timestep(self) -> float:
        """The UNet's t for the next step (fractional only for Euler on linspace spacing)."""
        return self.state.plan.timesteps[self.step_index]

    @property
    def timestep(self) -> int:
        return round(self.model_timestep)

    @property
    def input_scale(self) -> float:
        """The UNet sees latents·input_scale (1/√(σ̂² + 1) on the Euler family's scale, else 1)."""
        return self.state.plan.input_scale(self.step_index)

    def model_input(self) -> torch.Tensor:
        """The latents as the UNet sees them (n, C, h, w) float32."""
        scale = self.input_scale
        return self.latents if scale == 1.0 else (self.latents.double() * scale).float()

    def elapsed(self) -> float:
        return time.monotonic() - self.admitted_at


@dataclass
class UNetBatch:
    members: list[ActiveRequest]
    latents: torch.Tensor  # (R, C, h, w), scaled for the backbone, in the model dtype
    timesteps: torch.Tensor  # (R,) float32 (the UNet embeds float and integer t alike; flow models' t = σ·T)
    cond: Conditioning  # each tensor (R, ...): text states, pooled text, time ids, guidance, as the family keys them

    @property
    def num_rows(self) -> int:
        return self.latents.shape[0]


def build_unet_batch(members: list[ActiveRequest], dtype: torch.dtype) -> UNetBatch:
    latents, timesteps, conds = [], [], []
    for member in members:
        model_input = member.model_input()
        for needed, conditioning in ((member.needs_uncond, member.uncond), (member.needs_cond, member.cond)):
            if needed:
                latents.append(model_input)
                conds.append(conditioning)
                timesteps.append(torch.full((member.num_images,), member.model_timestep, dtype=torch.float32))
    device = members[0].latents.device
    return UNetBatch(
        members=members,
        latents=torch.cat(latents).to(dtype),
        timesteps=to_device(torch.cat(timesteps), device),
        cond={key: torch.cat([c[key] for c in conds]) for key in conds[0]},
    )


def guided_outputs(batch: UNetBatch, model_output: torch.Tensor) -> torch.Tensor:
    """UNet output (R, C, h, w) -> guided output (N, C, h, w), N = images of all members, in member order.
    A member with only one kind of row passes it as both, so s = 1 and s = 0 return it exactly. Guidance
    rescale applies where s > 1, as in diffusers' pipeline (which guides at all only where s > 1)."""
    eps_uncond, eps_cond, scales, rescales = [], [], [], []
    row = 0
    for member in batch.members:
        n = member.num_images
        uncond = cond = None
        if member.needs_uncond:
            uncond = model_output[row : row + n]
            row += n
        if member.needs_cond:
            cond = model_output[row : row + n]
            row += n
        eps_uncond.append(uncond if uncond is not None else cond)
        eps_cond.append(cond if cond is not None else uncond)
        scales.append(torch.full((n,), member.cfg_scale, dtype=model_output.dtype))
        rescales.append(member.guidance_rescale if member.cfg_scale > 1 and member.needs_uncond else 0.0)
    scale = to_device(torch.cat(scales), model_output.device)  # (N,)
    eps_uncond, eps_cond = torch.cat(eps_uncond), torch.cat(eps_cond)
    guided = classifier_free_guidance(eps_uncond, eps_cond, scale)
    if any(rescales):
        counts = torch.tensor([m.num_images for m in batch.members])
        phi = torch.tensor(rescales, dtype=model_output.dtype).repeat_interleave(counts)  # (N,)
        guided = rescale_guidance(guided, eps_cond, to_device(phi, model_output.device))
    return guided
