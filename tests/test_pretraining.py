"""dmlab.pretraining: slight label corruption and CEP (paper 9), KIND layers and transfer (paper 45), their zoo
entries, and the full-scale paths on config-built diffusers models."""
import pytest
import torch

from dmlab import pretraining as pt
from dmlab.distill.guidance import ClassMLP


def test_class_triads_exact_structure():
    tri = pt.class_triads()
    assert tri.n_classes == 10 and tri.uncond.K == 30
    x = tri.sample(torch.arange(10).repeat_interleave(50), torch.Generator().manual_seed(0))
    post = tri.class_posterior(x)
    assert (post.argmax(1) == torch.arange(10).repeat_interleave(50)).float().mean() > 0.99
    # every class has the same triangle: the distances between its modes are equal across classes
    d = torch.stack([torch.pdist(tri.per_class[k].means) for k in range(10)])
    assert torch.allclose(d, d[:1].expand_as(d), atol=1e-12)
    with pytest.raises(ValueError, match="n_classes"):
        pt.class_triads(1)


def test_corrupt_labels_counts_and_never_keeps_the_class():
    y = torch.arange(10).repeat_interleave(40)
    yc, m = pt.corrupt_labels(y, 0.05, 10, torch.Generator().manual_seed(3))
    assert int(m.sum()) == 20 and (yc[m] != y[m]).all() and torch.equal(yc[~m], y[~m])
    y0, m0 = pt.corrupt_labels(y, 0.0, 10, torch.Generator())
    assert torch.equal(y0, y) and not m0.any()
    with pytest.raises(ValueError, match="rate"):
        pt.corrupt_labels(y, 1.5, 10, torch.Generator())
    with pytest.raises(TypeError, match="integer"):
        pt.corrupt_labels(y.float(), 0.1, 10, torch.Generator())


def test_cep_delta_scale_and_kinds():
    g = torch.Generator().manual_seed(0)
    dg = pt.cep_delta((4000, 64), 2.0, "gaussian", g)
    assert abs(float(dg.std()) - 2.0 / 8) < 0.005
    du = pt.cep_delta((4000, 64), 2.0, "uniform", g)
    assert float(du.abs().max()) <= 2.0 / 8 and float(du.abs().max()) > 0.24
    with pytest.raises(ValueError, match="CEP-G"):
        pt.cep_delta((2, 2), 1.0, "laplace", g)
    with pytest.raises(ValueError, match="gamma"):
        pt.cep_delta((2, 2), -1.0, "gaussian", g)


def test_perturb_embedding_is_reversible_and_cep_training_keeps_batches():
    net = ClassMLP(2, 16, 2, 10)
    y = torch.arange(5)
    with torch.no_grad():
        e0 = net.label_emb(y)
        with pt.perturb_embedding(net.label_emb, 1.0, "uniform", torch.Generator().manual_seed(1)):
            e1 = net.label_emb(y)
        assert not torch.equal(e0, e1) and float((e1 - e0).abs().max()) <= 0.25
        assert torch.equal(net.label_emb(y), e0)
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(2))
    yy = torch.arange(10).repeat(4)
    kw = dict(steps=3, batch=8, lr=1e-3)
    a, b = ClassMLP(2, 16, 2, 10), ClassMLP(2, 16, 2, 10)
    b.load_state_dict(a.state_dict())
    la = pt.train_class_toy(a, x, yy, generator=torch.Generator().manual_seed(5), **kw)
    lb = pt.train_class_toy(b, x, yy, generator=torch.Generator().manual_seed(5), cep=("gaussian", 0.0),
                            cep_generator=torch.Generator().manual_seed(6), **kw)
    assert la == lb  # gamma 0: the same batches, the same run (the CEP noise has its own stream)
    with pytest.raises(TypeError, match="cep_generator"):
        pt.train_class_toy(a, x, yy, generator=torch.Generator(), cep=("gaussian", 1.0), **kw)


def test_kind_from_linear_is_exact_at_full_rank_and_gated():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10)
    x = torch.randn(6, 12)
    k = pt.kind_from_linear(lin, 7, 3, n_classes=4)
    with torch.no_grad():
        assert torch.allclose(k(x, torch.tensor([0, 1, 2, 3, 0, 1])), lin(x), atol=1e-5)
        k.U_t[2].zero_()  # only class 2's tailors change: other classes untouched
        out = k(x, torch.tensor([0, 1, 2, 3, 0, 1]))
        assert torch.allclose(out[[0, 1, 3, 4, 5]], lin(x)[[0, 1, 3, 4, 5]], atol=1e-5)
        assert not torch.allclose(out[2], lin(x)[2], atol=1e-3)
        # the null class (label n_classes) uses the learngenes alone
        W = (k.U_g * k.s_g) @ k.V_g.T
        assert torch.allclose(k(x, torch.full((6,), 4)), x @ W.T + k.bias, atol=1e-5)
    assert k.tailor_params([0, 1]) == 2 * 3 * (12 + 10 + 1)
    with pytest.raises(ValueError, match="rank bound"):
        pt.kind_from_linear(lin, 9, 3, 4)
    with pytest.raises(TypeError, match="nn.Linear"):
        pt.kind_from_linear(torch.nn.Conv2d(1, 1, 1), 1, 1, 1)


