"""The DDIM update, schedules and forward process against diffusers' DDIMScheduler (pure tensor math)."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import DDIMScheduler

from services.worker.diffusion.ddim import ddim_step
from services.worker.diffusion.forward import alpha_bars_paper, forward_trajectory, q_sample
from services.worker.diffusion.guidance import classifier_free_guidance
from services.worker.diffusion.schedules import (
    alphas_cumprod_from_config,
    final_alpha_cumprod,
    inference_timesteps,
    max_inference_steps,
    previous_timesteps,
)

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
STEPS = (1, 10, 50, 1000)


def make_scheduler(
    schedule: str,
    spacing: str,
    prediction_type: str = "epsilon",
    set_alpha_to_one: bool = False,
    rescale_betas_zero_snr: bool = False,
):
    return DDIMScheduler(
        rescale_betas_zero_snr=rescale_betas_zero_snr,
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=schedule,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )


@pytest.mark.parametrize("schedule,zero_snr", [*((s, False) for s in SCHEDULES), *((s, True) for s in SCHEDULES)])
def test_alphas_cumprod_match_diffusers(schedule, zero_snr):
    """With rescale_betas_zero_snr too (Lin et al. 2024): √ᾱ shifted to 0 at t = T − 1, ᾱ_0 kept."""
    scheduler = make_scheduler(schedule, "leading", "v_prediction", rescale_betas_zero_snr=zero_snr)
    ours = alphas_cumprod_from_config(scheduler.config)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    if zero_snr:
        plain = alphas_cumprod_from_config(make_scheduler(schedule, "leading", "v_prediction").config)
        assert float(ours[-1]) == 0.0 and float(ours[0]) == pytest.approx(float(plain[0]), rel=1e-12)


def test_zero_terminal_snr_with_epsilon_prediction_is_refused_naming_why():
    config = make_scheduler("scaled_linear", "trailing", "epsilon", rescale_betas_zero_snr=True).config
    with pytest.raises(ValueError, match="rescale_betas_zero_snr needs prediction_type v_prediction"):
        alphas_cumprod_from_config(config)


def test_cosine_schedule_is_improved_ddpm():
    ac = alphas_cumprod_from_config({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})
    import math

    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(ac[499]) - f(500) / f(0)) < 1e-9  # ᾱ after 500 steps, before the cap applies
    betas = 1 - ac[1:] / ac[:-1]
    assert float(betas.max()) <= 0.999 + 1e-12


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS + (7, 61))
def test_timesteps_match_diffusers(spacing, steps):
    scheduler = make_scheduler("scaled_linear", spacing)
    scheduler.set_timesteps(steps)
    if spacing == "leading" and steps == 1000:  # steps_offset 1 puts t = 1000 past the table
        with pytest.raises(ValueError, match="num_inference_steps must be between 1 and 999"):
            inference_timesteps(scheduler.config, steps)
        return
    theirs = scheduler.timesteps.tolist()
    if spacing == "trailing" and steps == 61:
        # diffusers' np.arange(1000, 0, −1000/61) gains an element ≈ 0: a 62nd step at t = −1 (ᾱ from the
        # table's end); we run the 61 asked for. (linspace at 61 steps has a .5 tie, t = 166.5, that torch's
        # linspace rounded the other way: we use numpy's, as diffusers.)
        assert theirs[-1] == -1 and len(theirs) == 62
        theirs = theirs[:-1]
    assert inference_timesteps(scheduler.config, steps) == theirs


def test_bad_step_count_is_named():
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 and 1000, got 0"):
        inference_timesteps({"num_train_timesteps": 1000}, 0)


def _run_ours(config, steps, x, outputs, noises, eta, prediction_type):
    ac = alphas_cumprod_from_config(config)
    final = final_alpha_cumprod(config, ac)
    ts = inference_timesteps(config, steps)
    prev = previous_timesteps(config, ts)
    results = []
    for i, (t, t_prev) in enumerate(zip(ts, prev)):
        R = x.shape[0]
        out = ddim_step(
            outputs[i],
            x,
            torch.full((R,), t),
            torch.full((R,), t_prev),
            ac,
            final,
            eta=torch.full((R,), eta),
            variance_noise=noises[i] if eta > 0 else None,
            prediction_type=prediction_type,
        )
        results.append(out.x_prev)
    return ts, prev, results


def consistent_inputs(ac, t, prediction_type, g, shape=(2, 4, 4, 4)):
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and a near-perfect model output, as in real sampling: values stay O(1).
    (Independent random x_t and ε at t = 999 would give x̂0 ~ 1/√ᾱ ≈ 160, where 1e-5 is below float32's ulp.)"""
    a_t = float(ac[t])
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    x_t = a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps
    target = eps if prediction_type == "epsilon" else a_t**0.5 * eps - (1 - a_t) ** 0.5 * x0
    return x_t, target + 1e-3 * a_t**0.5 * torch.randn(shape, generator=g)


