"""Fake quantization (Q-Diffusion, PTQ4DM, TFMQ-DM, Temporal Feature Matters, QuEST): quantizer arithmetic against
hand-computed values, calibration schemes, no-op / removal bit-identity, composition, errors that teach."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmlab import samplers, schedules
from dmlab.accelerators import DeepCacheConfig, apply_deepcache
from dmlab.hooks import count_calls
from dmlab.accelerators.quant_calibration import CalibrationSet, calibration_set
from dmlab.accelerators.quantization import (QuantConfig, apply_quantization, model_bytes, temporal_cache_bytes,
                                             temporal_layers)
from dmlab.accelerators.quantizers import check_bits, fake_quant, minmax_range, mse_shrink, qparams
from dmlab.accelerators.quest import quest_finetune
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, assert_restored, snapshot

SIG = schedules.discrete(6, schedules.sigmas_from_alphas_cumprod(AC), dtype=torch.float32)


def setup_run(model, gen, n=4, cond_kind="class"):
    d = DiscreteVPDenoiser(model, AC)
    x = torch.randn(n, 1, 8, 8, generator=gen) * SIG[0]
    cond = {"class_labels": torch.arange(n) % 10}
    return d, x, cond, (lambda sig=SIG: samplers.sample_euler(d, x, sig, cond=cond))


def calib(model, gen, n=12, scheme="uniform"):
    d, x, cond, _ = setup_run(model, gen)
    return calibration_set(d, x, SIG, n=n, scheme=scheme, cond=cond, generator=gen)


# ----------------------------------------------------------------------------------------------- quantizer math
def manual_fq(x, lo, hi, bits):
    """The textbook formula written out independently: scalar range, python floats."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    s = (hi - lo) / (2 ** bits - 1)
    z = round(-lo / s)
    return torch.tensor([(min(max(round(v / s) + z, 0), 2 ** bits - 1) - z) * s for v in x.tolist()])


def test_fake_quant_matches_hand_computed_values():
    # 2 bits on [-1, 3]: scale 4/3, zero point round(0.75) = 1, levels {-4/3, 0, 4/3, 8/3}
    s, z = qparams(torch.tensor(-1.0), torch.tensor(3.0), 2)
    assert float(s) == pytest.approx(4 / 3) and float(z) == 1.0
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0, 5.0, -3.0])
    expect = torch.tensor([-4 / 3, 0.0, 0.0, 4 / 3, 8 / 3, 8 / 3, -4 / 3])
    torch.testing.assert_close(fake_quant(x, s, z, 2), expect)
    x = torch.randn(101, generator=torch.Generator().manual_seed(0)) + 0.8  # no ties at half steps
    for bits in (2, 4, 8):
        s, z = qparams(x.min(), x.max(), bits)
        torch.testing.assert_close(fake_quant(x, s, z, bits), manual_fq(x, x.min(), x.max(), bits))


def test_zero_is_exact_and_range_is_widened_to_contain_it():
    s, z = qparams(torch.tensor(0.5), torch.tensor(2.0), 4)  # becomes [0, 2]
    assert float(z) == 0.0 and float(s) == pytest.approx(2 / 15)
    assert float(fake_quant(torch.tensor(0.0), s, z, 4)) == 0.0


def test_straight_through_estimator_passes_gradients():
    x = torch.tensor([0.1, 0.4, 0.9], requires_grad=True)
    s, z = qparams(torch.tensor(0.0), torch.tensor(1.0), 2)
    y = fake_quant(x, s, z, 2, ste=True)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), fake_quant(x.detach(), s, z, 2))
    torch.testing.assert_close(x.grad, torch.ones(3))


def test_mse_range_clips_an_outlier_and_keeps_an_exact_grid():
    grid = torch.arange(16.0)  # exactly representable at 4 bits: the full range is optimal (error 0)
    assert float(mse_shrink(grid, 4)) == 1.0
    x = torch.cat([torch.linspace(0, 1, 20000), torch.tensor([5.0])])
    a = float(mse_shrink(x, 4))
    assert a < 0.5
    s, z = qparams(x.min() * a, x.max() * a, 4)
    s0, z0 = qparams(x.min(), x.max(), 4)
    assert (fake_quant(x, s, z, 4) - x).pow(2).mean() < (fake_quant(x, s0, z0, 4) - x).pow(2).mean()
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    lo, hi = minmax_range(w, per_channel=True)
    assert lo.shape == (5, 1) and torch.equal(lo[:, 0], w.amin(1)) and mse_shrink(w, 4, per_channel=True).shape == (5,)


@pytest.mark.parametrize("bits", [1, 17, 8.0, True, "8"])
def test_bits_outside_2_to_16_raise_with_advice(bits):
    with pytest.raises(ValueError, match="2..16"):
        check_bits(bits)
    with pytest.raises(ValueError, match="weight_bits must be an int in 2..16"):
        QuantConfig(weight_bits=bits)
    with pytest.raises(ValueError, match="act_bits"):
        QuantConfig(act_bits=bits)


