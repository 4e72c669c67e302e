"""The samplers' plans and updates against diffusers' schedulers (pure tensor math, no model).

Each sampler is compared with the scheduler a pipeline user would swap in:
`Scheduler.from_config(the model's scheduler config, **overrides)` (samplers.py: each sampler's `scheduler` and `overrides`),
over the schedules, spacings and prediction types of test_ddim_parity.py.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from services.common import rules
from services.common.rules import DDPM_SAMPLERS as SAMPLERS  # the DDPM-family models' samplers
from services.common.rules import SAMPLERS as ALL_SAMPLERS
from services.worker.diffusion.guidance import rescale_guidance
from services.worker.diffusion.samplers import (
    SAMPLER_CLASSES,
    SamplerState,
    build_samplers,
    diffusers_scheduler,
    sampler_for_scheduler,
    unsupported_samplers,
)
from services.worker.diffusion.schedules import alphas_cumprod_from_config, final_alpha_cumprod
from services.worker.diffusion.thresholding import Thresholding
from training.evaluate import rescale_guidance as evaluate_rescale

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")
# planned in σ̂ (DDIM: test_ddim_parity.py; PLMS and LCM, whose schedulers keep no σ̂, and DPM-Solver-2, whose keeps
# its midpoints apart, below)
DPM2_ANCESTRAL = ("dpm2_ancestral", "dpm2_ancestral_karras")
DPM2 = ("dpm2", "dpm2_karras", *DPM2_ANCESTRAL)  # their schedulers keep the midpoints apart (dpm2_reference)
SDE = ("dpmpp_sde", "dpmpp_sde_karras")  # their scheduler lays its calls out as KDPM2's, noise from a Brownian path
SIGMA_SAMPLERS = tuple(name for name in SAMPLERS if name not in ("ddim", "plms", "lcm", *DPM2, *SDE))
KARRAS = ("dpmpp_2m_karras", "dpmpp_2m_sde_karras")
# not offered on the capped cosine schedule (DPMSolver2MKarrasSampler, HeunSampler)
NOT_ON_COSINE = (*KARRAS, "heun", "heun_karras")
STEPS = (1, 7, 10, 50, 1000)
FRACTIONAL = ("euler_karras", "lms_karras", "heun_karras")  # Karras σ at fractional timesteps


def model_config(schedule: str, spacing: str, prediction_type: str = "epsilon", **options) -> dict:
    """A model's scheduler config as shipped (a DDIMScheduler's, as the tiny model and SD 1.x carry); `options`:
    more DDIMScheduler arguments. (They go to the constructor: a key laid over the dict afterwards is reset to its
    default by from_config where the dict's `_use_default_values` lists it.)"""
    return dict(
        DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule=schedule,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing=spacing,
            prediction_type=prediction_type,
            **options,
        ).config
    )


def reference(name: str, config: dict, steps: int, alphas_cumprod: torch.Tensor | None = None):
    """diffusers' scheduler for `name`, set to `steps`; with alphas_cumprod, on our float64 ᾱ table."""
    scheduler = diffusers_scheduler(name, config)
    if alphas_cumprod is not None:
        scheduler.alphas_cumprod = alphas_cumprod
    scheduler.set_timesteps(steps)
    return scheduler


def test_names_are_the_registry():
    assert tuple(SAMPLER_CLASSES) == ALL_SAMPLERS == SAMPLERS + ("flow_euler",)
    # the names are the API's: a rename breaks clients
    assert " ".join(SAMPLERS) == (
        "ddim plms dpmpp_2m dpmpp_2m_karras dpmpp_2m_sde dpmpp_2m_sde_karras unipc euler euler_karras lms lms_karras "
        "heun heun_karras dpm2 dpm2_karras dpm2_ancestral dpm2_ancestral_karras dpmpp_sde dpmpp_sde_karras "
        "euler_ancestral lcm"
    )


@pytest.mark.parametrize("name,schedule,spacing", list(itertools.product(SIGMA_SAMPLERS, SCHEDULES, SPACINGS)))
def test_plan_matches_diffusers(name, schedule, spacing):
    """Timesteps (what the UNet sees) exactly, σ̂ and init_noise_sigma to float32 rounding (diffusers stores
    them in float32), for 1/7/10/50/1000 steps; on our float64 ᾱ table, then on diffusers' own float32 one."""
    config = model_config(schedule, spacing)
    ac = alphas_cumprod_from_config(config)
    if name in NOT_ON_COSINE and schedule == "squaredcos_cap_v2":
        assert "squaredcos_cap_v2" in unsupported_samplers(config)[name]
        assert name not in build_samplers(config, ac)
        return
    check_plan(name, config, spacing)


def check_plan(name: str, config: dict, spacing: str) -> None:
    sampler = build_samplers(config, alphas_cumprod_from_config(config))[name]
    ac = sampler.alphas_cumprod  # the sampler's: ᾱ_{T−1} = 2⁻²⁴ under zero terminal SNR, as its scheduler's
    for steps in STEPS:
        try:
            plan = sampler.plan(steps)
        except ValueError as error:
            # leading + steps_offset 1: t would reach T; DPM-Solver needs distinct timesteps (see max_dpm_solver_steps)
            assert steps > sampler.max_steps(), error  # DPM-Solver on linspace: T − 1 (T + 1 rounded points)
            assert f"between 1 and {sampler.max_steps()}" in str(error)
            continue
        ref = reference(name, config, steps, ac)
        ref_timesteps = ref.timesteps.double().tolist()
        assert plan.num_steps == rules.steps_run(steps, None, name)  # what the doors count
        if spacing == "trailing" and len(ref_timesteps) > plan.num_steps:
            # diffusers' np.arange(T, 0, −T/steps) gains an element ≈ 0 (t = −1) for 62 step counts (7 of these)
            assert ref_timesteps[-1] == -1 and list(plan.timesteps) == ref_timesteps[: plan.num_steps]
            continue
        if name in FRACTIONAL:  # fractional timesteps from log σ̂ interpolation: float32 rounding apart
            assert np.allclose(plan.timesteps, ref_timesteps, rtol=1e-6, atol=1e-4), steps
        else:
            assert list(plan.timesteps) == ref_timesteps, steps
        ref_sigmas = ref.sigmas.double()
        assert torch.allclose(torch.tensor(plan.sigmas, dtype=torch.float64), ref_sigmas, rtol=1e-7, atol=0), steps
        assert math.isclose(plan.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-7), steps
        # diffusers' own float32 ᾱ: the same timesteps (the Karras ones at 1000 steps may round across a boundary)
        own = reference(name, config, steps)
        if name in FRACTIONAL:  # fractional, from diffusers' float32 σ̂ table: to its rounding
            assert np.allclose(plan.timesteps, own.timesteps.double().tolist(), rtol=1e-3, atol=1e-2), steps
        elif not (name in KARRAS and steps == 1000):
            assert list(plan.timesteps) == own.timesteps.double().tolist(), steps
        # σ̂ near t = 0 comes from 1 − ᾱ ≈ 4e-5 (cosine) in float32 there: 3 to 4 digits
        assert torch.allclose(torch.tensor(plan.sigmas, dtype=torch.float64), own.sigmas.double(), rtol=1e-3, atol=0), (
            steps
        )