@pytest.mark.parametrize(
    "schedule,spacing,prediction_type,zero_snr",
    [
        *((*combo, False) for combo in itertools.product(SCHEDULES, SPACINGS, ("epsilon", "v_prediction"))),
        *(("scaled_linear", spacing, "v_prediction", True) for spacing in SPACINGS),
    ],
)
def test_ddim_step_matches_diffusers(schedule, spacing, prediction_type, zero_snr):
    """Steps of 1/10/50/1000-step runs, eta 0 and 1 with the same noise; max abs error ≤ 1e-5 (float32). At zero
    terminal SNR (ᾱ_999 = 0: the first step of trailing and linspace spacing) x̂0 = −v."""
    g = torch.Generator().manual_seed(0)
    scheduler = make_scheduler(schedule, spacing, prediction_type, rescale_betas_zero_snr=zero_snr)
    ac = alphas_cumprod_from_config(scheduler.config)
    final = final_alpha_cumprod(scheduler.config, ac)
    # diffusers steps in float64 with our ᾱ table: the same math, compared where float32 rounding of the inputs
    # cannot hide a difference. (Near t = T the cosine ᾱ is ~1e-9 and x̂0 = (x_t − √(1−ᾱ)ε)/√ᾱ cancels: any
    # float32 evaluation, diffusers' own included, is off by ~1e-4 there.) The tables are compared in
    # test_alphas_cumprod_match_diffusers, and the float32 step below wherever it is well conditioned.
    reference = make_scheduler(schedule, spacing, prediction_type, rescale_betas_zero_snr=zero_snr)
    reference.alphas_cumprod = ac
    reference.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
    for steps, eta in itertools.product(STEPS, (0.0, 1.0)):
        if spacing == "leading" and steps == 1000:
            steps = 999  # 1000 runs past the table with steps_offset 1 (see test_timesteps_match_diffusers)
        scheduler.set_timesteps(steps)
        reference.set_timesteps(steps)
        ts = scheduler.timesteps.tolist()
        prev = previous_timesteps(scheduler.config, ts)
        stride = max(1, steps // 12)  # every step for short runs, a spread of them (first and last included) at 1000
        for i in sorted(set(range(0, steps, stride)) | {steps - 1}):
            t, t_prev = ts[i], prev[i]
            x, model_output = consistent_inputs(ac, t, prediction_type, g)
            noise = torch.randn(x.shape, generator=g)
            ours = ddim_step(
                model_output,
                x,
                torch.full((2,), t),
                torch.full((2,), t_prev),
                ac,
                final,
                eta=torch.full((2,), eta),
                variance_noise=noise if eta > 0 else None,
                prediction_type=prediction_type,
            ).x_prev
            assert ours.dtype == torch.float32
            diffusers_prev = t - 1000 // steps
            if t_prev == diffusers_prev or (t_prev == -1 and diffusers_prev < 0):
                theirs = reference.step(
                    model_output.double(), t, x.double(), eta=eta, variance_noise=noise.double()
                ).prev_sample
                if float(ac[t]) > 1e-3:
                    theirs32 = scheduler.step(model_output, t, x, eta=eta, variance_noise=noise).prev_sample
                    assert (ours - theirs32).abs().max().item() <= 1e-5, (steps, eta, t, "float32")
                if zero_snr and theirs.isnan().any():
                    # one step at η = 1 from ᾱ = 0 to ᾱ_0: 1 − ᾱ_prev − σ² is 0 exactly and rounds below it, whose
                    # square root diffusers takes (NaN); ddim.py clamps it, as the closed form does
                    assert (steps, eta, t_prev) == (1, 1.0, -1)
                    theirs = closed_form(x, model_output, ac, t, t_prev, final, eta, noise, prediction_type)
            else:
                # linspace: diffusers steps to t − T//steps, not a timestep of the sequence;
                # we step to the true previous one, checked against the closed form (eq. 12, 16).
                assert spacing == "linspace"
                theirs = closed_form(x, model_output, ac, t, t_prev, final, eta, noise, prediction_type)
            err = (ours.double() - theirs).abs().max().item()
            assert err <= 1e-5, (steps, eta, t, t_prev, err)


def closed_form(x, model_output, ac, t, t_prev, final, eta, noise, prediction_type):
    a_t = float(ac[t])
    a_prev = float(ac[t_prev]) if t_prev >= 0 else final
    x, model_output, noise = x.double(), model_output.double(), noise.double()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    else:
        x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * model_output
        eps = a_t**0.5 * model_output + (1 - a_t) ** 0.5 * x
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    return a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps + sigma * noise


def test_linspace_steps_to_the_true_previous_timestep():
    config = make_scheduler("scaled_linear", "linspace").config
    ts = inference_timesteps(config, 10)
    assert previous_timesteps(config, ts) == [*ts[1:], -1]
    assert ts[0] - ts[1] != 1000 // 10  # where diffusers would step elsewhere


def test_rows_at_different_steps_share_one_call():
    """One call over rows of different requests equals each row stepped alone."""
    g = torch.Generator().manual_seed(1)
    config = make_scheduler("scaled_linear", "leading").config
    ac = alphas_cumprod_from_config(config)
    final = final_alpha_cumprod(config, ac)
    x = torch.randn(3, 4, 4, 4, generator=g)
    eps = torch.randn(3, 4, 4, 4, generator=g)
    noise = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([981, 501, 21])
    t_prev = torch.tensor([961, 1, -1])
    eta = torch.tensor([0.0, 1.0, 0.5])
    together = ddim_step(eps, x, t, t_prev, ac, final, eta, noise).x_prev
    for r in range(3):
        alone = ddim_step(
            eps[r : r + 1], x[r : r + 1], t[r : r + 1], t_prev[r : r + 1], ac, final, eta[r : r + 1], noise[r : r + 1]
        ).x_prev
        assert torch.equal(alone, together[r : r + 1])


def test_forward_process():
    ac = alphas_cumprod_from_config({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})
    x0 = torch.rand(3, 8, 8) * 2 - 1
    frames = forward_trajectory(x0, [0, 1, 500, 1000], ac, noise_seed=7)
    assert frames.shape == (4, 3, 8, 8)
    assert torch.equal(frames[0], x0)  # t = 0 is the clean picture
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    expected = float(ac[499]) ** 0.5 * x0 + (1 - float(ac[499])) ** 0.5 * noise[0]
    assert torch.allclose(frames[2], expected, atol=1e-6)
    # the same ε at every t, and the same seed gives the same frames
    assert torch.equal(forward_trajectory(x0, [500], ac, noise_seed=7)[0], frames[2])
    assert not torch.equal(forward_trajectory(x0, [500], ac, noise_seed=8)[0], frames[2])
    # diffusers' add_noise agrees at its index t − 1
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    theirs = scheduler.add_noise(x0[None], noise, torch.tensor([499]))
    assert torch.allclose(frames[2:3], theirs, atol=1e-5)
    with pytest.raises(ValueError, match="between 0 and 1000"):
        alpha_bars_paper(ac, [1001])
    assert torch.allclose(q_sample(x0, torch.tensor(1.0), noise[0]), x0)


def test_guidance_per_row_and_exact_at_one_and_zero():
    u = torch.randn(3, 4, 2, 2)
    c = torch.randn(3, 4, 2, 2)
    out = classifier_free_guidance(u, c, torch.tensor([0.0, 1.0, 7.5]))
    assert torch.equal(out[0], u[0])
    assert torch.allclose(out[1], c[1])
    assert torch.allclose(out[2], u[2] + 7.5 * (c[2] - u[2]))
    assert torch.equal(classifier_free_guidance(c, c, 7.5), c)  # a row with only ε_cond keeps it exactly


@pytest.mark.parametrize(
    "spacing,offset,expected", [("leading", 1, 999), ("leading", 0, 1000), ("trailing", 0, 1000), ("linspace", 0, 1000)]
)
def test_max_inference_steps_is_the_most_diffusers_can_run(spacing, offset, expected):
    config = {"num_train_timesteps": 1000, "timestep_spacing": spacing, "steps_offset": offset}
    assert max_inference_steps(config) == expected
    scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(expected)
    assert int(scheduler.timesteps.max()) < 1000
