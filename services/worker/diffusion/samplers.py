"""The sampler seam: one object per sampler name and model, which turns the model's scheduler config and
a request's step count into the request's plan, and steps the rows of all requests using it at once.

What a sampler knows, for each request kind:
(a) `plan(steps)`: the UNet's timestep at each step and the noise levels σ̂ around it, from the scheduler
    config (float64, pure, cached per step count), as the sampler's diffusers scheduler's set_timesteps (a step
    is one model call: PLMS plans n + 1 for n, its first step twice; Heun 2n − 1);
(b) `plan.init_noise_sigma` (x_T = ε·init_noise_sigma) and `plan.input_scale(i)` (the UNet sees x·scale:
    1/√(σ̂² + 1) for the Euler family, whose x lives on the variance-exploding scale; 1 otherwise);
(c) `step(states, counts, model_output, x, noise)`: one vectorised update over the rows of every request
    using this sampler, with per-row coefficients gathered from each request's own plan at its own step;
    a multistep history (DPM-Solver++'s previous x0 prediction; UniPC's, and its corrector's starting sample;
    PLMS's last model outputs, LMS's last slopes, Heun's first slope of a step) lives in the request's
    SamplerState;
(d) `draws_noise(state)`: whether this step takes one randn draw (the request's latents' shape, in the model's
    dtype or the sampler's `noise_dtype`) from the request's own CPU generator, after the initial latents, in
    diffusers' order (DDIM with eta > 0, Euler ancestral and the SDE solver at every step, LCM at every step but
    the last, DPM2 ancestral at each step's second call; the others never: DPM++ SDE's noise comes from a
    Brownian path of the request's, seeded by its seed, kept in its state);
(e) `scheduler` and `overrides`: the diffusers scheduler it follows (diffusers_scheduler), by which a model
    folder's own scheduler names its default sampler (sampler_for_scheduler).

The math is in ddim.py, plms.py, dpm_solver.py (with its SDE variant), unipc.py, euler.py, lms.py, second_order.py,
dpmpp_sde.py, euler_ancestral.py, lcm.py and flow_matching.py (one algorithm per file); this module is bookkeeping. Flow
matching (`flow_euler`: x_next = x + (σ_next − σ)·v on a shifted σ schedule, the SD3 and Flux families' sampler)
is one more class: a plan, an input scale (1), a step. Its plan may depend on the picture's size (Flux's
resolution-dependent shift μ), so the engine asks for a request's plan with `plan_for(steps, image_seq_len,
start)`. Image-to-image (a request starting at step k of its plan with noised image latents) is the same:
`SamplerState.steps_done` counts the request's own updates, so a multistep history starts fresh wherever the
request starts; the samplers of more calls than steps (PLMS, Heun) plan from the start they are given, the
steps before it once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.common.rules import SAMPLERS
from services.worker.diffusion.ddim import ddim_step
from services.worker.diffusion.dpm_solver import dpm_solver_2m_step
from services.worker.diffusion.dpmpp_sde import BrownianNoise, dpmpp_sde_step
from services.worker.diffusion.euler import euler_step
from services.worker.diffusion.euler_ancestral import euler_ancestral_step
from services.worker.diffusion.flow_matching import flow_euler_step, flow_schedule, mu_for, unsupported_reason
from services.worker.diffusion.lcm import boundary_scalings, lcm_step
from services.worker.diffusion.lms import MAX_ORDER, lms_coefficients, lms_step
from services.worker.diffusion.plms import MAX_HISTORY, combine, weights_for
from services.worker.diffusion.schedules import (
    ZERO_SNR_ALPHA_BAR,
    dpm_solver_timesteps,
    euler_timesteps,
    final_alpha_cumprod,
    inference_timesteps,
    interpolate_sigmas,
    karras_sigmas,
    lcm_original_steps,
    lcm_timesteps,
    max_dpm_solver_steps,
    max_inference_steps,
    previous_timesteps,
    sigma_table,
    sigma_to_timestep,
)
from services.worker.diffusion.second_order import second_order_step
from services.worker.diffusion.thresholding import Thresholding, clip_range
from services.worker.diffusion.unipc import History, unipc_step

PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


@dataclass(frozen=True)
class Plan:
    """One request's schedule: what its sampler does at each of its steps (float64, computed once)."""

    # (n,) the UNet's t at step i (integers but for the Euler family on linspace spacing); a step is a model call,
    # so PLMS lists n + 1 for n steps and Heun 2n − 1
    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]  # (n + 1,) σ̂_i = √((1 − ᾱ)/ᾱ) of the sample before step i; σ̂_n: after the last
    init_noise_sigma: float = 1.0  # x_T = ε·init_noise_sigma
    scale_input: bool = False  # the UNet sees x/√(σ̂_i² + 1) (x on the variance-exploding scale)
    prev_timesteps: tuple[int, ...] = ()  # DDIM, PLMS: the t each step goes to (−1: after the last)
    orders: tuple[int, ...] = ()  # DPM-Solver++(2M): the solver order of each step, for a request run from step 0
    flow: bool = False  # flow matching: `sigmas` are σ of x_σ = (1 − σ)·x0 + σ·ε (float32 values), not σ̂
    # DPM-Solver-2 ancestral, one entry per call: the σ̂ its ODE update ends at (a step's midpoint at its first call,
    # σ̂↓ at its second) and the σ̂↑ of the noise it adds after (0 at first calls)
    step_ends: tuple[float, ...] = ()
    sigmas_up: tuple[float, ...] = ()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def input_scale(self, i: int) -> float:
        return 1 / math.sqrt(self.sigmas[i] ** 2 + 1) if self.scale_input else 1.0

    def alpha_bar(self, i: int) -> float:
        """ᾱ of the sample before step i (for trajectory frames of DDPM-family models)."""
        return 1 / (self.sigmas[i] ** 2 + 1)

    def noise_level(self, i: int) -> dict[str, float]:
        """The sample's noise level before step i, as trajectory frames carry it: {"sigma": σ} for flow
        matching, {"alpha_bar": ᾱ} otherwise."""
        return {"sigma": self.sigmas[i]} if self.flow else {"alpha_bar": self.alpha_bar(i)}


@dataclass
class SamplerState:
    """A request's progress through its plan: the part of the sampler that lives in the request."""

    plan: Plan
    eta: float = 0.0  # DDIM only
    step_index: int = 0  # the plan's step that runs next
    steps_done: int = 0  # updates this request has made (a request may start past step 0: image to image)
    x0_prev: torch.Tensor | None = None  # DPM-Solver++(2M), UniPC: the last step's x0 prediction (n, C, h, w), float64
    # UniPC: the x0 prediction before x0_prev, the last step's corrected starting sample, and that step's order
    x0_prev2: torch.Tensor | None = None
    x_last: torch.Tensor | None = None
    last_order: int = 0
    # the multistep samplers' history, newest first, float64: PLMS the model's outputs that enter its combination,
    # LMS the ODE's slopes, Heun the slope of its step's first call; and the sample a step's first call started from,
    # which its second call steps from again (PLMS at its first step, Heun at every step but the last)
    history: tuple[torch.Tensor, ...] = ()
    x_start: torch.Tensor | None = None
    start_index: int = 0  # the plan's step the request starts at (image to image: rules.start_step)
    known: Any = None  # inpainting with an ordinary UNet: the img2img.KnownRegion blended in after each step
    seed: int = 0  # the request's seed: the SDE sampler's Brownian path takes it as its entropy
    brownian: Any = None  # DPM++ SDE: the request's dpmpp_sde.BrownianNoise, made at its first update

    @property
    def finished(self) -> bool:
        return self.step_index >= self.plan.num_steps

    @property
    def num_steps(self) -> int:
        """The updates this request makes: the plan's steps from its start on."""
        return self.plan.num_steps - self.start_index


