"""Flow matching on the rectified-flow path (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et
al. 2023, "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers", the SD3 paper),
as SD3 and Flux sample it: the σ schedule with its shift, and one Euler step of the ODE, vectorised over rows.

The forward process is a straight line from the picture to noise (Esser et al. eq. 2 and 3 with a_t = 1 − t,
b_t = t, written here with σ for t): x_σ = (1 − σ)·x0 + σ·ε, σ ∈ [0, 1]. The network predicts the velocity of
that line, v = dx_σ/dσ = ε − x0, so the sampler integrates dx/dσ = v from σ = 1 (pure noise) down to σ = 0:
straighter trajectories than DDPM's, which is why a few Euler steps go far.

Notation (<variable name> -> <name in paper>)
- sigma -> σ (Esser et al.'s t), the noise level; sigma_next -> the next, smaller σ (0 after the last step)
- x -> x_σ, the sample; x_next -> x at sigma_next; x0_pred -> x̂0 = x − σ·v (from x_σ = x0 + σ·(ε − x0))
- model_output -> v_θ(x_σ, σ), the predicted velocity ε − x0
- shift -> s, the timestep shift (Esser et al. sec. 5.3.2, eq. 23): σ' = s·σ/(1 + (s − 1)·σ); s > 1 spends
  more steps at high noise, which larger pictures need (SD3: s = 3)
- mu -> μ, Flux's resolution-dependent shift: σ' = e^μ/(e^μ + (1/σ − 1)), the same map with s = e^μ, and μ
  linear in the image's sequence length n (tokens the transformer sees): from base_shift at
  base_image_seq_len to max_shift at max_image_seq_len (diffusers' `calculate_shift`)
- num_train_timesteps -> T; timesteps -> t = σ·T, what the backbone is called with

The schedule follows diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps value for value, float32 where it
rounds to float32 (tests/worker/test_flow_matching.py compares every configuration), and the step is its
`sample + (σ_next − σ)·v` in float32, so a request alone gives the pipeline's latents bit for bit on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# scheduler config keys that change what FlowMatchEulerDiscreteScheduler does and that latentd does not follow
UNSUPPORTED_CONFIG = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}
TIME_SHIFT_TYPES = ("exponential", "linear")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """σ' = s·σ/(1 + (s − 1)·σ) (Esser et al. eq. 23), in σ's dtype."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """Flux's shift by μ: e^μ/(e^μ + (1/σ − 1)) ("exponential"), or μ/(μ + (1/σ − 1)) ("linear"), in σ's dtype."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1) ** 1.0)
    raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}, got {kind!r}")


def resolution_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ for an image of `image_seq_len` tokens: the line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift) (diffusers' calculate_shift, the same expression)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def mu_for(config: Mapping[str, Any], image_seq_len: int, default_max_shift: float = 1.15) -> float:
    """μ from the scheduler config for an image of `image_seq_len` tokens (the pipelines read these keys; SD3's
    pipeline defaults max_shift to 1.16 where the config lacks it, Flux's to 1.15)."""
    return resolution_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", default_max_shift),
    )


def _training_sigma_range(config: Mapping[str, Any]) -> tuple[float, float]:
    """(σ_max, σ_min) of the scheduler's own training table: σ = t/T for t = T..1 in float32, shifted by s unless
    the shift is dynamic (what FlowMatchEulerDiscreteScheduler.__init__ keeps as sigma_max, sigma_min)."""
    T = int(config.get("num_train_timesteps", 1000))
    sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
    if not config.get("use_dynamic_shifting", False):
        shift = float(config.get("shift", 1.0))
        sigmas = shift_sigmas(sigmas, np.float32(shift)).astype(np.float32)
    return float(sigmas[0]), float(sigmas[-1])


