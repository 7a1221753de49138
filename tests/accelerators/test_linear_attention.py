import json

import pytest
import torch
import torch.nn.functional as F

from dmlab import samplers, schedules
from dmlab.hooks import count_calls
from dmlab.accelerators.early_exit import EarlyExitConfig, apply_early_exit, exit_heads_for
from dmlab.accelerators.linear_attention import (GeneralizedLinearAttention, LinearAttentionConfig,
                                                 apply_linear_attention, cost_curve, distill_linear_attention,
                                                 linear_attention_for, load_linear_attention,
                                                 save_linear_attention, self_attention_names)
from dmlab.bench import count_flops
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, assert_restored, cond_unet, dit, snapshot, unet2d

SIG = schedules.karras(4, 0.01, 80.0)


@pytest.fixture(scope="module")
def model():
    return dit(seed=5, layers=3)


@pytest.fixture(scope="module")
def mods(model):
    torch.manual_seed(0)
    m = linear_attention_for(model)
    with torch.no_grad():  # non-zero MLPs, so the q/k paths are exercised
        for lin in m.mods.values():
            lin.to_q_[3].weight.normal_(0, 0.1)
            lin.to_k_[3].weight.normal_(0, 0.1)
    return m


def run(model, n=2):
    d = DiscreteVPDenoiser(model, AC)
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * SIG[0]
    return samplers.sample_euler(d, x, SIG, cond={"class_labels": torch.arange(n)})


def test_linear_attention_equals_normalised_kernel_attention():
    """q (k^T v / N) / (q . mean k + 1e-4) is the O(N^2) kernel attention sum_j (q_i.k_j) v_j / sum_j q_i.k_j."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, bias=True).double()
    lin = GeneralizedLinearAttention(attn).double()
    with torch.no_grad():
        lin.to_q_[3].weight.normal_(0, 0.2)
        lin.to_k_[3].weight.normal_(0, 0.2)
    h = torch.randn(3, 10, 16, dtype=torch.float64)
    b, n = 3, 10
    split = lambda t: t.reshape(b, n, 2, 8).transpose(1, 2)  # noqa: E731
    q = F.elu(split(lin.to_q(h + lin.to_q_(h)))) + 1
    k = F.elu(split(lin.to_k(h + lin.to_k_(h)))) + 1
    v = split(lin.to_v(h))
    w = q @ k.transpose(-1, -2) / n  # [B, H, N, N] kernel weights
    ref = (w @ v) / (w.sum(-1, keepdim=True) + 1e-4)
    ref = lin.to_out(ref.transpose(1, 2).reshape(b, n, 16))
    torch.testing.assert_close(lin(h), ref, rtol=1e-10, atol=1e-12)
    # before distillation the projections are the teacher's own
    assert torch.equal(lin.to_v.weight, attn.to_v.weight) and torch.equal(lin.to_out.weight, attn.to_out[0].weight)


def test_empty_layers_is_bit_identical(model, mods):
    base = run(model)
    with apply_linear_attention(model, LinearAttentionConfig(mods, layers=())) as h:
        assert torch.equal(run(model), base)
    assert h.stats == {"calls": 4, "linear_calls": 0, "tokens": 0}


def test_apply_changes_output_and_removal_restores(model, mods):
    snap = snapshot(model)
    base = run(model)
    with apply_linear_attention(model, LinearAttentionConfig(mods)) as h:
        out = run(model)
        assert model.state_dict().keys() == snap[1].keys()  # modules live outside the model
    assert not torch.equal(out, base)
    assert h.stats["calls"] == 4 and h.stats["linear_calls"] == 4 * 3 and h.stats["tokens"] == 16
    with apply_linear_attention(model, LinearAttentionConfig(mods, layers=(1,))) as h:
        run(model)
    assert h.stats["linear_calls"] == 4
    assert torch.equal(run(model), base)
    assert_restored(model, snap)


def test_cpu_softmax_attention_flops_are_counted():
    """bench.count_flops counts F.scaled_dot_product_attention on the CPU (torch registers only CUDA kernels)."""
    q = torch.randn(1, 2, 32, 8)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * 2 * 32 * 32 * 8 * 2


def test_cost_curve_linear_vs_quadratic(model, mods):
    rows = cost_curve(model, mods, [8, 16, 32, 64], class_labels=torch.tensor([1]))
    assert [r["tokens"] for r in rows] == [16, 64, 256, 1024]
    lin = [r["flops_linear"] for r in rows]
    soft = [r["flops_softmax"] for r in rows]
    d_lin = [b - a for a, b in zip(lin, lin[1:])]  # FLOPs = const (embeddings) + slope * N for linear attention
    assert all(abs(b / a - 4) < 1e-3 for a, b in zip(d_lin, d_lin[1:]))
    d_soft = [b - a for a, b in zip(soft, soft[1:])]  # ... and grow faster than N with softmax attention
    assert all(b / a > 4.5 for a, b in zip(d_soft, d_soft[1:])) and rows[-1]["ratio"] > rows[0]["ratio"]
    assert 0 < rows[0]["attn_share"] < rows[-1]["attn_share"] < 1
    # meta-device counting agrees with counting the real CPU call
    x = torch.zeros(1, 1, 16, 16)
    with torch.no_grad():
        f = count_flops(lambda: model(x, timestep=torch.tensor([500.0]), class_labels=torch.tensor([1])))
    assert f == rows[1]["flops_softmax"]


def test_applying_twice_raises(model, mods):
    with apply_linear_attention(model, LinearAttentionConfig(mods)):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_linear_attention(model, LinearAttentionConfig(mods, layers=(0,)))


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_composes_with_early_exit_and_call_counting(model, mods, order):
    snap = snapshot(model)
    heads = exit_heads_for(model)
    with torch.no_grad():
        for u in heads.uems:
            u.linear.weight.zero_()
            u.linear.bias.fill_(-5.0)  # everyone leaves after block 1
    base = run(model)
    hs = [count_calls(model), apply_linear_attention(model, LinearAttentionConfig(mods)),
          apply_early_exit(model, EarlyExitConfig(heads, 0.5))]
    out = run(model)
    assert hs[1].stats["linear_calls"] == 4 and hs[2].stats["depth_counts"][0] == 8 and hs[0].stats["calls"] == 4
    assert not torch.equal(out, base)
    for h in (hs[::-1] if order == "lifo" else hs):
        h.remove()
    assert torch.equal(run(model), base)
    assert_restored(model, snap)


def test_bad_configs_raise_clear_errors(model, mods):
    with pytest.raises(ValueError, match="layers"):
        LinearAttentionConfig(mods, layers=(3,))
    with pytest.raises(ValueError, match="layers"):
        LinearAttentionConfig(mods, layers=(True,))
    with pytest.raises(TypeError, match="LinearAttentionModules"):
        LinearAttentionConfig({"a": 1})
    with pytest.raises(ValueError, match="no diffusers Attention"):
        linear_attention_for(unet2d())
    with pytest.raises(ValueError, match="another model"):
        apply_linear_attention(dit(layers=2), LinearAttentionConfig(linear_attention_for(dit(layers=4))))
    with pytest.raises(TypeError, match="LinearAttentionConfig"):
        apply_linear_attention(model, mods)


def test_sd_unet_self_attention_is_found():
    u = cond_unet()
    names = self_attention_names(u)
    assert names and all(n.endswith("attn1") for n in names)
    mods = linear_attention_for(u)
    x = torch.randn(1, 4, 8, 8)
    kw = {"encoder_hidden_states": torch.randn(1, 5, 32)}
    with torch.no_grad():
        base = u(x, 10, **kw).sample
        with apply_linear_attention(u, LinearAttentionConfig(mods)) as h:
            out = u(x, 10, **kw).sample
        assert torch.equal(u(x, 10, **kw).sample, base)
    assert h.stats["linear_calls"] == len(names) and out.shape == base.shape
    rows = cost_curve(u, mods, [8, 16], **kw)  # the full-scale chapter's path: a UNet2DConditionModel on meta
    assert rows[1]["flops_softmax"] > rows[0]["flops_softmax"] > 0 and rows[0]["tokens"] == 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cost_curve_of_a_half_precision_model(dtype):
    """The full-scale chapter runs cost_curve on an fp16 model: inputs follow the model's dtype."""
    u = cond_unet().to(dtype)
    mods = linear_attention_for(u).to(dtype)
    kw = {"encoder_hidden_states": torch.randn(1, 5, 32)}  # float32 conditioning, as a pipeline might pass it
    rows = cost_curve(u, mods, [8, 16], **kw)
    assert rows[1]["flops_softmax"] > rows[0]["flops_softmax"] > 0
    assert rows == cost_curve(u.float(), mods.float(), [8, 16], **kw)  # counting does not depend on the dtype
    d = dit(seed=5, layers=1).to(dtype)
    assert cost_curve(d, linear_attention_for(d).to(dtype), [8], class_labels=torch.tensor([1]))[0]["tokens"] == 16