def per_row(values: Sequence[Any], counts: Sequence[int], device: torch.device, dtype=torch.float64) -> torch.Tensor:
    """One value (or K of them) per request -> one per row (R,) (or (R, K)), on `device` without waiting for queued
    GPU work."""
    rows = torch.tensor(values, dtype=dtype).repeat_interleave(torch.tensor(counts), dim=0)
    if device.type != "cuda":
        return rows.to(device)
    return rows.pin_memory().to(device, non_blocking=True)


def row_slices(counts: Sequence[int]) -> list[slice]:
    """Each request's rows of the batch: states[k] owns counts[k] consecutive rows."""
    ends = list(itertools.accumulate(counts))
    return [slice(end - count, end) for end, count in zip(ends, counts)]


def history_rows(states: Sequence[SamplerState], counts: Sequence[int], field: str, x: torch.Tensor):
    """A multistep history field (float64 per request, or None) as rows of one tensor, zeros for the requests
    without one; None when no request has one."""
    values = [getattr(state, field) for state in states]
    if all(value is None for value in values):
        return None
    zeros = functools.partial(torch.zeros, dtype=torch.float64, device=x.device)
    return torch.cat([value if value is not None else zeros((c, *x.shape[1:])) for value, c in zip(values, counts)])


def history_stack(states: Sequence[SamplerState], counts: Sequence[int], x: torch.Tensor, depth: int):
    """The requests' `history` as rows (R, depth, C, h, w) float64, zeros past each request's own; None where no
    request has any."""
    if not any(state.history for state in states):
        return None
    zeros = functools.partial(torch.zeros, dtype=torch.float64, device=x.device)
    return torch.cat(
        [
            torch.stack([*state.history, *[zeros((c, *x.shape[1:]))] * (depth - len(state.history))], 1)
            for state, c in zip(states, counts)
        ]
    )


