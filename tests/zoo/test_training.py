"""A few-step smoke run of every recipe, resumability, and the CLI."""
import dataclasses

import pytest
import torch

from dmlab import zoo
from dmlab.zoo import train as ztrain


def _tiny(name, steps=3, **train):
    return zoo.get_recipe(name).with_steps(steps, batch_size=8, checkpoint_every=2, warmup=1, **train)


@pytest.mark.parametrize("name", ["classifier", "unet_s", "dit_s"])
def test_recipe_smoke_run_saves_safetensors_that_load(name, tmp_path):
    from dmlab.zoo import _load_folder
    from dmlab.zoo.nets import build_model

    r = _tiny(name)
    init = build_model(r).state_dict()
    model, log = ztrain.train(r, progress=False, state_dir=tmp_path / "run")
    assert log["config_hash"] == r.config_hash and log["steps"] == 3 and log["complete"] and log["curve"]
    changed = any(not torch.equal(init[k], v) for k, v in model.state_dict().items())
    assert changed, "training must move the weights"
    folder = ztrain.save_model(r, model, log, tmp_path / name)
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")) and list(folder.glob("*.safetensors"))
    loaded = _load_folder(r.kind, folder)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    r = _tiny("unet_s", steps=4)
    full, _ = ztrain.train(r, progress=False, state_dir=tmp_path / "a")
    part, log = ztrain.train(r, progress=False, state_dir=tmp_path / "b", stop_after=2)
    assert log["steps"] == 2 and not log["complete"]
    resumed, log = ztrain.train(r, progress=False, state_dir=tmp_path / "b")
    assert log["steps"] == 4 and log["complete"]
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_config_hash_tracks_what_defines_the_weights():
    r = zoo.get_recipe("unet_l")
    assert r.with_steps(r.train.steps).config_hash == r.config_hash
    assert r.with_steps(r.train.steps + 1).config_hash != r.config_hash
    assert dataclasses.replace(r, description="x").config_hash == r.config_hash
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.get_recipe("unet_xl")


def test_sd_tiny_recipe_smoke_run_builds_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from dmlab.zoo.latent import train_pipeline

    base = zoo.get_recipe("sd_tiny")
    small = {"vae": dict(base.model["vae"], block_out_channels=[8, 16]),
             "unet": dict(base.model["unet"], block_out_channels=[8, 16, 16]),
             "text_encoder": dict(base.model["text_encoder"], hidden_size=16, intermediate_size=32)}
    small["unet"]["cross_attention_dim"] = 16
    r = dataclasses.replace(_tiny("sd_tiny", steps=2), model=small, extra=dict(base.extra, vae_steps=2))
    assert train_pipeline(r, tmp_path / "sd", progress=False, state_dir=tmp_path / "run", stop_after=3) is None
    folder = train_pipeline(r, tmp_path / "sd", progress=False, state_dir=tmp_path / "run")  # resumes in phase 2
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(["a handwritten seven"], height=16, width=16, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (1, 1, 16, 16)
    assert pipe.vae.config.scaling_factor > 0


def test_tokenizer_maps_every_prompt_word_to_one_token(tmp_path):
    from dmlab.zoo.latent import WORDS, prompt, write_tokenizer

    tok = write_tokenizer(tmp_path / "tok")
    ids = tok(prompt(7)).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "handwritten</w>", "seven</w>",
                                              "<|endoftext|>"]
    assert len({tok(w).input_ids[1] for w in WORDS}) == 10
    with pytest.raises(ValueError, match="digit"):
        prompt(12)


def test_cli_lists_the_registry(capsys):
    from dmlab.zoo.__main__ import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "unet_l" in out and "MFLOPs" in out


def test_sigma_to_index_follows_sigma_to_another_device():
    """Zoo denoisers on a GPU pass CUDA sigmas with CPU training sigmas (the meta device stands in for CUDA here)."""
    from dmlab import schedules

    st = schedules.sigmas_from_alphas_cumprod(torch.cumprod(1 - schedules.betas_for(1000), 0))
    assert schedules.sigma_to_index(torch.tensor([1.0], device="meta"), st).device.type == "meta"
