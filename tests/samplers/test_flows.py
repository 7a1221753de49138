import math
from functools import partial

import pytest
import torch

from dmlab import schedules
from dmlab.denoisers import FlowDenoiser, RecordingDenoiser
from dmlab.exact import EmpiricalDenoiser, GaussianDenoiser, GMMDenoiser, reference_ode
from dmlab.samplers import sample_euler
from dmlab.samplers.flows import (Interpolant, denoiser_from_velocity, get_interpolant, sample_interpolant, straightness,
                                  velocity_from_denoiser)
from dmlab.samplers.mrs import MeanReverting, exact_mr_model, mr_times, sample_mr_euler_maruyama, sample_mrs
from dmlab.samplers.pfgm import PFGMEmpiricalDenoiser, pfgmpp_prior
from dmlab.samplers.rectify import AffineCouplingDenoiser, ode_coupling, train_rectified
from dmlab.samplers.sde import gaussian_w2, output_moments
from dmlab.samplers import fit_order

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
C = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
SMAX = 20.0


@pytest.fixture
def gauss():
    return GaussianDenoiser(MU, C)


# ----------------------------------------------------------------------------------------------- interpolants
def test_linear_interpolant_euler_is_euler_in_sigma(gauss, gen):
    x = SMAX * torch.randn(5, 2, generator=gen, dtype=torch.float64)
    s = schedules.karras(10, 0.002, SMAX)
    torch.testing.assert_close(sample_interpolant(gauss, x, s), sample_euler(gauss, x, s), rtol=1e-12, atol=1e-12)
    # another path is another time variable: a different discretisation of the same ODE
    assert (sample_interpolant(gauss, x, s, interpolant="trig") - sample_euler(gauss, x, s)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["linear", "trig"])
def test_velocity_adapters_round_trip(name, gauss, gen):
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    sig = torch.tensor([0.05, 0.7, 3.0, 40.0], dtype=torch.float64)
    v = velocity_from_denoiser(gauss, name)
    torch.testing.assert_close(denoiser_from_velocity(v, name)(x, sig), gauss(x, sig), rtol=1e-10, atol=1e-10)
    # the velocity is d/dt of the path: check against a finite difference of x_t = a x0 + b eps along a fixed pair
    ip = get_interpolant(name)
    x0, e = torch.randn(2, 1, 2, generator=gen, dtype=torch.float64)
    point = GaussianDenoiser(x0[0], 1e-12 * torch.eye(2, dtype=torch.float64))  # data = one point: D = x0
    t, dt = torch.tensor(0.4, dtype=torch.float64), 1e-6
    xt = lambda t: ip.a(t) * x0 + ip.b(t) * e  # noqa: E731
    fd = (xt(t + dt) - xt(t - dt)) / (2 * dt)
    torch.testing.assert_close(velocity_from_denoiser(point, name)(xt(t), t), fd, rtol=1e-6, atol=1e-6)