class Sampler:
    """Base: a sampler bound to one model's scheduler config (and the device its rows live on)."""

    name = ""
    takes_eta = False
    # the diffusers scheduler this sampler follows: its class, built with from_config(the model's scheduler
    # config, **overrides) (diffusers_scheduler); a folder whose own scheduler is that one with those values
    # gets this sampler as its default (sampler_for_scheduler)
    scheduler = ""
    overrides: Mapping[str, Any] = {}
    # the dtype of the step noise a drawing sampler takes from the request's generator (diffusers' scheduler's):
    # None is the model's dtype (DDIM and Euler ancestral draw in the model output's), else this one
    noise_dtype: torch.dtype | None = None
    # scheduler config keys that would change what the diffusers scheduler does, and the values it does here
    # (a scheduler without `rescale_betas_zero_snr` lists it False: its pipeline would not rescale)
    config_defaults: Mapping[str, Any] = {}
    # ᾱ_{T−1} under zero terminal SNR (rescale_betas_zero_snr) where the scheduler does not keep it 0: the σ̂-based
    # ones' ZERO_SNR_ALPHA_BAR, their first σ̂ finite
    zero_snr_alpha_bar: float | None = None

    def __init__(self, config: Mapping[str, Any], alphas_cumprod: torch.Tensor, device: torch.device | str = "cpu"):
        self.config = dict(config)
        self.alphas_cumprod = alphas_cumprod.double()  # (T,) float64
        if self.config.get("rescale_betas_zero_snr") and self.zero_snr_alpha_bar is not None:
            self.alphas_cumprod = self.alphas_cumprod.clone()
            self.alphas_cumprod[-1] = self.zero_snr_alpha_bar
        self.device = torch.device(device)
        self.prediction_type = self.config.get("prediction_type", "epsilon")
        self.plan = functools.lru_cache(maxsize=256)(self._plan)

    @classmethod
    def unsupported(cls, config: Mapping[str, Any]) -> str | None:
        """Why this sampler cannot follow its diffusers scheduler on this config, or None."""
        if config.get("_class_name") == FLOW_SCHEDULER:
            return "a flow-matching model (FlowMatchEulerDiscreteScheduler): its sampler is flow_euler"
        if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            return f"prediction_type {config.get('prediction_type')!r} (supported: {', '.join(PREDICTION_TYPES)})"
        for key, default in cls.config_defaults.items():
            value = config.get(key, default)
            if key == "rescale_betas_zero_snr" and value:
                return (
                    f"scheduler config rescale_betas_zero_snr = true: {cls.scheduler} has no such option (a "
                    "pipeline with it would sample another schedule than the model's)"
                )
            if value != default and value is not None:
                return f"scheduler config {key} = {value!r} (supported: {default!r})"
        return None

    def max_steps(self) -> int:
        return max_inference_steps(self.config)

    def _plan(self, num_inference_steps: int) -> Plan:
        raise NotImplementedError

    def plan_for(self, num_inference_steps: int, image_seq_len: int | None = None, start: int = 0) -> Plan:
        """A request's plan; `image_seq_len` (the tokens of its picture) matters to flow matching's dynamic
        shift only, `start` (the step image to image starts at) to PLMS's only. Raises ValueError (naming the
        limit) for a step count the schedule cannot do."""
        return self.plan(num_inference_steps)

    def start(self, num_inference_steps: int, eta: float = 0.0) -> SamplerState:
        """A new request's state; raises ValueError (naming the limit) for a step count the schedule cannot do."""
        return SamplerState(plan=self.plan(num_inference_steps), eta=eta)

    def draws_noise(self, state: SamplerState) -> bool:
        return False

    def step(
        self,
        states: Sequence[SamplerState],
        counts: Sequence[int],
        model_output: torch.Tensor,
        x: torch.Tensor,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One update of every row: states[k] owns counts[k] consecutive rows of model_output, x and noise
        (R, C, h, w). Returns (x_next, x0_pred), each (R, C, h, w) in x's dtype, and advances the states."""
        raise NotImplementedError

    def _advance(self, states: Sequence[SamplerState]) -> None:
        for state in states:
            state.step_index += 1
            state.steps_done += 1

    def _sigmas(self, states: Sequence[SamplerState], counts: Sequence[int], offset: int) -> torch.Tensor:
        return per_row([s.plan.sigmas[s.step_index + offset] for s in states], counts, self.device)


class DDIMSampler(Sampler):
    """DDIM (ddim.py) on the scheduler's own timesteps; eta per request; x̂0 dynamically thresholded where the
    config says `thresholding`, clipped where it says `clip_sample` (thresholding.py)."""

    name = "ddim"
    takes_eta = True
    scheduler = "DDIMScheduler"

    def __init__(self, config, alphas_cumprod, device="cpu"):
        super().__init__(config, alphas_cumprod, device)
        self.final_alpha_cumprod = final_alpha_cumprod(self.config, self.alphas_cumprod)
        self.table = self.alphas_cumprod.to(self.device)
        self.thresholding = Thresholding.from_config(self.config)
        self.clip_range = clip_range(self.config)

    def _plan(self, num_inference_steps: int) -> Plan:
        timesteps = inference_timesteps(self.config, num_inference_steps)
        prev = previous_timesteps(self.config, timesteps)
        alpha_bars = [float(self.alphas_cumprod[t]) for t in timesteps] + [self.final_alpha_cumprod]
        sigmas = tuple(math.sqrt((1 - a) / a) if a > 0 else math.inf for a in alpha_bars)  # ᾱ = 0: zero SNR
        return Plan(timesteps=tuple(float(t) for t in timesteps), sigmas=sigmas, prev_timesteps=tuple(prev))

    def draws_noise(self, state: SamplerState) -> bool:
        return state.eta > 0

    def step(self, states, counts, model_output, x, noise):
        t = per_row([s.plan.timesteps[s.step_index] for s in states], counts, self.device, torch.long)
        t_prev = per_row([s.plan.prev_timesteps[s.step_index] for s in states], counts, self.device, torch.long)
        eta = per_row([s.eta for s in states], counts, self.device)
        out = ddim_step(
            model_output,
            x,
            t,
            t_prev,
            self.table,
            self.final_alpha_cumprod,
            eta=eta,
            variance_noise=noise,
            prediction_type=self.prediction_type,
            thresholding=self.thresholding,
            clip_range=self.clip_range,
        )
        self._advance(states)
        return out.x_prev, out.x0_pred


class PLMSSampler(Sampler):
    """PLMS (plms.py) as PNDMScheduler.from_config(config, skip_prk_steps=True), SD 1.x's scheduler: DDIM's
    timesteps, an Euler call and a second call at the same timestep that redoes the first step with the average of
    both outputs (pseudo improved Euler), then Adams–Bashforth up to fourth order over the model's last outputs;
    the transfer is DDIM's (η = 0; no clipping or thresholding, as the scheduler). So a request's plan lists n + 1
    calls for n steps (1 for 1), the second timestep twice, as the pipeline's timesteps do.

    Where it starts matters to the plan: an image-to-image request starting at step k of the n doubles step k + 1
    (its own second call), so it runs from its own start as a text-to-image request runs from t_T. (diffusers'
    img2img pipelines instead cut the n + 1 timesteps at k, which from k ≥ 2 leaves the scheduler one timestep
    ahead of the sample.) On trailing and linspace spacing each call goes to the next timestep of the sequence;
    diffusers goes to t − T//n, not a timestep of the sequence where T//n is not the spacing (ddim.py's
    previous_timesteps says the same of DDIMScheduler)."""

    name = "plms"
    scheduler = "PNDMScheduler"
    overrides = {"skip_prk_steps": True}
    config_defaults = {"rescale_betas_zero_snr": False}  # PNDMScheduler has no such option: it would not rescale

    def __init__(self, config, alphas_cumprod, device="cpu"):
        super().__init__(config, alphas_cumprod, device)
        # PNDMScheduler's default: ᾱ_0 after the last step (a DDIM config says its own)
        self.final_alpha_cumprod = final_alpha_cumprod({"set_alpha_to_one": False, **self.config}, self.alphas_cumprod)
        self.table = self.alphas_cumprod.to(self.device)

    def plan_for(self, num_inference_steps: int, image_seq_len: int | None = None, start: int = 0) -> Plan:
        return self.plan(num_inference_steps, start)

    def _plan(self, num_inference_steps: int, start: int = 0) -> Plan:
        """The steps before `start` as DDIM's (never run; image to image noises to step `start`'s level), then
        the calls from there: step `start`, step start + 1 twice, the rest once."""
        distinct = inference_timesteps(self.config, num_inference_steps)
        prev = previous_timesteps(self.config, distinct)
        if not 0 <= start < num_inference_steps:
            raise ValueError(f"start must be between 0 and {num_inference_steps - 1}, got {start}")
        calls = list(range(num_inference_steps))  # the step each call evaluates the model at
        if num_inference_steps - start > 1:
            calls.insert(start + 1, start + 1)
        timesteps = [distinct[k] for k in calls]
        # where each call goes: the next step's timestep; the doubled call redoes the first step (from its start)
        to = [prev[k] for k in calls]
        if num_inference_steps - start > 1:
            to[start + 1] = prev[start]
        alpha_bars = [float(self.alphas_cumprod[t]) for t in timesteps] + [self.final_alpha_cumprod]
        return Plan(
            timesteps=tuple(float(t) for t in timesteps),
            sigmas=tuple(math.sqrt((1 - a) / a) for a in alpha_bars),
            prev_timesteps=tuple(to),
        )

    def start(self, num_inference_steps: int, eta: float = 0.0) -> SamplerState:
        return SamplerState(plan=self.plan(num_inference_steps, 0), eta=eta)

    def step(self, states, counts, model_output, x, noise):
        again = [s.steps_done == 1 for s in states]  # the second call: from the first call's sample and timestep
        outputs = model_output.double()
        history = history_stack(states, counts, x, MAX_HISTORY)
        stacked = outputs[:, None] if history is None else torch.cat([outputs[:, None], history], 1)
        weights = [weights_for(s.steps_done, len(s.history)) for s in states]
        weights = per_row([w + (0.0,) * (MAX_HISTORY + 1 - len(w)) for w in weights], counts, self.device)
        starts = []
        for state, rows, redo in zip(states, row_slices(counts), again):
            starts.append(state.x_start if redo else x[rows])
            if state.steps_done == 0:
                state.x_start = x[rows].clone()
        i_from = [s.step_index - 1 if redo else s.step_index for s, redo in zip(states, again)]
        out = ddim_step(
            combine(stacked, weights[:, : stacked.shape[1]]),
            torch.cat(starts).to(x.dtype),
            per_row([s.plan.timesteps[i] for s, i in zip(states, i_from)], counts, self.device, torch.long),
            per_row([s.plan.prev_timesteps[s.step_index] for s in states], counts, self.device, torch.long),
            self.table,
            self.final_alpha_cumprod,
            prediction_type=self.prediction_type,
        )
        for state, rows in zip(states, outputs.split(list(counts))):
            if state.steps_done != 1:  # the second call's output does not enter the history (it redid the first)
                state.history = (rows, *state.history)[:MAX_HISTORY]
        self._advance(states)
        for state in states:
            if state.finished or state.steps_done > 1:
                state.x_start = None
            if state.finished:
                state.history = ()
        return out.x_prev, out.x0_pred


class DPMSolver2MSampler(Sampler):
    """DPM-Solver++(2M) (dpm_solver.py) as DPMSolverMultistepScheduler.from_config(config,
    algorithm_type="dpmsolver++", solver_order=2): its timesteps, σ̂ interpolated at them, σ̂ = 0 after
    the last step (final_sigmas_type "zero"; "sigma_min" is read too), first order at the first step
    and at the last (lower_order_final, euler_at_final read from the config), x_θ dynamically thresholded
    where the config says `thresholding` (thresholding.py)."""

    name = "dpmpp_2m"
    scheduler = "DPMSolverMultistepScheduler"
    overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}
    karras = False
    sde = False  # the SDE variant (DPMSolver2MSDESampler)
    config_defaults = {
        "solver_type": "midpoint",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "variance_type": None,
        "lambda_min_clipped": -math.inf,
    }
    zero_snr_alpha_bar = ZERO_SNR_ALPHA_BAR

    def __init__(self, config, alphas_cumprod, device="cpu"):
        super().__init__(config, alphas_cumprod, device)
        self.thresholding = Thresholding.from_config(self.config)

    def max_steps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000)) if self.karras else max_dpm_solver_steps(self.config)

    def _plan(self, num_inference_steps: int) -> Plan:
        n = num_inference_steps
        table = sigma_table(self.alphas_cumprod)  # (T,) σ̂_t
        if self.karras:
            if not 1 <= n <= self.max_steps():
                raise ValueError(f"num_inference_steps must be between 1 and {self.max_steps()}, got {n}")
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
            timesteps = sigma_to_timestep(sigmas, table)
            if self.config.get("beta_schedule") != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)  # diffusers' int64 cast truncates the unrounded ones
        else:
            timesteps = dpm_solver_timesteps(self.config, n)
            sigmas = interpolate_sigmas(table, timesteps)
        final = 0.0 if self.config.get("final_sigmas_type", "zero") == "zero" else float(table[0])
        lower_order_final = (
            self.config.get("euler_at_final", False)
            or (self.config.get("lower_order_final", True) and n < 15)
            or final == 0.0
        )
        orders = tuple(1 if i == 0 or (i == n - 1 and lower_order_final) else 2 for i in range(n))
        return Plan(
            timesteps=tuple(float(t) for t in timesteps),
            sigmas=(*(float(s) for s in sigmas), final),
            orders=orders,
        )

    def step(self, states, counts, model_output, x, noise):
        sigma, sigma_next = self._sigmas(states, counts, 0), self._sigmas(states, counts, 1)
        sigma_prev = per_row(
            [s.plan.sigmas[max(s.step_index - 1, 0)] for s in states], counts, self.device
        )  # unused at order 1
        order = per_row(
            [1 if s.x0_prev is None else s.plan.orders[s.step_index] for s in states], counts, self.device, torch.long
        )
        x0_prev = history_rows(states, counts, "x0_prev", x)
        if self.sde and noise is None:
            raise ValueError(f"{self.name} needs the rows' noise")
        out = dpm_solver_2m_step(
            model_output,
            x,
            sigma,
            sigma_next,
            sigma_prev,
            x0_prev,
            order,
            self.prediction_type,
            self.thresholding,
            noise if self.sde else None,
        )
        for state, rows in zip(states, row_slices(counts)):
            state.x0_prev = out.x0_pred[rows]
        self._advance(states)
        for state in states:
            if state.finished:
                state.x0_prev = None
        return out.x_next, out.x0_pred.to(x.dtype)