# Zero terminal SNR (rescale_betas_zero_snr, v-prediction): the samplers whose diffusers scheduler rescales (DDIM's
# update: test_ddim_parity.py); under it their σ̂-based schedulers put ᾱ_{T−1} = 2⁻²⁴, σ̂_max ≈ 4096
# (not DPM-Solver's Karras names: σ̂_max ≈ 4096 gives them the cosine schedule's duplicate first timesteps)
ZERO_SNR = ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "euler", "euler_karras", "euler_ancestral")  # and lcm (below)


def zero_snr_config(spacing: str) -> dict:
    return model_config("scaled_linear", spacing, "v_prediction", rescale_betas_zero_snr=True)


def test_zero_terminal_snr_offers_the_samplers_whose_scheduler_rescales():
    """The others' schedulers have no rescale_betas_zero_snr: a pipeline with one would sample another schedule
    than the model was trained on, so they are not offered, each saying why."""
    config = zero_snr_config("trailing")
    assert list(build_samplers(config, alphas_cumprod_from_config(config))) == [
        name for name in SAMPLERS if name in ("ddim", *ZERO_SNR, "lcm")
    ]
    for name, reason in unsupported_samplers(config).items():
        if name in KARRAS:
            assert reason == "Karras σ spacing at zero terminal SNR (rescale_betas_zero_snr)"
        elif name != "flow_euler":
            assert "rescale_betas_zero_snr = true" in reason and "has no such option" in reason, (name, reason)


@pytest.mark.parametrize("name,spacing", list(itertools.product(ZERO_SNR, SPACINGS)))
def test_zero_terminal_snr_plan_matches_diffusers(name, spacing):
    check_plan(name, zero_snr_config(spacing), spacing)


@pytest.mark.parametrize("name,spacing", list(itertools.product(ZERO_SNR, SPACINGS)))
def test_zero_terminal_snr_update_matches_diffusers(name, spacing):
    check_update(name, zero_snr_config(spacing), "v_prediction")


def consistent_output(x, plan, i, x0, prediction_type, g):
    """A model output for the sample x at step i that is right about x0 up to a small error, as in real
    sampling (x̂0 stays O(1)): ε implied by x and x0, or v = √ᾱ·ε − √(1−ᾱ)·x0."""
    x_vp = x.double() * plan.input_scale(i)
    a = plan.alpha_bar(i)
    eps = (x_vp - a**0.5 * x0) / (1 - a) ** 0.5 + 1e-3 * a**0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    out = eps if prediction_type == "epsilon" else a**0.5 * eps - (1 - a) ** 0.5 * x0
    return out.float()


@pytest.mark.parametrize(
    "name,schedule,spacing,prediction_type",
    [
        combo
        for combo in itertools.product(SIGMA_SAMPLERS, SCHEDULES, SPACINGS, PREDICTIONS)
        if not (combo[0] in NOT_ON_COSINE and combo[1] == "squaredcos_cap_v2")
    ],
)
def test_update_matches_diffusers(name, schedule, spacing, prediction_type):
    """Every step of 1/7/10/50-step runs (the multistep history included), fed the same sample and model
    output: our update vs diffusers' `.step` on the same σ̂ in float64, max error ≤ 1e-5. The Euler family's
    sample lives on the variance-exploding scale (|x| ~ σ̂, 2·10⁴ at the cosine schedule's t = 999), so its
    error is measured on x/√(σ̂² + 1), the scale the UNet sees next and DDIM's 1e-5 refers to."""
    check_update(name, model_config(schedule, spacing, prediction_type), prediction_type)


def check_update(name: str, config: dict, prediction_type: str) -> None:
    sampler = build_samplers(config, alphas_cumprod_from_config(config))[name]
    ac = sampler.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    for steps in (1, 7, 10, 50):
        plan = sampler.plan(steps)
        ref = reference(name, config, steps, ac)
        ref.sigmas = torch.tensor(plan.sigmas, dtype=torch.float64)  # checked against diffusers' own above
        state = sampler.start(steps)
        x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
        x = (torch.randn((2, 4, 4, 4), generator=g) * plan.init_noise_sigma).float()
        for i, t in enumerate(ref.timesteps[: plan.num_steps]):
            scaled = ref.scale_model_input(x, t)
            assert torch.allclose(scaled.double(), x.double() * plan.input_scale(i), rtol=1e-6), (steps, i)
            model_output = consistent_output(x, plan, i, x0, prediction_type, g)
            kwargs, noise = {}, None
            if sampler.draws_noise(state):
                seed = int(torch.randint(0, 2**31, (1,), generator=g))
                kwargs["generator"] = torch.Generator().manual_seed(seed)
                # diffusers draws in the model output's dtype (float64 here), the SDE solver in float32
                dtype = sampler.noise_dtype or torch.float64
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
            # the sample in float64 too: a float32 one makes diffusers' x/(σ² + 1) float32 (a 0-dim float64 σ does
            # not promote it), which Heun's second call on the cosine schedule multiplies by dt ≈ −2·10⁴
            theirs = ref.step(model_output.double(), t, x.double(), **kwargs).prev_sample
            ours, x0_pred = sampler.step([state], [2], model_output, x, noise)
            assert ours.dtype == torch.float32 and x0_pred.shape == x.shape
            scale = 1 / math.sqrt(plan.sigmas[i + 1] ** 2 + 1) if plan.scale_input else 1.0
            err = ((ours.double() - theirs) * scale).abs().max().item()
            assert err <= 1e-5, (steps, i, float(t), err)
            x = ours
        assert state.finished and state.steps_done == plan.num_steps and state.x0_prev is None