def test_bad_configs_raise_errors_that_say_what_to_do(tiny_unet, gen):
    with pytest.raises(ValueError, match="minmax"):
        QuantConfig(weight_range="max")
    with pytest.raises(ValueError, match="tfmq"):
        QuantConfig(temporal="cache")
    with pytest.raises(TypeError, match="QuantConfig"):
        apply_quantization(tiny_unet, {"weight_bits": 8})
    with pytest.raises(TypeError, match="nn.Module"):
        apply_quantization(lambda x: x, QuantConfig())
    with pytest.raises(ValueError, match="calibration_set"):
        apply_quantization(tiny_unet, QuantConfig(8, 8))
    with pytest.raises(ValueError, match="matches no"):
        apply_quantization(tiny_unet, QuantConfig(8, None, skip=("not_a_layer",)))
    with pytest.raises(ValueError, match="matches no"):
        apply_quantization(tiny_unet, QuantConfig(8, None, layers=("up_blocks.*.conv_shorcut",)))
    with pytest.raises(ValueError, match="patterns"):
        QuantConfig(layers=())
    with apply_quantization(tiny_unet, QuantConfig(8, None, layers=("up_blocks.*",), skip=("*conv_shortcut",))) as h:
        assert h.layers and all(n.startswith("up_blocks.") and "conv_shortcut" not in n for n in h.layers)
    with pytest.raises(TypeError, match="generator"):
        calib(tiny_unet, None, scheme="normal")
    with pytest.raises(ValueError, match="Q-Diffusion"):
        calib(tiny_unet, gen, scheme="late")
    snap = snapshot(tiny_unet)
    assert_restored(tiny_unet, snap)  # failed applies left nothing behind


# ----------------------------------------------------------------------------------------------- the wrapper
def test_quantized_layer_matches_manual_weight_and_activation_quantization(gen):
    lin = nn.Linear(6, 3)
    x = torch.randn(10, 6, generator=gen)
    cs = CalibrationSet([((x,), {})], (0,), (), [((x,), {})], "uniform", 10)
    ref_w = torch.stack([manual_fq(r, r.min(), r.max(), 4) for r in lin.weight.detach()])
    with apply_quantization(lin, QuantConfig(4, None, weight_range="minmax")), torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, ref_w, lin.bias))
    xq = manual_fq(x.reshape(-1), x.min(), x.max(), 8).reshape(x.shape)
    with apply_quantization(lin, QuantConfig(4, 8, weight_range="minmax", act_range="minmax"), cs), torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(xq, ref_w, lin.bias))


def test_model_bytes_by_hand():
    lin = nn.Linear(4, 3)  # 12 weights at 4 bits = 6 bytes, 3 channels x (fp32 scale + int32 zero point), fp32 bias
    assert model_bytes(lin) == 15 * 4
    assert model_bytes(lin, {"": 4}) == 6 + 3 * 8 + 3 * 4
    with apply_quantization(lin, QuantConfig(4, None)) as h:
        assert h.stats["bytes"] == 6 + 3 * 8 + 3 * 4 and h.stats["fp32_bytes"] == 60


def test_noop_is_bit_identical_and_patches_nothing(tiny_unet, gen):
    _, _, _, run = setup_run(tiny_unet, gen)
    base = run()
    snap = snapshot(tiny_unet)
    with apply_quantization(tiny_unet, QuantConfig(weight_bits=None, act_bits=None)) as h:
        assert_restored(tiny_unet, snap)
        assert torch.equal(run(), base)
    assert h.stats["layers"] == 0 and h.stats["bytes"] == h.stats["fp32_bytes"]


def test_16_bit_is_close_but_quantization_is_not_a_noop(tiny_unet, gen):
    cs = calib(tiny_unet, gen)
    a, k = cs.calls[0]
    cs = CalibrationSet([(a, k)], (0,), (), [], "first", 2)  # ranges of exactly these inputs: no clipping
    with torch.no_grad():
        ref = tiny_unet(*a, **k).sample
        with apply_quantization(tiny_unet, QuantConfig(16, 16, weight_range="minmax", act_range="minmax"), cs):
            out16 = tiny_unet(*a, **k).sample
        with apply_quantization(tiny_unet, QuantConfig(4, 8), cs):
            out4 = tiny_unet(*a, **k).sample
    err16, err4 = (out16 - ref).abs().max(), (out4 - ref).abs().max()
    assert 0 < err16 < 1e-3 * ref.abs().max() and err4 > 100 * err16