def test_linear_adapter_is_flow_denoiser(gauss, gen):
    x = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    sig = torch.tensor([0.3, 2.0, 9.0], dtype=torch.float64)
    v = velocity_from_denoiser(gauss, "linear")
    fd = FlowDenoiser(lambda x_t, timestep: v(x_t, timestep))
    torch.testing.assert_close(fd(x, sig), denoiser_from_velocity(v)(x, sig), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, lam", [("linear", 0.0), ("linear", 1.0), ("trig", 0.5), ("trig", 2.0)])
def test_interpolant_sde_family_weak_order_one(name, lam, gauss):
    """Every member of the family (paper 76, eq. 2.33) has the target's law in the limit: weak order 1."""
    start = C + SMAX ** 2 * torch.eye(2, dtype=torch.float64)
    ns = [16, 32, 64, 128]
    errs = [gaussian_w2(*output_moments(sample_interpolant, gauss, MU, start, schedules.karras(n, 0.002, SMAX),
                                        interpolant=name, eps=lam), MU, C) for n in ns]
    assert abs(fit_order(ns, errs) - 1) < 0.25, errs


def test_interpolant_nfe_and_bad_input(gauss, gen):
    rec = RecordingDenoiser(gauss)
    s = schedules.karras(6, 0.01, 10.0)
    sample_interpolant(rec, 10 * torch.randn(3, 2, generator=gen, dtype=torch.float64), s, eps=1.0, generator=gen)
    assert rec.nfe == 6 and all((c > 0).all() for c in rec.sigmas)
    x = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown interpolant"):
        sample_interpolant(gauss, x, s, interpolant="cubic")
    with pytest.raises(ValueError, match="eps must be"):
        sample_interpolant(gauss, x, s, eps=-1.0)
    with pytest.raises(ValueError, match="0 < t < 1"):
        velocity_from_denoiser(gauss)(x, 1.0)
    custom = Interpolant("lin2", lambda t: 1 - t, lambda t: t, lambda t: -torch.ones_like(t), lambda t: torch.ones_like(t),
                         lambda s: s / (1 + s))
    torch.testing.assert_close(sample_interpolant(gauss, x, s, interpolant=custom), sample_interpolant(gauss, x, s))


# ----------------------------------------------------------------------------------------------- rectification
def test_exact_rectified_denoiser_is_one_step_exact(gauss, gen):
    """Rectified diffusion = rectified flow for an exact coupling: D is constant on each path, one step is exact."""
    rd = AffineCouplingDenoiser.gaussian(MU, C, SMAX)
    e = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    s = schedules.karras(48, 0.002, SMAX)
    _, x0 = ode_coupling(gauss, e, s, solver=partial(reference_ode))
    one = sample_euler(rd, x0 + SMAX * e, torch.tensor([SMAX, 0.0], dtype=torch.float64))
    torch.testing.assert_close(one, x0, rtol=1e-9, atol=1e-9)
    lines = schedules.karras(64, 0.002, SMAX)
    assert straightness(rd, SMAX * e, lines) < 1e-20 < 1e-3 < straightness(gauss, SMAX * e, lines)


def test_rectification_beats_independent_pairs_at_one_step(gen):
    gmm = GMMDenoiser.isotropic(torch.ones(2), torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64), 0.05)
    e, x0 = ode_coupling(gmm, torch.randn(1000, 2, generator=gen, dtype=torch.float64), schedules.karras(16, 0.002, SMAX))
    test, t0 = ode_coupling(gmm, torch.randn(200, 2, generator=gen, dtype=torch.float64), schedules.karras(16, 0.002, SMAX))
    one = torch.tensor([SMAX, 0.0], dtype=torch.float64)
    err = {f: (sample_euler(train_rectified(e, x0, form=f, steps=300, width=32, generator=gen), SMAX * test, one)
               - t0).norm(dim=1).mean().item() for f in ("flow", "independent")}
    assert err["flow"] < 0.5 * err["independent"], err
    with pytest.raises(ValueError, match="unknown form"):
        train_rectified(e, x0, form="consistency", generator=gen)


# ----------------------------------------------------------------------------------------------- PFGM++
def test_pfgm_recovers_diffusion_as_D_grows(gen):
    pts = torch.randn(64, 2, generator=gen, dtype=torch.float64) * 2
    x = 3 * torch.randn(200, 2, generator=gen, dtype=torch.float64)
    sig = torch.full((200,), 0.7, dtype=torch.float64)
    gaussian = EmpiricalDenoiser(pts)(x, sig)
    assert torch.equal(PFGMEmpiricalDenoiser(pts, math.inf)(x, sig), gaussian)
    Ds = [2 ** 11, 2 ** 13, 2 ** 15]
    errs = [(PFGMEmpiricalDenoiser(pts, D)(x, sig) - gaussian).abs().max().item() for D in Ds]
    assert errs[0] > errs[1] > errs[2] and abs(fit_order(Ds, errs) - 1) < 0.25, errs  # O(1/D)


def test_pfgm_prior_is_the_papers_beta_construction():
    """sigma z sqrt(D / chi2_D) has |x|^2 / (sigma^2 N) ~ F(N, D), the law of the paper's R = r sqrt(B / (1 - B))."""
    from scipy.stats import f as fdist

    n, N, D, sigma = 20000, 2, 4, 3.0
    x = pfgmpp_prior(n, (N,), sigma, D, generator=torch.Generator().manual_seed(0))
    stat = (x.pow(2).sum(1) / (sigma ** 2 * N)).sort().values
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (ecdf - torch.from_numpy(fdist.cdf(stat.numpy(), N, D))).abs().max().item()
    assert ks < 1.63 / math.sqrt(n)  # the 1% Kolmogorov-Smirnov critical value
    g = torch.Generator().manual_seed(1)
    assert torch.equal(pfgmpp_prior(5, (N,), sigma, math.inf, generator=g),
                       sigma * torch.randn(5, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64))


