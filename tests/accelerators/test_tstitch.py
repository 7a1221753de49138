import pytest
import torch

from dmlab import samplers, schedules
from dmlab.accelerators import TStitch, tstitch
from dmlab.accelerators.tstitch import switch_sigma
from dmlab.bench import count_flops
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, unet2d

SIG = schedules.karras(10, 0.01, 80.0)


@pytest.fixture(scope="module")
def pair():
    return DiscreteVPDenoiser(unet2d((8, 16, 16), seed=1), AC), DiscreteVPDenoiser(unet2d((16, 32, 32), seed=2), AC)


def run(d, sampler=samplers.sample_euler):
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * SIG[0]
    return sampler(d, x, SIG, cond={"class_labels": torch.tensor([1, 5, 9])})


def test_fraction_zero_and_one_are_the_single_models(pair):
    small, large = pair
    assert torch.equal(run(tstitch(small, large, SIG, 0.0)), run(large))
    assert torch.equal(run(tstitch(small, large, SIG, 1.0)), run(small))


@pytest.mark.parametrize("fraction,n_small", [(0.3, 3), (0.4, 4), (0.5, 5), (0.25, 3)])
def test_steps_on_each_model(pair, fraction, n_small):
    small, large = pair
    ts = tstitch(small, large, SIG, fraction)
    out = run(ts)
    assert ts.n_small_steps == n_small and ts.stats == {"calls_small": n_small, "calls_large": 10 - n_small}
    rev = tstitch(small, large, SIG, fraction, first="large")
    out_rev = run(rev)
    assert rev.stats == ts.stats and not torch.equal(out, out_rev)  # same cost, other order
    heun = tstitch(small, large, SIG, fraction)
    run(heun, samplers.sample_heun)  # the corrector of the last small step runs below the switch: large
    assert heun.stats == {"calls_small": 2 * n_small - 1, "calls_large": 19 - (2 * n_small - 1)}


def test_flops_follow_the_split(pair):
    small, large = pair
    fs, fl = count_flops(lambda: run(small)), count_flops(lambda: run(large))
    assert 10 * count_flops(lambda: run(tstitch(small, large, SIG, 0.4))) == 4 * fs + 6 * fl


def test_bad_arguments(pair):
    small, large = pair
    with pytest.raises(ValueError, match="fraction"):
        tstitch(small, large, SIG, 1.5)
    with pytest.raises(ValueError, match="first"):
        TStitch(small, large, SIG, 0.5, first="middle")
    with pytest.raises(TypeError, match="denoisers"):
        tstitch(small, None, SIG, 0.5)
    with pytest.raises(ValueError):
        tstitch(small, large, torch.tensor([1.0, 2.0, 0.0]), 0.5)
    with pytest.raises(ValueError, match="n_first"):
        switch_sigma(SIG, 11)
