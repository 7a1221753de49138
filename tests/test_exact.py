import math

import pytest
import torch

from dmlab.exact import EmpiricalDenoiser, GaussianDenoiser, GMMDenoiser, reference_ode


def _autograd_score(d, x, sigma, **kw):
    x = x.clone().requires_grad_(True)
    lp = d.log_prob(x, sigma, **kw).sum()
    (g,) = torch.autograd.grad(lp, x)
    return g


def test_gmm_score_is_grad_log_prob(smooth_gmm, gen):
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64) * 3
    for s in (0.05, 0.7, 5.0):
        sig = torch.full((16,), s, dtype=torch.float64)
        torch.testing.assert_close(smooth_gmm.score(x, sig), _autograd_score(smooth_gmm, x, sig), rtol=1e-9, atol=1e-10)
    # sigma = 0 is finite for non-singular covariances
    torch.testing.assert_close(smooth_gmm.score(x, 0.0), _autograd_score(smooth_gmm, x, torch.zeros(16, dtype=torch.float64)))


def test_gmm_denoiser_is_brute_force_posterior_mean(gen):
    # 1-D two-component mixture: the posterior mean by quadrature over x0
    g = GMMDenoiser(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0], [1.5]]), torch.tensor([[[0.2]], [[0.4]]]))
    x0 = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    p0 = g.log_prob(x0[:, None], 0.0).exp()
    for xv, s in [(0.3, 0.5), (-2.0, 1.3), (4.0, 0.1)]:
        w = p0 * torch.exp(-(xv - x0) ** 2 / (2 * s ** 2))
        brute = (w * x0).sum() / w.sum()
        assert g(torch.tensor([[xv]], dtype=torch.float64), s).item() == pytest.approx(brute.item(), abs=1e-7)


def test_gaussian_closed_form(gen):
    mu = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    A = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    C = A @ A.T + 0.1 * torch.eye(3, dtype=torch.float64)
    g = GaussianDenoiser(mu, C)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    s = 0.8
    expect = mu + (x - mu) @ torch.linalg.solve(C + s ** 2 * torch.eye(3, dtype=torch.float64), C)
    torch.testing.assert_close(g(x, s), expect)
    mvn = torch.distributions.MultivariateNormal(mu, C + s ** 2 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(g.log_prob(x, s), mvn.log_prob(x))
    samples = g.sample(20000, gen)
    assert torch.allclose(samples.mean(0), mu, atol=0.05)
    assert torch.allclose(torch.cov(samples.T), C, atol=0.1)


def test_singular_covariance_allowed_but_no_density_at_zero(gen):
    C = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))  # data on a line
    g = GaussianDenoiser(torch.zeros(2), C)
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    assert torch.allclose(g(x, 0.1)[:, 1], torch.zeros(4, dtype=torch.float64))  # projected onto the line
    with pytest.raises(ValueError, match="sigma = 0"):
        g.log_prob(x, 0.0)
    with pytest.raises(ValueError, match="singular at sigma = 0"):
        reference_ode(g, x, torch.tensor([1.0, 0.0]))


