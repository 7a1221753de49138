import math

import pytest
import torch

from dmlab import schedules
from dmlab.accelerators import DeepCacheConfig, Testbed, apply_deepcache, tstitch
from dmlab.accelerators.tstitch import denoising_error
from dmlab.bench import count_flops
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, unet2d


@pytest.fixture(scope="module")
def proto():
    small, large = unet2d((8, 16, 16), seed=1), unet2d((16, 32, 32), seed=2)
    ds, dl = DiscreteVPDenoiser(small, AC), DiscreteVPDenoiser(large, AC)
    p = Testbed(dl, large, torch.tensor([1, 4, 7]), generator=torch.Generator().manual_seed(0), n_steps=6,
                 others=((ds, small),))
    return p, ds, dl


def test_protocol_rows_and_exact_flop_ratios(proto):
    p, ds, dl = proto
    base = p.measure("baseline")
    assert base["flop_speedup"] == 1.0 and math.isinf(base["psnr"]) and base["steps"] == 6
    fewer = p.fewer_steps(2.0)
    assert fewer["steps"] == 3 and fewer["flop_speedup"] == 2.0 and fewer["psnr"] < 100
    ts = tstitch(ds, dl, p.sigmas, 0.5)
    row = p.measure("tstitch", denoiser=ts)
    assert row["flop_speedup"] == pytest.approx(count_flops(p.sample) / count_flops(lambda: p.sample(ts)), rel=1e-12)
    dc = p.measure("deepcache", apply=lambda m: apply_deepcache(m, DeepCacheConfig(3)), extra_col="x")
    with apply_deepcache(p.model, DeepCacheConfig(3)):
        f_dc = count_flops(p.sample)
    assert dc["flop_speedup"] == pytest.approx(count_flops(p.sample) / f_dc, rel=1e-12) and dc["extra_col"] == "x"
    assert [r["configuration"] for r in p.table.rows] == ["baseline", "same sampler, 3 steps (matched FLOPs)",
                                                          "tstitch", "deepcache"]
    assert "deepcache" in p.table.text()


def test_denoising_error_of_the_identity_is_sigma_squared():
    x0 = torch.zeros(4000, 1)
    sig = torch.tensor([0.5, 2.0])
    err = denoising_error(lambda x, s: x, x0, sig, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(err, sig.double() ** 2, rtol=0.08)
    with pytest.raises(TypeError, match="generator"):
        denoising_error(lambda x, s: x, x0, sig, generator=None)


def test_protocol_measures_early_exit():
    """Early exit bypasses the root forward (it runs the blocks itself); the FLOP accountant still charges every
    block on the samples that reached it."""
    from dmlab.accelerators import EarlyExitConfig, apply_early_exit, exit_heads_for

    from acc_models import dit

    net = dit()
    den = DiscreteVPDenoiser(net, AC)
    p = Testbed(den, net, torch.tensor([1, 4]), generator=torch.Generator().manual_seed(0), n_steps=3)
    heads = exit_heads_for(net)
    for u in heads.uems:  # every sample leaves after block 2 of 4
        torch.nn.init.zeros_(u.linear.weight)
        torch.nn.init.constant_(u.linear.bias, -5.0)
    row = p.measure("exit", apply=lambda m: apply_early_exit(m, EarlyExitConfig(heads, 0.1, min_depth=2)))
    assert 1.0 < row["flop_speedup"] < 2.5 and row["psnr"] < 100