class DPMSolver2MKarrasSampler(DPMSolver2MSampler):
    """DPM-Solver++(2M) on Karras et al.'s σ spacing (use_karras_sigmas=True): σ̂ from ρ = 7 between the
    table's ends, the UNet's timestep interpolated in log σ̂ (rounded, but truncated for the cosine
    schedule, as diffusers). Not offered on the capped cosine schedule: there σ̂_999 ≈ 2·10⁴ is 30×
    σ̂_998, Karras spacing puts about half the steps at t ≈ 998, and diffusers' scheduler cannot run it
    (duplicate first timesteps put its step index one ahead, and it indexes past its σ table). Nor at zero
    terminal SNR, whose σ̂_999 ≈ 4096 (2⁻²⁴) makes the same duplicates from 20 steps on."""

    name = "dpmpp_2m_karras"
    overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
    karras = True

    @classmethod
    def unsupported(cls, config):
        if config.get("beta_schedule") == "squaredcos_cap_v2":
            return "Karras σ spacing on the capped cosine schedule (squaredcos_cap_v2)"
        if config.get("rescale_betas_zero_snr"):  # σ̂_999 ≈ 4096 there: the same duplicate first timesteps
            return "Karras σ spacing at zero terminal SNR (rescale_betas_zero_snr)"
        return super().unsupported(config)


class DPMSolver2MSDESampler(DPMSolver2MSampler):
    """SDE-DPM-Solver++(2M) (dpm_solver.py, with noise) as DPMSolverMultistepScheduler.from_config(config,
    algorithm_type="sde-dpmsolver++", solver_order=2): dpmpp_2m's plan and orders, one noise draw per step (the
    last too, where σ̂_next = 0 multiplies it by 0), in float32 whatever the model's dtype, as that scheduler."""

    name = "dpmpp_2m_sde"
    overrides = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}
    sde = True
    noise_dtype = torch.float32

    def draws_noise(self, state: SamplerState) -> bool:
        return True


class DPMSolver2MSDEKarrasSampler(DPMSolver2MSDESampler, DPMSolver2MKarrasSampler):
    """SDE-DPM-Solver++(2M) on Karras et al.'s σ spacing (use_karras_sigmas=True): "DPM++ 2M SDE Karras"."""

    name = "dpmpp_2m_sde_karras"
    overrides = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}


class UniPCSampler(DPMSolver2MSampler):
    """UniPC (unipc.py) as UniPCMultistepScheduler.from_config(config, solver_order=2): DPM-Solver++'s timesteps
    and σ̂ (the same set_timesteps), order 1 at the first update and at the last (lower_order_final), the
    corrector from the second update on; B(h) "bh1" where the config's solver_type says so, else "bh2" (the
    scheduler maps DPM-Solver's midpoint and heun to it); x_θ dynamically thresholded where the config says."""

    name = "unipc"
    scheduler = "UniPCMultistepScheduler"
    overrides = {"solver_order": 2}
    config_defaults = {
        "predict_x0": True,
        "disable_corrector": [],
        "lower_order_final": True,  # off, the last step is second order across σ̂ = 0 and diffusers' gives NaN
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
    }

    def __init__(self, config, alphas_cumprod, device="cpu"):
        super().__init__(config, alphas_cumprod, device)
        self.bh1 = self.config.get("solver_type") == "bh1"

    def _plan(self, num_inference_steps: int) -> Plan:
        plan = super()._plan(num_inference_steps)
        n = num_inference_steps
        return dataclasses.replace(plan, orders=tuple(1 if i in (0, n - 1) else 2 for i in range(n)))

    def step(self, states, counts, model_output, x, noise):
        def sigma_back(k):
            return per_row([s.plan.sigmas[max(s.step_index - k, 0)] for s in states], counts, self.device)

        history = None
        if any(s.x0_prev is not None for s in states):
            history = History(
                x_last=history_rows(states, counts, "x_last", x),
                m_prev=history_rows(states, counts, "x0_prev", x),
                m_prev2=history_rows(states, counts, "x0_prev2", x),
                has=per_row([s.x0_prev is not None for s in states], counts, self.device, torch.bool),
                last_order=per_row([s.last_order for s in states], counts, self.device, torch.long),
            )
        orders = [1 if s.x0_prev is None else s.plan.orders[s.step_index] for s in states]
        out = unipc_step(
            model_output,
            x,
            self._sigmas(states, counts, 0),
            self._sigmas(states, counts, 1),
            sigma_back(1),
            sigma_back(2),
            history,
            per_row(orders, counts, self.device, torch.long),
            self.prediction_type,
            self.thresholding,
            self.bh1,
        )
        for state, rows, order in zip(states, row_slices(counts), orders):
            state.x0_prev2, state.x0_prev = state.x0_prev, out.x0_pred[rows]
            state.x_last, state.last_order = out.x_corrected[rows], order
        self._advance(states)
        for state in states:
            if state.finished:
                state.x0_prev = state.x0_prev2 = state.x_last = None
        return out.x_next, out.x0_pred.to(x.dtype)


