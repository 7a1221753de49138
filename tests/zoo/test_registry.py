"""Loading, hash verification and the clear errors of dmlab.zoo."""
import json
import shutil

import pytest
import torch

from dmlab import zoo
from dmlab.zoo import store


def test_every_recipe_is_registered_with_its_cost_and_metrics():
    reg = store.read_registry()
    assert sorted(reg) == sorted(zoo.RECIPES)
    for name, e in reg.items():
        assert e["config_hash"] == zoo.get_recipe(name).config_hash, f"{name}: retrain, the recipe changed"
        assert e["params"] > 0 and e["train_seconds"] > 0 and e["metrics"]
        if e["kind"] in zoo.ADAPTER_KINDS:  # an adapter names its base and the base's weights it was trained on
            assert e["base"] in reg and e["base_weights"] == store.base_fingerprint(reg[e["base"]])
        else:
            assert e["flops_per_call"] > 0
        assert all(f.endswith((".json", ".safetensors", ".txt")) for f in e["files"]), "weights must be safetensors"
    total = sum(m["bytes"] for e in reg.values() for m in e["files"].values())
    assert total < 40e6


def test_registry_costs_are_consistent():
    """S models are cheaper than L models (quality is re-measured in tests/zoo/test_quality.py, not read back)."""
    reg = store.read_registry()
    for fam in ("unet", "dit"):
        assert reg[f"{fam}_l"]["flops_per_call"] >= 5 * reg[f"{fam}_s"]["flops_per_call"]


def test_adapters_are_zoo_entries_loaded_through_one_table():
    """Exit heads and linear attention load with zoo.load like the models; the accelerators' loaders agree; every
    kind has one record (build/load/train/evaluate) and the adapter recipes spell the accelerators' settings."""
    from dmlab.accelerators.early_exit import EXIT_RECIPE, ExitHeads, load_exit_heads
    from dmlab.accelerators.linear_attention import LINEAR_RECIPE, load_linear_attention
    from dmlab.zoo.kinds import adapter_recipe_dict

    heads = zoo.load("dit_l_exit")
    assert isinstance(heads, ExitHeads) and sum(p.numel() for p in heads.parameters()) == zoo.info("dit_l_exit")["params"]
    again = load_exit_heads("dit_l_exit")
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), again.state_dict().values()))
    lin = zoo.load("dit_l_linear")
    ref = load_linear_attention("dit_l_linear", zoo.load("dit_l"))
    assert lin.names == ref.names
    assert adapter_recipe_dict(zoo.get_recipe("dit_l_exit")) == EXIT_RECIPE
    assert adapter_recipe_dict(zoo.get_recipe("dit_l_linear")) == LINEAR_RECIPE
    assert {r.kind for r in zoo.RECIPES.values()} <= set(zoo.KINDS)
    with pytest.raises(ValueError, match="not a diffusion model"):
        zoo.load_denoiser("dit_l_exit")
    with pytest.raises(ValueError, match="unknown zoo kind"):
        zoo.kinds.kind_of("lora9")


@pytest.mark.parametrize("name", ["classifier", "unet_s", "dit_s"])
def test_load_verifies_and_returns_the_model(name):
    m = zoo.load(name)
    assert sum(p.numel() for p in m.parameters()) == zoo.info(name)["params"]
    assert not m.training


def test_load_denoiser_gives_a_denoiser_and_the_raw_model(gen):
    from diffusers import UNet2DModel

    from dmlab.denoisers import DiscreteVPDenoiser

    den, unet = zoo.load_denoiser("unet_s")
    assert isinstance(den, DiscreteVPDenoiser) and isinstance(unet, UNet2DModel) and den.model is unet
    x = torch.randn(3, 1, 8, 8, generator=gen)
    out = den(x, torch.full((3,), 0.5), class_labels=torch.tensor([1, 2, zoo.NULL_CLASS]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not a diffusion model"):
        zoo.load_denoiser("classifier")


def _copy_zoo(tmp_path, name):
    root = tmp_path / "zoo"
    shutil.copytree(store.zoo_dir() / name, root / name)
    (root / "registry.json").write_text(json.dumps({name: store.read_registry()[name]}))
    return root


def test_corrupted_missing_and_unknown(tmp_path):
    root = _copy_zoo(tmp_path, "classifier")
    assert zoo.load("classifier", root=root) is not None
    f = root / "classifier" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooIntegrityError, match="git checkout"):
        zoo.load("classifier", root=root)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        zoo.load("classifier", root=root)
    with pytest.raises(ValueError, match="unknown zoo model 'nope'"):
        zoo.load("nope", root=root)
    with pytest.raises(ValueError, match="python -m dmlab.zoo train unet_l"):
        zoo.load("unet_l", root=root)
    with pytest.raises(TypeError):
        zoo.load(3)
    assert "classifier" in zoo.verify_all(root) and zoo.verify_all(root)["classifier"] != "ok"


def test_remote_zoo_downloads_verifies_and_fails_clearly_offline(tmp_path, monkeypatch):
    """Outside a checkout the files come from raw.githubusercontent.com (here: a file:// URL of the checkout)."""
    src = store.zoo_dir()
    monkeypatch.setattr(store, "checkout_zoo_dir", lambda: None)
    monkeypatch.delenv("DMLAB_DATA", raising=False)
    monkeypatch.setenv("DMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "raw_url", lambda rel: (src / rel).as_uri())
    clf = zoo.load("classifier")
    assert (tmp_path / "cache" / "zoo" / "classifier" / "model.safetensors").is_file()
    assert sum(p.numel() for p in clf.parameters()) == zoo.info("classifier")["params"]
    monkeypatch.setattr(store, "raw_url", lambda rel: "http://127.0.0.1:9/" + rel)  # nothing listens on port 9
    with pytest.raises(FileNotFoundError, match="DMLAB_DATA"):
        zoo.load("unet_s")


def test_dmlab_data_folder_is_used_outside_a_checkout(tmp_path, monkeypatch):
    root = _copy_zoo(tmp_path, "classifier")
    monkeypatch.setattr(store, "checkout_zoo_dir", lambda: None)
    monkeypatch.setenv("DMLAB_DATA", str(tmp_path))
    assert store.zoo_dir() == root
    assert zoo.names() == ["classifier"]
    assert zoo.load("classifier") is not None


def test_sd_tiny_loads_offline_as_a_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    from dmlab.zoo.latent import generate

    pipe = zoo.load("sd_tiny")
    assert isinstance(pipe, StableDiffusionPipeline)
    again = StableDiffusionPipeline.from_pretrained(store.zoo_dir() / "sd_tiny", local_files_only=True)
    assert again.tokenizer("a handwritten seven").input_ids == pipe.tokenizer("a handwritten seven").input_ids
    x = generate(pipe, [7, 3], generator=torch.Generator().manual_seed(0), steps=4)
    assert x.shape == (2, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
