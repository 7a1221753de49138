"""dmlab.finetuning: full / LoRA / DiffFit / SaRA on config-built diffusers models (tiny, random weights)."""
import pytest
import torch

from dmlab import finetuning as ft
from dmlab.train import ddpm_batch
from dmlab.zoo.train import training_alphas_cumprod


def _unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=11, norm_num_groups=4).eval()


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(5, 10, (n,), generator=g)


def _out(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 8, 8, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([10, 200, 500, 700, 900, 999]), class_labels=torch.arange(6)).sample


@pytest.mark.parametrize("method", ft.METHODS)
def test_adapted_model_starts_at_the_base(method):
    base = _unet()
    ad = ft.adapt(base, method, rank=2, fraction=0.1)
    torch.testing.assert_close(_out(ad.model), _out(base), rtol=0, atol=1e-6)
    assert ad.trainable == sum(p.numel() for p in ad.params) > 0


def test_trainable_sets():
    base = _unet()
    n_all = sum(p.numel() for p in base.parameters())
    cls = base.class_embedding.weight.numel()
    assert ft.adapt(base, "full").trainable == n_all
    lora = ft.adapt(base, "lora", rank=2)
    want = 0
    for name, m in base.named_modules():
        if name.split(".")[-1] in ("conv1", "conv2", "time_emb_proj"):
            k = m.weight[0].numel() if isinstance(m, torch.nn.Conv2d) else m.in_features
            want += 2 * (k + m.weight.shape[0])  # A: r x (in k k), B: out x r
    assert lora.trainable == want + cls
    dfit = ft.adapt(base, "difffit")
    names = {n for n, p in dfit.model.named_parameters() if p.requires_grad}
    assert all(n.endswith("bias") or "norm" in n or "class_embedding" in n or "difffit_gammas" in n for n in names)
    assert not any(n.endswith("conv1.weight") for n in names)
    sara = ft.adapt(base, "sara", fraction=0.1)
    frac = sara.info["stage1"] / sum(m.weight.numel() for _, m in ft._sara_targets(base))
    assert abs(frac - 0.1) < 0.01
    assert sara.trainable == sara.info["stage1"] + cls


def test_finetune_changes_only_what_the_method_trains():
    base = _unet()
    x, y = _data()
    ac = training_alphas_cumprod()
    r = ft.finetune(base, "difffit", x, y, ac, steps=4, lr=1e-2, seed=0, batch_size=8)
    w0, w1 = base.state_dict(), r.model.state_dict()
    assert torch.equal(w0["down_blocks.0.resnets.0.conv1.weight"], w1["down_blocks.0.resnets.0.conv1.weight"])
    assert not torch.equal(w0["down_blocks.0.resnets.0.conv1.bias"], w1["down_blocks.0.resnets.0.conv1.bias"])
    masks, theta = ft.sara_masks(base, 0.1)
    r = ft.finetune(base, "sara", x, y, ac, steps=4, lr=1e-2, seed=0, batch_size=8, fraction=0.1)
    w1 = r.model.state_dict()
    changed = (w1["down_blocks.0.resnets.0.conv2.weight"] != w0["down_blocks.0.resnets.0.conv2.weight"])
    assert changed.any()
    # stage 1 trains the entries below theta; stage 2 those still below theta: every change started below theta
    assert (w0["down_blocks.0.resnets.0.conv2.weight"].abs()[changed] < theta).all()
    assert r.info["stage2"] > 0
    assert torch.equal(w0["conv_in.weight"][w0["conv_in.weight"].abs() >= theta],
                       w1["conv_in.weight"][w0["conv_in.weight"].abs() >= theta])


def test_same_seed_same_batches_and_result():
    base = _unet()
    x, y = _data()
    ac = training_alphas_cumprod()
    a = ft.finetune(base, "lora", x, y, ac, steps=3, lr=1e-2, seed=5, batch_size=8, rank=2)
    b = ft.finetune(base, "lora", x, y, ac, steps=3, lr=1e-2, seed=5, batch_size=8, rank=2)
    assert a.losses == b.losses
    torch.testing.assert_close(_out(a.model), _out(b.model), rtol=0, atol=0)


