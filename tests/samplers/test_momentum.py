import pytest
import torch

from dmlab import schedules
from dmlab.denoisers import RecordingDenoiser
from dmlab.exact import reference_ode
from dmlab.samplers import sample_euler, sample_heun
from dmlab.samplers.momentum import (DPMPP_2M, MultistepRule, adams_bashforth_weights, plms, sample_ghvb, sample_hb,
                                     stability_interval)
from dmlab.viz import fit_order

NS = [16, 32, 64, 128]
_REF: dict = {}


@pytest.fixture
def start(gen):
    return 20.0 * torch.randn(8, 2, generator=gen, dtype=torch.float64)


def test_beta_one_is_the_plain_solver(smooth_gmm, start):
    s = schedules.karras(10, 0.002, 20.0)
    torch.testing.assert_close(sample_hb(smooth_gmm, start, s, beta=1.0, method="heun"), sample_heun(smooth_gmm, start, s),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sample_hb(smooth_gmm, start, s, beta=1.0, method="euler"),
                               sample_euler(smooth_gmm, start, s), rtol=1e-13, atol=1e-13)
    # an integer GHVB order is PLMS
    assert torch.equal(sample_ghvb(smooth_gmm, start, s, order=3), sample_hb(smooth_gmm, start, s, beta=1.0, order=3))


def test_dpmpp_2m_rule_matches_the_exponential_integrator(smooth_gmm, start):
    """The wrapped data-space rule at beta = 1 is DPM-Solver++(2M): against dmlab's own and a direct formula."""
    s = schedules.karras(9, 0.002, 20.0)
    ours = sample_hb(smooth_gmm, start, s, beta=1.0, method="dpmpp_2m")
    # DPM-Solver++(2M) written out (Lu et al. 2022, Alg. 2 in VE coordinates)
    x, old = start, None
    for i in range(9):
        d = smooth_gmm(x, s[i].expand(8))
        if s[i + 1] == 0:
            x = d
            continue
        h = (s[i] / s[i + 1]).log()
        u = d if old is None else d + (d - old) / (2 * (s[i - 1] / s[i]).log() / h)
        x, old = (s[i + 1] / s[i]) * x - torch.expm1(-h) * u, d
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)
    try:
        from dmlab.samplers.exponential import sample_dpmpp_2m
    except ImportError:  # pragma: no cover - the exponential integrators land separately
        return
    torch.testing.assert_close(ours, sample_dpmpp_2m(smooth_gmm, start, s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler, kw, order", [
    (sample_hb, {"method": "euler", "beta": 0.8}, 1), (sample_hb, {"method": "plms", "beta": 0.8}, 1),
    (sample_hb, {"method": "plms", "order": 2, "beta": 1.0}, 2), (sample_ghvb, {"order": 1.8}, 2)],
    ids=["hb_euler", "hb_plms2", "plms2", "ghvb1.8"])
def test_convergence_order(sampler, kw, order, smooth_gmm, start):
    errs = []
    for n in NS:
        s = schedules.karras(n, 0.002, 20.0)
        if n not in _REF:  # the reference depends only on the grid (fixed fixtures): solve it once per module
            _REF[n] = reference_ode(smooth_gmm, start, s)
        errs.append((sampler(smooth_gmm, start, s, **kw) - _REF[n]).norm().item())
    assert abs(fit_order(NS, errs) - order) < 0.25, errs


def test_stability_intervals():
    # textbook Adams-Bashforth intervals: AB1 (Euler) [-2, 0], AB2 [-1, 0], AB3 [-6/11, 0], AB4 [-3/10, 0]
    for k, left in [(1, -2.0), (2, -1.0), (3, -6 / 11), (4, -0.3)]:
        assert abs(stability_interval("hb", k, 1.0, z_min=-3, n=3001) - left) < 2e-3
    # momentum enlarges the interval (the paper's claim), monotonically in 1 - beta
    iv = [stability_interval("hb", 2, b, z_min=-6, n=1201) for b in (1.0, 0.8, 0.5)]
    assert iv[0] > iv[1] > iv[2]
    assert stability_interval("ghvb", 1.8, z_min=-3, n=601) < stability_interval("ghvb", 2, z_min=-3, n=601)


def test_adams_bashforth_weights_sum_to_one():
    for k in range(1, 6):
        for b in (1.0, 0.8, 0.3):
            assert abs(sum(adams_bashforth_weights(k, b)) - 1) < 1e-12


@pytest.mark.parametrize("sampler, kw, nfe", [(sample_hb, {}, lambda n: n), (sample_hb, {"method": "heun"}, lambda n: 2 * n - 1),
                                              (sample_ghvb, {}, lambda n: n)], ids=["hb", "hb_heun", "ghvb"])
def test_where_and_how_often_the_model_is_called(sampler, kw, nfe, smooth_gmm, gen):
    s = schedules.karras(7, 0.01, 10.0)
    rec = RecordingDenoiser(smooth_gmm)
    sampler(rec, 10 * torch.randn(3, 2, generator=gen, dtype=torch.float64), s, **kw)
    called = torch.stack([c[0] for c in rec.sigmas])
    assert rec.nfe == nfe(7) and (called > 0).all()


def test_a_custom_rule(smooth_gmm, start):
    """The MultistepRule interface: a user-written AB1 rule equals Euler."""
    rule = MultistepRule("mine", "eps", lambda hist, sig, s_next: hist[-1])
    s = schedules.karras(6, 0.01, 20.0)
    torch.testing.assert_close(sample_hb(smooth_gmm, start, s, beta=1.0, method=rule), sample_euler(smooth_gmm, start, s),
                               rtol=1e-13, atol=1e-13)
    assert DPMPP_2M.space == "x0" and plms(3).history == 3


def test_bad_input(smooth_gmm):
    x, s = torch.randn(2, 2, dtype=torch.float64), schedules.karras(3)
    for beta in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="beta must be"):
            sample_hb(smooth_gmm, x, s, beta=beta)
    with pytest.raises(ValueError, match="unknown method"):
        sample_hb(smooth_gmm, x, s, method="rk4")
    with pytest.raises(ValueError, match="order k must be"):
        sample_hb(smooth_gmm, x, s, method="plms", order=7)
    for order in (0, 6, "2"):
        with pytest.raises(ValueError, match="order must be"):
            sample_ghvb(smooth_gmm, x, s, order=order)
    with pytest.raises(ValueError, match="unknown kind"):
        stability_interval("nesterov")
    with pytest.raises(ValueError, match="space must be"):
        MultistepRule("bad", "v", lambda *a: a[0][-1])
