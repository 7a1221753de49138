import json

import pytest
import torch

from dmlab import samplers, schedules
from dmlab.hooks import count_calls
from dmlab.accelerators.early_exit import (EarlyExitConfig, ExitHeads, apply_early_exit, block_outputs,
                                           exit_heads_for, load_exit_heads, save_exit_heads, train_exit_heads)
from dmlab.bench import count_flops
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, assert_restored, dit, snapshot, unet2d

SIG = schedules.karras(5, 0.01, 80.0)
SIG_TRAIN = schedules.sigmas_from_alphas_cumprod(AC)


@pytest.fixture(scope="module")
def model():
    return dit(seed=3, layers=4)


@pytest.fixture(scope="module")
def heads(model):
    torch.manual_seed(1)
    h = exit_heads_for(model)
    with torch.no_grad():  # untrained heads whose adapters are not zero, so an exit visibly changes the output
        for hd in h.heads:
            hd.adapter.weight.normal_(0, 0.05)
    return h


def set_uem_bias(heads, value):
    with torch.no_grad():
        for u in heads.uems:
            u.linear.weight.zero_()
            u.linear.bias.fill_(value)


def run(model, n=3, sampler=samplers.sample_euler):
    d = DiscreteVPDenoiser(model, AC)
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * SIG[0]
    return sampler(d, x, SIG, cond={"class_labels": torch.arange(n) % 10})


def test_threshold_zero_is_bit_identical_and_counts(model, heads):
    base = run(model)
    with apply_early_exit(model, EarlyExitConfig(heads, threshold=0.0)) as h:
        assert torch.equal(run(model), base)
    s = h.stats
    assert s["calls"] == 5 and s["samples"] == 15 and s["exits"] == 0 and s["exit_rate"] == 0
    assert s["depth_counts"] == [0, 0, 0, 15] and s["mean_depth"] == 4 and len(s["per_call"]) == 5


def test_exit_forward_that_never_exits_is_bit_identical(model, heads):
    """The re-implemented forward (UEMs evaluated, nobody leaves) gives the model's own bits."""
    base = run(model)
    set_uem_bias(heads, 5.0)  # u = sigmoid(5) = 0.993 > threshold
    with apply_early_exit(model, EarlyExitConfig(heads, threshold=0.5)) as h:
        assert torch.equal(run(model), base)
    assert h.stats["exits"] == 0 and h.stats["blocks_run"] == 15 * 4


@pytest.mark.parametrize("min_depth", [1, 2, 3])
def test_always_exit_uses_the_head_at_min_depth(model, heads, min_depth):
    set_uem_bias(heads, -5.0)  # u = 0.0067 < threshold: everyone leaves at the first allowed exit
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([900.0, 500.0, 20.0]), torch.tensor([1, 4, 10])
    with torch.no_grad():
        hs, c, _ = block_outputs(model, x, t, class_labels=y)
        tok = heads.output(min_depth, hs[min_depth - 1], c)
        want = torch.einsum("nhwpqc->nchpwq", tok.reshape(-1, 4, 4, 2, 2, 2)).reshape(-1, 2, 8, 8)
        with apply_early_exit(model, EarlyExitConfig(heads, threshold=0.1, min_depth=min_depth)) as h:
            got = model(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert h.stats["exit_rate"] == 1.0 and h.stats["depth_counts"][min_depth - 1] == 3
    assert h.stats["mean_depth"] == min_depth


def test_per_sample_exit_matches_running_samples_alone(model, heads):
    """Each sample's exit depends on itself only: a batch with mixed exits equals the samples run one by one."""
    torch.manual_seed(5)
    with torch.no_grad():
        for u in heads.uems:
            u.linear.weight.normal_(0, 1.0)
            u.linear.bias.zero_()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t, y = torch.linspace(50, 950, 6), torch.arange(6)
    with torch.no_grad():
        hs, c, _ = block_outputs(model, x, t, class_labels=y)
        u1 = heads.uncertainty(1, hs[0], c)
    thr = float(u1.median())
    cfg = EarlyExitConfig(heads, threshold=thr)
    with torch.no_grad(), apply_early_exit(model, cfg) as h:
        batch = model(x, timestep=t, class_labels=y).sample
        counts = list(h.stats["depth_counts"])
        alone = torch.cat([model(x[i:i + 1], timestep=t[i:i + 1], class_labels=y[i:i + 1]).sample for i in range(6)])
    assert counts[0] >= 1 and sum(counts[1:]) >= 1  # some leave after block 1, some go on
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)


def test_batch_mode_leaves_together(model, heads):
    set_uem_bias(heads, -5.0)
    with torch.no_grad(), apply_early_exit(model, EarlyExitConfig(heads, 0.1, per_sample=False)) as h:
        model(torch.randn(4, 1, 8, 8), timestep=torch.full((4,), 300.0), class_labels=torch.arange(4))
    assert h.stats["depth_counts"] == [4, 0, 0, 0]


def test_exits_save_flops_and_removal_restores(model, heads):
    snap = snapshot(model)
    base = run(model, n=2)
    f_base = count_flops(lambda: run(model, n=2))
    set_uem_bias(heads, -5.0)
    with apply_early_exit(model, EarlyExitConfig(heads, 0.1, min_depth=2)):
        f_exit = count_flops(lambda: run(model, n=2))
        assert not torch.equal(run(model, n=2), base)
    # 2 of 4 blocks run plus a head instead of the final layer: clearly fewer FLOPs, clearly more than a quarter
    assert 0.3 < f_exit / f_base < 0.75
    assert torch.equal(run(model, n=2), base)
    assert_restored(model, snap)