def test_empirical_equals_brute_force(gen):
    data = torch.randn(40, 1, 2, 2, generator=gen, dtype=torch.float64)
    labels = torch.arange(40) % 3
    e = EmpiricalDenoiser(data, labels)
    x = torch.randn(6, 1, 2, 2, generator=gen, dtype=torch.float64)
    s = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 0.3], dtype=torch.float64)
    flat = data.reshape(40, -1)
    for i in range(6):
        logw = torch.stack([torch.distributions.Normal(flat[j], s[i]).log_prob(x[i].reshape(-1)).sum() for j in range(40)])
        brute = (torch.softmax(logw, 0)[:, None] * flat).sum(0)
        torch.testing.assert_close(e(x[i:i + 1], s[i:i + 1]).reshape(-1), brute)
        lp = torch.logsumexp(logw, 0) - math.log(40)
        assert e.log_prob(x[i:i + 1], s[i:i + 1]).item() == pytest.approx(lp.item(), rel=1e-10)
    # class-conditional: only points of that class contribute
    y = torch.tensor([2, 0, 1, -1, 2, 1])
    out = e(x, s, class_labels=y)
    for i in range(6):
        m = labels == y[i] if y[i] >= 0 else torch.ones(40, dtype=torch.bool)
        logw = -((flat[m] - x[i].reshape(-1)) ** 2).sum(1) / (2 * s[i] ** 2)
        torch.testing.assert_close(out[i].reshape(-1), (torch.softmax(logw, 0)[:, None] * flat[m]).sum(0))
    torch.testing.assert_close(e.score(x, s), _autograd_score(e, x, s))
    torch.testing.assert_close(e.score(x, s, class_labels=y), _autograd_score(e, x, s, class_labels=y))


def test_empirical_small_sigma_returns_nearest_point(gen):
    data = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    e = EmpiricalDenoiser(data)
    x = data[[2, 7]] + 0.01
    torch.testing.assert_close(e(x, 1e-3), data[[2, 7]])
    d, i = e.nearest(x)
    assert i.tolist() == [2, 7] and torch.allclose(d, torch.full((2,), 0.01 * math.sqrt(3), dtype=torch.float64))


def test_identity_at_sigma_zero_and_dtype(smooth_gmm, gen):
    x = torch.randn(3, 2, generator=gen)
    assert torch.equal(smooth_gmm(x, 0.0), x)
    assert smooth_gmm(x, 1.0).dtype == torch.float32


