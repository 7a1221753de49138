"""Fokker-Planck residuals (paper 15): zero for exact scores, non-zero for wrong ones, the regulariser hook."""
import pytest
import torch

from dmlab.exact import GaussianDenoiser, GMMDenoiser
from dmlab.probes import fp_regulariser, ode_sde_gap, score_fp_residual, score_of
from dmlab.probes.fokker_planck import log_fp_residual
from dmlab.zoo.toy import log_density, toy_denoiser, train_toy


def _points(gen, n=48, d=2):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2
    sig = torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.05
    return x, sig


def test_exact_score_has_zero_residual(smooth_gmm, gen):
    x, sig = _points(gen)
    for scaled in (True, False):
        r = score_fp_residual(smooth_gmm.score, x, sig, scaled=scaled)
        assert r.shape == (48, 2) and r.abs().max() < 1e-10
        u = log_fp_residual(smooth_gmm.log_prob, x, sig, scaled=scaled)
        assert u.shape == (48,) and u.abs().max() < 1e-10
    # the same through Tweedie's formula on the denoiser (no .score attribute)
    r = score_fp_residual(score_of(lambda y, s: smooth_gmm(y, s)), x, sig)
    assert r.abs().max() < 1e-9


def test_exact_low_rank_mixture_in_10d_hutchinson_is_unbiased(gen):
    U = torch.linalg.qr(torch.randn(10, 3, generator=gen, dtype=torch.float64)).Q
    g = GMMDenoiser(torch.ones(2), torch.randn(2, 10, generator=gen, dtype=torch.float64),
                    torch.stack([U @ U.T, 0.3 * torch.eye(10, dtype=torch.float64)]))
    x, sig = _points(gen, 16, 10)
    assert score_fp_residual(g.score, x, sig, method="exact").abs().max() < 1e-10
    sig = sig + 0.45  # Hutchinson's variance explodes as sigma -> 0 on the rank-3 component
    # a wrong score: Hutchinson averages to the exact residual
    wrong = lambda y, s: 1.2 * g.score(y, s)  # noqa: E731
    exact = score_fp_residual(wrong, x, sig, method="exact")
    assert exact.abs().mean() > 0.05
    one = score_fp_residual(wrong, x, sig, method="hutchinson", n_probes=1, generator=gen)
    est = score_fp_residual(wrong, x, sig, method="hutchinson", n_probes=400, generator=gen)
    err = (est - exact).norm() / exact.norm()
    assert err < 0.25 and err < 0.5 * (one - exact).norm() / exact.norm()


def test_wrong_scores_have_residuals(gen):
    g = GaussianDenoiser(torch.zeros(2), torch.tensor([[0.5, 0.1], [0.1, 0.3]]))
    x, sig = _points(gen)
    sizes = [score_fp_residual(lambda y, s, lam=lam: lam * g.score(y, s), x, sig).norm(dim=1).mean()
             for lam in (1.0, 1.05, 1.2)]
    assert sizes[0] < 1e-12 < sizes[1] < sizes[2]
    # the score of the right density at the wrong noise level is not FP-consistent either
    shifted = score_fp_residual(lambda y, s: g.score(y, 1.1 * s), x, sig)
    assert shifted.norm(dim=1).mean() > 1e-3


def test_residual_errors(smooth_gmm):
    with pytest.raises(ValueError, match="sigma > 0"):
        score_fp_residual(smooth_gmm.score, torch.zeros(2, 2, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="points"):
        score_fp_residual(smooth_gmm.score, torch.zeros(2, 1, 2, 2), 1.0)
    with pytest.raises(ValueError, match="method"):
        score_fp_residual(smooth_gmm.score, torch.zeros(2, 2, dtype=torch.float64), 1.0, method="trace")
    with pytest.raises(ValueError, match="weight"):
        fp_regulariser(-1.0)
    with pytest.raises(ValueError, match="kind"):
        fp_regulariser(1.0, kind="pinn")


def test_conservative_toy_potential_is_its_score(gen):
    d = toy_denoiser(2, hidden=16, depth=2, conservative=True, dtype=torch.float64, seed=3)
    x, sig = _points(gen, 8)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_density(d, xr, sig).sum(), xr)
    torch.testing.assert_close(g, score_of(d)(x, sig), rtol=1e-9, atol=1e-9)
    # hence the score residual is the x-gradient of the log-density residual
    xr = x.clone().requires_grad_(True)
    r_u = log_fp_residual(lambda y, s: log_density(d, y, s), xr, sig, create_graph=True, scaled=False)
    (grad_ru,) = torch.autograd.grad(r_u.sum(), xr)
    r_s = score_fp_residual(score_of(d), x, sig, scaled=False)
    torch.testing.assert_close(grad_ru, r_s, rtol=1e-7, atol=1e-8)
    with pytest.raises(ValueError, match="conservative"):
        log_density(toy_denoiser(2, hidden=8, depth=1), x, sig)


@pytest.mark.parametrize("kind,conservative", [("log", True), ("score", False)])
def test_regulariser_lowers_the_residual_it_penalises(kind, conservative):
    """A few steps of pure regulariser descent (no DSM) reduce the residual from its random-init value."""
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    d = toy_denoiser(2, hidden=32, depth=2, conservative=conservative, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(128, 2, generator=gen) * 1.5
    sig = torch.rand(128, generator=gen) + 0.2
    def measure():
        if kind == "log":
            return log_fp_residual(lambda y, s: log_density(d, y, s), x, sig).abs().mean()
        return score_fp_residual(score_of(d), x, sig).norm(dim=1).mean()

    before = measure()
    reg = fp_regulariser(1.0, kind=kind, n_points=None, sigma_min=0.0)
    opt = torch.optim.Adam(d.net.parameters(), lr=3e-3)
    for _ in range(60):
        loss = reg(d, None, x, sig, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = measure()
    assert after < 0.5 * before
    # and train_toy accepts it as its hook
    losses = train_toy(d, data, steps=3, batch=32, generator=gen, regulariser=reg, progress=False)
    assert len(losses) == 3


def test_ode_sde_gap_of_exact_score_is_at_the_noise_floor(smooth_gmm):
    from dmlab import schedules

    gen = torch.Generator().manual_seed(0)
    out = ode_sde_gap(smooth_gmm, 1500, generator=gen, sigmas_ode=schedules.karras(24, 0.002, 30),
                      sigmas_sde=schedules.karras(200, 0.002, 30), log_prob=lambda y: smooth_gmm.log_prob(y, 0.0),
                      reference=smooth_gmm.sample(1500, gen))
    assert out["ode"].shape == (1500, 2) and out["sde"].shape == (1500, 2)
    assert abs(out["ed_ode_sde"]) < 0.01 and abs(out["ed_ode"]) < 0.01 and abs(out["ed_sde"]) < 0.01
    assert abs(out["loglik_gap"]) < 0.15
    # a wrong score moves the ODE and the SDE apart
    wrong = lambda y, s: smooth_gmm(y, 1.5 * s)  # noqa: E731
    bad = ode_sde_gap(wrong, 1500, generator=gen, sigmas_ode=schedules.karras(24, 0.002, 30),
                      sigmas_sde=schedules.karras(200, 0.002, 30))
    assert bad["ed_ode_sde"] > 5 * max(abs(out["ed_ode_sde"]), 1e-3)