@pytest.mark.parametrize("D", [0, -1, 1.5, "16", True])
def test_pfgm_bad_D(D):
    with pytest.raises(ValueError, match="D must be"):
        PFGMEmpiricalDenoiser(torch.zeros(3, 2), D)


# ----------------------------------------------------------------------------------------------- MRS
_MR_REF: dict = {}


@pytest.fixture
def mr_setup(smooth_gmm):
    proc = MeanReverting(theta=5.0, lam=1.0)
    mu = torch.tensor([0.2, 0.1], dtype=torch.float64)
    return proc, mu, partial(exact_mr_model(smooth_gmm, proc), mu=mu)


def test_mrs_first_order_step_is_the_papers_formula(mr_setup, gen):
    """One MRS-ODE-1 step against eq. (13) of the paper, written in mean-reverting coordinates."""
    proc, mu, model = mr_setup
    x = mu + torch.randn(4, 2, generator=gen, dtype=torch.float64)
    ts = torch.tensor([0.6, 0.3, 0.0], dtype=torch.float64)
    s, t = ts[0], ts[1]
    d0 = model(x, s.expand(4))
    a_s, a_t, sd_s, sd_t = proc.alpha(s), proc.alpha(t), proc.std(s), proc.std(t)
    h = torch.log(a_t / sd_t) - torch.log(a_s / sd_s)
    paper = sd_t / sd_s * x - a_t * torch.expm1(-h) * d0 + mu * (1 - sd_t / sd_s + sd_t / sd_s * a_s - a_t)
    ours = []
    sample_mrs(model, x, mu, ts, process=proc, order=1, callback=lambda d: ours.append(d["x"]))
    torch.testing.assert_close(mu + proc.alpha(t) * ours[1], paper, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_mrs_ode_order(order, mr_setup, smooth_gmm, gen):
    proc, mu, model = mr_setup
    shifted = GMMDenoiser(smooth_gmm.weights, smooth_gmm.means - mu, smooth_gmm.covs)  # the law of x0 - mu
    x = mu + 1.0 * torch.randn(6, 2, generator=gen, dtype=torch.float64)
    ns, errs = [20, 40, 80, 160], []
    for n in ns:
        ts = mr_times(n, proc)
        sig = proc.sigma(ts)
        if n not in _MR_REF:  # depends only on the grid (fixed fixtures): solve once for the three orders
            _MR_REF[n] = reference_ode(shifted, (x - mu) / proc.alpha(ts[0]), sig[:-1], rtol=1e-11, atol=1e-11)
        y_ref = _MR_REF[n]  # compared at sigma_min, before the final denoising step
        ends = []
        sample_mrs(model, x, mu, ts, process=proc, order=order, callback=lambda d: ends.append(d["x"]))
        errs.append((ends[-1] - y_ref).norm().item())
    assert abs(fit_order(ns, errs) - order) < 0.25, errs


def test_mrs_sde_and_em_reach_the_data(mr_setup, smooth_gmm, gen):
    from dmlab import metrics

    proc, mu, model = mr_setup
    n = 1500
    x0 = smooth_gmm.sample(n, gen)
    xT = proc.marginal(x0, mu, 1.0, torch.randn(n, 2, generator=gen, dtype=torch.float64))
    w, m, c = smooth_gmm.weights, smooth_gmm.means, smooth_gmm.covs
    floor = metrics.gmm_mode_stats(x0, w, m, c)
    for out in (sample_mrs(model, xT, mu, mr_times(15, proc), process=proc, stochastic=True, generator=gen),
                sample_mr_euler_maruyama(model, xT, mu, mr_times(200, proc, spacing="t"), process=proc, generator=gen)):
        st = metrics.gmm_mode_stats(out, w, m, c)
        assert st["high_quality"] > floor["high_quality"] - 0.02 and st["kl_modes"] < floor["kl_modes"] + 0.02, st
    with pytest.raises(ValueError, match="order must be"):
        sample_mrs(model, xT, mu, mr_times(5, proc), stochastic=True, order=3)
    with pytest.raises(ValueError, match="ts must be"):
        sample_mrs(model, xT, mu, torch.tensor([0.5, 0.7, 0.0]))
    with pytest.raises(ValueError, match="theta and lam"):
        MeanReverting(theta=-1.0)