def test_removal_after_an_exception(model, heads):
    base = run(model, n=1)
    with pytest.raises(KeyError):
        with apply_early_exit(model, EarlyExitConfig(heads, 0.3)):
            raise KeyError("boom")
    assert torch.equal(run(model, n=1), base)


def test_applying_twice_raises(model, heads):
    with apply_early_exit(model, EarlyExitConfig(heads, 0.1)):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_early_exit(model, EarlyExitConfig(heads, 0.2))


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_composes_with_another_handle(model, heads, order):
    snap = snapshot(model)
    set_uem_bias(heads, -5.0)
    h1 = count_calls(model)
    h2 = apply_early_exit(model, EarlyExitConfig(heads, 0.1, min_depth=3))
    run(model, n=2)
    assert h1.stats["calls"] == 5 and h2.stats["calls"] == 5 and h2.stats["depth_counts"][2] == 10
    for h in ([h2, h1] if order == "lifo" else [h1, h2]):
        h.remove()
    assert_restored(model, snap)


def test_bad_configs_raise_clear_errors(model, heads):
    for thr in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="threshold"):
            EarlyExitConfig(heads, threshold=thr)
    for md in (0, 4, 2.0):
        with pytest.raises(ValueError, match="min_depth"):
            EarlyExitConfig(heads, 0.1, min_depth=md)
    with pytest.raises(TypeError, match="ExitHeads"):
        EarlyExitConfig(object(), 0.1)
    with pytest.raises(TypeError, match="deepcache"):
        apply_early_exit(unet2d(), EarlyExitConfig(heads, 0.1))
    with pytest.raises(ValueError, match="exit_heads_for"):
        apply_early_exit(dit(layers=3), EarlyExitConfig(heads, 0.1))
    with pytest.raises(TypeError, match="EarlyExitConfig"):
        apply_early_exit(model, {"threshold": 0.1})
    with pytest.raises(ValueError, match=">= 2"):
        ExitHeads(1, 8, 8)


def test_training_reduces_the_exit_error():
    m = dit(seed=4, layers=3)
    x0 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    y0 = torch.arange(64) % 10
    xt, t, y = x0[:16] * 0.7, torch.linspace(100, 900, 16), y0[:16]

    def err(h):
        with torch.no_grad():
            hs, c, target = block_outputs(m, xt, t, class_labels=y)
            return float((h.output(1, hs[0], c) - target).pow(2).mean())

    heads = exit_heads_for(m)
    before = err(heads)
    heads, log = train_exit_heads(m, x0, y0, SIG_TRAIN, heads=heads, generator=torch.Generator().manual_seed(0),
                                  steps=40, batch_size=16, lr=3e-3)
    assert err(heads) < 0.8 * before
    assert log["loss"][-1][1] < log["loss"][0][1] and log["steps"] == 40
    assert all(p.requires_grad for p in m.parameters())


def test_save_and_load_round_trip(tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "dit_x"
    base.mkdir()
    save_file({"w": torch.zeros(2)}, str(base / "model.safetensors"))
    from dmlab.zoo.store import file_table

    (tmp_path / "registry.json").write_text(json.dumps({"dit_x": {"kind": "dit", "config_hash": "h",
                                                                  "files": file_table(base)}}))
    m = dit(seed=0, layers=3)
    heads = exit_heads_for(m)
    with torch.no_grad():
        heads.uems[0].linear.bias.fill_(0.25)
    entry = save_exit_heads(heads, "dit_x_exit", base="dit_x", recipe={"steps": 1}, log={"steps": 1}, root=tmp_path)
    assert entry["kind"] == "exit_heads" and entry["params"] == sum(p.numel() for p in heads.parameters())
    back = load_exit_heads("dit_x_exit", root=tmp_path)
    assert back.info["base"] == "dit_x"  # adapters are zoo entries: one registry
    assert json.loads((tmp_path / "registry.json").read_text())["dit_x_exit"]["kind"] == "exit_heads"
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), back.state_dict().values()))
    save_file({"w": torch.ones(2)}, str(base / "model.safetensors"))  # the base is retrained ...
    (tmp_path / "registry.json").write_text(json.dumps({**json.loads((tmp_path / "registry.json").read_text()),
                                                        "dit_x": {"kind": "dit", "config_hash": "h",
                                                                  "files": file_table(base)}}))
    with pytest.raises(ValueError, match="retrain"):  # ... so the heads no longer fit it
        load_exit_heads("dit_x_exit", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        load_exit_heads("nope", root=tmp_path)


def test_per_sample_exit_refuses_diffusers_caches_batch_exit_composes(model, heads):
    from dmlab.accelerators import apply_taylorseer

    set_uem_bias(heads, -5.0)
    with apply_taylorseer(model, interval=2):
        with apply_early_exit(model, EarlyExitConfig(heads, 0.1, min_depth=2)):
            with pytest.raises(RuntimeError, match="per_sample=False"):
                run(model, n=2)
        with apply_early_exit(model, EarlyExitConfig(heads, 0.1, min_depth=2, per_sample=False)) as h:
            out = run(model, n=2)
    assert torch.isfinite(out).all() and h.stats["depth_counts"] == [0, 10, 0, 0]