@pytest.mark.parametrize(
    "name,schedule,prediction_type,ratio,max_value",
    [
        (name, schedule, prediction_type, ratio, max_value)
        for name in ("ddim", "dpmpp_2m", "unipc")
        for schedule in ("scaled_linear", "squaredcos_cap_v2")
        for prediction_type in PREDICTIONS
        for ratio, max_value in ((0.995, 1.0), (0.9, 2.5), (0.995, 0.5))
    ],
)
def test_thresholding_matches_diffusers(name, schedule, prediction_type, ratio, max_value):
    """Dynamic thresholding (`thresholding: true` in the scheduler config) on x̂0, per row, against diffusers'
    DDIMScheduler and DPMSolverMultistepScheduler with it on: every step of 10- and 50-step runs (DPM-Solver's
    history holds the thresholded x̂0), max error ≤ 1e-5. Rows whose x̂0 quantile lies under 1, between 1 and
    sample_max_value, and over it; sample_max_value under 1 too (torch.clamp then gives s = sample_max_value)."""
    options = dict(dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    config = model_config(schedule, "trailing", prediction_type, thresholding=True, **options)
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)[name]
    plain = build_samplers(model_config(schedule, "trailing", prediction_type, **options), ac)[name]
    assert sampler.thresholding == Thresholding(ratio=ratio, max_value=max_value) and plain.thresholding is None
    g = torch.Generator().manual_seed(4)
    rows = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64).reshape(-1, 1, 1, 1)  # x̂0's scale per row
    for steps in (10, 50):
        plan = sampler.plan(steps)
        ref = reference(name, config, steps, ac)
        if name == "ddim":
            ref.final_alpha_cumprod = torch.tensor(final_alpha_cumprod(config, ac), dtype=torch.float64)
        else:
            ref.sigmas = torch.tensor(plan.sigmas, dtype=torch.float64)
        state, plain_state = sampler.start(steps), plain.start(steps)
        x0 = torch.randn((3, 4, 4, 4), generator=g, dtype=torch.float64) * rows
        x = (torch.randn((3, 4, 4, 4), generator=g) * plan.init_noise_sigma).float()
        changed = 0.0
        for i, t in enumerate(ref.timesteps[: plan.num_steps]):
            model_output = consistent_output(x, plan, i, x0, prediction_type, g)
            theirs = ref.step(model_output.double(), t, x.double()).prev_sample
            ours, x0_pred = sampler.step([state], [3], model_output, x, None)
            err = (ours.double() - theirs).abs().max().item()
            assert err <= 1e-5, (steps, i, float(t), err)
            assert x0_pred.abs().max().item() <= 1 + 1e-6  # thresholded x̂0 lies in [−1, 1]
            changed = max(changed, (ours - plain.step([plain_state], [3], model_output, x, None)[0]).abs().max().item())
            x = ours
        assert changed > 1e-2  # the option does something here


@pytest.mark.parametrize("schedule,spacing", [("scaled_linear", "leading"), ("squaredcos_cap_v2", "trailing")])
def test_unipc_bh1_matches_diffusers_but_for_its_nan_at_the_end(schedule, spacing):
    """solver_type "bh1" (B(h) = −h) in the model's config: every step of 7- and 20-step runs within 1e-5 of
    UniPCMultistepScheduler but the last, where σ̂ = 0 makes B(h) infinite and diffusers multiplies it by the zero
    of an order-1 step (NaN); latentd's order-1 update has no B(h) term and ends at x̂0, as bh2 does."""
    config = {**model_config(schedule, spacing), "solver_type": "bh1"}
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)["unipc"]
    assert sampler.bh1 and not build_samplers(model_config(schedule, spacing), ac)["unipc"].bh1
    g = torch.Generator().manual_seed(5)
    for steps in (7, 20):
        plan, state = sampler.plan(steps), sampler.start(steps)
        ref = reference("unipc", config, steps, ac)
        assert ref.config.solver_type == "bh1"
        ref.sigmas = torch.tensor(plan.sigmas, dtype=torch.float64)
        x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
        x = (torch.randn((2, 4, 4, 4), generator=g) * plan.init_noise_sigma).float()
        for i, t in enumerate(ref.timesteps):
            model_output = consistent_output(x, plan, i, x0, "epsilon", g)
            theirs = ref.step(model_output.double(), t, x).prev_sample
            ours, x0_pred = sampler.step([state], [2], model_output, x, None)
            if i < steps - 1:
                assert (ours.double() - theirs).abs().max().item() <= 1e-5, (steps, i)
            else:
                assert torch.isnan(theirs).all() and torch.equal(ours, x0_pred)
            x = ours


@pytest.mark.parametrize(
    "scheduler,overrides,expected",
    [
        ("DDIMScheduler", {}, "ddim"),
        ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m_karras"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
            "dpmpp_2m_sde_karras",
        ),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, None),  # third order: not implemented
        ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, None),
        ("UniPCMultistepScheduler", {}, "unipc"),
        ("UniPCMultistepScheduler", {"solver_order": 3}, None),
        ("EulerDiscreteScheduler", {}, "euler"),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler_karras"),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_max": 10.0}, None),
        # an SDXL v-prediction fine-tune trained at zero terminal SNR (NoobAI-XL v-pred ships this)
        ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, "euler"),
        ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral"),
        ("LMSDiscreteScheduler", {}, "lms"),
        ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "lms_karras"),
        ("LMSDiscreteScheduler", {"use_exponential_sigmas": True}, None),
        ("HeunDiscreteScheduler", {}, "heun"),
        ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun_karras"),
        ("KDPM2DiscreteScheduler", {}, "dpm2"),
        ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "dpm2_karras"),
        ("KDPM2AncestralDiscreteScheduler", {}, "dpm2_ancestral"),
        ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, "dpm2_ancestral_karras"),
        ("KDPM2AncestralDiscreteScheduler", {"use_beta_sigmas": True}, None),
        ("DPMSolverSDEScheduler", {}, "dpmpp_sde"),
        ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, "dpmpp_sde_karras"),
        ("PNDMScheduler", {"skip_prk_steps": True}, "plms"),  # SD 1.x's
        ("PNDMScheduler", {}, None),  # its Runge-Kutta warm-up (skip_prk_steps false): not implemented
        ("LCMScheduler", {}, "lcm"),
    ],
)
def test_a_folders_own_scheduler_names_the_sampler_that_does_what_it_does(scheduler, overrides, expected):
    """sampler_for_scheduler reads the config as the scheduler would (its defaults filled in); the sampler it names
    follows that very scheduler: diffusers_scheduler(name, config) is the folder's, value for value."""
    import diffusers

    config = dict(
        getattr(diffusers, scheduler).from_config(model_config("scaled_linear", "leading"), **overrides).config
    )
    config["_class_name"] = scheduler
    assert sampler_for_scheduler(config) == expected
    if expected is not None:

        def values(built):
            return {key: value for key, value in built.config.items() if not key.startswith("_")}

        assert values(diffusers_scheduler(expected, config)) == values(
            getattr(diffusers, scheduler).from_config(config)
        )


