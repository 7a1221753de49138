"""Score distillation (dmlab.score_distillation): gradients against closed forms on exact Gaussian targets."""
import math

import pytest
import torch

from dmlab import score_distillation as sd
from dmlab.exact import GaussianDenoiser, GMMDenoiser
from tiny_models import tiny_sd_unet

MU, S2 = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.25
G = GaussianDenoiser(MU, S2 * torch.eye(2, dtype=torch.float64))


def antithetic(n, seed=0):
    e = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return e


def test_sigma_of_t_ends_and_weight():
    st = sd.default_sigmas()
    ends = sd.sigma_of_t(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.stack([st[0], st[-1]]))
    s = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(sd.weight(s), s ** 2 / (1 + s ** 2))
    torch.testing.assert_close(sd.weight(s, "uniform"), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="t must lie"):
        sd.sigma_of_t(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="weighting"):
        sd.weight(s, "dmd")


def test_reconstruction_loss_gradient_is_sds():
    """StableDreamer's identity: grad of w/(2 sigma) ||x - sg(D(x_t))||^2 is the SDS gradient."""
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    eps = antithetic(5, 2)
    sig = torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0], dtype=torch.float64)
    sd.sds_reconstruction_loss(G, x, sig, eps).backward()
    torch.testing.assert_close(x.grad, sd.sds_grad(G, x.detach(), sig, eps), rtol=1e-12, atol=1e-14)


def test_sds_expected_gradient_on_a_gaussian():
    """For N(mu, s^2 I): E_eps[eps_hat - eps] = sigma / (s^2 + sigma^2) (x - mu); antithetic noise pairs make the
    average exact (the gradient is affine in eps)."""
    x = torch.tensor([[1.5, 0.2]], dtype=torch.float64).expand(2, 2)
    e = antithetic(1, 3)
    eps = torch.cat([e, -e])
    for s in (0.2, 1.0, 7.0):
        sig = torch.full((2,), s, dtype=torch.float64)
        g = sd.sds_grad(G, x, sig, eps).mean(0)
        expect = sd.weight(sig[:1]) * s / (S2 + s ** 2) * (x[0] - MU)
        torch.testing.assert_close(g, expect[0] if expect.ndim > 1 else expect, rtol=1e-10, atol=1e-12)


def test_asd_expected_gradient_and_zero_shift():
    x = torch.tensor([[1.5, 0.2]], dtype=torch.float64).expand(2, 2)
    e = antithetic(1, 4)
    eps = torch.cat([e, -e])
    s, s2 = 0.3, 0.45
    sig, sig2 = torch.full((2,), s, dtype=torch.float64), torch.full((2,), s2, dtype=torch.float64)
    g = sd.asd_grad(G, x, sig, sig2, eps).mean(0)
    coef = s ** 2 / (1 + s ** 2) * (s / (S2 + s ** 2) - s2 / (S2 + s2 ** 2))
    torch.testing.assert_close(g, coef * (x[0] - MU), rtol=1e-10, atol=1e-12)
    # below the data scale ASD pushes away from the mean (coef < 0); the same level gives no gradient
    assert coef < 0
    torch.testing.assert_close(sd.asd_grad(G, x, sig, sig, eps), torch.zeros_like(x))
    with pytest.raises(ValueError, match="later"):
        sd.asd_grad(G, x, sig2, sig, eps)


def test_asd_shift_matches_scaledreamer():
    t = torch.tensor([0.02, 0.5, 0.98], dtype=torch.float64)
    torch.testing.assert_close(sd.asd_shift(t), torch.tensor([0.02, 0.548, 1.0], dtype=torch.float64))


def test_vsd_with_the_target_as_particle_model_is_zero():
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = antithetic(4, 6)
    sig = torch.full((4,), 0.8, dtype=torch.float64)
    torch.testing.assert_close(sd.vsd_grad(G, G, x, sig, eps), torch.zeros_like(x))


def test_particle_denoiser_is_the_kde():
    p = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    d = sd.particle_denoiser(p, 0.1)
    x = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(d(x, torch.tensor([1.0], dtype=torch.float64)), x)  # midpoint: symmetric
    with pytest.raises(ValueError, match="bandwidth"):
        sd.particle_denoiser(p, 0)


