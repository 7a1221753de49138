import math

import pytest
import torch

from dmlab import metrics


def _exact_stats(n, mu, var, gen):
    """n samples whose *sample* mean is exactly mu and sample covariance exactly diag(var)."""
    z = torch.randn(n, len(mu), generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    L = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = z @ torch.linalg.inv(L).T
    return torch.tensor(mu, dtype=torch.float64) + z * torch.tensor(var, dtype=torch.float64).sqrt()


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances(gen):
    a = _exact_stats(400, [0.0, 1.0, -1.0], [1.0, 0.25, 4.0], gen)
    b = _exact_stats(300, [0.5, 1.0, 0.0], [0.36, 1.0, 1.0], gen)
    # commuting covariances: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    want = 0.25 + 0 + 1 + (1 - 0.6) ** 2 + (0.5 - 1) ** 2 + (2 - 1) ** 2
    assert metrics.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert metrics.frechet_distance(b, a) == pytest.approx(want, rel=1e-9)
    assert abs(metrics.frechet_distance(a, a)) < 1e-9


def test_frechet_distance_validates_input(gen):
    x = torch.randn(10, 3, generator=gen)
    with pytest.raises(ValueError, match="widths"):
        metrics.frechet_distance(x, torch.randn(10, 4, generator=gen))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.frechet_distance(x[0], x)
    with pytest.raises(TypeError):
        metrics.frechet_distance(x.numpy(), x)


def test_mmd_separates_shifted_samples_and_is_near_zero_for_same_law(gen):
    x, x2 = torch.randn(300, 2, generator=gen), torch.randn(300, 2, generator=gen)
    same, shifted = metrics.mmd(x, x2), metrics.mmd(x, x2 + 1.0)
    assert shifted > 0.05 and abs(same) < shifted / 10
    with pytest.raises(ValueError, match="dimension"):
        metrics.mmd(x, torch.randn(5, 3, generator=gen))


def test_psnr_and_mse_follow_their_definitions(gen):
    ref = torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1
    x = ref + 0.1
    assert metrics.mse(x, ref) == pytest.approx(0.01, rel=1e-6)
    assert metrics.psnr(x, ref) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)
    assert metrics.psnr(ref, ref) == math.inf
    with pytest.raises(ValueError, match="shapes"):
        metrics.mse(x, ref[:1])


def test_pck_counts_keypoints_within_alpha_size():
    target = torch.zeros(4, 2)
    pred = torch.tensor([[0.5, 0.0], [0.0, 0.9], [1.5, 0.0], [3.0, 4.0]])  # distances 0.5, 0.9, 1.5, 5
    assert metrics.pck(pred, target, alpha=0.1, size=10) == 0.5
    assert metrics.pck(pred, target, alpha=0.5, size=10) == 1.0
    with pytest.raises(ValueError, match="alpha"):
        metrics.pck(pred, target, alpha=0, size=10)


