"""Layer pruning (LAPTOP-Diff, LD-Pruner, A-SDM progressive, spectral KD) and EcoDiff structural masks: identity
removal, criteria on units whose importance is known by construction, FLOP accounting, bit-identical removal."""
import copy

import pytest
import torch

from dmlab import bench, samplers, schedules
from dmlab.accelerators.pruning import (CRITERIA, LayerPruneConfig, apply_layer_pruning, candidate_units,
                                        distill_pruned, joint_output_loss, prunable_units, select_units, unit_scores)
from dmlab.accelerators.pruning_masks import apply_masks, learn_masks, mask_sites, sliced_copy, threshold_masks
from dmlab.accelerators.quant_calibration import calibration_set
from dmlab.accelerators.quantization import QuantConfig, apply_quantization
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, assert_restored, dit, snapshot

SIG = schedules.discrete(5, schedules.sigmas_from_alphas_cumprod(AC), dtype=torch.float32)
T500 = torch.tensor([500, 500])


@pytest.fixture
def dead_dit():
    """A tiny DiT whose block 1 is the identity by construction (adaLN-Zero gates of 0)."""
    m = dit(layers=4)
    with torch.no_grad():
        m.transformer_blocks[1].norm1.linear.weight.zero_()
        m.transformer_blocks[1].norm1.linear.bias.zero_()
    return m


def setup(model, gen, n=4):
    d = DiscreteVPDenoiser(model, AC)
    x = torch.randn(n, 1, 8, 8, generator=gen) * SIG[0]
    cond = {"class_labels": torch.arange(n) % 10}
    return d, x, cond, (lambda: samplers.sample_euler(d, x, SIG, cond=cond))


def test_prunable_units_keep_shapes_and_removal_is_the_identity(tiny_unet, tiny_dit, gen):
    x, y = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([1, 2])
    cand, ok = candidate_units(tiny_unet), prunable_units(tiny_unet, x, T500, class_labels=y)
    assert set(ok) < set(cand) and "mid_block.attentions.0" in ok
    for u in set(cand) - set(ok):  # units that change the width cannot go
        with apply_layer_pruning(tiny_unet, LayerPruneConfig((u,))), pytest.raises(ValueError, match="cannot be removed"):
            tiny_unet(x, T500, class_labels=y)
    r = tiny_unet.down_blocks[0].resnets[0]
    h = torch.randn(2, r.in_channels, 8, 8, generator=gen)
    with apply_layer_pruning(tiny_unet, LayerPruneConfig(("down_blocks.0.resnets.0", "mid_block.attentions.0"))):
        assert torch.equal(r(h, None), h)
        a = tiny_unet.mid_block.attentions[0]
        hm = torch.randn(2, a.to_q.in_features, 2, 2, generator=gen)
        assert torch.equal(a(hm), hm)
    assert prunable_units(tiny_dit, x, T500, class_labels=y) == [f"transformer_blocks.{i}" for i in range(4)]
    b = tiny_dit.transformer_blocks[2]
    hb = torch.randn(2, 16, b.norm1.linear.in_features, generator=gen)
    with apply_layer_pruning(tiny_dit, LayerPruneConfig(("transformer_blocks.2",))):
        assert torch.equal(b(hb, timestep=T500, class_labels=y), hb)


def test_removal_is_bit_identical_and_applying_twice_raises(tiny_dit, gen):
    _, _, _, run = setup(tiny_dit, gen)
    base = run()
    snap = snapshot(tiny_dit)
    with pytest.raises(KeyError):
        with apply_layer_pruning(tiny_dit, LayerPruneConfig(("transformer_blocks.0", "transformer_blocks.3"))) as h:
            assert not torch.equal(run(), base) and h.stats["units"] == 2 and h.stats["calls"] == len(SIG) - 1
            with pytest.raises(RuntimeError, match="already applied"):
                apply_layer_pruning(tiny_dit, LayerPruneConfig(("transformer_blocks.1",)))
            raise KeyError("boom")
    assert_restored(tiny_dit, snap)
    assert torch.equal(run(), base)


