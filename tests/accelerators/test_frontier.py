import math

import pytest
import torch

from dmlab.accelerators.early_exit import exit_heads_for
from dmlab.accelerators.frontier import (Family, Frontier, Stack, composed, explorer, fd_spread, pareto_front,
                                         run_with_flops, select)
from dmlab.accelerators.handle import active_methods
from dmlab.accelerators.linear_attention import linear_attention_for
from dmlab.bench import count_flops
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, assert_restored, dit, snapshot, unet2d

LABELS = torch.tensor([0, 3, 7])


@pytest.fixture(scope="module")
def unet_family():
    big, small = unet2d((16, 32, 32), seed=1), unet2d((8, 16, 16), seed=2)
    return Family("unet", (DiscreteVPDenoiser(big, AC), big), (DiscreteVPDenoiser(small, AC), small))


@pytest.fixture(scope="module")
def dit_family():
    big, small = dit(seed=1, layers=4), dit(seed=2, layers=2)
    heads = exit_heads_for(big)
    with torch.no_grad():
        for u in heads.uems:  # everyone leaves after block 2 at thresholds > 0.5
            u.linear.weight.zero_()
            u.linear.bias.fill_(0.0)
    return Family("dit", (DiscreteVPDenoiser(big, AC), big), (DiscreteVPDenoiser(small, AC), small),
                  exit_heads=heads, linear_modules=linear_attention_for(big))


def test_stack_validation_and_labels():
    assert Stack().label == "ddim 50" and Stack().methods == ()
    s = Stack("dpmpp_2m", 8, cache=3, stitch=0.4, wbits=8)
    assert s.label == "dpmpp_2m 8 + cache 3 + stitch 0.4 + W8" and s.methods == ("cache", "stitch", "quant")
    assert s.but(cache=1).methods == ("stitch", "quant")
    for bad in [dict(sampler="plms"), dict(steps=0), dict(cache=0), dict(stitch=1.5), dict(exit=-0.1),
                dict(wbits=1), dict(wbits=32), dict(sampler="dpmpp_2m", steps=1)]:
        with pytest.raises(ValueError):
            Stack(**bad)
    with pytest.raises(TypeError, match="linear"):
        Stack(linear=1)


def test_family_checks(unet_family):
    with pytest.raises(ValueError, match="DiT"):
        unet_family.check(Stack(exit=0.2))
    with pytest.raises(ValueError, match="small model"):
        Family("unet", unet_family.large).check(Stack(stitch=0.5))
    with pytest.raises(ValueError, match="kind"):
        Family("vit", unet_family.large)


def test_run_with_flops_matches_count_flops(unet_family):
    net = unet_family.large[1]
    x = torch.randn(2, 1, 8, 8)
    out, f = run_with_flops(lambda: net(x, timestep=torch.tensor([5, 9]), class_labels=torch.tensor([1, 2])).sample)
    assert out.shape == x.shape
    assert f == count_flops(lambda: net(x, timestep=torch.tensor([5, 9]), class_labels=torch.tensor([1, 2])))


def test_all_dit_methods_compose_and_come_off(dit_family):
    net = dit_family.large[1]
    snap = snapshot(net)
    stack = Stack("dpmpp_2m", 6, cache=2, stitch=0.34, exit=0.6, linear=True, wbits=8)
    sig = dit_family.sigmas(6)
    with composed(stack, dit_family, sig) as (d, handles):
        assert set(handles) == {"cache", "stitch", "exit", "linear", "quant"}
        assert active_methods(net) >= {"early_exit", "linear_attention"}
        from dmlab import samplers

        x = samplers.sample_dpmpp_2m(d, torch.randn(2, 1, 8, 8) * sig[0], sig, cond={"class_labels": LABELS[:2]})
    assert torch.isfinite(x).all()
    assert handles["stitch"].stats["calls_small"] == 2 and handles["stitch"].stats["calls_large"] == 4
    assert handles["exit"].stats["depth_counts"] == [8, 0, 0, 0]  # u = 0.5 < 0.6 at the first exit
    assert handles["linear"].stats["linear_calls"] > 0
    assert not active_methods(net)
    assert_restored(net, snap)


