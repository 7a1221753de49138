"""Loading, hash verification and the clear errors of dmlab.zoo."""
import json
import shutil

import pytest
import torch

import dmlab
from dmlab import _meta, zoo
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
    # the repository's budget: the zoo is committed as plain files (a pip install downloads only what it loads);
    # the Part I-V models take about 34 MB, each later chapter's entries must stay small
    total = sum(m["bytes"] for e in reg.values() for m in e["files"].values())
    assert total < 64e6, f"the zoo holds {total / 1e6:.1f} MB: store new entries in float16 or make them smaller"
    for name, e in reg.items():
        if e["kind"] not in {"unet", "dit", "sd", "classifier", "linear_attention", "exit_heads"}:
            size = sum(m["bytes"] for m in e["files"].values())
            assert size < 1.5e6, f"{name} takes {size / 1e6:.1f} MB: a chapter's entry should stay under 1.5 MB"


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
    with pytest.raises(zoo.ZooIntegrityError, match=f"dmlab.zoo train classifier --out {root}"):
        zoo.load("classifier", root=root)  # the fix for a custom root names that root, not git
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
    assert (tmp_path / "cache" / "zoo" / _meta.ZOO_REF / "classifier" / "model.safetensors").is_file()
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


# ------------------------------------------------------------------------------------------ a hostile registry
def _remote(monkeypatch, tmp_path, src, urls=None):
    """Remote mode served from the folder ``src`` (file:// URLs), cache under tmp_path; ``urls`` collects the URLs."""
    monkeypatch.setattr(store, "checkout_zoo_dir", lambda: None)
    monkeypatch.delenv("DMLAB_DATA", raising=False)
    monkeypatch.setenv("DMLAB_CACHE", str(tmp_path / "cache"))

    def url(rel):
        if urls is not None:
            urls.append((store.ZOO_REF, rel))
        return (src / rel).as_uri()

    monkeypatch.setattr(store, "raw_url", url)


def _served(tmp_path, entry_files, name="classifier"):
    """A served zoo whose registry lists ``entry_files`` for ``name`` (and a bait file next to the served folder)."""
    src = tmp_path / "served" / "zoo"
    shutil.copytree(store.zoo_dir() / name, src / name)
    entry = dict(store.read_registry()[name], files=entry_files)
    (src / "registry.json").write_text(json.dumps({name: entry}))
    (tmp_path / "served" / "ESCAPED").write_text("bait")
    return src


@pytest.mark.parametrize("rel", ["../../../ESCAPED", "/etc/passwd", "a/../../ESCAPED", "..\\..\\ESCAPED", "C:x", "",
                                 "~/x"])
def test_paths_that_leave_the_zoo_are_refused(tmp_path, monkeypatch, rel):
    meta = {"sha256": "0" * 64, "bytes": 4}
    src = _served(tmp_path, {rel: meta})
    _remote(monkeypatch, tmp_path, src)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(zoo.ZooIntegrityError, match="leave the zoo folder"):
        zoo.load("classifier")
    new = [p for p in tmp_path.rglob("*") if p not in before]
    cache = tmp_path / "cache"
    assert all(p == cache or cache in p.parents for p in new) and not any("ESCAPED" in p.name for p in new)
    with pytest.raises(zoo.ZooIntegrityError, match="leave the zoo folder"):  # a local root: the same check
        zoo.names(root=src)
    with pytest.raises(zoo.ZooIntegrityError, match="leave the zoo folder"):  # and a name that leaves it
        store.fetch("../x", {"files": {"a": meta}}, src)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[]", "top level"),
    ('{"classifier": {"kind": "classifier"}}', "'files'"),
    ('{"classifier": {"kind": "classifier", "files": {"a": {"sha256": "zz"}}}}', "sha256"),
    ('{"classifier": {"kind": "classifier", "files": {"a": {"sha256": "' + "a" * 64 + '"}}}}', "bytes"),
    ('{"classifier": {"kind": "classifier", "files": {"a": {"sha256": "' + "a" * 64 + '", "bytes": "4"}}}}', "bytes"),
])
def test_registry_errors_name_the_file(tmp_path, text, match):
    root = tmp_path / "zoo"
    root.mkdir()
    (root / "registry.json").write_text(text)
    for call in (lambda: zoo.names(root=root), lambda: zoo.load("classifier", root=root)):
        with pytest.raises(zoo.ZooIntegrityError, match=match) as err:
            call()
        assert str(root / "registry.json") in str(err.value) and "--out" in str(err.value)