def test_bad_configs_raise_errors_that_say_what_to_do(tiny_dit):
    with pytest.raises(ValueError, match="did you mean"):
        apply_layer_pruning(tiny_dit, LayerPruneConfig(("transformer_block.1",)))
    with pytest.raises(ValueError, match="not a residual unit"):
        apply_layer_pruning(tiny_dit, LayerPruneConfig(("proj_out_1",)))
    with pytest.raises(ValueError, match="twice"):
        LayerPruneConfig(("transformer_blocks.1", "transformer_blocks.1"))
    with pytest.raises(ValueError, match="module names"):
        LayerPruneConfig(("",))
    with pytest.raises(TypeError, match="LayerPruneConfig"):
        apply_layer_pruning(tiny_dit, ("transformer_blocks.1",))
    with pytest.raises(ValueError, match="LAPTOP"):
        unit_scores(tiny_dit, ["transformer_blocks.1"], "taylor")
    with pytest.raises(TypeError, match="calibration"):
        unit_scores(tiny_dit, ["transformer_blocks.1"], "output")
    with pytest.raises(TypeError, match="sample"):
        unit_scores(tiny_dit, ["transformer_blocks.1"], "ld")
    with pytest.raises(ValueError, match="k must be"):
        select_units({"a": 1.0}, 2)


def test_flops_drop_by_exactly_the_removed_blocks(tiny_dit, gen):
    x, y = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([1, 2])
    full = bench.count_flops(lambda: tiny_dit(x, T500, class_labels=y))

    def pruned(k):
        with apply_layer_pruning(tiny_dit, LayerPruneConfig(tuple(f"transformer_blocks.{i}" for i in range(k)))) as h:
            return bench.count_flops(lambda: tiny_dit(x, T500, class_labels=y)), h.stats
    (f1, s1), (f2, s2) = pruned(1), pruned(2)
    assert full - f2 == 2 * (full - f1) > 0  # identical blocks: each one costs the same
    assert s2["params_removed"] == 2 * s1["params_removed"] == 2 * sum(
        p.numel() for p in tiny_dit.transformer_blocks[0].parameters())


def test_criteria_find_a_dead_unit_and_the_output_loss_is_additive_over_it(dead_dit, gen):
    d, x, cond, run = setup(dead_dit, gen)
    cs = calibration_set(d, x, SIG, n=8, cond=cond)
    units = candidate_units(dead_dit)
    out = unit_scores(dead_dit, units, "output", calibration=cs)
    ld = unit_scores(dead_dit, units, "ld", sample=run)
    assert out["transformer_blocks.1"] == 0.0 and ld["transformer_blocks.1"] == 0.0
    assert select_units(out, 1) == select_units(ld, 1) == ("transformer_blocks.1",)
    assert min(v for u, v in out.items() if u != "transformer_blocks.1") > 0
    assert out["transformer_blocks.2"] == pytest.approx(joint_output_loss(dead_dit, ["transformer_blocks.2"], cs))
    assert joint_output_loss(dead_dit, ["transformer_blocks.1", "transformer_blocks.2"], cs) == pytest.approx(
        out["transformer_blocks.2"])  # removing a dead unit adds nothing
    mag = unit_scores(dead_dit, units, "magnitude")
    ps = list(dead_dit.transformer_blocks[3].parameters())
    assert mag["transformer_blocks.3"] == pytest.approx(float(sum(p.detach().abs().sum() for p in ps)) / sum(p.numel() for p in ps))
    r1 = unit_scores(dead_dit, units, "random", generator=torch.Generator().manual_seed(3))
    r2 = unit_scores(dead_dit, units, "random", generator=torch.Generator().manual_seed(3))
    assert r1 == r2 and set(CRITERIA) == {"output", "ld", "magnitude", "random"}
    assert select_units({"b": 1.0, "a": 1.0, "c": 0.5}, 2) == ("c", "a")


@pytest.mark.parametrize("kw", [{}, {"normalized": False}, {"progressive": True}, {"spectral": True}])
def test_distillation_lowers_the_loss_and_is_undone(tiny_dit, gen, kw):
    d, _, _, run = setup(tiny_dit, gen)
    base = run()
    snap = snapshot(tiny_dit)
    teacher = copy.deepcopy(tiny_dit)
    x0 = torch.randn(16, 1, 8, 8, generator=gen).clamp(-1, 1)
    units = ("transformer_blocks.1", "transformer_blocks.2")
    with apply_layer_pruning(tiny_dit, LayerPruneConfig(units)) as h:
        with pytest.raises(ValueError, match="separate copy"):
            distill_pruned(h, tiny_dit, x0, sigmas_train=d.sigmas_train, generator=gen)
        info = distill_pruned(h, teacher, x0, sigmas_train=d.sigmas_train, cond={"class_labels": torch.arange(16) % 10},
                              steps=25, batch_size=8, lr=1e-3, generator=gen, **kw)
        assert info["final_loss"] < info["initial_loss"] and h.stats["distill"] is info
        assert h.active == set(units)
    assert_restored(tiny_dit, snap)
    assert torch.equal(run(), base) and all(p.requires_grad for p in tiny_dit.parameters())


