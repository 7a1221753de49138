"""DPM-Solver-v3 (paper 24): reduction to DPM-Solver++ with trivial statistics, statistics estimation and its cache,
and the gain the statistics buy on exact targets."""
import pytest
import torch

from dmlab import samplers, schedules
from dmlab.denoisers import RecordingDenoiser
from dmlab.exact import GaussianDenoiser, reference_ode
from dmlab.samplers.v3 import Statistics, estimate_statistics, sample_dpm_solver_v3


@pytest.mark.parametrize("n", [5, 12])
def test_trivial_statistics_reduce_to_dpm_solver_pp(smooth_gmm, n):
    x = 20 * torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = schedules.karras(n, 0.002, 20.0)
    triv = Statistics.trivial()
    for order in (1, 2, 3):
        ours = sample_dpm_solver_v3(smooth_gmm, x, s, statistics=triv, order=order, corrector=False,
                                    lower_order_final=False)
        ref = samplers.sample_dpm_solver_multistep(smooth_gmm, x, s, order=order, solver_type="heun",
                                                   lower_order_final=False)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)  # order 3: DPM-Solver++(3M), Taylor weight


def test_statistics_are_estimated_cached_and_pay_off(tmp_path):
    g = GaussianDenoiser(torch.tensor([1.0, -0.5]), torch.tensor([0.3, 0.1]))
    data = g.sample(2000, torch.Generator().manual_seed(1))
    rec = RecordingDenoiser(g)
    path = tmp_path / "ems.pt"
    kw = dict(lam_min=-3.0, lam_max=6.2, n_lam=32, n_samples=256, generator=torch.Generator().manual_seed(2), path=path)
    stats = estimate_statistics(rec, data, **kw)
    assert path.exists() and rec.nfe > 0
    # the exact l of a Gaussian with diagonal covariance c is sigma^2 / (c + sigma^2), per dimension
    sig2 = (-2 * stats.lam).exp()[:, None]
    torch.testing.assert_close(stats.l, sig2 / (torch.tensor([0.3, 0.1]) + sig2), rtol=0.05, atol=0.02)
    calls = rec.nfe
    again = estimate_statistics(rec, data, **{**kw, "generator": torch.Generator().manual_seed(2)})
    assert rec.nfe == calls  # loaded from the cache
    torch.testing.assert_close(again.l, stats.l)
    other = estimate_statistics(rec, data, **{**kw, "n_lam": 33, "generator": torch.Generator().manual_seed(2)})
    assert rec.nfe > calls and len(other.lam) == 33  # different settings: recomputed
    # the statistics buy accuracy at few steps
    x = 20 * torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = schedules.karras(6, 0.002, 20.0)
    ref = reference_ode(g, x, s)
    err = lambda out: (out - ref).norm(dim=1).mean().item()  # noqa: E731
    e_v3 = err(sample_dpm_solver_v3(g, x, s, statistics=stats, order=2))
    e_pp = err(samplers.sample_dpmpp_2m(g, x, s))
    assert e_v3 < e_pp / 5, (e_v3, e_pp)


def test_v3_calls_and_bad_input(smooth_gmm):
    s = schedules.karras(7, 0.01, 10.0)
    rec = RecordingDenoiser(smooth_gmm)
    x = 10 * torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sample_dpm_solver_v3(rec, x, s, statistics=Statistics.trivial(), order=3)
    assert rec.nfe == 7 and torch.isfinite(out).all()
    torch.testing.assert_close(torch.stack([c[0] for c in rec.sigmas]), s[:-1], rtol=0, atol=0)
    with pytest.raises(TypeError, match="statistics must be"):
        sample_dpm_solver_v3(smooth_gmm, x, s, statistics=None)
    with pytest.raises(ValueError, match="at least 3 steps"):
        sample_dpm_solver_v3(smooth_gmm, x, schedules.karras(2), statistics=Statistics.trivial(), order=3)
    with pytest.raises(ValueError, match="do not fit"):
        sample_dpm_solver_v3(smooth_gmm, x, s, statistics=Statistics.trivial(shape=(3,)))
    with pytest.raises(ValueError, match="strictly increasing"):
        Statistics(torch.tensor([1.0, 0.0]), torch.ones(2), torch.zeros(2), torch.zeros(2))