def test_a_scheduler_latentd_has_no_sampler_for_names_none():
    """DEISMultistepScheduler (not implemented): no sampler, and no import error."""
    config = {**model_config("scaled_linear", "leading"), "_class_name": "DEISMultistepScheduler"}
    assert sampler_for_scheduler(config) is None
    assert sampler_for_scheduler({"_class_name": "NoSuchScheduler"}) is None


@pytest.mark.parametrize("schedule,spacing", list(itertools.product(SCHEDULES, SPACINGS)))
def test_lcm_plan_matches_diffusers(schedule, spacing):
    """LCMScheduler's timesteps (its own: the distillation schedule subsampled, whatever the spacing), exactly;
    at most original_inference_steps of them, named in the refusal."""
    config = model_config(schedule, spacing)
    sampler = build_samplers(config, alphas_cumprod_from_config(config))["lcm"]
    assert sampler.max_steps() == 50
    for steps in (1, 2, 4, 7, 8, 50):
        ref = reference("lcm", config, steps)
        assert list(sampler.plan(steps).timesteps) == ref.timesteps.double().tolist(), steps
    with pytest.raises(ValueError, match="between 1 and 50"):
        sampler.plan(51)
    short = build_samplers({**config, "original_inference_steps": 25}, alphas_cumprod_from_config(config))["lcm"]
    assert short.max_steps() == 25 and len(short.plan(25).timesteps) == 25


@pytest.mark.parametrize(
    "schedule,prediction_type,clip",
    [
        (schedule, prediction_type, clip)
        for schedule in ("scaled_linear", "squaredcos_cap_v2")
        for prediction_type in PREDICTIONS
        for clip in (False, True)
    ]
    + [("zero_snr", "v_prediction", False)],
)
def test_lcm_update_matches_diffusers(schedule, prediction_type, clip):
    """Every step of 1/4/8-step runs fed the same sample and model output, the noise from the same seed at every
    step but the last (none there): our update vs LCMScheduler.step on our float64 ᾱ, max error ≤ 1e-5; with
    clip_sample too (x̂0 clamped before the boundary condition); at zero terminal SNR too, which LCMScheduler
    keeps at ᾱ_999 = 0 (its first step from pure noise)."""
    if schedule == "zero_snr":
        config = zero_snr_config("trailing")
    else:
        config = model_config(schedule, "trailing", prediction_type)
    if clip:  # laid over the dict: drop its _use_default_values, with which from_config would reset them
        config = {k: v for k, v in config.items() if k != "_use_default_values"}
        config |= {"clip_sample": True, "clip_sample_range": 0.8}
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)["lcm"]
    g = torch.Generator().manual_seed(6)
    for steps in (1, 4, 8):
        plan, state = sampler.plan(steps), sampler.start(steps)
        ref = reference("lcm", config, steps, ac)
        x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
        x = torch.randn((2, 4, 4, 4), generator=g)
        for i, t in enumerate(ref.timesteps):
            model_output = consistent_output(x, plan, i, x0, prediction_type, g)
            kwargs, noise = {}, None
            assert sampler.draws_noise(state) == (i < steps - 1)
            if sampler.draws_noise(state):
                seed = int(torch.randint(0, 2**31, (1,), generator=g))
                kwargs["generator"] = torch.Generator().manual_seed(seed)
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            theirs = ref.step(model_output.double(), t, x, **kwargs)
            ours, denoised = sampler.step([state], [2], model_output, x, noise)
            assert (ours.double() - theirs.prev_sample).abs().max().item() <= 1e-5, (steps, i)
            assert (denoised.double() - theirs.denoised).abs().max().item() <= 1e-5, (steps, i)
            x = ours
        assert state.finished and torch.equal(x, denoised)  # the last step returns f itself


def test_thresholding_defaults_are_diffusers():
    assert Thresholding.from_config({"thresholding": True}) == Thresholding(ratio=0.995, max_value=1.0)
    assert Thresholding.from_config({"thresholding": False, "sample_max_value": 3.0}) is None
    assert Thresholding.from_config({}) is None
    config = model_config("squaredcos_cap_v2", "trailing", "v_prediction", thresholding=True)
    for name in ("ddim", "dpmpp_2m"):
        assert name not in unsupported_samplers(config)
    # a config without clip_sample clips as the scheduler would built from it: DDIM yes, LCM no
    bare = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    samplers = build_samplers(bare, alphas_cumprod_from_config(bare))
    assert samplers["ddim"].clip_range == diffusers_scheduler("ddim", bare).config.clip_sample_range == 1.0
    assert samplers["lcm"].clip_range is None and not diffusers_scheduler("lcm", bare).config.clip_sample


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_float32_diffusers_agrees_where_well_conditioned(name):
    """Against diffusers exactly as shipped (its float32 ᾱ and σ̂) on SD's schedule (σ̂ ≤ 14.6): within 1e-4
    on the UNet's scale over a 20-step run, fed the same inputs."""
    config = model_config("scaled_linear", "leading", "epsilon")
    sampler = build_samplers(config, alphas_cumprod_from_config(config))[name]
    plan, state = sampler.plan(20), sampler.start(20)
    ref = reference(name, config, 20)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
    x = (torch.randn((2, 4, 4, 4), generator=g) * plan.init_noise_sigma).float()
    for i, t in enumerate(ref.timesteps):
        ref.scale_model_input(x, t)
        model_output = consistent_output(x, plan, i, x0, "epsilon", g)
        kwargs, noise = {}, None
        if sampler.draws_noise(state):
            kwargs["generator"] = torch.Generator().manual_seed(i)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        theirs = ref.step(model_output, t, x, **kwargs).prev_sample
        ours, _ = sampler.step([state], [2], model_output, x, noise)
        scale = 1 / math.sqrt(plan.sigmas[i + 1] ** 2 + 1) if plan.scale_input else 1.0
        assert ((ours.double() - theirs.double()) * scale).abs().max().item() <= 1e-4, i
        x = ours


