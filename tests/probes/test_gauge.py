"""Gauge fields, the L2(p) conservative split and intrinsic dimension (paper 59) on exact densities."""
import math

import pytest
import torch

from dmlab import schedules
from dmlab.data import toy_2d
from dmlab.exact import EmpiricalDenoiser, GaussianDenoiser, GMMDenoiser
from dmlab.probes import (add_field, energy_distance, helmholtz_split, intrinsic_dimension, jacobian_asymmetry,
                          mle_dimension, skew_gauge)
from dmlab.samplers import sample_heun

J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)


def _noised(g, n, sigma, gen):
    return g.sample(n, gen) + sigma * torch.randn(n, g.dim, generator=gen, dtype=torch.float64)


def test_split_of_exact_and_gauge_perturbed_scores(smooth_gmm, gen):
    sigma = 0.5
    x = _noised(smooth_gmm, 20000, sigma, gen)
    exact = helmholtz_split(smooth_gmm.score, x, sigma, n_centers=100, generator=gen)
    assert exact.fraction < 0.02  # the basis floor
    r = skew_gauge(smooth_gmm.score)
    split = helmholtz_split(lambda y, s: smooth_gmm.score(y, s) + r(y, s), x, sigma, n_centers=100, generator=gen)
    xt = _noised(smooth_gmm, 1000, sigma, gen)
    s = smooth_gmm.score(xt, sigma)
    assert (split.conservative(xt) - s).norm() / s.norm() < 0.1  # the gauge part is projected away
    assert abs(split.fraction - 0.5) < 0.05  # |Js| = |s|: half the energy is gauge
    rem = split.remainder(lambda y, sg: smooth_gmm.score(y, sg) + r(y, sg), xt, sigma)
    assert (rem - r(xt, sigma)).norm() / r(xt, sigma).norm() < 0.1


def test_rotation_is_a_gauge_of_an_isotropic_gaussian(gen):
    sigma = 0.5
    x = math.sqrt(1 + sigma ** 2) * torch.randn(10000, 2, generator=gen, dtype=torch.float64)
    split = helmholtz_split(lambda y, s: y @ J.T, x, sigma, n_centers=80, generator=gen)
    assert split.fraction > 0.95
    shift = helmholtz_split(lambda y, s: y + torch.tensor([1.0, 0.0], dtype=torch.float64), x, sigma, n_centers=80,
                            generator=gen)
    assert shift.fraction < 1e-6  # a gradient field (of |x|^2/2 + x_1) is conservative


def test_gauge_field_keeps_the_samples_a_non_gauge_field_does_not(smooth_gmm):
    gen = torch.Generator().manual_seed(0)
    sig = schedules.karras(40, 0.002, 30).double()
    x = 30 * torch.randn(1500, 2, generator=gen, dtype=torch.float64)
    ref = smooth_gmm.sample(1500, gen)
    base = sample_heun(smooth_gmm, x, sig)
    gauge = sample_heun(add_field(smooth_gmm, skew_gauge(smooth_gmm.score, scale=1.0)), x, sig)
    rot = sample_heun(add_field(smooth_gmm, lambda y, s: 0.5 * (y @ J.T) / (1 + s[:, None] ** 2)), x, sig)
    ed_base, ed_gauge, ed_rot = (energy_distance(v, ref) for v in (base, gauge, rot))
    assert abs(ed_gauge) < 0.01 and abs(ed_base) < 0.01 and ed_rot > 0.02
    assert (gauge - base).norm(dim=1).mean() > 0.3  # same distribution, different end points


def test_jacobian_asymmetry(smooth_gmm, gen):
    x = _noised(smooth_gmm, 6, 0.5, gen)
    assert jacobian_asymmetry(smooth_gmm.score, x, 0.5).max() < 1e-12
    a = jacobian_asymmetry(lambda y, s: y @ J.T, x, 0.5)
    torch.testing.assert_close(a, torch.full((6,), 2.0, dtype=torch.float64))  # |2J| / |J|


def test_intrinsic_dimension_of_known_manifolds(gen):
    U = torch.linalg.qr(torch.randn(10, 2, generator=gen, dtype=torch.float64)).Q
    plane = GaussianDenoiser(torch.zeros(10), U @ U.T)
    r = intrinsic_dimension(plane, plane.sample(10, gen), 0.05)
    assert (r.dims == 2).all() and (r.gap_dims == 2).all() and r.spectrum.shape == (10, 10)
    assert (intrinsic_dimension(plane, plane.sample(5, gen), 0.05, method="normal_svd", generator=gen).gap_dims == 2).all()
    # a circle in 2-D from its exact empirical denoiser (sigma between the point spacing and the radius)
    emp = EmpiricalDenoiser(toy_2d("circle", 1000, generator=gen, dtype=torch.float64))
    pts = toy_2d("circle", 10, generator=gen, dtype=torch.float64)
    assert intrinsic_dimension(emp, pts, 0.05).mode() == 1
    # a mixture of low-rank Gaussians of ranks 1, 2, 3 in 10-D: each point gets its component's rank
    Us = [torch.linalg.qr(torch.randn(10, k, generator=gen, dtype=torch.float64)).Q for k in (1, 2, 3)]
    mix = GMMDenoiser(torch.ones(3), 3 * torch.randn(3, 10, generator=gen, dtype=torch.float64),
                      torch.stack([u @ u.T for u in Us]))
    x, lab = mix.sample(15, gen, return_labels=True)
    assert torch.equal(intrinsic_dimension(mix, x, 0.05).dims, lab + 1)


def test_mle_dimension_and_errors(gen):
    U = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64)).Q
    pts = torch.randn(800, 3, generator=gen, dtype=torch.float64) @ U.T
    assert abs(mle_dimension(pts, 10) - 3) < 0.4
    g = GaussianDenoiser(torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        intrinsic_dimension(g, torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="method"):
        intrinsic_dimension(g, torch.zeros(2, 2), 0.1, method="pca")
    with pytest.raises(ValueError, match="skew"):
        skew_gauge(g.score, torch.eye(2))
    with pytest.raises(ValueError, match="n_centers"):
        helmholtz_split(g.score, torch.zeros(5, 2), 0.1, n_centers=10)
