import pytest
import torch

from dmlab import metrics, schedules
from dmlab.denoisers import RecordingDenoiser
from dmlab.samplers import sample_euler, sample_heun
from dmlab.samplers.mcmc import sample_dmcmc, sigma_posterior_exact


def _run(gmm, seed=0, **kw):
    s = schedules.karras(10, 0.002, 20.0)
    grid = s[(s <= 2.0) & (s > 0.1)]
    g = torch.Generator().manual_seed(seed)
    x = grid[0] * torch.randn(kw.pop("chains", 50), 2, generator=g, dtype=torch.float64)
    return s, grid, sample_dmcmc(gmm, x, s, grid=grid, generator=g, return_info=True, **kw)


def test_samples_follow_the_mixture(smooth_gmm):
    """DLG + Heun from the chains' levels reproduces the exact mixture: mode frequencies and likelihood."""
    _, _, (out, info) = _run(smooth_gmm, chains=200, n_samples=4, burn_in=15, thin=3)
    ref = smooth_gmm.sample(800, torch.Generator().manual_seed(9))
    w, mu, cov = smooth_gmm.weights, smooth_gmm.means, smooth_gmm.covs
    st = metrics.gmm_mode_stats(out, w, mu, cov)
    assert st["kl_modes"] < 0.05 and st["high_quality"] > 0.95, st
    assert abs(metrics.gmm_nll(out, w, mu, cov) - metrics.gmm_nll(ref, w, mu, cov)) < 0.3
    # the chain does move between levels, and each sample is integrated from a level below sigma_max
    assert len(info["levels"].unique()) > 1 and info["nfe_integrate"] < 2 * 10 - 1


def test_output_is_the_integrator_run_from_each_state(smooth_gmm):
    s, grid, (out, info) = _run(smooth_gmm, n_samples=2, burn_in=3, thin=2, integrator=sample_euler)
    for lvl in info["levels"].unique():
        m = info["levels"] == lvl
        j = int((s == lvl).nonzero())
        torch.testing.assert_close(out[m], sample_euler(smooth_gmm, info["states"][m], s[j:]), rtol=0, atol=0)


def test_nfe_accounting_and_never_at_zero(smooth_gmm):
    rec = RecordingDenoiser(smooth_gmm)
    rec.log_prob = smooth_gmm.log_prob
    _, _, (out, info) = _run(rec, n_samples=3, burn_in=4, thin=2, chains=20)
    per_sample = sum(len(c) for c in rec.sigmas) / len(out)
    assert abs(per_sample - info["nfe_per_sample"]) < 1e-12
    assert all((c > 0).all() for c in rec.sigmas)


def test_exact_gibbs_posterior(smooth_gmm, gen):
    """Levels drawn from the prior, data noised at them: the exact posterior is calibrated and informative."""
    grid = torch.tensor([8.0, 1.0, 0.125], dtype=torch.float64)
    k = torch.randint(3, (3000,), generator=gen)
    x = smooth_gmm.sample(3000, gen) + grid[k, None] * torch.randn(3000, 2, generator=gen, dtype=torch.float64)
    p = sigma_posterior_exact(smooth_gmm, x, grid, torch.zeros(3)).exp()
    assert torch.allclose(p.sum(1), torch.ones(3000, dtype=torch.float64))
    assert ((p.mean(0) - 1 / 3).abs() < 0.03).all()  # E_x[p(k | x)] = prior(k)
    assert (p.argmax(1) == k).double().mean() > 0.6  # chance is 1/3


def test_same_seed_same_bits(smooth_gmm):
    a = _run(smooth_gmm, seed=3, burn_in=2)[2][0]
    b = _run(smooth_gmm, seed=3, burn_in=2)[2][0]
    c = _run(smooth_gmm, seed=4, burn_in=2)[2][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_input(smooth_gmm):
    s = schedules.karras(5, 0.01, 10.0)
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="entry of sigmas"):
        sample_dmcmc(smooth_gmm, x, s, grid=torch.tensor([0.77]))
    with pytest.raises(ValueError, match="log_prior"):
        sample_dmcmc(smooth_gmm, x, s, log_prior=torch.zeros(2))
    with pytest.raises(ValueError, match="n_samples"):
        sample_dmcmc(smooth_gmm, x, s, n_samples=0)
    with pytest.raises(ValueError, match="step"):
        sample_dmcmc(smooth_gmm, x, s, step=0.0)
    with pytest.raises(TypeError, match="log_prob"):
        sample_dmcmc(lambda x, sigma: x, x, s)
    with pytest.raises(TypeError, match="integrator"):
        sample_dmcmc(smooth_gmm, x, s, integrator="heun")