@pytest.mark.parametrize("name", SAMPLERS)
def test_rows_of_different_requests_share_one_call(name):
    """One call over three requests at different steps of different schedules (with their histories) equals
    each request stepped alone, bit for bit."""
    config = model_config("scaled_linear", "leading", "v_prediction")
    sampler = build_samplers(config, alphas_cumprod_from_config(config))[name]
    g = torch.Generator().manual_seed(2)
    counts = [1, 2, 3]

    def states_at(progress):
        states = []
        for steps, done, count in zip((10, 25, 4), progress, counts):
            state = sampler.start(steps, eta=0.5 if sampler.takes_eta else 0.0)
            for _ in range(done):
                x = torch.randn((count, 4, 4, 4), generator=torch.Generator().manual_seed(done))
                out = torch.randn((count, 4, 4, 4), generator=torch.Generator().manual_seed(done + 1))
                noise = torch.randn_like(x) if sampler.draws_noise(state) else None
                sampler.step([state], [count], out, x, noise)
            states.append(state)
        return states

    progress = (1, 7, 3)  # the second update (PLMS: its redone first step; the 2M solvers: their first 2nd order)
    x = torch.randn((6, 4, 4, 4), generator=g)
    out = torch.randn((6, 4, 4, 4), generator=g)
    noise = torch.randn((6, 4, 4, 4), generator=g)
    together_states = states_at(progress)
    uses_noise = any(sampler.draws_noise(s) for s in together_states)
    together = sampler.step(together_states, counts, out, x, noise if uses_noise else None)
    alone_states, row = states_at(progress), 0
    for state, count in zip(alone_states, counts):
        rows = slice(row, row + count)
        alone = sampler.step([state], [count], out[rows], x[rows], noise[rows] if uses_noise else None)
        assert torch.equal(alone[0], together[0][rows]) and torch.equal(alone[1], together[1][rows])
        row += count
    assert [s.step_index for s in alone_states] == [s.step_index for s in together_states] == [2, 8, 4]


def plms_reference(config, steps, alphas_cumprod, plan, start=0):
    """PNDMScheduler(skip_prk_steps) set to `steps` on our float64 ᾱ, each update going from and to the timesteps our
    plan says: where diffusers' own t ± T//n are those (leading spacing; trailing where the step count divides T),
    checked to be; elsewhere (not a timestep of the sequence: the diffusers issue PLMSSampler names) put in their
    place. Everything else (the outputs kept, their weights, the redone first step's sample) stays diffusers'."""
    ref = reference("plms", config, steps, alphas_cumprod)
    final = final_alpha_cumprod({"set_alpha_to_one": False, **config}, alphas_cumprod)
    ref.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
    uniform = config["timestep_spacing"] == "leading" or (
        config["timestep_spacing"] == "trailing" and config["num_train_timesteps"] % steps == 0
    )
    froms = list(plan.timesteps)
    if plan.num_steps - start > 1:
        froms[start + 1] = plan.timesteps[start]  # the second call redoes the first step
    calls = iter(zip(froms[start:], plan.prev_timesteps[start:]))
    original = ref._get_prev_sample

    def on_the_sequence(sample, timestep, prev_timestep, model_output):
        t_from, t_to = next(calls)
        if uniform:
            assert (int(timestep), max(int(prev_timestep), -1)) == (t_from, t_to)
        return original(sample, int(t_from), int(t_to), model_output)

    ref._get_prev_sample = on_the_sequence
    return ref


@pytest.mark.parametrize("schedule,spacing", list(itertools.product(SCHEDULES, SPACINGS)))
def test_plms_plan_matches_diffusers(schedule, spacing):
    """PNDMScheduler's timesteps (skip_prk_steps: the second one twice, n + 1 calls for n > 1 steps) exactly, and
    the doors' step count (rules.steps_run) is the plan's; σ̂ at each call from diffusers' own ᾱ to float32 rounding."""
    config = model_config(schedule, spacing)
    sampler = build_samplers(config, alphas_cumprod_from_config(config))["plms"]
    for steps in (1, 2, 7, 10, 50, sampler.max_steps()):
        plan, ref = sampler.plan(steps, 0), reference("plms", config, steps)
        assert plan.num_steps == rules.steps_run(steps, None, "plms") == steps + (steps > 1)
        if spacing == "trailing" and len(ref._timesteps) == steps + 1:  # the extra element ≈ 0 (see above)
            assert list(plan.timesteps) == ref.timesteps.double().tolist()[1:]
            continue
        assert list(plan.timesteps) == ref.timesteps.double().tolist(), steps
        ac = ref.alphas_cumprod.double()[ref.timesteps]
        assert np.allclose(plan.sigmas[:-1], ((1 - ac) / ac).sqrt().tolist(), rtol=1e-3, atol=0), steps
    with pytest.raises(ValueError, match=f"between 1 and {sampler.max_steps()}"):
        sampler.plan(sampler.max_steps() + 1, 0)


@pytest.mark.parametrize("schedule,spacing,prediction_type", list(itertools.product(SCHEDULES, SPACINGS, PREDICTIONS)))
def test_plms_update_matches_diffusers(schedule, spacing, prediction_type):
    """Every call of 1/2/7/10/50-step runs (the first step's redo and the multistep history included), fed the same
    sample and model output: our update vs PNDMScheduler.step in float64, within 1e-5 (and 1e-6 relative)."""
    config = model_config(schedule, spacing, prediction_type)
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)["plms"]
    g = torch.Generator().manual_seed(7)
    for steps in (1, 2, 7, 10, 50):
        plan, state = sampler.plan(steps, 0), sampler.start(steps)
        ref = plms_reference(config, steps, ac, plan)
        x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
        x = torch.randn((2, 4, 4, 4), generator=g)
        for i, t in enumerate(plan.timesteps):
            model_output = consistent_output(x, plan, i, x0, prediction_type, g)
            theirs = ref.step(model_output.double(), int(t), x.double()).prev_sample
            ours, x0_pred = sampler.step([state], [2], model_output, x, None)
            # to float32 rounding where a 2-step cosine run's redone first step (from ᾱ ≈ 2e-9) leaves |x| ~ 5000
            assert torch.allclose(ours.double(), theirs, rtol=1e-6, atol=1e-5), (steps, i, t)
            assert x0_pred.shape == x.shape and torch.isfinite(x0_pred).all()
            x = ours
        assert state.finished and state.history == () and state.x_start is None