def test_kind_transfer_trains_only_new_tailors():
    torch.manual_seed(0)
    net = pt.KindMLP(2, 16, 2, 10, r_shared=4, r_class=2)
    new, params = pt.kind_transfer(net, [5, 6], seed=0)
    x = torch.randn(32, 2)
    y = torch.tensor([0, 1, 5, 6]).repeat(8)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    pt.train_class_toy(new, x, y, steps=3, batch=16, lr=1e-2, generator=torch.Generator().manual_seed(0),
                       params=params)
    after = new.state_dict()
    for k, v in before.items():
        if k.endswith((".U_t", ".s_t", ".V_t")):
            assert torch.equal(after[k][[0, 1, 2, 3, 4, 7, 8, 9]], v[[0, 1, 2, 3, 4, 7, 8, 9]]), k
            assert not torch.equal(after[k][[5, 6]], v[[5, 6]]), k
        elif k == "label_emb.weight":
            assert torch.equal(after[k][:5], v[:5]) and not torch.equal(after[k][5:7], v[5:7])
        else:
            assert torch.equal(after[k], v), k  # learngenes and biases frozen
    # the old classes compute exactly what the pre-trained model computes
    from dmlab.denoisers import EDMPrecond

    with torch.no_grad():
        ys = torch.tensor([0, 1, 2, 3])
        a = EDMPrecond(net, 2.0)(x[:4], torch.ones(4), class_labels=ys)
        b = EDMPrecond(new, 2.0)(x[:4], torch.ones(4), class_labels=ys)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="class ids"):
        pt.kind_transfer(net, [12])


def test_zoo_entries_load_and_match_their_recipes():
    from dmlab import zoo

    m9 = zoo.load("corruption_gmm")
    assert set(m9) == {"clean", "corrupt2.5", "corrupt5", "corrupt10", "cep_g", "cep_u"}
    assert all(len(v) == 3 for v in m9.values())
    m45 = zoo.load("kind_gmm")
    assert set(m45) == {"plain", "lora", "kind", "kind_t"}
    x, y = torch.randn(8, 2), torch.arange(8) % 5  # source classes: KIND's transfer leaves them as they were
    with torch.no_grad():
        assert torch.equal(m45["kind"][0](x, torch.ones(8), class_labels=y),
                           m45["kind_t"][0](x, torch.ones(8), class_labels=y))
    r = pt.judge_samples(m9["clean"][0], range(2), 20, 0, steps=4)
    assert r["w2"].shape == (40,) and r["ok"].shape == (40,) and r["modes"].shape == (2,)


def test_full_scale_cep_on_config_built_models():
    from diffusers import UNet2DModel
    from tiny_models import tiny_sd_unet

    from dmlab import finetuning

    unet = tiny_sd_unet()
    g = torch.Generator().manual_seed(0)
    batch = {"x0": torch.randn(2, 4, 8, 8, generator=g), "eps": torch.randn(2, 4, 8, 8, generator=g),
             "t": torch.tensor([100, 700]), "encoder_hidden_states": torch.randn(2, 3, 8, generator=g)}
    batch["xt"] = 0.6 * batch["x0"] + 0.8 * batch["eps"]
    clean = finetuning.ddpm_loss(unet, batch)
    with torch.no_grad():
        same = pt.cep_step_loss(unet, batch, 0.0, "gaussian", torch.Generator())
        noisy = pt.cep_step_loss(unet, batch, 4.0, "gaussian", torch.Generator().manual_seed(1))
    assert torch.allclose(same, clean) and not torch.allclose(noisy, clean)
    torch.manual_seed(0)
    cu = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, num_class_embeds=11,
                     norm_num_groups=4).eval()
    b1 = {"x0": torch.randn(2, 1, 8, 8), "eps": torch.randn(2, 1, 8, 8), "t": torch.tensor([5, 500]),
          "y": torch.tensor([1, 2])}
    b1["xt"] = b1["x0"]
    ref = finetuning.ddpm_loss(cu, b1)
    with torch.no_grad():
        assert not torch.allclose(pt.cep_step_loss(cu, b1, 3.0, "uniform", torch.Generator()), ref)
    assert torch.equal(finetuning.ddpm_loss(cu, b1), ref)  # the hook is gone after the step
    with pytest.raises(ValueError, match="class embedding"):
        pt.cep_step_loss(torch.nn.Linear(2, 2), {"y": 1}, 1.0, "gaussian", torch.Generator())


def test_full_scale_kind_report_on_a_config_built_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    rows = pt.kind_report(dit, r_shared=12, r_class=4)
    names = [r[0] for r in rows]
    assert any(n.endswith("attn1.to_q") for n in names) and len(rows) >= 4
    for name, err, n_t in rows:
        assert err < 1e-4, name  # 16 components of a 16-wide layer: the SVD form is exact
        assert n_t > 0
    assert all(r[1] > 1e-3 for r in pt.kind_report(dit, r_shared=4, r_class=2))
    with pytest.raises(ValueError, match="BasicTransformerBlock"):
        pt.kind_report(torch.nn.Linear(2, 2), r_shared=1, r_class=1)
