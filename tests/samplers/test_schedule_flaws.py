import math

import pytest
import torch

from dmlab import schedules
from dmlab.exact import GaussianDenoiser, GMMDenoiser
from dmlab.samplers import sample_heun
from dmlab.samplers.boundary import GMMPosteriorDenoiser, search_boundary
from dmlab.schedule_flaws import (one_more_step, prior_mean, rescale_zero_terminal_snr, start_sigma, terminal_sigma)

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as theirs

    betas = schedules.betas_for(**SD)
    ours = rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours, theirs(betas.double()), rtol=1e-12, atol=1e-12)
    abar = torch.cumprod(1 - ours, 0)
    assert abar[-1] == 0 and terminal_sigma(ours) == math.inf
    assert abs(abar[0] - (1 - betas[0].double())) < 1e-12  # the first step is kept
    assert 14 < terminal_sigma(betas) < 15  # Stable Diffusion's sigma_T (alpha_bar_T = 0.0047)


def test_start_sigma_by_spacing():
    betas = schedules.betas_for(**SD)
    assert start_sigma(betas, 50, "trailing") == terminal_sigma(betas)
    assert start_sigma(betas, 50, "leading", 1) < terminal_sigma(betas)  # "sample steps are flawed" (Lin et al.)


def test_one_more_step_restores_the_conditional_mean(gen):
    """1-D brightness of a d = 4096 image: with a wide within-prompt spread, pure noise at sigma_T loses the
    prompt's brightness; OMS (x0_hat = E[x0 | c]) restores it, measured by the exact output mean."""
    d, sT = 4096, terminal_sigma(schedules.betas_for(**SD))
    dark = GaussianDenoiser(torch.tensor([-0.5 * math.sqrt(d)], dtype=torch.float64),
                            torch.tensor([[0.09 * d + 0.05]], dtype=torch.float64))
    z = torch.randn(4000, 1, generator=gen, dtype=torch.float64)
    s = schedules.karras(20, 0.002, sT)
    pure = sample_heun(dark, sT * z, s).mean() / math.sqrt(d)
    oms = sample_heun(dark, one_more_step(prior_mean(dark, z[:1]), z, sT), s).mean() / math.sqrt(d)
    assert abs(oms + 0.5) < 0.02 < 0.3 < abs(pure + 0.5), (pure, oms)


def test_prior_mean_is_the_mixture_mean():
    g = GMMDenoiser(torch.tensor([0.2, 0.8]), torch.tensor([[1.0, 2.0], [-1.0, 0.0]]), torch.tensor([0.3, 0.5]))
    torch.testing.assert_close(prior_mean(g, torch.zeros(3, 2, dtype=torch.float64)),
                               (g.weights[:, None] * g.means).sum(0).expand(3, 2), rtol=1e-9, atol=1e-9)


def test_bad_input():
    with pytest.raises(ValueError, match="betas must be"):
        rescale_zero_terminal_snr(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="sigma_start"):
        one_more_step(torch.zeros(2), torch.zeros(2), math.inf)
    with pytest.raises(ValueError, match="unknown spacing"):
        start_sigma(schedules.betas_for(), 10, "middle")


# ----------------------------------------------------------------------------------------------- optimal boundary
@pytest.fixture
def sr_problem(gen):
    d, K = 16, 4
    means = torch.randn(K, d, generator=gen, dtype=torch.float64)
    B = torch.randn(K, d, d, generator=gen, dtype=torch.float64) * 0.3
    prior = GMMDenoiser(torch.ones(K) / K, means, B @ B.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64))
    A = torch.zeros(4, 16, dtype=torch.float64)  # 2x2 average pooling of a 4x4 image
    for p in range(16):
        A[(p // 8) * 2 + (p % 4) // 2, p] = 0.25
    return prior, A, GMMPosteriorDenoiser(prior, A, 0.05)


def test_posterior_denoiser_is_the_posterior_mixture(sr_problem, gen):
    prior, A, post = sr_problem
    x0 = prior.sample(2, gen)
    y = x0 @ A.T + 0.05 * torch.randn(2, 4, generator=gen, dtype=torch.float64)
    logw, means = post.posterior(y)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    sig = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)
    one = GMMDenoiser(logw[1].exp(), means[1], post.P)  # the posterior of y[1] as an ordinary mixture
    torch.testing.assert_close(post(x, sig, y=y[1:].expand(3, 4)), one(x, sig), rtol=1e-10, atol=1e-10)
    # Bayes by brute force: for a huge measurement noise the posterior is the prior
    flat = GMMPosteriorDenoiser(prior, A, 1e4)
    torch.testing.assert_close(flat(x, sig, y=y[:1].expand(3, 4)), prior(x, sig), rtol=1e-6, atol=1e-6)


def test_search_boundary_picks_the_best_reference_score(sr_problem, gen):
    prior, A, post = sr_problem
    s = schedules.karras(8, 0.01, 30.0)
    sample = lambda xT, y: sample_heun(post, xT, s, cond={"y": y})  # noqa: E731
    xr = prior.sample(6, gen)
    yr = xr @ A.T + 0.05 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
    cand = 30 * torch.randn(10, 16, generator=gen, dtype=torch.float64)
    best, scores = search_boundary(sample, cand, xr, yr)
    direct = torch.stack([(sample(c.expand(6, 16), yr) - xr).pow(2).mean() for c in cand])
    torch.testing.assert_close(scores, direct, rtol=1e-10, atol=1e-12)
    assert best == int(direct.argmin())
    with pytest.raises(ValueError, match="one reference"):
        search_boundary(sample, cand, xr, yr[:3])