@pytest.mark.parametrize("start", [1, 2, 5, 9])
def test_plms_image_to_image_runs_from_its_own_start(start):
    """A request starting at step k of 10 (SD's schedule): the steps before k are DDIM's (the picture is noised to
    step k's level), then the calls are those of a text-to-image run from there (step k + 1 twice), each update
    PNDMScheduler's own (its t ± T//n are the plan's) within 1e-5; rules.steps_run counts them."""
    config = model_config("scaled_linear", "leading", "epsilon")
    ac = alphas_cumprod_from_config(config)
    samplers = build_samplers(config, ac)
    plan = samplers["plms"].plan_for(10, None, start)
    ddim = samplers["ddim"].plan(10)
    assert plan.timesteps[: start + 1] == ddim.timesteps[: start + 1] and plan.sigmas[start] == ddim.sigmas[start]
    strength = (10 - start) / 10
    assert rules.start_step(10, strength, "plms") == start
    assert plan.num_steps - start == rules.steps_run(10, strength, "plms") == 10 - start + (start < 9)
    state = SamplerState(plan=plan, step_index=start, start_index=start)
    ref = plms_reference(config, 10, ac, plan, start)
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn((1, 4, 4, 4), generator=g, dtype=torch.float64)
    x = torch.randn((1, 4, 4, 4), generator=g)
    for i in range(start, plan.num_steps):
        model_output = consistent_output(x, plan, i, x0, "epsilon", g)
        theirs = ref.step(model_output.double(), int(plan.timesteps[i]), x.double()).prev_sample
        ours, _ = samplers["plms"].step([state], [1], model_output, x, None)
        assert (ours.double() - theirs).abs().max().item() <= 1e-5, i
        x = ours
    assert state.finished


def per_step_layout(values) -> torch.Tensor:
    """KDPM2(Ancestral)DiscreteScheduler's layout of a per-step table (n + 1 entries): the first, each after it twice,
    the last again."""
    values = torch.tensor(values, dtype=torch.float64)
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


def dpm2_reference(name, config, steps, alphas_cumprod, plan):
    """KDPM2(Ancestral)DiscreteScheduler set to `steps` on our float64 ᾱ, its σ̂ and midpoints (kept apart, in its
    layout) the plan's in float64: the σ̂ each step starts at from the plan's first calls, the midpoints from its
    second; the ancestral one's σ̂↓ and σ̂↑ from the plan's second calls too."""
    ref = reference(name, config, steps, alphas_cumprod)
    ref.sigmas = per_step_layout([*plan.sigmas[0:-1:2], 0.0])  # σ̂_0..σ̂_{n−1}, 0
    midpoints = list(plan.sigmas[1:-1:2])  # σ̂'_0..σ̂'_{n−2}
    if not plan.step_ends:  # KDPM2: entry i is the midpoint between σ̂_{i−1} and σ̂_i (none before step 0)
        ref.sigmas_interpol = per_step_layout([math.nan, *midpoints, 0.0])
        return ref
    # KDPM2Ancestral: entry i is step i's midpoint toward its σ̂↓, and the tables of σ̂↓ and σ̂↑ are laid out alike
    ref.sigmas_interpol = per_step_layout([*midpoints, 0.0, 0.0])
    ref.sigmas_down = per_step_layout([*plan.step_ends[1::2], 0.0, 0.0])
    ref.sigmas_up = per_step_layout([*plan.sigmas_up[1::2], 0.0, 0.0])
    return ref


@pytest.mark.parametrize("name,schedule,spacing", list(itertools.product(DPM2, ("linear", "scaled_linear"), SPACINGS)))
def test_dpm2_plan_matches_diffusers(name, schedule, spacing):
    """KDPM2DiscreteScheduler's calls (2n − 1: each step's start, then its midpoint √(σ̂_i·σ̂_{i+1}) at a fractional
    timestep, the last step one call), its timesteps, the σ̂ each call sees (sigmas at a step's start,
    sigmas_interpol at its midpoint) and init_noise_sigma, to the rounding of diffusers' float32 tables; not offered
    on the capped cosine schedule (as heun). KDPM2AncestralDiscreteScheduler's the same with its midpoint toward
    σ̂↓, and its σ̂↓ and σ̂↑."""
    config = model_config(schedule, spacing)
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)[name]
    for steps in (1, 2, 7, 10, 50):
        plan, ref = sampler.plan(steps), reference(name, config, steps)
        timesteps = ref.timesteps.double().numpy()
        assert plan.num_steps == len(timesteps) == rules.steps_run(steps, None, name) == 2 * steps - 1
        # on our float64 ᾱ to the float32 rounding of its midpoint σ̂; on its own float32 table to that table's
        on_ours = reference(name, config, steps, ac).timesteps.double().numpy()
        # (the ancestral one's σ̂↓ = √(σ̂_{i+1}² − σ̂↑²) cancels in its float32 where σ̂_{i+1} ≪ σ̂_i, at 2 steps: σ̂↓
        # and the midpoint off by up to 5 % there (ours, float64, are σ̂_{i+1}²/σ̂_i and σ̂_{i+1}), its t by 0.012 on
        # one machine and 0.022 on another: how much cancels depends on the CPU's float32 kernels)
        cancels = name in DPM2_ANCESTRAL and steps == 2
        atol = 5e-2 if cancels else 1e-4
        assert np.allclose(plan.timesteps, on_ours, rtol=1e-6, atol=atol), steps
        assert np.allclose(plan.timesteps, timesteps, rtol=1e-6, atol=1e-2), steps
        lag = 1 if name in DPM2_ANCESTRAL else 0  # where each scheduler reads a second call's midpoint
        seen = [float(ref.sigmas[i] if i % 2 == 0 else ref.sigmas_interpol[i - lag]) for i in range(plan.num_steps)]
        # diffusers' own float32 ᾱ: σ̂ near t = 0 from 1 − ᾱ ≈ 1e-3 in float32, to 3 or 4 digits
        rtol = 5e-2 if cancels else 1e-3
        assert np.allclose(plan.sigmas[:-1], seen, rtol=rtol, atol=0) and plan.sigmas[-1] == 0.0, steps
        assert math.isclose(plan.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-3), steps
        if name in DPM2_ANCESTRAL:  # step i's σ̂↓ and σ̂↑: its second call's (diffusers' entry 2i)
            assert np.allclose(plan.step_ends[1::2], ref.sigmas_down[0::2][: steps - 1], rtol=rtol, atol=0), steps
            assert np.allclose(plan.sigmas_up[1::2], ref.sigmas_up[0::2][: steps - 1], rtol=rtol, atol=0), steps
            assert plan.sigmas_up[0::2] == (0.0,) * steps and plan.step_ends[-1] == 0.0
        else:
            assert plan.step_ends == plan.sigmas_up == ()
    assert "squaredcos_cap_v2" in unsupported_samplers(model_config("squaredcos_cap_v2", spacing))[name]


