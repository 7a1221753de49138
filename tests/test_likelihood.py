import pytest
import torch

from dmlab.exact import GaussianDenoiser, GMMDenoiser
from dmlab.likelihood import divergence, log_likelihood


def test_pf_ode_likelihood_matches_exact_log_prob(smooth_gmm, gen):
    x = smooth_gmm.sample(16, gen)
    exact = smooth_gmm.log_prob(x, 1e-3)
    est = log_likelihood(smooth_gmm, x, sigma_min=1e-3, sigma_max=80.0, rtol=1e-9, atol=1e-9,
                         log_prior=smooth_gmm.log_prob)
    assert (est - exact).abs().max() < 1e-5
    # with the Gaussian prior at the top, the error is the prior mismatch, shrinking as sigma_max grows
    errs = [(log_likelihood(smooth_gmm, x, sigma_max=s, rtol=1e-9, atol=1e-9) - exact).abs().mean() for s in (20.0, 80.0)]
    assert errs[1] < errs[0] / 2


def test_hutchinson_is_unbiased_for_the_divergence(gen):
    g = GaussianDenoiser(torch.zeros(3), torch.diag(torch.tensor([0.2, 0.5, 1.0])))
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    _, exact = divergence(g, x, 0.7)
    # for this linear field the divergence is known in closed form: tr(I - C(C+s^2)^-1) / s
    c, s = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64), 0.7
    torch.testing.assert_close(exact, torch.full((4,), ((1 - c / (c + s ** 2)).sum() / s).item(), dtype=torch.float64))
    probes = torch.randint(0, 2, (4000, 4, 3), generator=gen).double() * 2 - 1
    _, est = divergence(g, x, 0.7, probes=probes)
    torch.testing.assert_close(est, exact, atol=1e-10, rtol=0)  # Rademacher is exact for diagonal Jacobians


def test_bad_arguments(smooth_gmm, gen):
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(smooth_gmm, x, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(TypeError, match="Generator"):
        log_likelihood(smooth_gmm, x, hutchinson=2)
    with pytest.raises(ValueError, match="hutchinson"):
        log_likelihood(smooth_gmm, x, hutchinson=-1)
