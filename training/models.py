"""Configs of the default model's parts, sized for a 2-core CPU training budget."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from training.shapes import IMAGE_SIZE

LATENT_CHANNELS = 4
TEXT_HIDDEN = 64


def build_vae(block_out_channels: tuple[int, ...] = (8, 16, 32)) -> AutoencoderKL:
    """64x64x3 -> 16x16x4 (two downsamples: 12x fewer numbers)."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        # Several channels per group: one channel per group (instance norm) erases the per-picture
        # colour level that the decoder has to reproduce, and reconstructions came out grey.
        norm_num_groups=2,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(latent_size: int, block_out_channels: tuple[int, ...] = (32, 64, 64)) -> UNet2DConditionModel:
    """Cross-attention on the 8x8 and 4x4 levels only: attention over 16x16 = 256 tokens costs
    ~4x the step time on the CPU for little gain on one-shape pictures."""
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def build_scheduler() -> DDIMScheduler:
    """DDIM over the cosine schedule; trailing spacing starts sampling at t = 999 (pure noise).

    The UNet predicts v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022), not ε. Under
    `squaredcos_cap_v2`, ᾱ_999 = 2.4e-9: DDIM's x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t multiplies any
    error of an ε-predicting UNet by 1/√ᾱ_999 ≈ 2·10⁴ at the first step, and without sample
    clipping the latents blow up (rms 1 → 99 in one step, measured on an ε model). From v,
    x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂ is well conditioned at every t (Lin et al. 2024, sec. 3.2).
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        steps_offset=1,  # unused by trailing spacing; 1 keeps diffusers from warning
    )