@pytest.mark.parametrize(
    "name,schedule,spacing,prediction_type",
    list(itertools.product(DPM2, ("linear", "scaled_linear"), SPACINGS, PREDICTIONS)),
)
def test_dpm2_update_matches_diffusers(name, schedule, spacing, prediction_type):
    """Every call of 1/2/7/10/50-step runs, fed the same sample and model output: our update vs
    KDPM2(Ancestral)DiscreteScheduler.step on the plan's float64 σ̂ (dpm2_reference), within 1e-5 on the UNet's scale;
    the UNet sees the sample scaled by the σ̂ of that call (the midpoint's at a second call), as scale_model_input
    does. The ancestral one draws its noise at each second call, from the generator it is given, as we do."""
    config = model_config(schedule, spacing, prediction_type)
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)[name]
    g = torch.Generator().manual_seed(9)
    for steps in (1, 2, 7, 10, 50):
        plan, state = sampler.plan(steps), sampler.start(steps)
        ref = dpm2_reference(name, config, steps, ac, plan)
        x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
        x = (torch.randn((2, 4, 4, 4), generator=g) * plan.init_noise_sigma).float()
        for i, t in enumerate(ref.timesteps):
            scaled = ref.scale_model_input(x.double(), t)
            assert torch.allclose(scaled, x.double() * plan.input_scale(i), rtol=1e-12), (steps, i)
            model_output = consistent_output(x, plan, i, x0, prediction_type, g)
            kwargs, noise = {}, None
            if sampler.draws_noise(state):
                seed = int(torch.randint(0, 2**31, (1,), generator=g))
                kwargs["generator"] = torch.Generator().manual_seed(seed)
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            assert (noise is not None) == (name in DPM2_ANCESTRAL and i % 2 == 1), (steps, i)
            theirs = ref.step(model_output.double(), t, x.double(), **kwargs).prev_sample
            ours, _ = sampler.step([state], [2], model_output, x, noise)
            scale = 1 / math.sqrt(plan.sigmas[i + 1] ** 2 + 1)
            assert ((ours.double() - theirs) * scale).abs().max().item() <= 1e-5, (steps, i)
            x = ours
        assert state.finished and state.x_start is None and state.history == ()


@pytest.mark.parametrize("name,schedule,spacing", list(itertools.product(SDE, SCHEDULES, SPACINGS)))
def test_dpmpp_sde_plan_matches_diffusers(name, schedule, spacing):
    """DPMSolverSDEScheduler's calls (2n − 1: each step's start, then its midpoint √(σ̂_i·σ̂_{i+1}), the last step
    one call), its timesteps (float64 as it keeps them), the σ̂ each call sees and init_noise_sigma; not offered on
    the capped cosine schedule too (unlike heun: its first step from σ̂_0 ≈ 2·10⁴ is a data-prediction step)."""
    config = model_config(schedule, spacing)
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)[name]
    for steps in (1, 2, 7, 10, 50):
        plan, ref = sampler.plan(steps), reference(name, config, steps, ac)
        assert plan.num_steps == len(ref.timesteps) == rules.steps_run(steps, None, name) == 2 * steps - 1
        assert np.allclose(plan.timesteps, ref.timesteps.double().numpy(), rtol=1e-9, atol=1e-6), steps
        starts = ref.sigmas.double()[0::2][:steps]  # its layout: σ̂_0, σ̂_1 twice, ..., σ̂_{n−1} twice, 0
        assert torch.allclose(torch.tensor(plan.sigmas[0:-1:2], dtype=torch.float64), starts, rtol=1e-6), steps
        midpoints = (starts[:-1] * starts[1:]).sqrt()  # where scale_model_input puts a second call's sample
        assert torch.allclose(torch.tensor(plan.sigmas[1:-1:2], dtype=torch.float64), midpoints, rtol=1e-6), steps
        assert math.isclose(plan.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-6), steps


@pytest.mark.parametrize(
    "name,schedule,spacing,prediction_type",
    list(itertools.product(SDE, ("linear", "scaled_linear"), SPACINGS, PREDICTIONS)),
)
def test_dpmpp_sde_update_matches_diffusers(name, schedule, spacing, prediction_type):
    """Every call of 1/2/7/20-step runs, fed the same sample and model output: our update vs DPMSolverSDEScheduler's
    step with its Brownian noise sampler seeded as the request is (its noise_sampler_seed), within 1e-5 on the
    UNet's scale: the path is rough (√δ over δ), so this holds only where both query it at the same σ. (The cosine
    schedule: the next test.)"""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    config = model_config(schedule, spacing, prediction_type)
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)[name]
    g = torch.Generator().manual_seed(11)
    for steps in (1, 2, 7, 20):
        plan, ref = sampler.plan(steps), reference(name, config, steps, ac)
        state = sampler.start(steps)
        state.seed = 1000 + steps
        x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
        x = (torch.randn((2, 4, 4, 4), generator=g) * plan.init_noise_sigma).float()
        positive = ref.sigmas[ref.sigmas > 0]  # as its step makes it, but from the float32 sample, as the engine's
        ref.noise_sampler = BrownianTreeNoiseSampler(x, positive.min().item(), positive.max().item(), state.seed)
        for i, t in enumerate(ref.timesteps):
            scaled = ref.scale_model_input(x.double(), t)
            assert torch.allclose(scaled, x.double() * plan.input_scale(i), rtol=1e-5), (steps, i)
            model_output = consistent_output(x, plan, i, x0, prediction_type, g)
            assert not sampler.draws_noise(state)  # its noise is the path's, not the generator's
            theirs = ref.step(model_output.double(), t, x.double()).prev_sample
            ours, _ = sampler.step([state], [2], model_output, x, None)
            scale = 1 / math.sqrt(plan.sigmas[i + 1] ** 2 + 1)
            assert ((ours.double() - theirs) * scale).abs().max().item() <= 1e-5, (steps, i)
            x = ours
        assert state.finished and state.x_start is None and state.brownian is None


