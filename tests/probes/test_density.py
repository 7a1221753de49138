"""The Itô density estimator and SuperDiff superposition (paper 31) against exact Gaussian mixtures."""
import pytest
import torch

from dmlab import schedules
from dmlab.exact import EmpiricalDenoiser, GaussianDenoiser, GMMDenoiser
from dmlab.probes import energy_distance, gaussian_log_prior, ito_log_density, sample_reverse_sde, superpose
from dmlab.viz import fit_order

SMAX = 20.0


def _errors(g, steps, n=400, follow=0, seed=0):
    errs = []
    for N in steps:
        gen = torch.Generator().manual_seed(seed)
        sig = schedules.karras(N, 0.01, SMAX).double()[:-1]  # stop at sigma = 0.01
        x = SMAX * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        r = ito_log_density(g.score, x, sig, log_q0=g.log_prob(x, SMAX), generator=gen, follow=follow)
        errs.append(float((r.log_q[0] - g.log_prob(r.x, sig[-1])).abs().mean()))
    return errs


def test_ito_estimate_converges_to_the_exact_log_density(smooth_gmm):
    steps = [25, 100, 400]
    errs = _errors(smooth_gmm, steps)
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.5
    assert 0.3 < fit_order(steps, errs) < 0.8  # strong order 1/2 of Euler-Maruyama


def test_ito_estimate_holds_along_any_path(smooth_gmm):
    other = GaussianDenoiser(torch.tensor([1.0, 1.0]), 2.0)  # the path follows another model's score
    errs = _errors(smooth_gmm, [25, 400], follow=other.score)
    assert errs[1] < 0.5 * errs[0] and errs[1] < 0.5


def test_reverse_sde_samples_a_gaussian(gen):
    g = GaussianDenoiser(torch.tensor([1.0, -1.0]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]))
    x = sample_reverse_sde(g, SMAX * torch.randn(4000, 2, generator=gen, dtype=torch.float64),
                           schedules.karras(200, 0.002, SMAX).double(), generator=gen)
    torch.testing.assert_close(x.mean(0), g.means[0], atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), g.covs[0], atol=0.05, rtol=0)


def _pair():
    g1 = GMMDenoiser.isotropic(torch.ones(2), torch.tensor([[-2.0, 2.0], [2.0, 2.0]]), 0.1)
    g2 = GMMDenoiser.isotropic(torch.ones(2), torch.tensor([[-2.0, -2.0], [2.0, -2.0]]), 0.1)
    return g1, g2


def test_superdiff_or_samples_the_mixture():
    g1, g2 = _pair()
    mix = GMMDenoiser.isotropic(torch.ones(4), torch.cat([g1.means, g2.means]), 0.1)
    gen = torch.Generator().manual_seed(0)
    sig = schedules.karras(100, 0.01, SMAX).double()[:-1]
    x = SMAX * torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    lq0 = torch.stack([g1.log_prob(x, SMAX), g2.log_prob(x, SMAX)])
    r = superpose([g1.score, g2.score], x, sig, mode="or", log_q0=lq0, generator=gen)
    ref = mix.sample(1000, gen)
    assert abs(float((r.x[:, 1] > 0).double().mean()) - 0.5) < 0.06
    avg = ito_log_density([g1.score, g2.score], x, sig, log_q0=lq0, generator=gen,
                          follow=lambda y, s: 0.5 * (g1.score(y, s) + g2.score(y, s)))
    ed_or, ed_avg = energy_distance(r.x, ref), energy_distance(avg.x, ref)
    assert ed_or < 0.02 and ed_avg > 10 * max(ed_or, 0.002)  # averaging scores is not OR
    k = torch.stack(r.kappa)
    assert k.shape == (99, 2, 1000) and torch.allclose(k.sum(1), torch.ones(1, dtype=torch.float64))


def test_superdiff_and_reaches_equal_densities():
    h1 = GaussianDenoiser(torch.tensor([-1.0, 0.0]), 1.0)
    h2 = GaussianDenoiser(torch.tensor([1.0, 0.0]), 1.0)
    gen = torch.Generator().manual_seed(1)
    sig = schedules.karras(100, 0.01, SMAX).double()[:-1]
    x = SMAX * torch.randn(500, 2, generator=gen, dtype=torch.float64)
    lq0 = torch.stack([h1.log_prob(x, SMAX), h2.log_prob(x, SMAX)])
    r = superpose([h1.score, h2.score], x, sig, mode="and", log_q0=lq0, generator=gen)
    assert (r.log_q[0] - r.log_q[1]).abs().max() < 1e-8  # the tracked densities are kept equal
    gap = lambda y: float((h1.log_prob(y, sig[-1]) - h2.log_prob(y, sig[-1])).abs().mean())  # noqa: E731
    avg = ito_log_density([h1.score, h2.score], x, sig, log_q0=lq0, generator=gen,
                          follow=lambda y, s: 0.5 * (h1.score(y, s) + h2.score(y, s)))
    assert gap(r.x) < 0.1 and gap(avg.x) > 5 * gap(r.x)


def test_empirical_class_models_and_prior(gen):
    data = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    labels = torch.arange(40) % 2
    emp = EmpiricalDenoiser(data, labels)
    s = [lambda y, sg, c=c: emp.score(y, sg, class_labels=torch.full((len(y),), c)) for c in (0, 1)]
    x = SMAX * torch.randn(8, 3, generator=gen, dtype=torch.float64)
    lq0 = gaussian_log_prior(x, SMAX, data_var=1.0)
    r = superpose(s, x, schedules.karras(30, 0.05, SMAX).double()[:-1], mode="or", log_q0=lq0, generator=gen)
    assert r.x.shape == (8, 3) and torch.isfinite(r.log_q).all()


def test_errors(smooth_gmm):
    x = torch.zeros(4, 2, dtype=torch.float64)
    sig = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="decreasing"):
        ito_log_density(smooth_gmm.score, x, sig.flip(0), log_q0=torch.zeros(4))
    with pytest.raises(ValueError, match="log_q0"):
        ito_log_density(smooth_gmm.score, x, sig, log_q0=torch.zeros(5))
    with pytest.raises(ValueError, match="mode"):
        superpose([smooth_gmm.score] * 2, x, sig, mode="xor", log_q0=torch.zeros(4))
    with pytest.raises(ValueError, match="two models"):
        superpose([smooth_gmm.score] * 3, x, sig, mode="and", log_q0=torch.zeros(4))
    with pytest.raises(ValueError, match="follow"):
        ito_log_density(smooth_gmm.score, x, sig, log_q0=torch.zeros(4), follow=3)
    with pytest.raises(TypeError, match="Generator"):
        sample_reverse_sde(smooth_gmm, x, sig, generator=1)
