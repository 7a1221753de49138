"""dmlab.hub: one clear error offline / without a GPU; config-built tiny stand-ins through the same code path."""
import time

import pytest
import torch

from dmlab import hub

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize("call", [lambda: hub.load_sd("1.5", device="cpu", require_gpu=False),
                                  lambda: hub.load_sd("2.1", device="cpu", require_gpu=False),
                                  lambda: hub.load_dit(device="cpu", require_gpu=False),
                                  lambda: hub.load_dinov2("small", device="cpu")])
def test_offline_fails_at_once_with_one_message(call, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_cached", lambda repo_id, filename: False)
    t0 = time.perf_counter()
    with pytest.raises(hub.HubUnavailableError, match="HF_HUB_OFFLINE=1.*Colab.*DMLAB_SCALE=full.*tiny scale use"):
        call()
    assert time.perf_counter() - t0 < 5  # "at once": no network retries (they take ~23 s)


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU path")
def test_without_a_gpu_the_full_models_say_where_to_run():
    with pytest.raises(hub.HubUnavailableError, match="no GPU is visible.*Colab"):
        hub.load_sd("1.5")
    with pytest.raises(hub.HubUnavailableError, match="no GPU is visible"):
        hub.load_dit()
    with pytest.raises(hub.HubUnavailableError, match="torch sees no CUDA GPU"):
        hub.load_dinov2(device="cuda")


def test_bad_arguments():
    with pytest.raises(ValueError, match="version"):
        hub.load_sd("3.0", device="cpu", require_gpu=False)
    with pytest.raises(ValueError, match="size"):
        hub.load_dinov2("giant")
    with pytest.raises(TypeError, match="repo_id"):
        hub.resolve("", family="sd", probe_file="x", device="cpu", require_gpu=False)


def test_sd_loader_on_the_tiny_pipeline_folder():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from dmlab.zoo import store

    folder = store.zoo_dir() / "sd_tiny"
    pipe = hub.load_sd(repo_id=str(folder), device="cpu", require_gpu=False, scheduler="ddim")
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.unet.dtype == torch.float32
    img = pipe(["a handwritten two"], height=16, width=16, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 1, 16, 16)


def test_dit_loader_on_a_config_built_stand_in(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8)
    DiTPipeline(transformer=tr, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "dit")
    pipe = hub.load_dit(repo_id=str(tmp_path / "dit"), device="cpu", require_gpu=False)
    assert isinstance(pipe, DiTPipeline)
    img = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape == (1, 8, 8, 3)


def test_dinov2_loader_on_a_config_built_stand_in(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "dino")
    model, proc = hub.load_dinov2(repo_id=str(tmp_path / "dino"), device="cpu")
    img = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        out = model(**proc(images=img, return_tensors="pt"))
    assert out.last_hidden_state.shape == (1, 17, 32) and not model.training


def test_reachability_probe_gives_up_quickly():
    t0 = time.perf_counter()
    assert hub._reachable("https://127.0.0.1:9", timeout=0.5) is False  # discard port: refused at once
    assert hub._reachable("https://", timeout=0.5) is False
    assert time.perf_counter() - t0 < 5


def test_without_offline_mode_an_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(hub, "_reachable", lambda *a, **k: False)  # never touch a real network from the tests
    monkeypatch.setattr(hub, "_cached", lambda repo_id, filename: False)
    with pytest.raises(hub.HubUnavailableError, match="not reachable within 3 s.*not in the local cache.*Colab"):
        hub.load_sd("1.5", device="cpu", require_gpu=False)
    monkeypatch.setattr(hub, "_cached", lambda repo_id, filename: True)  # cached: load from the cache, offline
    assert hub.resolve("org/x", family="sd", probe_file="model_index.json", device="cpu", require_gpu=False) == \
        ("cpu", True)


def test_local_folders_get_local_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        hub.load_sd(repo_id=str(tmp_path / "missing"), device="cpu", require_gpu=False)
    with pytest.raises(ValueError, match="holds no model_index.json.*save_pretrained"):
        hub.load_sd(repo_id=str(tmp_path), device="cpu", require_gpu=False)
    from dmlab.zoo import store

    with pytest.raises(ValueError, match="could not load the local folder") as err:
        hub.load_dit(repo_id=str(store.zoo_dir() / "sd_tiny"), device="cpu", require_gpu=False)
    assert "Colab" not in str(err.value)


def test_hub_downloads_fp16_weights_pinned_revision_and_progress_at_full_scale(monkeypatch):
    import dmlab

    sd15 = hub.REPOS["sd15"]
    assert hub._hub_kwargs(sd15, torch.float16) == {"variant": "fp16"}  # the fp16 files, not the fp32 ones
    assert hub._hub_kwargs(sd15, torch.float32) == {}
    assert hub._hub_kwargs("/some/local/folder", torch.float16) == {}
    monkeypatch.setitem(hub.REVISIONS, "sd15", "0123abc")
    assert hub._hub_kwargs(sd15, torch.float16) == {"revision": "0123abc", "variant": "fp16"}
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dmlab.setup(seed=0, scale="tiny")
    assert hub._progress_off()  # tiny scale: no bars in stored outputs
    dmlab.setup(seed=0, scale="full")
    assert not hub._progress_off()  # full scale: downloads and long loops show progress
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the user's own choice is kept
    dmlab.setup(seed=0, scale="full")
    assert hub._progress_off()
    dmlab.setup(seed=0, scale="tiny")
