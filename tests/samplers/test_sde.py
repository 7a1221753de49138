import math

import pytest
import torch

from dmlab import schedules
from dmlab.denoisers import DiscreteVPDenoiser, RecordingDenoiser
from dmlab.exact import GaussianDenoiser
from dmlab.samplers import sample_euler
from dmlab.samplers.sde import (gaussian_w2, output_moments, sample_ddpm, sample_dpmpp_2m_sde, sample_euler_maruyama,
                                sample_pc)
from dmlab.samplers import fit_order

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
C = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
SMAX = 20.0


@pytest.fixture
def gauss():
    return GaussianDenoiser(MU, C)


def weak_errors(sampler, g, ns, **kw):
    """W2 between the exact output law and the target, starting from the exact marginal at SMAX."""
    start = C + SMAX ** 2 * torch.eye(2, dtype=torch.float64)
    return [gaussian_w2(*output_moments(sampler, g, MU, start, schedules.karras(n, 0.002, SMAX), **kw), MU, C)
            for n in ns]


@pytest.mark.parametrize("sampler, kw", [(sample_ddpm, {}), (sample_ddpm, {"eta": 0.5}),
                                         (sample_ddpm, {"variance": "large"}), (sample_euler_maruyama, {})],
                         ids=["ddpm", "ddim_eta0.5", "ddpm_large", "euler_maruyama"])
def test_weak_order_one_on_a_gaussian(sampler, kw, gauss):
    ns = [16, 32, 64, 128]
    errs = weak_errors(sampler, gauss, ns, **kw)
    assert abs(fit_order(ns, errs) - 1) < 0.25, errs


def test_sde_dpmpp_2m_weak_order_two(gauss):
    ns = [16, 32, 64, 128]
    assert abs(fit_order(ns, weak_errors(sample_dpmpp_2m_sde, gauss, ns)) - 2) < 0.25


def test_sde_dpmpp_special_cases(gauss, gen):
    x = SMAX * torch.randn(5, 2, generator=gen, dtype=torch.float64)
    s = schedules.karras(10, 0.002, SMAX)
    # first order with eta = 1 is DDPM ancestral sampling, draw for draw
    torch.testing.assert_close(sample_dpmpp_2m_sde(gauss, x, s, order=1, generator=torch.Generator().manual_seed(2)),
                               sample_ddpm(gauss, x, s, generator=torch.Generator().manual_seed(2)), rtol=1e-12, atol=1e-12)
    # eta = 0 is the ODE: DPM-Solver++(2M), written out here in VE coordinates
    ref, old = x, None
    for i in range(10):
        d = gauss(ref, s[i].expand(5))
        if s[i + 1] == 0:
            ref = d
            continue
        h = (s[i] / s[i + 1]).log()
        u = d if old is None else d + (d - old) / (2 * (s[i - 1] / s[i]).log() / h)
        ref, old = (s[i + 1] / s[i]) * ref - torch.expm1(-h) * u, d
    torch.testing.assert_close(sample_dpmpp_2m_sde(gauss, x, s, eta=0.0), ref, rtol=1e-12, atol=1e-12)