def test_timesteps():
    a = sd.timesteps("annealed", 5, 3)
    assert (a[:, 0].diff() < 0).all() and float(a[0, 0]) == 0.98 and abs(float(a[-1, 0]) - 0.02) < 1e-12
    g = torch.Generator().manual_seed(0)
    r = sd.timesteps("random", 50, 4, generator=g)
    assert r.min() >= 0.02 and r.max() <= 0.98
    ar = sd.timesteps("annealed-random", 50, 4, generator=g)
    assert (ar <= torch.linspace(0.98, 0.02, 50, dtype=torch.float64)[:, None] + 1e-12).all()
    torch.testing.assert_close(sd.timesteps("random", 7, 2, generator=torch.Generator().manual_seed(1)),
                               sd.timesteps("random", 7, 2, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="generator"):
        sd.timesteps("random", 3, 1)
    with pytest.raises(ValueError, match="schedule"):
        sd.timesteps("cosine", 3, 1)


def test_annealed_sds_reaches_the_modes_random_t_does_not():
    """SDS with random t settles near the mean of a two-mode target; annealed t ends on the modes."""
    modes = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    T = GMMDenoiser.isotropic(torch.ones(2), modes, 0.05)
    out = {}
    for sched in ("random", "annealed"):
        g = torch.Generator().manual_seed(0)
        th = torch.randn(32, 2, generator=g, dtype=torch.float64).requires_grad_()
        r = sd.distill(lambda: th * 1, [th], T, schedule=sched, n_steps=400, lr=0.03, generator=g)
        out[sched] = float(torch.cdist(r.x, modes).min(1).values.mean())
        assert r.nfe == 400
    assert out["random"] > 1.0 and out["annealed"] < 0.5 * out["random"]


def test_distill_vsd_asd_and_draws_count_calls():
    g = torch.Generator().manual_seed(0)
    th = torch.randn(8, 2, generator=g, dtype=torch.float64).requires_grad_()
    r = sd.distill(lambda: th * 1, [th], G, method="asd", n_steps=5, generator=g, snapshot_every=2)
    assert r.nfe == 10 and r.steps == [0, 2, 4] and torch.isfinite(r.x).all()
    r = sd.distill(lambda: th * 1, [th], G, method="sds", draws=3, n_steps=4, generator=g)
    assert r.nfe == 12
    r = sd.distill(lambda: th * 1, [th], G, method="vsd", n_steps=3, generator=g,
                   particle_model=lambda p: sd.particle_denoiser(p, 0.2))
    assert r.nfe == 3 and torch.isfinite(r.x).all()


def test_distill_errors():
    g = torch.Generator().manual_seed(0)
    th = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="particle_model"):
        sd.distill(lambda: th, [th], G, method="vsd", generator=g)
    with pytest.raises(ValueError, match="method"):
        sd.distill(lambda: th, [th], G, method="dds", generator=g)
    with pytest.raises(ValueError, match="requires_grad"):
        sd.distill(lambda: th, [th.detach()], G, generator=g)
    with pytest.raises(ValueError, match="shape"):
        sd.sds_grad(G, th.detach(), 1.0, torch.zeros(3, 2, dtype=torch.float64))


def test_half_precision_matches_float32():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(6, 2, generator=torch.Generator().manual_seed(8))
    sig = torch.full((6,), 0.7)
    g32 = sd.sds_grad(G, x, sig, eps)
    g16 = sd.sds_grad(G, x.half(), sig.half(), eps.half())
    assert g16.dtype == torch.float16
    torch.testing.assert_close(g16.float(), g32, rtol=2e-2, atol=2e-2)