def test_distillation_moves_towards_the_teacher():
    m = dit(seed=6, layers=2)
    mods = linear_attention_for(m)
    x0 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    y0 = torch.arange(64) % 10
    x, t, y = x0[:16], torch.linspace(50, 950, 16), y0[:16]

    def gap():
        with torch.no_grad():
            teacher = m(x, timestep=t, class_labels=y).sample
            with apply_linear_attention(m, LinearAttentionConfig(mods)):
                return float((m(x, timestep=t, class_labels=y).sample - teacher).pow(2).mean())

    before = gap()
    mods, log = distill_linear_attention(m, mods, x0, y0, schedules.sigmas_from_alphas_cumprod(AC),
                                         generator=torch.Generator().manual_seed(0), steps=30, batch_size=16,
                                         lr=3e-3, w_eps=0.0)  # a random teacher's eps error would dominate
    assert gap() < 0.7 * before and log["steps"] == 30
    assert all(p.requires_grad for p in m.parameters())


def test_save_and_load_round_trip(tmp_path, model, mods):
    from safetensors.torch import save_file

    from dmlab.zoo.store import file_table

    (tmp_path / "base").mkdir()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "registry.json").write_text(json.dumps({"base": {"kind": "dit", "config_hash": "h",
                                                                 "files": file_table(tmp_path / "base")}}))
    save_linear_attention(mods, "base_lin", base="base", recipe={"steps": 0}, log={}, root=tmp_path)
    back = load_linear_attention("base_lin", model, root=tmp_path)
    assert back.names == mods.names
    assert all(torch.equal(a, b) for a, b in zip(mods.state_dict().values(), back.state_dict().values()))
    with pytest.raises(ValueError, match="base model"):
        load_linear_attention("base_lin", dit(layers=2), root=tmp_path)