class EulerSampler(Sampler):
    """Euler (euler.py) as EulerDiscreteScheduler.from_config(config): its timesteps (fractional on
    linspace spacing), σ̂ interpolated linearly at them, then 0 (final_sigmas_type "sigma_min" is read
    too); x_T = ε·σ̂_max (ε·√(σ̂_max² + 1) for leading spacing); the UNet sees x/√(σ̂² + 1)."""

    name = "euler"
    scheduler = "EulerDiscreteScheduler"
    overrides = {"use_karras_sigmas": False}
    config_defaults = {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
    }
    zero_snr_alpha_bar = ZERO_SNR_ALPHA_BAR
    final_sigma_from_config = True

    def _schedule(self, num_inference_steps: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, σ̂ at them) of the scheduler's set_timesteps."""
        timesteps = euler_timesteps(self.config, num_inference_steps)
        return timesteps, interpolate_sigmas(table, timesteps)

    def _plan(self, num_inference_steps: int) -> Plan:
        table = sigma_table(self.alphas_cumprod)
        timesteps, sigmas = self._schedule(num_inference_steps, table)
        final = 0.0
        if self.final_sigma_from_config and self.config.get("final_sigmas_type", "zero") == "sigma_min":
            final = float(table[0])
        sigma_max = float(sigmas.max())
        leading = self.config.get("timestep_spacing", "leading") == "leading"
        return Plan(
            timesteps=tuple(float(t) for t in timesteps),
            sigmas=(*(float(s) for s in sigmas), final),
            init_noise_sigma=math.sqrt(sigma_max**2 + 1) if leading else sigma_max,
            scale_input=True,
        )

    def step(self, states, counts, model_output, x, noise):
        sigma, sigma_next = self._sigmas(states, counts, 0), self._sigmas(states, counts, 1)
        out = euler_step(model_output, x, sigma, sigma_next, self.prediction_type)
        self._advance(states)
        return out.x_next, out.x0_pred


