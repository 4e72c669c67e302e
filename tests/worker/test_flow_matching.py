"""The flow-matching schedule and Euler step against diffusers' FlowMatchEulerDiscreteScheduler (pure math, no model)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from services.worker.diffusion.flow_matching import (
    flow_euler_step,
    flow_forward_trajectory,
    flow_q_sample,
    flow_schedule,
    mu_for,
    resolution_shift,
    unsupported_reason,
)

STEPS = (1, 2, 3, 4, 7, 28, 50, 100)
# (config overrides, how the pipeline calls set_timesteps): SD3's pipeline lets the scheduler space σ; Flux's
# passes sigmas = linspace(1, 1/n, n) and μ from the image's token count
CONFIGS = [
    ({"shift": 1.0}, False),
    ({"shift": 3.0}, False),  # SD3-medium
    ({"shift": 6.0}, False),
    ({"shift": 3.0, "shift_terminal": 0.02}, False),
    ({"shift": 1.0}, True),  # Flux-schnell
    ({"shift": 3.0, "use_dynamic_shifting": True}, True),  # Flux-dev
    ({"shift": 3.0, "use_dynamic_shifting": True}, False),  # SD3.5-style dynamic shift without pipeline σ
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, True),
    ({"use_dynamic_shifting": True, "base_shift": 0.3, "max_shift": 1.5}, True),
    ({"num_train_timesteps": 500, "shift": 2.0}, False),
]
SEQ_LENS = (16, 1024, 4096)


def cases():
    for (overrides, pipeline_sigmas), steps in itertools.product(CONFIGS, STEPS):
        dynamic = overrides.get("use_dynamic_shifting", False)
        for seq_len in SEQ_LENS if dynamic else (None,):
            yield overrides, pipeline_sigmas, steps, seq_len


def config_of(scheduler) -> dict:
    """The config as a model folder's scheduler_config.json holds it (with _class_name)."""
    return json.loads(scheduler.to_json_string())


def reference(overrides: dict, pipeline_sigmas: bool, steps: int, seq_len: int | None):
    scheduler = FlowMatchEulerDiscreteScheduler(**overrides)
    kwargs = {}
    if seq_len is not None:
        kwargs["mu"] = mu_for(scheduler.config, seq_len)
    if pipeline_sigmas:
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps, **kwargs)
    else:
        scheduler.set_timesteps(steps, **kwargs)
    return scheduler


ALL_CASES = list(cases())


def test_there_are_many_configurations():
    assert len(ALL_CASES) >= 120


@pytest.mark.parametrize("overrides,pipeline_sigmas,steps,seq_len", ALL_CASES)
def test_schedule_is_diffusers_exactly(overrides, pipeline_sigmas, steps, seq_len):
    if overrides.get("shift_terminal") and steps == 1:  # diffusers' stretch divides by zero: NaN σ
        with pytest.raises(ValueError, match="at least 2"):
            flow_schedule(config_of(FlowMatchEulerDiscreteScheduler(**overrides)), steps)
        return
    scheduler = reference(overrides, pipeline_sigmas, steps, seq_len)
    config = config_of(scheduler)
    mu = mu_for(config, seq_len) if seq_len is not None else None
    timesteps, sigmas = flow_schedule(config, steps, mu=mu, pipeline_sigmas=pipeline_sigmas)
    assert timesteps.dtype == np.float32 and sigmas.dtype == np.float32
    assert np.array_equal(timesteps, scheduler.timesteps.numpy())
    assert np.array_equal(sigmas, scheduler.sigmas.numpy())


@pytest.mark.parametrize("overrides,pipeline_sigmas", CONFIGS)
def test_euler_steps_are_diffusers_exactly(overrides, pipeline_sigmas):
    """Every step of a 12-step run on the same model outputs: the same latents, bit for bit."""
    steps, seq_len = 12, 64
    dynamic = overrides.get("use_dynamic_shifting", False)
    scheduler = reference(overrides, pipeline_sigmas, steps, seq_len if dynamic else None)
    mu = mu_for(scheduler.config, seq_len) if dynamic else None
    _, sigmas = flow_schedule(config_of(scheduler), steps, mu=mu, pipeline_sigmas=pipeline_sigmas)
    g = torch.Generator().manual_seed(0)
    x_theirs = x_ours = torch.randn((3, 4, 8, 8), generator=g)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn((3, 4, 8, 8), generator=g)
        x_theirs = scheduler.step(v, t, x_theirs, return_dict=False)[0]
        sigma = torch.full((3,), float(sigmas[i]))
        sigma_next = torch.full((3,), float(sigmas[i + 1]))
        x_ours = flow_euler_step(v, x_ours, sigma, sigma_next).x_next
        assert torch.equal(x_ours, x_theirs), i


def test_rows_at_different_sigmas_step_independently():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn((2, 4, 4, 4), generator=g), torch.randn((2, 4, 4, 4), generator=g)
    both = flow_euler_step(v, x, torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.0]))
    first = flow_euler_step(v[:1], x[:1], torch.tensor([1.0]), torch.tensor([0.75]))
    second = flow_euler_step(v[1:], x[1:], torch.tensor([0.5]), torch.tensor([0.0]))
    assert torch.equal(both.x_next, torch.cat([first.x_next, second.x_next]))
    # x̂0 = x − σ·v, and the last step (σ_next = 0) lands on it
    assert torch.allclose(second.x_next, x[1:] - 0.5 * v[1:])
    assert torch.allclose(both.x0_pred[1], second.x_next[0])


def test_resolution_shift_is_flux_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (16, 256, 1024, 4096, 8192):
        assert resolution_shift(seq_len) == calculate_shift(seq_len)
        assert resolution_shift(seq_len, 256, 4096, 0.5, 1.16) == calculate_shift(seq_len, 256, 4096, 0.5, 1.16)
    assert resolution_shift(256) == pytest.approx(0.5) and resolution_shift(4096) == pytest.approx(1.15)


def test_dynamic_shift_needs_mu():
    config = config_of(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="μ is needed"):
        flow_schedule(config, 4)


def test_unsupported_configs_are_named():
    assert unsupported_reason(config_of(FlowMatchEulerDiscreteScheduler())) is None
    karras = config_of(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True))
    assert "use_karras_sigmas" in unsupported_reason(karras)
    stochastic = config_of(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    assert "stochastic_sampling" in unsupported_reason(stochastic)
    assert "FlowMatchEulerDiscreteScheduler" in unsupported_reason({"_class_name": "DDIMScheduler"})


def test_forward_process_is_a_straight_line():
    x0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    frames, sigmas = flow_forward_trajectory(x0, [0, 250, 1000], 1000, noise_seed=3)
    assert sigmas == [0.0, 0.25, 1.0]
    noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(3))
    assert torch.equal(frames[0], x0[0]) and torch.allclose(frames[2], noise[0])
    assert torch.allclose(frames[1], 0.75 * x0[0] + 0.25 * noise[0], atol=1e-6)
    # diffusers' scale_noise is the same line
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    theirs = scheduler.scale_noise(x0, scheduler.timesteps[1:2], noise)
    assert torch.equal(flow_q_sample(x0, float(scheduler.sigmas[1]), noise), theirs)
