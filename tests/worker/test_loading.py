from __future__ import annotations

import shutil

import pytest
import torch

from services.worker.loading import ModelLoadError, load_model, to_pil


def test_loads_the_folder(tiny_model, tiny_model_path):
    m = tiny_model
    assert m.name == tiny_model_path.name and m.path == tiny_model_path.resolve()
    assert (m.native_width, m.native_height, m.latent_channels, m.vae_scale_factor) == (32, 32, 4, 4)
    assert m.dtype == torch.float32 and m.vae.dtype == torch.float32
    assert m.max_prompt_tokens == 77 and m.num_train_timesteps == 1000
    assert m.alphas_cumprod.dtype == torch.float64 and m.alphas_cumprod.shape == (1000,)
    assert m.count_prompt_tokens("a red circle") == len(m.tokenizer("a red circle").input_ids)
    embeds = [c["encoder_hidden_states"] for c in m.encode_prompts(["a red circle", ""])]
    assert [e.shape for e in embeds] == [(77, 32)] * 2 and not torch.equal(embeds[0], embeds[1])
    assert m.family.name == "sd" and m.alphas_cumprod is not None and m.prediction_type == "epsilon"
    latents = m.encode_images(torch.zeros(2, 3, 32, 32))
    assert latents.shape == (2, 4, 8, 8)
    pixels = m.decode_latents(latents)
    assert pixels.shape == (2, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    assert to_pil(pixels)[0].size == (32, 32)


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'nope'} does not exist"):
        load_model(tmp_path / "nope")


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(tmp_path)


def test_missing_part_is_named(tiny_model_path, tmp_path):
    folder = _copy(tiny_model_path, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelLoadError, match=r"model folder .*model is missing vae/"):
        load_model(folder)


def test_pickled_only_weights_are_refused(tiny_model_path, tmp_path):
    folder = _copy(tiny_model_path, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"unet/ holds only pickled weights \(diffusion_pytorch_model.bin\)"):
        load_model(folder)


def test_malformed_config_names_the_folder(tiny_model_path, tmp_path):
    folder = _copy(tiny_model_path, tmp_path)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"model folder {folder}"):
        load_model(folder)