def test_output_moments_match_monte_carlo(gauss, gen):
    s = schedules.karras(8, 0.002, SMAX)
    start = C + SMAX ** 2 * torch.eye(2, dtype=torch.float64)
    m, c = output_moments(sample_ddpm, gauss, MU, start, s)
    n = 40000
    x = MU + torch.randn(n, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(start).T
    out = sample_ddpm(gauss, x, s, generator=gen)
    se = (c.diagonal() / n).sqrt()
    assert ((out.mean(0) - m).abs() < 5 * se).all()
    # the sample covariance's entries have std about sqrt((c_ii c_jj + c_ij^2) / n)
    se_c = ((c.diagonal()[:, None] * c.diagonal()[None] + c ** 2) / n).sqrt()
    assert ((out.T.cov() - c).abs() < 5 * se_c).all()
    # and the law is not the target's: the check can tell a wrong answer
    assert gaussian_w2(m, c, MU, C) > 10 * se.max()


def test_output_moments_refuses_a_non_affine_sampler(gauss):
    s = schedules.karras(4, 0.01, SMAX)
    with pytest.raises(ValueError, match="not affine"):
        output_moments(sample_pc, gauss, MU, SMAX ** 2 * torch.eye(2, dtype=torch.float64), s, norm="sample")


def test_eta_zero_is_ddim_is_euler(gauss, gen):
    x = SMAX * torch.randn(5, 2, generator=gen, dtype=torch.float64)
    s = schedules.karras(10, 0.002, SMAX)
    torch.testing.assert_close(sample_ddpm(gauss, x, s, eta=0.0), sample_euler(gauss, x, s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler, kw", [(sample_ddpm, {}), (sample_euler_maruyama, {}), (sample_pc, {})],
                         ids=["ddpm", "em", "pc"])
def test_same_seed_same_bits(sampler, kw, gauss):
    x = SMAX * torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = schedules.karras(6, 0.01, SMAX)
    a = sampler(gauss, x, s, generator=torch.Generator().manual_seed(7), **kw)
    b = sampler(gauss, x, s, generator=torch.Generator().manual_seed(7), **kw)
    c = sampler(gauss, x, s, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler, kw, nfe", [(sample_ddpm, {}, lambda n: n), (sample_euler_maruyama, {}, lambda n: n),
                                              (sample_pc, {"corrector_steps": 2}, lambda n: 3 * n)],
                         ids=["ddpm", "em", "pc"])
def test_where_and_how_often_the_model_is_called(sampler, kw, nfe, gauss, gen):
    s = schedules.karras(7, 0.01, 10.0)
    rec = RecordingDenoiser(gauss)
    out = sampler(rec, 10 * torch.randn(3, 2, generator=gen, dtype=torch.float64), s, generator=gen, **kw)
    assert rec.nfe == nfe(7) and out.dtype == torch.float64
    called = torch.stack([c[0] for c in rec.sigmas])
    assert (called > 0).all() and set(called.tolist()) == set(s[:-1].tolist())


def test_corrector_helps_in_high_dimension(gen):
    """Langevin correction (SNR step, Song et al. 2021) lowers the error of a coarse predictor in d = 32."""
    d = 32
    A = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    cov, mu = A @ A.T * 0.5 + 0.1 * torch.eye(d, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    g = GaussianDenoiser(mu, cov)
    x = mu + torch.randn(3000, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(
        cov + SMAX ** 2 * torch.eye(d, dtype=torch.float64)).T
    s = schedules.karras(12, 0.002, SMAX)
    w = {k: gaussian_w2((o := sample_pc(g, x, s, generator=gen, corrector_steps=k)).mean(0), o.T.cov(), mu, cov)
         for k in (0, 3)}
    assert w[3] < 0.8 * w[0], w


def test_pc_matches_diffusers_score_sde_ve(smooth_gmm):
    """Our PC (batch norms, reverse-diffusion predictor) = diffusers' ScoreSdeVeScheduler loop, same noise."""
    from diffusers import ScoreSdeVeScheduler

    n, smin, smax = 12, 0.01, 30.0
    sched = ScoreSdeVeScheduler(snr=0.16, sigma_min=smin, sigma_max=smax, correct_steps=2)
    sched.set_timesteps(n)
    sched.set_sigmas(n)
    idx = (sched.timesteps * (n - 1)).long()
    assert idx.tolist() == list(range(n - 1, -1, -1))
    sig = sched.discrete_sigmas.flip(0).to(torch.float32)
    x0 = smax * torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    x = x0.clone()
    for i in range(n):
        score = lambda x: smooth_gmm.score(x, sig[i].expand(x.shape[0]))  # noqa: E731
        for _ in range(2):
            x = sched.step_correct(score(x), x, generator=g).prev_sample
        out = sched.step_pred(score(x), sched.timesteps[i], x, generator=g)
        x, x_mean = out.prev_sample, out.prev_sample_mean
    ours = sample_pc(smooth_gmm, x0, schedules.append_zero(sig), generator=torch.Generator().manual_seed(3),
                     corrector_steps=2, snr=0.16, norm="batch")
    torch.testing.assert_close(ours, x_mean, rtol=1e-4, atol=1e-4)


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def _diffusers_ddpm(unet, sched, x, g):
    for t in sched.timesteps:
        with torch.no_grad():
            eps = unet(x, t).sample
        x = sched.step(eps, t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_matches_diffusers_exactly_with_the_same_noise(variance):
    from diffusers import DDPMScheduler

    unet = _tiny_unet()
    sched = DDPMScheduler(num_train_timesteps=100, clip_sample=False, variance_type=f"fixed_{variance}")
    sched.set_timesteps(10)
    x_vp = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_ddpm(unet, sched, x_vp, torch.Generator().manual_seed(1))
    den = DiscreteVPDenoiser.from_scheduler(unet, sched, quantize=True)
    sig = schedules.discrete(10, den.sigmas_train, "leading", dtype=torch.float32)
    assert den.sigma_to_t(sig[:-1]).long().tolist() == sched.timesteps.tolist()
    x = x_vp * (1 + sig[0] ** 2).sqrt()  # VP -> VE at sigma_0
    ours = sample_ddpm(den, x, sig, generator=torch.Generator().manual_seed(1), variance=variance)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_sde_dpmpp_2m_matches_diffusers_with_the_same_noise():
    """diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") on a config-built UNet, same noise."""
    from diffusers import DPMSolverMultistepScheduler

    unet = _tiny_unet()
    sched = DPMSolverMultistepScheduler(num_train_timesteps=100, algorithm_type="sde-dpmsolver++")
    sched.set_timesteps(8)
    x_vp = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g, x = torch.Generator().manual_seed(1), x_vp
    for t in sched.timesteps:
        with torch.no_grad():
            x = sched.step(unet(x, t).sample, t, x, generator=g).prev_sample
    den = DiscreteVPDenoiser.from_scheduler(unet, sched, quantize=True)
    sig = sched.sigmas.to(torch.float32)
    ours = sample_dpmpp_2m_sde(den, x_vp * (1 + sig[0] ** 2).sqrt(), sig, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_ddpm_matches_diffusers_in_distribution():
    """Independent noise on both sides: per-pixel means and stds agree within Monte Carlo error."""
    from diffusers import DDPMScheduler

    unet = _tiny_unet()
    sched = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    sched.set_timesteps(5)
    n = 400
    ref = _diffusers_ddpm(unet, sched, torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                          torch.Generator().manual_seed(1)).reshape(n, -1)
    den = DiscreteVPDenoiser.from_scheduler(unet, sched, quantize=True)
    sig = schedules.discrete(5, den.sigmas_train, "leading", dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    x = (1 + sig[0] ** 2).sqrt() * torch.randn(n, 1, 8, 8, generator=g)  # our own draw of N(0, I) in VP
    ours = sample_ddpm(den, x, sig, generator=g).reshape(n, -1)
    sd = ref.std(0)
    z_mean = (ours.mean(0) - ref.mean(0)) / (sd * math.sqrt(2 / n))
    assert z_mean.abs().mean() < 1.5 and z_mean.abs().max() < 5  # a mean |z| of 0.8 is expected under equality
    ratio = (ours.std(0) / sd).mean()  # pooled over the 64 pixels: its spread under equality is about 0.01
    assert abs(ratio - 1) < 0.04, ratio
    # the statistic has power: the same loop without noise (DDIM) is told apart
    ddim = sample_ddpm(den, x, sig, eta=0.0).reshape(n, -1)
    assert abs((ddim.std(0) / sd).mean() - 1) > 0.06


def test_bad_input(gauss):
    x, s = torch.randn(2, 2, dtype=torch.float64), schedules.karras(3)
    with pytest.raises(ValueError, match="eta must be"):
        sample_ddpm(gauss, x, s, eta=-0.1)
    with pytest.raises(ValueError, match="unknown variance"):
        sample_ddpm(gauss, x, s, variance="learned")
    with pytest.raises(ValueError, match="eta=1"):
        sample_ddpm(gauss, x, s, variance="large", eta=0.5)
    with pytest.raises(ValueError, match="unknown predictor"):
        sample_pc(gauss, x, s, predictor="heun")
    with pytest.raises(ValueError, match="corrector_steps"):
        sample_pc(gauss, x, s, corrector_steps=-1)
    with pytest.raises(ValueError, match="snr"):
        sample_pc(gauss, x, s, snr=0)
    with pytest.raises(ValueError, match="unknown norm"):
        sample_pc(gauss, x, s, norm="l1")
    with pytest.raises(ValueError, match="shaped like x"):
        sample_euler_maruyama(gauss, x, s, noise_sampler=lambda x: torch.zeros(3))
    with pytest.raises(ValueError, match="end in 0"):
        sample_ddpm(gauss, x, torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        sample_dpmpp_2m_sde(gauss, x, s, order=3)
    with pytest.raises(ValueError, match="eta must be"):
        sample_dpmpp_2m_sde(gauss, x, s, eta=-1.0)
    with pytest.raises(TypeError, match="generator"):
        sample_ddpm(gauss, x, s, generator=0)