def test_gmm_log_prob_matches_the_exact_denoiser_and_scipy(smooth_gmm, gen):
    from scipy.stats import multivariate_normal

    w, mu, cov = smooth_gmm.weights, smooth_gmm.means, smooth_gmm.covs
    x = torch.randn(7, 2, generator=gen, dtype=torch.float64) * 2
    got = metrics.gmm_log_prob(x, w, mu, cov)
    want = torch.tensor([math.log(sum(float(w[k]) * multivariate_normal(mu[k].numpy(), cov[k].numpy()).pdf(xi.numpy())
                                      for k in range(3))) for xi in x], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gmm_mode_stats_and_kl(smooth_gmm, gen):
    w, mu, cov = smooth_gmm.weights, smooth_gmm.means, smooth_gmm.covs
    x = smooth_gmm.sample(3000, gen)
    st = metrics.gmm_mode_stats(x, w, mu, cov)
    assert st["modes_covered"] == 3 and st["high_quality"] > 0.95 and st["kl_modes"] < 0.01
    collapsed = mu[2] + 0.1 * torch.randn(100, 2, generator=gen, dtype=torch.float64)
    st = metrics.gmm_mode_stats(collapsed, w, mu, cov)
    assert st["modes_covered"] == 1 and st["counts"] == [0, 0, 100]
    assert st["kl_modes"] == pytest.approx(math.log(1 / 0.4), rel=1e-6)  # weights are float32
    # single Gaussians: Monte Carlo KL against the closed form
    p = (torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    q = (torch.ones(1), torch.tensor([[1.0, 0.0]]), 2 * torch.eye(2)[None])
    closed = 0.5 * (2 * 0.5 + 0.5 - 2 + 2 * math.log(2))  # tr(S2^-1 S1) + dmu' S2^-1 dmu - k + log det ratio
    assert metrics.gmm_kl(p, q, n=40000, generator=gen) == pytest.approx(closed, abs=0.02)
    assert metrics.gmm_kl(p, p, n=100, generator=gen) == 0.0


def test_digits_metrics_on_real_digits(gen):
    """Real test digits: the classifier meets the >= 0.97 bar and FD(test, test) is 0; the floor is positive."""
    from dmlab import zoo
    from dmlab.data import load_digits

    clf = zoo.load("classifier")
    x, y = load_digits("test")
    assert metrics.class_accuracy(x, y, classifier=clf) >= 0.97
    assert abs(metrics.digits_fd(x, classifier=clf)) < 1e-6
    floor = metrics.digits_fd_floor(200, generator=gen, classifier=clf)
    assert floor > 0.1
    noisy = (x + 0.5 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    assert metrics.digits_fd(noisy, classifier=clf) > 3 * floor
    with pytest.raises(ValueError, match="n must be"):
        metrics.digits_fd_floor(5000, generator=gen, classifier=clf)
    with pytest.raises(TypeError, match="features"):
        metrics.digits_fd(x, classifier=torch.nn.Linear(2, 2))


def test_kid_terms_average_to_kid_and_their_spread_matches_redraws(gen):
    """The per-sample terms average exactly to KID, and their standard error (delta method) matches the spread
    of KID over independent draws of the samples (within 30%: 200 draws estimate a standard deviation to ~5%)."""
    ref = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    a = torch.randn(60, 8, generator=gen, dtype=torch.float64) + 0.3
    t = metrics.kid_terms(a, ref)
    assert t.shape == (60,)
    assert abs(float(t.mean()) - metrics.kid(a, ref)) < 1e-10
    draws = torch.tensor([metrics.kid(torch.randn(60, 8, generator=gen, dtype=torch.float64) + 0.3, ref)
                          for _ in range(200)])
    se = torch.tensor([float(metrics.kid_terms(torch.randn(60, 8, generator=gen, dtype=torch.float64) + 0.3,
                                               ref).std() / 60 ** 0.5) for _ in range(50)]).mean()
    assert 0.7 < float(se / draws.std()) < 1.3, (float(se), float(draws.std()))
    with pytest.raises(ValueError, match="feature widths"):
        metrics.kid_terms(a, ref[:, :4])


def test_non_finite_features_and_mixtures_are_refused():
    f = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    g = f.clone()
    g[3, 1] = float("nan")
    for fn in (metrics.frechet_distance, metrics.kid, metrics.mmd):
        with pytest.raises(ValueError, match="NaN or inf in 1 of 20 rows"):
            fn(g, f)
    w, mu, cov = torch.ones(2), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.eye(2).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.gmm_nll(g[:, :2], w, mu, cov)
    with pytest.raises(ValueError, match="must be finite"):
        metrics.gmm_mode_stats(f[:, :2], w, mu, cov * float("inf"))
    with pytest.raises(ValueError, match="bandwidths"):
        metrics.mmd(torch.ones(5, 2), torch.ones(5, 2))
    # half-precision features: the same distance as their float32 values
    assert metrics.frechet_distance(f.half(), f[:10].half()) == metrics.frechet_distance(f.half().float(),
                                                                                        f[:10].half().float())


def test_one_psnr_three_reductions(gen):
    """bench.psnr is metrics.psnr; "mean" averages per-sample PSNRs, "global" is the PSNR of the pooled MSE."""
    from dmlab import bench

    assert bench.psnr is metrics.psnr
    ref = torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1
    x = ref + torch.tensor([0.1, 0.2, 0.0]).view(3, 1, 1, 1)  # per-sample MSE 0.01, 0.04, 0 (identical)
    per = metrics.psnr(x, ref, reduction="none")
    assert per[:2].tolist() == pytest.approx([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)], rel=1e-6)
    assert math.isinf(per[2])
    assert metrics.psnr(x, ref) == pytest.approx(float(per[:2].mean()), rel=1e-12)  # inf left out of the mean
    assert metrics.psnr(x, ref, reduction="global") == pytest.approx(10 * math.log10(4 / (0.05 / 3)), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        metrics.psnr(x, ref, reduction="sum")