def test_masks_slice_exactly_and_all_ones_is_a_noop(tiny_dit, tiny_cond_unet, gen):
    _, x, cond, run = setup(tiny_dit, gen)
    base = run()
    sites = mask_sites(tiny_dit)
    assert {s["kind"] for s in sites.values()} == {"heads", "ffn"} and len(sites) == 8
    with apply_masks(tiny_dit, {s: torch.ones(v["groups"]) for s, v in sites.items()}) as h:
        assert torch.equal(run(), base) and h.stats["params_off"] == 0
    scores = {s: torch.rand(v["groups"], generator=gen) for s, v in sites.items()}
    masks = threshold_masks(scores, sites, 0.3)
    total = sum(v["groups"] * v["group_params"] for v in sites.values())
    with apply_masks(tiny_dit, masks) as h, torch.no_grad():
        out = tiny_dit(x, T500.repeat(2), **cond).sample
    small = sliced_copy(tiny_dit, masks)
    n_small = sum(p.numel() for p in small.parameters())
    assert h.stats["params_off"] == sum(p.numel() for p in tiny_dit.parameters()) - n_small >= 0.3 * total
    assert all(int(m.sum()) >= 1 for m in masks.values())
    with torch.no_grad():
        torch.testing.assert_close(small(x, T500.repeat(2), **cond).sample, out, rtol=1e-5, atol=1e-6)
    # cross-attention UNet (GEGLU feed-forward, attn1 + attn2)
    u_sites = mask_sites(tiny_cond_unet)
    m = {s: (torch.arange(v["groups"]) % 3 != 0).float() for s, v in u_sites.items()}
    xu, ehs = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)
    with apply_masks(tiny_cond_unet, m), torch.no_grad():
        ref = tiny_cond_unet(xu, 500, encoder_hidden_states=ehs).sample
    with torch.no_grad():
        got = sliced_copy(tiny_cond_unet, m)(xu, 500, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask site"):
        apply_masks(tiny_dit, {"proj_out_1": torch.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(tiny_dit, {"transformer_blocks.0.ff": torch.ones(3)})
    with pytest.raises(ValueError, match="sparsity"):
        threshold_masks(scores, sites, 1.0)


def test_time_step_checkpointing_saves_memory_not_gradients(tiny_dit, gen):
    d, x, cond, _ = setup(tiny_dit, gen, n=2)
    snap = snapshot(tiny_dit)
    runs = [learn_masks(d, x, SIG, cond=cond, steps=2, checkpoint=c, generator=torch.Generator().manual_seed(0))
            for c in (True, False)]
    (s_ck, i_ck), (s_full, i_full) = runs
    assert i_ck["saved_bytes"] * 10 < i_full["saved_bytes"]
    assert i_ck["loss"] == pytest.approx(i_full["loss"], rel=1e-5)
    for s in s_ck:
        torch.testing.assert_close(s_ck[s], s_full[s])
    assert_restored(tiny_dit, snap)
    with pytest.raises(ValueError, match="e2e"):
        learn_masks(d, x, SIG, cond=cond, objective="global", generator=gen)


@pytest.mark.parametrize("order", [0, 1])
def test_composes_with_quantization_and_masks(tiny_dit, gen, order):
    _, _, _, run = setup(tiny_dit, gen)
    base = run()
    snap = snapshot(tiny_dit)
    hs = [apply_layer_pruning(tiny_dit, LayerPruneConfig(("transformer_blocks.2",))),
          apply_quantization(tiny_dit, QuantConfig(8, None)),
          apply_masks(tiny_dit, {"transformer_blocks.0.ff": (torch.arange(128) % 2).float()})]
    out = run()
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    for h in (hs if order == 0 else hs[::-1]):
        h.remove()
    assert_restored(tiny_dit, snap)
    assert torch.equal(run(), base)