def flow_schedule(
    config: Mapping[str, Any],
    num_inference_steps: int,
    mu: float | None = None,
    pipeline_sigmas: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (n,), sigmas (n + 1,)) as float32 arrays, the last σ 0: FlowMatchEulerDiscreteScheduler's
    set_timesteps(n, mu=μ) (SD3's pipeline), or with sigmas=linspace(1, 1/n, n) where `pipeline_sigmas`
    (Flux's pipeline passes those). μ is required where the config shifts dynamically."""
    n = num_inference_steps
    T = int(config.get("num_train_timesteps", 1000))
    if n < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {n}")
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        raise ValueError("this scheduler config shifts with the resolution (use_dynamic_shifting): μ is needed")
    if pipeline_sigmas:
        sigmas = np.linspace(1.0, 1 / n, n).astype(np.float32)  # float32 before the shift, as diffusers
    else:
        sigma_max, sigma_min = _training_sigma_range(config)
        sigmas = np.linspace(sigma_max * T, sigma_min * T, n) / T  # float64 until the end, as diffusers
    if dynamic:
        sigmas = time_shift(mu, sigmas, config.get("time_shift_type", "exponential"))
    else:
        sigmas = shift_sigmas(sigmas, float(config.get("shift", 1.0)))
    if config.get("shift_terminal"):
        if n < 2:  # the stretch divides by 1 − σ_last = 0: diffusers' σ become NaN
            raise ValueError(
                f"num_inference_steps must be at least 2 for this model's scheduler (shift_terminal), got {n}"
            )
        # stretch so that the last σ is shift_terminal (diffusers' stretch_shift_to_terminal)
        one_minus = 1 - sigmas
        scale = one_minus[-1] / (1 - config["shift_terminal"])
        sigmas = 1 - (one_minus / scale)
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    timesteps = sigmas * T  # float32, as diffusers
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    return timesteps.numpy(), sigmas.numpy()


def unsupported_reason(config: Mapping[str, Any]) -> str | None:
    """Why the flow-matching Euler sampler cannot follow this scheduler config, or None."""
    if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        return f"a flow-matching scheduler (FlowMatchEulerDiscreteScheduler), not {config.get('_class_name')!r}"
    for key, default in UNSUPPORTED_CONFIG.items():
        value = config.get(key, default)
        if value != default and value is not None:
            return f"scheduler config {key} = {value!r} (supported: {default!r})"
    if config.get("time_shift_type", "exponential") not in TIME_SHIFT_TYPES:
        return f"scheduler config time_shift_type = {config.get('time_shift_type')!r}"
    return None


@dataclass
class FlowOutput:
    x_next: torch.Tensor  # (R, C, h, w)
    x0_pred: torch.Tensor  # (R, C, h, w)


def flow_euler_step(
    model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> FlowOutput:
    """One Euler step of dx/dσ = v from σ to σ_next: x_next = x + (σ_next − σ)·v, and x̂0 = x − σ·v.

    model_output and x (R, C, h, w); σ, σ_next (R,) float32. In float32 as diffusers' step (dt is rounded to
    float32 before it multiplies v), so the result is the pipeline's bit for bit; the update is one
    multiply-add, with none of the cancellation that made the DDPM-family updates need float64."""
    shape = (-1, *([1] * (x.ndim - 1)))
    sigma = sigma.to(torch.float32).reshape(shape)
    sigma_next = sigma_next.to(torch.float32).reshape(shape)
    x, v = x.to(torch.float32), model_output.to(torch.float32)
    dt = sigma_next - sigma  # (R, 1, 1, 1), ≤ 0: σ goes down
    x_next = x + dt * v
    x0_pred = x - sigma * v
    return FlowOutput(x_next=x_next, x0_pred=x0_pred)


def flow_q_sample(x0: torch.Tensor, sigma: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """The forward process x_σ = (1 − σ)·x0 + σ·ε (σ a float or broadcastable (R, 1, ..., 1)), in x0's dtype and in
    the order of the flow schedulers' scale_noise, σ·ε + (1 − σ)·x0: an image-to-image request starts from the
    pipelines' latents bit for bit (no cancellation to fear here, unlike the DDPM family's updates)."""
    sigma = torch.as_tensor(sigma, device=x0.device).to(x0.dtype)
    return sigma * noise.to(x0.dtype) + (1.0 - sigma) * x0


def flow_forward_trajectory(
    x0: torch.Tensor, timesteps: list[int] | torch.Tensor, num_train_timesteps: int, noise_seed: int
) -> tuple[torch.Tensor, list[float]]:
    """x_σ for every paper timestep t in [0, T] (σ = t/T, unshifted: the forward process itself) from one ε
    fixed by noise_seed: x0 (C, H, W) or (1, C, H, W) -> ((len(t), C, H, W), the σ of each frame)."""
    t = torch.as_tensor(timesteps, dtype=torch.float64)
    T = num_train_timesteps
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > T):
        raise ValueError(f"timesteps must be between 0 and {T}, got {t.tolist()}")
    sigmas = t / T
    x0 = x0.reshape(1, *x0.shape[-3:])
    generator = torch.Generator("cpu").manual_seed(noise_seed)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    x_t = flow_q_sample(x0.expand(len(sigmas), -1, -1, -1), sigmas.reshape(-1, 1, 1, 1).to(x0.device), noise)
    return x_t, sigmas.tolist()