@pytest.mark.parametrize("name,spacing,prediction_type", list(itertools.product(SDE, SPACINGS, PREDICTIONS)))
def test_dpmpp_sde_on_the_cosine_schedule_matches_diffusers_in_float64(name, spacing, prediction_type):
    """On the capped cosine schedule (σ̂_0 ≈ 2·10⁴ at t = 999) DPMSolverSDEScheduler's own float32 σ̂ table and
    scalar log/exp move x_{i+1} by up to 7·10⁻⁴ on the UNet's scale; given our float64 σ̂ (its table's, rounded
    alike: the plan test above) and the same Brownian noise (ours, queried at its float32 σ̂ as on the other
    schedules), its step agrees with ours within 1e-6 at every call of 1/2/7/20-step runs."""
    from services.worker.diffusion.dpmpp_sde import BrownianNoise

    class SharedNoise(BrownianNoise):
        """The request's path, each z it gives ours kept for the reference's step that follows."""

        drawn: tuple = ()

        def step_noise(self, *args):
            self.drawn = (*self.drawn, super().step_noise(*args))
            return self.drawn[-1]

        def last(self, sigma, sigma_next):
            return self.drawn[-1].double()

    config = model_config("squaredcos_cap_v2", spacing, prediction_type)
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)[name]
    g = torch.Generator().manual_seed(12)
    for steps in (1, 2, 7, 20):
        plan, ref = sampler.plan(steps), reference(name, config, steps, ac)
        starts = list(plan.sigmas[0:-1:2])  # its layout: σ̂_0, σ̂_1 twice, ..., σ̂_{n−1} twice, 0
        ref.sigmas = torch.tensor([starts[0], *(s for s in starts[1:] for _ in "ab"), 0.0], dtype=torch.float64)
        state = sampler.start(steps)
        state.seed = 2000 + steps
        x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
        x = (torch.randn((2, 4, 4, 4), generator=g) * plan.init_noise_sigma).float()
        positive = [s for s in plan.sigmas if s > 0]
        state.brownian = shared = SharedNoise(x, min(positive), max(positive), state.seed)
        ref.noise_sampler = shared.last
        for i, t in enumerate(ref.timesteps):
            model_output = consistent_output(x, plan, i, x0, prediction_type, g)
            ours, _ = sampler.step([state], [2], model_output, x, None)
            theirs = ref.step(model_output.double(), t, x.double()).prev_sample
            scale = 1 / math.sqrt(plan.sigmas[i + 1] ** 2 + 1)
            assert ((ours.double() - theirs) * scale).abs().max().item() <= 1e-6, (steps, i)
            x = ours
        assert len(shared.drawn) == 2 * steps - 2 and state.finished  # a draw per call but the last step's


def test_the_brownian_path_is_queried_within_its_ends_without_a_warning():
    """torchsde keeps a path's ends to 6 digits and warns (once per process, into the worker's log) of a query past
    them; the schedule's σ̂_max and σ̂_min in float32 have more: the query is clamped to torchsde's ends first, which
    is what torchsde does after its warning, so the noise is the same."""
    from services.worker.diffusion.dpmpp_sde import BrownianNoise

    sigma_min, sigma_max = 0.0291675, 7.371844291687012  # neither a float32 of 6 digits
    path = BrownianNoise(torch.zeros((1, 4, 2, 2)), sigma_min, sigma_max, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = path.step_noise(sigma_max, 3.0, halfway=False)
        last = path.step_noise(0.5, sigma_min, halfway=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's own clamp, after its warning
        assert torch.equal(first, path.path(3.0, sigma_max) * -1 / (sigma_max - 3.0) ** 0.5)
    assert torch.isfinite(last).all()


def test_dpm_solver_history_starts_with_the_request():
    """The 2M update needs the previous x0 prediction: a request's first update is first order wherever it
    starts (image to image will start past step 0), and the last is first order (σ̂ = 0 after it)."""
    config = model_config("scaled_linear", "leading", "epsilon")
    sampler = build_samplers(config, alphas_cumprod_from_config(config))["dpmpp_2m"]
    plan = sampler.plan(20)
    assert plan.orders == (1,) + (2,) * 18 + (1,)
    assert plan.sigmas[-1] == 0.0
    assert sampler.plan(10).orders == (1,) + (2,) * 8 + (1,)


def test_guidance_rescale_is_diffusers_formula_per_row():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(3)
    guided, cond = torch.randn((3, 4, 8, 8), generator=g) * 3, torch.randn((3, 4, 8, 8), generator=g)
    phi = torch.tensor([0.0, 0.7, 1.0])
    ours = rescale_guidance(guided, cond, phi)
    assert torch.equal(ours[0], guided[0])  # φ = 0: exactly the guided output
    for r in (1, 2):
        theirs = rescale_noise_cfg(guided[r : r + 1], cond[r : r + 1], guidance_rescale=float(phi[r]))
        assert (ours[r : r + 1] - theirs).abs().max().item() <= 1e-6
        assert torch.equal(evaluate_rescale(guided[r : r + 1], cond[r : r + 1], float(phi[r])), theirs)
    assert math.isclose(float(ours[2].std()), float(cond[2].std()), rel_tol=1e-5)  # φ = 1: cond's std
    flat = torch.zeros((1, 4, 2, 2))
    assert torch.equal(rescale_guidance(flat, flat, 0.0), flat)  # no 0/0 where φ = 0


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("clip_range", [1.0, 2.5])
def test_ddim_clip_sample_matches_diffusers(prediction_type, clip_range):
    """`clip_sample: true` (DDIMScheduler's default where a config leaves the key out): x̂0 clamped to
    [−clip_sample_range, clip_sample_range] at every step of a 20-step run, max error ≤ 1e-5 against diffusers."""
    config = model_config("scaled_linear", "leading", prediction_type, clip_sample_range=clip_range)
    config["clip_sample"] = True  # model_config passes False; from_config reads the dict as it is here
    ac = alphas_cumprod_from_config(config)
    sampler = build_samplers(config, ac)["ddim"]
    assert sampler.clip_range == clip_range
    assert build_samplers({k: v for k, v in config.items() if k != "clip_sample"}, ac)["ddim"].clip_range == clip_range
    ref = reference("ddim", config, 20, ac)
    assert ref.config.clip_sample and ref.config.clip_sample_range == clip_range
    ref.final_alpha_cumprod = torch.tensor(final_alpha_cumprod(config, ac), dtype=torch.float64)
    plan, state = sampler.plan(20), sampler.start(20)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64) * 3  # well outside the range
    x = (torch.randn((2, 4, 4, 4), generator=g) * plan.init_noise_sigma).float()
    for i, t in enumerate(ref.timesteps[: plan.num_steps]):
        model_output = consistent_output(x, plan, i, x0, prediction_type, g)
        theirs = ref.step(model_output.double(), t, x.double()).prev_sample
        ours, x0_pred = sampler.step([state], [2], model_output, x, None)
        assert (ours.double() - theirs).abs().max().item() <= 1e-5, (i, float(t))
        assert x0_pred.abs().max().item() <= clip_range + 1e-6
        x = ours
