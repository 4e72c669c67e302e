"""The request-facing constants of sampling, in one torch-free place (front doors may import this).

A request picks its sampler by name (`sampler`; None: the model's default, `default_sampler` in the
model info); the model info lists the names a model supports (`samplers`), which are these less the
ones its scheduler config rules out.
"""

from __future__ import annotations

# DDIM (Song et al. 2021); DPM-Solver++(2M) (Lu et al. 2022) on the scheduler's timesteps, and on Karras
# et al.'s σ spacing; Euler (Karras et al. 2022) and Euler ancestral (k-diffusion), each as its diffusers
# scheduler configured from the model's scheduler config.
SAMPLERS: tuple[str, ...] = ("ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_ancestral")
DEFAULT_SAMPLER = "ddim"  # a model's own default, if it names one (latentd.json), wins
ETA_SAMPLERS: tuple[str, ...] = ("ddim",)  # eta > 0 is refused with any other sampler (field `eta`)
MIN_GUIDANCE_RESCALE, MAX_GUIDANCE_RESCALE = 0.0, 1.0  # φ of Lin et al. 2024; applied where guidance_scale > 1