@pytest.mark.parametrize("cfg", [QuantConfig(8, 8), QuantConfig(4, 8, split_shortcut=True, temporal="tfmq"),
                                 QuantConfig(4, 4, per_step_acts=True, temporal="fp", act_range="minmax")])
def test_removal_is_bit_identical_also_after_an_exception(tiny_unet, gen, cfg):
    cs = calib(tiny_unet, gen)
    _, _, _, run = setup_run(tiny_unet, gen)
    base = run()
    snap = snapshot(tiny_unet)
    with pytest.raises(KeyError):
        with apply_quantization(tiny_unet, cfg, cs) as h:
            assert not torch.equal(run(), base)
            with h.bypass():
                assert torch.equal(run(), base)
            raise KeyError("boom")
    assert_restored(tiny_unet, snap)
    assert torch.equal(run(), base)


def test_applying_twice_raises(tiny_unet):
    with apply_quantization(tiny_unet, QuantConfig(8, None)):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_quantization(tiny_unet, QuantConfig(4, None))


@pytest.mark.parametrize("order", ["first_out_first", "last_out_first"])
def test_composes_with_caching_and_call_counting(tiny_unet, gen, order):
    cs = calib(tiny_unet, gen)
    _, _, _, run = setup_run(tiny_unet, gen)
    base = run()
    snap = snapshot(tiny_unet)
    with apply_quantization(tiny_unet, QuantConfig(8, 8), cs):
        q_only = run()
    hq = apply_quantization(tiny_unet, QuantConfig(8, 8), cs)
    hc = count_calls(tiny_unet)
    assert torch.equal(run(), q_only) and hc.stats["calls"] == len(SIG) - 1 == hq.stats["calls"]
    hd = apply_deepcache(tiny_unet, DeepCacheConfig(interval=2))
    out = run()
    assert hd.stats["cache_hits"] > 0 and not torch.equal(out, q_only)
    for h in ([hq, hc, hd] if order == "first_out_first" else [hd, hc, hq]):
        h.remove()
    assert_restored(tiny_unet, snap)
    assert torch.equal(run(), base)


# ----------------------------------------------------------------------------------------------- the methods
def test_calibration_schemes_pick_the_documented_steps(tiny_unet, gen):
    first = calib(tiny_unet, gen, n=12, scheme="first")
    assert first.steps == (0,) and first.histogram() == {0: 4}  # at most the batch of 4, no duplicates
    uni = calib(tiny_unet, gen, n=12, scheme="uniform")
    assert uni.histogram() == {s: 2 for s in range(6)} and len(uni.timesteps) == 6
    ts = torch.tensor(uni.timesteps)
    n1 = calib(tiny_unet, torch.Generator().manual_seed(1), n=400, scheme="normal")
    n2 = calib(tiny_unet, torch.Generator().manual_seed(1), n=400, scheme="normal")
    assert n1.draws == n2.draws and len(n1.draws) == 400 and first.draws == (0,) * 12
    # NDTC's N(0.4 T, 0.4 T), clamped to [0, T) and snapped to the grid: the mean drawn timestep sits near 0.4-0.5 T
    mean_t = float(ts[list(n1.draws)].mean()) / 1000
    assert 0.35 < mean_t < 0.55
    d, x, cond, _ = setup_run(tiny_unet, gen)
    early = calibration_set(d, x, SIG, n=400, scheme="normal", cond=cond, generator=gen, mean=0.1, std=0.1)
    assert float(ts[list(early.draws)].mean()) / 1000 < 0.2


def test_split_shortcut_finds_the_concat_boundary(tiny_unet, gen):
    cs = calib(tiny_unet, gen)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.update({n: a[1]}))
             for n, m in tiny_unet.named_modules() if n.startswith("up_blocks.") and n.count(".") == 1]
    with apply_quantization(tiny_unet, QuantConfig(8, 8, split_shortcut=True), cs) as h:
        splits = {n: v["split"] for n, v in h.layers.items() if v["split"]}
    for hk in hooks:
        hk.remove()
    assert splits and all(n.endswith("conv_shortcut") and "up_blocks" in n for n in splits)
    for n, split in splits.items():
        blk, i = n.split(".resnets.")[0], int(n.split(".resnets.")[1].split(".")[0])
        skip = list(reversed(seen[blk]))[i].shape[1]
        conv = dict(tiny_unet.named_modules())[n]
        assert split == conv.in_channels - skip > 0


def test_per_step_ranges_hit_on_the_calibrated_trajectory_only(tiny_unet, gen):
    cs = calib(tiny_unet, gen)
    _, _, _, run = setup_run(tiny_unet, gen)
    with apply_quantization(tiny_unet, QuantConfig(8, 8, per_step_acts=True), cs) as h:
        run()
        assert h.stats["per_step_hits"] == len(SIG) - 1 and h.stats["per_step_misses"] == 0
        run(schedules.karras(3, 0.05, 50.0))
        assert h.stats["per_step_misses"] == 3