@pytest.mark.parametrize("method", ft.METHODS)
def test_stored_update_rebuilds_the_tuned_model(method):
    base = _unet()
    x, y = _data()
    r = ft.finetune(base, method, x, y, training_alphas_cumprod(), steps=3, lr=1e-2, seed=0, batch_size=8,
                    **({"rank": 2} if method == "lora" else {}))
    state = ft.adapter_state(method, base, r.model)
    rebuilt = ft.load_adapter_state(method, _unet(), state, **({"rank": 2} if method == "lora" else {}))
    tol = 1e-3 if method == "full" else 1e-6  # full fine-tuning stores its update in float16
    torch.testing.assert_close(_out(rebuilt), _out(r.model), rtol=0, atol=tol)
    n_state = sum(v.numel() for k, v in state.items() if not k.endswith("::index"))
    if method != "full":
        assert n_state < sum(p.numel() for p in base.parameters()) / 2


def test_nuclear_penalty_is_the_sum_of_singular_values():
    base = _unet()
    ad = ft.adapt(base, "sara", fraction=0.2, nuclear=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ad.params[:-1]:
            p.copy_(torch.randn(p.shape, generator=g))
    want = 0.0
    for name, m in ft._sara_targets(ad.model):
        w0 = m.parametrizations.weight.original
        dw = (m.weight - w0).detach().reshape(w0.shape[0], -1)
        want += float(torch.linalg.svdvals(dw).sum())
    assert abs(float(ad.penalty()) - want) < 1e-3 * want


def test_training_memory_counts_trained_bytes():
    base = _unet()
    x, y = _data()
    b = ddpm_batch(x, training_alphas_cumprod(), 8, torch.Generator().manual_seed(0), labels=y)
    full, dfit = ft.training_memory(ft.adapt(base, "full"), b), ft.training_memory(ft.adapt(base, "difffit"), b)
    assert full["trainable"] == 4 * sum(p.numel() for p in base.parameters())
    assert full["total"] == full["activations"] + 4 * full["trainable"]
    assert dfit["trainable"] < full["trainable"] / 10 and dfit["activations"] > 0


def test_full_scale_path_on_a_config_built_conditional_unet():
    """The SD-1.5 code path: DiffFit scales ResNet and transformer branches, LoRA targets attention projections."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    d = ft.adapt(unet, "difffit")
    kinds = {s[0].split(".")[-1] for s in ft._difffit_sites(d.model)}
    assert {"conv2", "attn1", "attn2", "ff"} <= kinds
    lo = ft.adapt(unet, "lora", rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for ad in (d, lo):
        with torch.no_grad():
            torch.testing.assert_close(ad.model(x, t, encoder_hidden_states=ctx).sample, ref, rtol=0, atol=1e-6)
    assert lo.trainable > 0 and all("lora_" in n for n, p in lo.model.named_parameters() if p.requires_grad)
    eps = torch.randn(2, 4, 8, 8)
    batch = {"x0": x, "eps": eps, "t": t, "xt": 0.8 * x + 0.6 * eps, "encoder_hidden_states": ctx}
    for ad in (d, lo):
        mem = ft.training_memory(ad, batch)
        assert mem["activations"] > 0 and mem["trainable"] == 4 * ad.trainable


def test_zoo_entries_rebuild_from_the_source_model():
    """A registered fine-tuned entry is unet_src plus its stored update (sha256-verified by the zoo)."""
    from dmlab import zoo

    src = zoo.load("unet_src")
    tuned = zoo.load("ft_difffit_s0")
    assert zoo.info("ft_difffit_s0")["base"] == "unet_src"
    assert zoo.info("ft_difffit_s0")["trainable"] == ft.adapt(src, "difffit").trainable
    a, b = _out(src), _out(tuned)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        ft.adapt(_unet(), "prefix")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ft.adapt("unet", "full")
    with pytest.raises(ValueError, match="fraction"):
        ft.adapt(_unet(), "sara", fraction=1.5)
    with pytest.raises(ValueError, match="rank"):
        ft.adapt(_unet(), "lora", rank=0)