def test_bytes_are_enforced(tmp_path, monkeypatch):
    root = _copy_zoo(tmp_path, "classifier")
    reg = json.loads((root / "registry.json").read_text())
    reg["classifier"]["files"]["model.safetensors"]["bytes"] += 1
    (root / "registry.json").write_text(json.dumps(reg))
    with pytest.raises(zoo.ZooIntegrityError, match="bytes, the registry says"):
        zoo.load("classifier", root=root)
    # remote: a download longer than the registry says is stopped, and nothing is kept
    files = dict(reg["classifier"]["files"])
    files["model.safetensors"] = dict(files["model.safetensors"], bytes=files["model.safetensors"]["bytes"] - 100)
    src = _served(tmp_path, files)
    _remote(monkeypatch, tmp_path, src)
    with pytest.raises(zoo.ZooIntegrityError, match="longer than"):
        zoo.load("classifier")
    assert not list((tmp_path / "cache").rglob("model.safetensors*"))


def test_downloads_are_pinned_to_the_package_version_and_refreshed_when_it_changes(tmp_path, monkeypatch):
    import re
    import tomllib

    version = tomllib.loads((store.PACKAGE_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _meta.VERSION == dmlab.__version__ == version and _meta.ZOO_REF == f"v{version}"
    url = store.raw_url("registry.json")
    assert f"/{_meta.ZOO_REF}/data/zoo/registry.json" in url and not re.search(r"/(main|master)/", url)
    urls = []
    _remote(monkeypatch, tmp_path, store.zoo_dir(), urls)
    assert zoo.names() and urls == [(_meta.ZOO_REF, "registry.json")]
    zoo.names()
    assert len(urls) == 1  # cached for this version
    monkeypatch.setattr(store, "ZOO_REF", "v99.0.0")
    assert store.zoo_dir() == tmp_path / "cache" / "zoo" / "v99.0.0"
    assert zoo.names() and urls[-1] == ("v99.0.0", "registry.json")  # a new version: a fresh registry
    # a corrupted cached registry is downloaded again once
    (store.zoo_dir() / "registry.json").write_text("{oops")
    assert zoo.names() and len(urls) == 3


def test_a_corrupted_remote_file_offline_is_kept_and_the_error_says_both(tmp_path, monkeypatch):
    _remote(monkeypatch, tmp_path, store.zoo_dir())
    zoo.load("classifier")
    f = store.zoo_dir() / "classifier" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    monkeypatch.setattr(store, "raw_url", lambda rel: "http://127.0.0.1:9/" + rel)  # nothing listens on port 9
    with pytest.raises(zoo.ZooIntegrityError, match="sha256.*downloading it again failed"):
        zoo.load("classifier")
    assert f.is_file()


def test_a_missing_registry_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "checkout_zoo_dir", lambda: None)
    monkeypatch.setenv("DMLAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no zoo registry at .*nowhere.*DMLAB_DATA"):
        zoo.load("unet_s")


def test_registering_a_multi_model_entry_skips_the_per_step_cpu_cost(tmp_path):
    """A chapter's toy entry (several small networks in one file) registers with the default arguments; the
    per-step CPU cost, which only single networks and the latent pipeline have, is refused with a clear error."""
    from dmlab.zoo import build, evaluate

    root = _copy_zoo(tmp_path, "poseidon_1d")
    before = store.read_registry(root)["poseidon_1d"]
    entry = build.register("poseidon_1d", root=root, measure=False)
    assert entry["files"] == before["files"] and entry["params"] == before["params"]
    assert "cpu_seconds_per_step" not in entry
    with pytest.raises(ValueError, match="train_log.json records its training time"):
        evaluate.cpu_seconds_per_step(zoo.get_recipe("poseidon_1d"))