def test_transport_costs_are_the_exact_w2():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(sd.transport_costs(a, b), torch.ones(2, dtype=torch.float64))
    assert math.isclose(sd.wasserstein2(a, b), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        sd.transport_costs(a, b[:1])


def test_full_scale_path_on_a_config_built_sd_unet():
    """The full-scale cell's path: samplers.fullscale.sd_guided on a pipeline whose UNet is a config-built
    UNet2DConditionModel, then SDS and ASD (baseline: the unguided VP adapter) on a latent."""
    import types

    from diffusers import DDPMScheduler

    from dmlab.denoisers import DiscreteVPDenoiser
    from dmlab.samplers.fullscale import sd_guided

    unet = tiny_sd_unet()
    emb = {p: torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(len(p))) for p in ("", "a corgi")}
    pipe = types.SimpleNamespace(unet=unet, scheduler=DDPMScheduler(), encode_prompt=lambda ps, d, n, c, neg: (
        torch.cat([emb[p] for p in ps]), torch.cat([emb[p] for p in neg])))
    guided, cond, _, _, shape = sd_guided(pipe, ["a corgi"], 7.5)
    den = DiscreteVPDenoiser.from_scheduler(unet, pipe.scheduler)
    for method in ("sds", "asd"):
        g = torch.Generator().manual_seed(0)
        lat = (0.1 * torch.randn(shape, generator=g)).requires_grad_()
        start = lat.detach().clone()
        kw = {"baseline": den} if method == "asd" else {}
        r = sd.distill(lambda: lat * 1, [lat], guided, method=method, schedule="annealed", n_steps=2, lr=0.01,
                       generator=g, cond=cond, sigmas=den.sigmas_train, **kw)
        assert r.x.shape == shape and torch.isfinite(r.x).all()
        assert not torch.equal(r.x, start)
        assert r.nfe == (4 if method == "asd" else 2)


def _two_shape_prior(size=6):
    a = torch.zeros(size * size, dtype=torch.float64)
    a[: size * size // 2] = 1
    return GMMDenoiser(torch.ones(2), torch.stack([a, a.flip(0)]), torch.full((2,), 0.01, dtype=torch.float64))


def test_projection_matrix_preserves_mass_and_validates():
    for angle in (0.0, 0.4, math.pi / 2, 2.0):
        P = sd.projection_matrix(7, angle)
        torch.testing.assert_close(P.sum(0), torch.full((49,), 2 / 7, dtype=torch.float64))  # partition of unity
    with pytest.raises(ValueError, match="size"):
        sd.projection_matrix(1, 0.0)


def test_view_prior_matches_projected_samples():
    prior = _two_shape_prior()
    P = sd.projection_matrix(6, 0.7)
    vp = sd.view_prior(prior, P)
    torch.testing.assert_close(vp.means, prior.means @ P.T)
    v = prior.sample(4000, torch.Generator().manual_seed(0)) @ P.T
    mix_mean = vp.weights @ vp.means
    assert (v.mean(0) - mix_mean).abs().max() < 0.05
    with pytest.raises(ValueError, match="camera"):
        sd.view_prior(prior, P[:, :10])


def test_condition_on_views_picks_the_seen_shape_and_fits_the_views():
    prior = _two_shape_prior()
    A = sd.projection_matrix(6, math.pi / 2)  # integrates along x: sees the top/bottom split
    v = prior.sample(1, torch.Generator().manual_seed(3)).squeeze(0)
    post = sd.condition_on_views(prior, A, A @ v, noise_var=1e-6)
    k_true = int(torch.cdist(v[None], prior.means).argmin())
    assert float(post.weights[k_true]) > 0.99
    torch.testing.assert_close(A @ (post.weights @ post.means), A @ v, atol=1e-3, rtol=0)


def test_conditioned_prior_beats_no_prior_on_a_two_shape_scene():
    prior = _two_shape_prior()
    cams = [sd.projection_matrix(6, a) for a in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)]
    v = prior.sample(1, torch.Generator().manual_seed(1)).squeeze(0)
    y = cams[2] @ v
    errs = {}
    for kind in (None, "conditioned"):
        r = sd.reconstruct_from_views(prior, cams, [2], y, distill_prior=kind, n_steps=120,
                                      generator=torch.Generator().manual_seed(0))
        errs[kind] = float(((r - v) ** 2).mean())
    assert errs["conditioned"] < 0.5 * errs[None]
    with pytest.raises(ValueError, match="distill_prior"):
        sd.reconstruct_from_views(prior, cams, [2], y, distill_prior="mv", generator=torch.Generator())