def test_reference_ode_reaches_gaussian_closed_form():
    # For N(0, c I) the PF-ODE is x(sigma) = x(sigma0) * sqrt((c + sigma^2) / (c + sigma0^2))
    c = 0.3
    g = GaussianDenoiser(torch.zeros(2), torch.tensor(c))
    x = torch.tensor([[10.0, -4.0]], dtype=torch.float64)
    sig = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    path = reference_ode(g, x, sig, return_path=True)
    for k, s in enumerate(sig):
        torch.testing.assert_close(path[k], x * math.sqrt((c + s ** 2) / (c + 100.0)), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("make, msg", [
    (lambda: GMMDenoiser(torch.ones(2), torch.zeros(2, 2), torch.stack([torch.eye(2), -torch.eye(2)])), "semi-definite"),
    (lambda: GMMDenoiser(torch.ones(2), torch.zeros(2, 2), torch.tensor([[[1.0, 2.0], [0.0, 1.0]]] * 2)), "symmetric"),
    (lambda: GMMDenoiser(torch.ones(3), torch.zeros(2, 2), torch.ones(2)), "weights must have shape"),
    (lambda: GMMDenoiser(torch.ones(2), torch.zeros(2, 2), torch.ones(3)), "covs must have shape"),
    (lambda: GMMDenoiser(-torch.ones(2), torch.zeros(2, 2), torch.ones(2)), "non-negative"),
    (lambda: EmpiricalDenoiser(torch.zeros(4, 2), torch.tensor([0, 1, 2]),), "labels must be"),
    (lambda: EmpiricalDenoiser(torch.zeros(4, 2), torch.tensor([0, 1, -2, 1]),), "non-negative"),
])
def test_bad_construction(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_bad_calls(smooth_gmm, gen):
    x = torch.randn(4, 2, generator=gen)
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        smooth_gmm(x, torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        smooth_gmm(x, -1.0)
    with pytest.raises(ValueError, match="values per sample"):
        smooth_gmm(torch.randn(4, 3), 1.0)
    e = EmpiricalDenoiser(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="class_labels must lie"):
        e(x, 1.0, class_labels=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="without labels"):
        EmpiricalDenoiser(torch.zeros(4, 2))(x, 1.0, class_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="Generator"):
        smooth_gmm.sample(3, generator=0)
    with pytest.raises(ValueError, match="no density"):
        e.log_prob(x, 0.0)


def test_sampling_is_deterministic(smooth_gmm):
    a = smooth_gmm.sample(5, torch.Generator().manual_seed(1))
    b = smooth_gmm.sample(5, torch.Generator().manual_seed(1))
    c = smooth_gmm.sample(5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_to_moves_buffers_and_calls_follow_the_input(smooth_gmm, gen):
    # 'meta' stands in for an accelerator: buffers move with .to() and calls follow the input's device
    x = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    e = EmpiricalDenoiser(torch.randn(5, 2, generator=gen, dtype=torch.float64))
    for d in (smooth_gmm, e):
        d(x, 0.5)
        assert d._device == x.device  # a call records the device it followed (tests/gpu run it on CUDA)
        assert d.to("meta") is d
        assert all(v.device.type == "meta" for v in vars(d).values() if isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------------------------- reliability
NAN, INF = float("nan"), float("inf")
M2 = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])


@pytest.mark.parametrize("means,covs", [(M2 * NAN, torch.full((2,), .3)), (M2, torch.tensor([.3, NAN])),
                                        (M2, torch.tensor([.3, INF])), (M2 + INF, torch.full((2,), .3))])
def test_gmm_refuses_non_finite_parameters(means, covs):
    with pytest.raises(ValueError, match="must be finite"):
        GMMDenoiser(torch.ones(2), means, covs)


def test_empirical_refuses_bad_data_and_conditioning():
    with pytest.raises(ValueError, match="N >= 1"):
        EmpiricalDenoiser(torch.empty(0, 2))
    with pytest.raises(ValueError, match="finite"):
        EmpiricalDenoiser(torch.tensor([[0.0, NAN]]))
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        EmpiricalDenoiser(torch.randn(3, 2), chunk=0)
    e = EmpiricalDenoiser(torch.randn(10, 2, dtype=torch.float64), torch.arange(10) % 2, chunk=3)
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"one entry per sample: shape \[B\] = \[4\]"):
        e(x, 1.0, class_labels=torch.zeros(3).long())
    with pytest.raises(TypeError, match="integer class indices"):
        e(x, 1.0, class_labels=torch.tensor([0.7, 1.2, 0.0, 1.0]))
    # whole-number floats are class indices: same answer as the integer labels
    torch.testing.assert_close(e(x, 1.0, class_labels=torch.tensor([0.0, 1.0, 0.0, 1.0])),
                               e(x, 1.0, class_labels=torch.tensor([0, 1, 0, 1])))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_exact_denoisers_in_half_precision(dtype, tol, smooth_gmm, gen):
    """Half-precision x, float64 inside: finite and as accurate as the input's own rounding, over the EDM grid
    and up to sigma = 1e4 (the denoiser, the score, and sigmas below float16's smallest subnormal)."""
    emp = EmpiricalDenoiser(torch.randn(50, 2, generator=gen, dtype=torch.float64))
    z = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    for s in torch.cat([schedules_karras(0.002, 80), schedules_karras(1.0, 1e4)]).tolist() + [1e-8]:
        xh = (z * max(s, 1.0)).to(dtype)
        for d in (smooth_gmm, emp):
            for f in (d, d.score):
                ref = f(xh.double(), s)
                if ref.abs().max() > torch.finfo(dtype).max:  # the true value does not fit: a clear error
                    with pytest.raises(ValueError, match=f"beyond {dtype}.*float32"):
                        f(xh, s)
                    continue
                out = f(xh, s)
                assert out.dtype == dtype and torch.isfinite(out).all(), (f, s)
                assert (out.double() - ref).norm() <= tol * ref.norm().clamp_min(1e-6), (f, s)


def schedules_karras(lo, hi):
    from dmlab.schedules import karras

    return karras(8, lo, hi)[:-1]