def temporal_outputs(model, run):
    outs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: outs.setdefault(n, []).append(o))
             for n, m in model.named_modules() if n.endswith("time_emb_proj")]
    run()
    for hk in hooks:
        hk.remove()
    return {k: torch.cat(v) for k, v in outs.items()}


def test_temporal_modes(tiny_unet, gen):
    cs = calib(tiny_unet, gen)
    _, _, _, run = setup_run(tiny_unet, gen)
    ref = temporal_outputs(tiny_unet, run)
    errs = {}
    for mode in ("quantize", "tfmq", "fp"):
        with apply_quantization(tiny_unet, QuantConfig(4, 4, temporal=mode), cs) as h:
            got = temporal_outputs(tiny_unet, run)
            names = set(temporal_layers(tiny_unet))
            assert (names <= set(h.layers)) == (mode != "fp") and h.stats["temporal_layers"] == (0 if mode == "fp" else len(names))
            if mode == "tfmq":  # finite-set calibration: every sampler timestep has its own range
                assert h.stats["per_step_hits"] == len(SIG) - 1
        errs[mode] = sum(float((got[k] - ref[k]).pow(2).mean()) for k in ref)
    assert errs["fp"] == 0.0 and errs["tfmq"] < errs["quantize"]


def test_temporal_cache_bytes_by_hand(tiny_unet, tiny_dit):
    from diffusers.models.resnet import ResnetBlock2D

    width = sum(m.time_emb_proj.out_features for m in tiny_unet.modules() if isinstance(m, ResnetBlock2D))
    assert temporal_cache_bytes(tiny_unet, 20) == 20 * 11 * width * 4
    width = sum(b.norm1.linear.out_features for b in tiny_dit.transformer_blocks) + tiny_dit.proj_out_1.out_features
    labels = tiny_dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings  # 11 + null
    assert temporal_cache_bytes(tiny_dit, 10, bytes_per_value=2) == 10 * labels * width * 2
    with pytest.raises(ValueError, match="n_timesteps"):
        temporal_cache_bytes(tiny_dit, 0)


def test_quest_finetune_lowers_the_error_and_is_undone(tiny_unet, gen):
    cs = calib(tiny_unet, gen)
    snap = snapshot(tiny_unet)
    with apply_quantization(tiny_unet, QuantConfig(4, 4), cs) as h:
        info = quest_finetune(h, cs, select="all", steps=15, lr=1e-3, generator=gen)
        assert info["final_loss"] < info["initial_loss"] and h.stats["quest"] is info
        with pytest.raises(ValueError, match="select"):
            quest_finetune(h, cs, select="some", generator=gen)
    assert_restored(tiny_unet, snap)
    assert all(p.requires_grad for p in tiny_unet.parameters())
    with apply_quantization(tiny_unet, QuantConfig(4, 4), cs) as h:
        few = quest_finetune(h, cs, select="quest", steps=1, generator=gen)["params"]
    assert 0 < few < info["params"] == sum(p.numel() for p in tiny_unet.parameters())
    assert_restored(tiny_unet, snap)


def test_works_on_dit_cross_attention_unet_and_pipelines(tiny_dit, tiny_cond_unet, sd_pipe, gen):
    d, x, cond, run = setup_run(tiny_dit, gen)
    cs = calibration_set(d, x, SIG, n=8, cond=cond)
    base = run()
    snap = snapshot(tiny_dit)
    with apply_quantization(tiny_dit, QuantConfig(8, 8, temporal="tfmq", per_step_acts=True), cs) as h:
        assert h.stats["layers"] == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in tiny_dit.modules())
        assert torch.isfinite(run()).all()
    assert_restored(tiny_dit, snap)
    assert torch.equal(run(), base)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ehs = torch.randn(2, 5, 32, generator=gen)
    cs = CalibrationSet([((x, torch.tensor([500, 500])), {"encoder_hidden_states": ehs})], (0,), (500.0,), [], "first", 2)
    with torch.no_grad():
        ref = tiny_cond_unet(x, 500, encoder_hidden_states=ehs).sample
        with apply_quantization(tiny_cond_unet, QuantConfig(8, 8, split_shortcut=True), cs) as h:
            out = tiny_cond_unet(x, 500, encoder_hidden_states=ehs).sample
        assert h.stats["split_layers"] > 0 and 0 < (out - ref).abs().max() < 0.1 * ref.abs().max()
    snap = snapshot(sd_pipe.unet)
    with apply_quantization(sd_pipe, QuantConfig(4, None)) as h:
        assert h.model is sd_pipe.unet and h.stats["bytes"] < h.stats["fp32_bytes"] / 4
    assert_restored(sd_pipe.unet, snap)