def test_frontier_rows_speedups_and_matched_steps(unet_family):
    fr = Frontier(unet_family, LABELS, generator=torch.Generator().manual_seed(0), reference=Stack("ddim", 6))
    assert fr.ref["flop_speedup"] == 1.0 and math.isinf(fr.ref["psnr"]) and fr.ref["group"] == "reference"
    r2 = fr.measure(Stack("ddim", 3))
    assert r2["flop_speedup"] == pytest.approx(2.0, rel=1e-9) and r2["group"] == "steps only"
    r3 = fr.measure(Stack("ddim", 6, cache=2))
    assert 1.2 < r3["flop_speedup"] < 2.0 and math.isfinite(r3["psnr"])  # DeepCache saves FLOPs
    m = fr.matched_steps(r3)
    assert m["steps"] == round(6 / r3["flop_speedup"]) and m["group"].startswith("same sampler")
    r4 = fr.measure(Stack("ddim", 6, stitch=0.5))
    assert r4["flop_speedup"] > 1.2  # half the steps on the small model
    assert "fd" not in r4  # no classifier given
    assert "configuration" in fr.table(("flop_speedup", "psnr"))


def test_pareto_front():
    rows = [{"configuration": c, "s": s, "q": q} for c, s, q in
            [("a", 1, 1.0), ("b", 2, 1.5), ("c", 2, 2.0), ("d", 4, 1.4), ("e", 8, 3.0), ("f", 3, math.nan)]]
    assert [r["configuration"] for r in pareto_front(rows, "s", "q")] == ["a", "d", "e"]
    psnr = [{"configuration": c, "s": s, "p": p} for c, s, p in
            [("ref", 1, math.inf), ("a", 2, 30.0), ("b", 2, 25.0), ("c", 4, 28.0), ("d", 8, 20.0), ("e", 6, 19.0)]]
    assert [r["configuration"] for r in pareto_front(psnr, "s", "p", larger_y_better=True)] == ["a", "c", "d"]


def test_select_and_explorer(unet_family):
    pytest.importorskip("ipywidgets")
    fr = Frontier(unet_family, LABELS, generator=torch.Generator().manual_seed(0), reference=Stack("ddim", 4))
    fr.measure(Stack("ddim", 2))
    fr.measure(Stack("ddim", 4, cache=2))
    assert select(fr.rows, steps=2, cache=1)["configuration"] == "ddim 2"
    assert select(fr.rows, steps=2, cache=2) is None
    w = explorer(fr, y="psnr")
    menus = w.children[0].children[:-1]
    assert [m.description for m in menus] == ["steps", "cache"]
    menus[0].value = 2  # the callback runs (and finds the row); an unmeasured combination is reported, not raised
    menus[1].value = 2
    assert "not measured" in w.children[0].children[-1].value
    with pytest.raises(ValueError, match="unknown knobs"):
        explorer(fr, knobs=("colour",))
    w2 = explorer({"a": fr, "b": fr})  # several families: a family menu comes first
    assert w2.children[0].children[0].description == "family"
    fig = fr.figure("flop_speedup", "psnr", target=(2, None), highlight=fr.rows[1])
    assert len(fig.axes) == 1


def test_fd_spread_is_paired(unet_family):
    from dmlab import zoo

    clf = zoo.load("classifier")
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = torch.Generator().manual_seed(1)
    alone = fd_spread(x, classifier=clf, generator=g, reps=8)
    paired = fd_spread(x + 0.01, x, classifier=clf, generator=g, reps=8)
    assert alone > 0 and 0 <= paired < alone  # a tiny change has a tiny, well-determined FD difference
    with pytest.raises(ValueError, match="shape"):
        fd_spread(x, x[:10], classifier=clf, generator=g)