class EulerKarrasSampler(EulerSampler):
    """Euler on Karras et al.'s σ spacing, as EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True):
    σ̂ from ρ = 7 between the σ̂ the plain Euler schedule starts and ends at (not the table's ends, unlike
    DPM-Solver's), the UNet called at their fractional timesteps (interpolated in log σ̂, in float32). Offered on
    the capped cosine schedule too, as the scheduler runs it there (fractional timesteps do not collide as
    DPM-Solver's integer ones do), though it spends about half its steps at t ≈ 998."""

    name = "euler_karras"
    overrides = {"use_karras_sigmas": True}
    config_defaults = {**EulerSampler.config_defaults, "sigma_min": None, "sigma_max": None}

    def _schedule(self, num_inference_steps: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, plain = super()._schedule(num_inference_steps, table)
        sigmas = karras_sigmas(float(plain[-1]), float(plain[0]), num_inference_steps)
        return sigma_to_timestep(sigmas, table).astype(np.float32).astype(np.float64), sigmas


class HeunSampler(EulerSampler):
    """Heun's method (second_order.py) as HeunDiscreteScheduler.from_config(config): the Euler plan with σ̂ = 0 after
    the last step (the scheduler has no final_sigmas_type), every step but the last as two model calls (Euler, then
    the step again with the two slopes' mean), so n steps make 2n − 1 calls and the plan lists each with the σ̂ of
    the sample it sees; x̂0 clipped where the config says `clip_sample`. An image-to-image request starting at step
    k has the plan of a request run from step k (the steps before it once, never run), as the pipelines' timesteps
    from index 2k are."""

    name = "heun"
    scheduler = "HeunDiscreteScheduler"
    overrides = {"use_karras_sigmas": False}
    config_defaults = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "rescale_betas_zero_snr": False}
    final_sigma_from_config = False
    mean_slopes = True  # Heun's trapezoid; DPM-Solver-2 takes the second call's slope alone

    def __init__(self, config, alphas_cumprod, device="cpu"):
        super().__init__(config, alphas_cumprod, device)
        self.clip_range = clip_range(self.config, clip_by_default=False)  # HeunDiscreteScheduler's default

    @classmethod
    def unsupported(cls, config):
        if config.get("beta_schedule") == "squaredcos_cap_v2":
            # the first step's second call sets the whole step from σ̂_0 ≈ 2·10⁴ with a slope taken far below it:
            # Heun's x_1 = σ̂_0·(ε_0 − ε')/2, DPM-Solver-2's σ̂_0·(ε_0 − ε'), so any difference between the noise
            # estimates becomes the picture
            return (
                f"{cls.name} on the capped cosine schedule (squaredcos_cap_v2): its first step's second call sets the "
                "whole step from σ̂ ≈ 2·10⁴ with a slope taken far below it"
            )
        return super().unsupported(config)

    def plan_for(self, num_inference_steps: int, image_seq_len: int | None = None, start: int = 0) -> Plan:
        return self.plan(num_inference_steps, start)

    def _second_calls(self, steps: Plan) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The timestep and σ̂ of each step's second call (the step's end for Heun), one per step but the last."""
        return steps.timesteps[1:], steps.sigmas[1:-1]

    def _ancestral(self, steps: Plan) -> tuple[np.ndarray, np.ndarray] | None:
        """(σ̂↓, σ̂↑) of each step but the last for an ancestral sampler; None for the ODE ones."""
        return None

    def _plan(self, num_inference_steps: int, start: int = 0) -> Plan:
        steps = super()._plan(num_inference_steps)  # one entry per step
        if not 0 <= start < num_inference_steps:
            raise ValueError(f"start must be between 0 and {num_inference_steps - 1}, got {start}")
        second_timesteps, second_sigmas = self._second_calls(steps)
        ancestral = self._ancestral(steps)
        timesteps, sigmas = list(steps.timesteps[:start]), list(steps.sigmas[:start])  # never run
        ends, ups = [math.nan] * start, [0.0] * start
        for k in range(start, num_inference_steps):
            timesteps.append(steps.timesteps[k])
            sigmas.append(steps.sigmas[k])
            if k < num_inference_steps - 1:
                timesteps.append(second_timesteps[k])
                sigmas.append(second_sigmas[k])
            if ancestral is not None and k < num_inference_steps - 1:
                down, up = ancestral
                ends += [second_sigmas[k], float(down[k])]
                ups += [0.0, float(up[k])]
            elif ancestral is not None:  # the last step: one Euler call to σ̂ = 0
                ends.append(steps.sigmas[-1])
                ups.append(0.0)
        return dataclasses.replace(
            steps,
            timesteps=tuple(timesteps),
            sigmas=(*sigmas, steps.sigmas[-1]),
            step_ends=tuple(ends) if ancestral is not None else (),
            sigmas_up=tuple(ups) if ancestral is not None else (),
        )

    def start(self, num_inference_steps: int, eta: float = 0.0) -> SamplerState:
        return SamplerState(plan=self.plan(num_inference_steps, 0), eta=eta)

    def step(self, states, counts, model_output, x, noise):
        second = [s.x_start is not None for s in states]  # the step's second call (its first kept x_i and d_i)
        slopes = history_stack(states, counts, x, 1)
        starts = [s.x_start if s.x_start is not None else x[rows] for s, rows in zip(states, row_slices(counts))]
        # to the σ after this call (σ' or σ_{i+1}; an ancestral second call σ↓) from the σ the step started at (this
        # call's, or the one before's)
        dt = [
            (s.plan.step_ends[s.step_index] if s.plan.step_ends else s.plan.sigmas[s.step_index + 1])
            - s.plan.sigmas[s.step_index - 1 if again else s.step_index]
            for s, again in zip(states, second)
        ]
        ancestral = noise is not None and all(s.plan.sigmas_up for s in states)
        out = second_order_step(
            model_output,
            x,
            self._sigmas(states, counts, 0),
            per_row(dt, counts, self.device),
            per_row(second, counts, self.device, torch.bool),
            torch.cat(starts),
            slopes[:, 0] if slopes is not None else torch.zeros_like(x, dtype=torch.float64),
            self.mean_slopes,
            self.prediction_type,
            self.clip_range,
            per_row([s.plan.sigmas_up[s.step_index] for s in states], counts, self.device) if ancestral else None,
            noise if ancestral else None,
        )
        for state, rows, again in zip(states, row_slices(counts), second):
            # a first call keeps x_i and d_i for the second (none after the last step: σ = 0 ends the request)
            state.x_start, state.history = (None, ()) if again else (x[rows].clone(), (out.slope[rows],))
        self._advance(states)
        for state in states:
            if state.finished:
                state.x_start, state.history = None, ()
        return out.x_next, out.x0_pred


class DPM2Sampler(HeunSampler):
    """DPM-Solver-2 (second_order.py) as KDPM2DiscreteScheduler.from_config(config): Heun's plan but for the second
    call of each step, at the midpoint σ̂' = √(σ̂_i·σ̂_{i+1}) (log-linear, as the scheduler's lerp of log σ̂) and its
    fractional timestep (interpolated in log σ̂, in float32, as the scheduler's); the step from x_i with the
    midpoint's slope alone. No clipping (the scheduler has none)."""

    name = "dpm2"
    scheduler = "KDPM2DiscreteScheduler"
    mean_slopes = False

    def __init__(self, config, alphas_cumprod, device="cpu"):
        super().__init__(config, alphas_cumprod, device)
        self.clip_range = None

    def _targets(self, steps: Plan) -> np.ndarray:
        """The σ̂ each step but the last integrates the ODE down to: σ̂_{i+1}."""
        return np.array(steps.sigmas[1:-1])

    midpoint_dtype = np.float32  # the midpoints' timesteps as the scheduler computes them (DPM++ SDE's: float64)

    def _second_calls(self, steps: Plan) -> tuple[tuple[float, ...], tuple[float, ...]]:
        starts = np.array(steps.sigmas[:-2])  # σ̂_0..σ̂_{n−2}
        midpoints = np.exp((np.log(starts) + np.log(self._targets(steps))) / 2)  # λ = −log σ̂ halfway
        timesteps = sigma_to_timestep(midpoints.astype(self.midpoint_dtype), sigma_table(self.alphas_cumprod))
        return tuple(float(t) for t in timesteps.astype(self.midpoint_dtype)), tuple(float(s) for s in midpoints)


class HeunKarrasSampler(HeunSampler, EulerKarrasSampler):
    """Heun's method on euler_karras's Karras σ and fractional timesteps, as HeunDiscreteScheduler.from_config(config,
    use_karras_sigmas=True)."""

    name = "heun_karras"
    overrides = {"use_karras_sigmas": True}


class DPM2KarrasSampler(DPM2Sampler):
    """DPM-Solver-2 on Karras σ (ρ = 7, between the plain schedule's ends), as KDPM2DiscreteScheduler.from_config(
    config, use_karras_sigmas=True): the steps' timesteps rounded, as that scheduler rounds them ("DPM2 Karras")."""

    name = "dpm2_karras"
    overrides = {"use_karras_sigmas": True}

    def _schedule(self, num_inference_steps: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, plain = super()._schedule(num_inference_steps, table)
        sigmas = karras_sigmas(float(plain[-1]), float(plain[0]), num_inference_steps)
        return sigma_to_timestep(sigmas, table).round(), sigmas


class DPM2AncestralSampler(DPM2Sampler):
    """DPM-Solver-2 ancestral (second_order.py) as KDPM2AncestralDiscreteScheduler.from_config(config), "DPM2 a":
    DPM2's calls, but each step's ODE part ends at σ̂↓ (its second call at the midpoint √(σ̂_i·σ̂↓)), and the second
    call adds σ̂↑·z, z one draw from the request's generator in the model's dtype (n − 1 draws, one per second call,
    as the scheduler draws them)."""

    name = "dpm2_ancestral"
    scheduler = "KDPM2AncestralDiscreteScheduler"

    def _ancestral(self, steps: Plan) -> tuple[np.ndarray, np.ndarray]:
        sigma, sigma_next = np.array(steps.sigmas[:-2]), np.array(steps.sigmas[1:-1])
        up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        return np.sqrt(sigma_next**2 - up**2), up

    def _targets(self, steps: Plan) -> np.ndarray:
        return self._ancestral(steps)[0]

    def draws_noise(self, state: SamplerState) -> bool:
        return state.x_start is not None  # the call to come is a step's second


class DPM2AncestralKarrasSampler(DPM2AncestralSampler, DPM2KarrasSampler):
    """DPM-Solver-2 ancestral on dpm2_karras's σ̂ and rounded timesteps, as KDPM2AncestralDiscreteScheduler.from_config(
    config, use_karras_sigmas=True) ("DPM2 a Karras")."""

    name = "dpm2_ancestral_karras"
    scheduler = "KDPM2AncestralDiscreteScheduler"
    overrides = {"use_karras_sigmas": True}


class DPMSolverSDESampler(DPM2Sampler):
    """DPM-Solver++ SDE (dpmpp_sde.py) as DPMSolverSDEScheduler.from_config(config), "DPM++ SDE": Heun's layout of
    2n − 1 calls, each step's second call at the midpoint √(σ̂_i·σ̂_{i+1}) and its timestep (float64, as that
    scheduler's), each call an ancestral step from x_i with noise from the request's Brownian path in σ̂, seeded by
    its seed (a pipeline user passes it as the scheduler's `noise_sampler_seed`; unset, diffusers seeds it at
    random). The path is made in float32, the latents' dtype in the engine."""

    name = "dpmpp_sde"
    scheduler = "DPMSolverSDEScheduler"
    midpoint_dtype = np.float64

    @classmethod
    def unsupported(cls, config):
        # Offered on the capped cosine schedule, unlike Heun and DPM-Solver-2: each call is a data-prediction step
        # in which x_i enters scaled by σ̂_next/σ̂_i (about 10⁻³ from t = 999), not a slope taken far below σ̂_0.
        return super(HeunSampler, cls).unsupported(config)

    def _schedule(self, num_inference_steps: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        timesteps = euler_timesteps(self.config, num_inference_steps, np.float64)  # linspace's: float64 here
        return timesteps, interpolate_sigmas(table, timesteps)

    def step(self, states, counts, model_output, x, noise):
        second = [s.x_start is not None for s in states]
        z = []
        for state, rows, again in zip(states, row_slices(counts), second):
            sigmas = state.plan.sigmas
            if state.brownian is None:  # over the schedule's σ̂ (> 0), as the scheduler's noise sampler
                positive = [s for s in sigmas if s > 0]
                state.brownian = BrownianNoise(x[rows].float(), min(positive), max(positive), state.seed)
            # the step's ends σ̂_i and σ̂_{i+1}: its first call's entry, and the one after its midpoint's (none after the
            # last step's one call: σ̂ = 0 there)
            i = state.step_index - 1 if again else state.step_index
            end = sigmas[i + 2] if sigmas[i + 1] > 0 else 0.0
            z.append(state.brownian.step_noise(sigmas[i], end, not again) if end > 0 else torch.zeros_like(x[rows]))
        out = dpmpp_sde_step(
            model_output,
            x,
            self._sigmas(states, counts, 0),
            per_row(
                [s.plan.sigmas[s.step_index - 1 if a else s.step_index] for s, a in zip(states, second)],
                counts,
                self.device,
            ),
            self._sigmas(states, counts, 1),
            per_row(second, counts, self.device, torch.bool),
            torch.cat([s.x_start if s.x_start is not None else x[rows] for s, rows in zip(states, row_slices(counts))]),
            torch.cat(z).to(x.device),
            self.prediction_type,
        )
        for state, rows, again in zip(states, row_slices(counts), second):
            state.x_start = None if again else x[rows].clone()  # a first call keeps x_i for the second
        self._advance(states)
        for state in states:
            if state.finished:
                state.x_start, state.brownian = None, None
        return out.x_next, out.x0_pred


class DPMSolverSDEKarrasSampler(DPMSolverSDESampler):
    """DPM-Solver++ SDE on Karras σ (ρ = 7 between the plain schedule's ends) at their fractional timesteps, as
    DPMSolverSDEScheduler.from_config(config, use_karras_sigmas=True) ("DPM++ SDE Karras")."""

    name = "dpmpp_sde_karras"
    overrides = {"use_karras_sigmas": True}

    def _schedule(self, num_inference_steps: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, plain = super()._schedule(num_inference_steps, table)
        sigmas = karras_sigmas(float(plain[-1]), float(plain[0]), num_inference_steps)
        return sigma_to_timestep(sigmas, table), sigmas


class LMSSampler(EulerSampler):
    """Linear multistep, "K-LMS" (lms.py), as LMSDiscreteScheduler.from_config(config) stepped at its default order 4
    (the pipelines'): the Euler plan with σ̂ = 0 after the last step (the scheduler has no final_sigmas_type), and
    the slopes of the request's last three updates in its state; an update's order is 1 + the slopes it has, so a
    request starting past step 0 (image to image) starts at first order. (LMSDiscreteScheduler takes the order
    from its step index instead, so from a begin index it weighs its one slope as if it had four.)"""

    name = "lms"
    scheduler = "LMSDiscreteScheduler"
    overrides = {"use_karras_sigmas": False}
    config_defaults = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "rescale_betas_zero_snr": False}
    final_sigma_from_config = False

    def step(self, states, counts, model_output, x, noise):
        coefficients = []
        for state in states:
            order = min(len(state.history) + 1, MAX_ORDER)
            padding = (0.0,) * (MAX_ORDER - order)
            coefficients.append(lms_coefficients(state.plan.sigmas, state.step_index, order) + padding)
        out = lms_step(
            model_output,
            x,
            self._sigmas(states, counts, 0),
            history_stack(states, counts, x, MAX_ORDER - 1),
            per_row(coefficients, counts, self.device),
            self.prediction_type,
        )
        for state, rows in zip(states, out.derivative.split(list(counts))):
            state.history = (rows, *state.history)[: MAX_ORDER - 1]
        self._advance(states)
        for state in states:
            if state.finished:
                state.history = ()
        return out.x_next, out.x0_pred


class LMSKarrasSampler(LMSSampler, EulerKarrasSampler):
    """LMS on Karras σ, as LMSDiscreteScheduler.from_config(config, use_karras_sigmas=True): euler_karras's plan
    ("LMS Karras")."""

    name = "lms_karras"
    overrides = {"use_karras_sigmas": True}


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral (euler_ancestral.py) as EulerAncestralDiscreteScheduler.from_config(config): the
    Euler plan with σ̂ = 0 after the last step, and one noise draw per step."""

    name = "euler_ancestral"
    scheduler = "EulerAncestralDiscreteScheduler"
    overrides = {}  # no Karras option in this scheduler
    config_defaults = {}
    final_sigma_from_config = False

    def draws_noise(self, state: SamplerState) -> bool:
        return True

    def step(self, states, counts, model_output, x, noise):
        if noise is None:
            raise ValueError("euler_ancestral needs the rows' noise")
        sigma, sigma_next = self._sigmas(states, counts, 0), self._sigmas(states, counts, 1)
        out = euler_ancestral_step(model_output, x, sigma, sigma_next, noise, self.prediction_type)
        self._advance(states)
        return out.x_next, out.x0_pred


class LCMSampler(Sampler):
    """Multistep consistency sampling (lcm.py) as LCMScheduler.from_config(config), for latent consistency models
    guided by CFG (an SD or SDXL model with the LCM-LoRA fused in; a UNet with a guidance embedding is refused at
    load): LCM's own timesteps (original_inference_steps, 50 by default, evenly subsampled), σ̂ at them and 0 after
    the last; a noise draw at every step but the last, in the model's dtype; x̂0 thresholded or clipped where the
    config says."""

    name = "lcm"
    scheduler = "LCMScheduler"

    def __init__(self, config, alphas_cumprod, device="cpu"):
        super().__init__(config, alphas_cumprod, device)
        self.timestep_scaling = float(self.config.get("timestep_scaling", 10.0))
        self.thresholding = Thresholding.from_config(self.config)
        self.clip_range = clip_range(self.config, clip_by_default=False)  # LCMScheduler's default

    @classmethod
    def unsupported(cls, config):
        if lcm_original_steps(config) > int(config.get("num_train_timesteps", 1000)):
            return "original_inference_steps above num_train_timesteps"
        return super().unsupported(config)

    def max_steps(self) -> int:
        return lcm_original_steps(self.config)  # at most num_train_timesteps (unsupported() says)

    def _plan(self, num_inference_steps: int) -> Plan:
        timesteps = lcm_timesteps(self.config, num_inference_steps)
        sigmas = interpolate_sigmas(sigma_table(self.alphas_cumprod), timesteps)
        return Plan(timesteps=tuple(float(t) for t in timesteps), sigmas=(*(float(s) for s in sigmas), 0.0))

    def draws_noise(self, state: SamplerState) -> bool:
        return state.step_index < state.plan.num_steps - 1

    def step(self, states, counts, model_output, x, noise):
        scalings = [boundary_scalings(s.plan.timesteps[s.step_index], self.timestep_scaling) for s in states]
        out = lcm_step(
            model_output,
            x,
            per_row([s.plan.alpha_bar(s.step_index) for s in states], counts, self.device),
            per_row([s.plan.alpha_bar(s.step_index + 1) for s in states], counts, self.device),
            per_row([c_skip for c_skip, _ in scalings], counts, self.device),
            per_row([c_out for _, c_out in scalings], counts, self.device),
            per_row([not self.draws_noise(s) for s in states], counts, self.device, torch.bool),
            noise,
            self.prediction_type,
            self.thresholding,
            self.clip_range,
        )
        self._advance(states)
        return out.x_next, out.denoised


class FlowEulerSampler(Sampler):
    """Flow-matching Euler (flow_matching.py) as FlowMatchEulerDiscreteScheduler.from_config(config): σ from
    the config's shift (or μ from the picture's token count where use_dynamic_shifting), the backbone called
    at t = σ·T, x_T = ε (σ_max = 1), the backbone sees x itself; float32 throughout, as diffusers.

    `pipeline_sigmas`: the pipeline hands set_timesteps σ = linspace(1, 1/n, n) (Flux's) instead of letting the
    scheduler space them (SD3's); `default_max_shift`: the pipeline's max_shift where the config has none."""

    name = "flow_euler"
    scheduler = FLOW_SCHEDULER

    def __init__(
        self,
        config: Mapping[str, Any],
        alphas_cumprod: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        *,
        pipeline_sigmas: bool = False,
        default_max_shift: float = 1.15,
    ):
        self.config = dict(config)
        self.alphas_cumprod = None
        self.device = torch.device(device)
        self.prediction_type = "flow"
        self.pipeline_sigmas = pipeline_sigmas
        self.default_max_shift = default_max_shift
        self.dynamic = bool(self.config.get("use_dynamic_shifting", False))
        self.plan = functools.lru_cache(maxsize=256)(self._plan)

    @classmethod
    def unsupported(cls, config):
        return unsupported_reason(config)

    def max_steps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    def plan_for(self, num_inference_steps: int, image_seq_len: int | None = None, start: int = 0) -> Plan:
        if not 1 <= num_inference_steps <= self.max_steps():
            raise ValueError(f"num_inference_steps must be between 1 and {self.max_steps()}, got {num_inference_steps}")
        if not self.dynamic:
            return self.plan(num_inference_steps)
        if image_seq_len is None:
            raise ValueError("this model's σ schedule depends on the picture's size (use_dynamic_shifting)")
        return self.plan(num_inference_steps, mu_for(self.config, image_seq_len, self.default_max_shift))

    def _plan(self, num_inference_steps: int, mu: float | None = None) -> Plan:
        timesteps, sigmas = flow_schedule(self.config, num_inference_steps, mu, self.pipeline_sigmas)
        return Plan(
            timesteps=tuple(float(t) for t in timesteps),
            sigmas=tuple(float(s) for s in sigmas),
            flow=True,
        )

    def step(self, states, counts, model_output, x, noise):
        sigma = per_row([s.plan.sigmas[s.step_index] for s in states], counts, self.device, torch.float32)
        sigma_next = per_row([s.plan.sigmas[s.step_index + 1] for s in states], counts, self.device, torch.float32)
        out = flow_euler_step(model_output, x, sigma, sigma_next)
        self._advance(states)
        return out.x_next.to(x.dtype), out.x0_pred.to(x.dtype)


SAMPLER_CLASSES: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        DDIMSampler,
        PLMSSampler,
        DPMSolver2MSampler,
        DPMSolver2MKarrasSampler,
        DPMSolver2MSDESampler,
        DPMSolver2MSDEKarrasSampler,
        UniPCSampler,
        EulerSampler,
        EulerKarrasSampler,
        LMSSampler,
        LMSKarrasSampler,
        HeunSampler,
        HeunKarrasSampler,
        DPM2Sampler,
        DPM2KarrasSampler,
        DPM2AncestralSampler,
        DPM2AncestralKarrasSampler,
        DPMSolverSDESampler,
        DPMSolverSDEKarrasSampler,
        EulerAncestralSampler,
        LCMSampler,
        FlowEulerSampler,
    )
}
assert tuple(SAMPLER_CLASSES) == SAMPLERS


def unsupported_samplers(config: Mapping[str, Any]) -> dict[str, str]:
    """{name: why} for the samplers this scheduler config rules out (a flow-matching config rules out every
    DDPM-family sampler, a DDPM one rules out flow_euler)."""
    return {name: reason for name, cls in SAMPLER_CLASSES.items() if (reason := cls.unsupported(config))}


def diffusers_scheduler(name: str, config: Mapping[str, Any]):
    """The diffusers scheduler that sampler `name` follows, as a pipeline user would swap it in:
    Scheduler.from_config(the model's scheduler config, **overrides)."""
    import diffusers

    cls = SAMPLER_CLASSES[name]
    return getattr(diffusers, cls.scheduler).from_config(dict(config), **cls.overrides)


def sampler_for_scheduler(config: Mapping[str, Any]) -> str | None:
    """The sampler that does what the model folder's own scheduler does, i.e. what its pipeline samples with when
    called plainly; None where latentd has none (PNDMScheduler with its Runge-Kutta warm-up; DPM-Solver of order
    3; a config option a sampler does not implement). The folder's config is read with the scheduler's own
    defaults filled in, and matched against each sampler's scheduler and overrides, among the samplers the config
    allows."""
    import diffusers

    candidates = [(name, cls) for name, cls in SAMPLER_CLASSES.items() if cls.scheduler == config.get("_class_name")]
    if not candidates:  # nothing to build (some need packages the worker does not have: DPMSolverSDE, torchsde)
        return None
    resolved = dict(getattr(diffusers, candidates[0][1].scheduler).from_config(dict(config)).config)
    for name, cls in candidates:
        if not cls.unsupported(config) and all(resolved.get(key) == value for key, value in cls.overrides.items()):
            return name
    return None


def build_samplers(
    config: Mapping[str, Any],
    alphas_cumprod: torch.Tensor | None,
    device: torch.device | str = "cpu",
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Sampler]:
    """The samplers a model supports, bound to its scheduler config, in SAMPLERS order. `options`: keyword
    arguments per sampler name (a family's pipeline habits, e.g. flow_euler's pipeline_sigmas)."""
    ruled_out = unsupported_samplers(config)
    options = options or {}
    return {
        name: cls(config, alphas_cumprod, device, **options.get(name, {}))
        for name, cls in SAMPLER_CLASSES.items()
        if name not in ruled_out
    }
