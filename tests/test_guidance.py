"""dmlab.guidance: W2SD reflection, classifier guidance on x0_hat with calibration, FIND's noise policy."""
import math

import pytest
import torch

from dmlab import guidance as G
from dmlab.data import toy_gmm8_params
from dmlab.denoisers import DiscreteVPDenoiser, RecordingDenoiser
from dmlab.exact import GMMDenoiser
from dmlab.schedules import karras


def _gmm(f=1.0):
    w, mu, cov = toy_gmm8_params(dtype=torch.float64)
    return GMMDenoiser(w, mu, cov * f**2), mu


def test_reflection_first_order_identity():
    """The reflected move tends to (s - s1) s (grad log p_s - grad log p_w) with error O(ds^2)."""
    (S, mu), (W, _) = _gmm(1.3), _gmm(1.6)
    x = mu[torch.arange(200) % 8] + torch.randn(200, 2, generator=torch.Generator().manual_seed(0),
                                                dtype=torch.float64)
    errs = []
    for ds in (0.01, 0.0025):
        moved = G.reflect(S, W, x, 1.0, 1.0 - ds) - x
        pred = ds * (S(x, 1.0) - W(x, 1.0))  # s * (s - s1) * (score_s - score_w) with s = 1
        errs.append(float((moved - pred).norm() / pred.norm()))
    assert errs[1] < 0.35 * errs[0]  # first order: 4x smaller step -> ~4x smaller relative error
    assert errs[1] < 0.1


def test_reflection_with_identical_models_is_identity_to_second_order():
    S, mu = _gmm(1.3)
    x = mu[:4] + 0.1
    moved = G.reflect(S, S, x, 2.0, 1.99) - x
    assert float(moved.abs().max()) < 1e-3


def test_w2sd_counts_calls_and_reduces_to_euler():
    from dmlab.samplers import sample_euler

    S, W = RecordingDenoiser(_gmm(1.3)[0]), RecordingDenoiser(_gmm(1.6)[0])
    sig = karras(8, 0.01, 10.0).double()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sig[0]
    G.sample_w2sd(S, W, x, sig, n_reflect=5)
    assert (S.nfe, W.nfe) == G.w2sd_calls(8, 5) == (13, 5)
    torch.testing.assert_close(G.sample_w2sd(S.denoiser, W.denoiser, x, sig, n_reflect=0),
                               sample_euler(S.denoiser, x, sig))
    with pytest.raises(ValueError, match="n_reflect"):
        G.sample_w2sd(S, W, x, sig, n_reflect=8)


def test_w2sd_aligned_pair_moves_spread_towards_ideal():
    """Exact judge: strong = ideal with std x1.3, weak x1.6; reflecting shrinks the spread towards the ideal's."""
    (S, mu), (W, _) = _gmm(1.3), _gmm(1.6)
    sig = karras(50, 0.01, 20.0).double()
    z = torch.randn(600, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 20.0
    spread = lambda x: float((torch.cdist(x, mu).min(1).values ** 2).mean() / (2 * 0.04))  # noqa: E731
    v0 = spread(G.sample_w2sd(S, W, z, sig, n_reflect=0))
    v1 = spread(G.sample_w2sd(S, W, z, sig, n_reflect=49))
    assert 1.5 < v0 < 1.9  # the strong model's own spread, 1.3^2
    assert abs(v1 - 1) < abs(v0 - 1) - 0.2


def test_classifier_guidance_matches_exact_posterior_gradient():
    """A linear 'classifier' f(x) = A x: grad_{x0} log softmax_y = (A_y - sum p_c A_c)/T; the guided denoiser adds
    scale * alpha sigma^2 times it."""
    torch.manual_seed(0)
    A = torch.randn(3, 2, dtype=torch.float64)
    lin = torch.nn.Linear(2, 3, bias=False).double()
    lin.weight.data = A.clone()
    D, _ = _gmm(1.0)
    cg = G.ClassifierGuidance(D, lin, 0.7, temperature=2.0, clip=None)
    x, y, s = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]), 1.5
    d = D(x, s)
    p = torch.softmax(d @ A.T / 2.0, 1)
    grad = (A[y] - p @ A) / 2.0
    expect = d + 0.7 * s**2 / math.sqrt(1 + s**2) * grad
    torch.testing.assert_close(cg(x, s, class_labels=y), expect)
    assert torch.equal(G.ClassifierGuidance(D, lin, 0.0)(x, s, class_labels=y), d)
    with pytest.raises(ValueError, match="class_labels"):
        cg(x, s)


def test_fit_temperature_recovers_known_temperature_and_ece_drops():
    g = torch.Generator().manual_seed(3)
    true = torch.randn(4000, 10, generator=g, dtype=torch.float64) * 2.0
    y = torch.multinomial(torch.softmax(true, 1), 1, generator=g).squeeze(1)
    over = true * 3.0  # an over-confident classifier: logits 3x too large
    T = G.fit_temperature(over, y)
    assert abs(T - 3.0) < 0.3
    assert G.expected_calibration_error(over, y, temperature=T).mean() < 0.5 * G.expected_calibration_error(
        over, y).mean()
    terms = G.expected_calibration_error(over, y)
    assert terms.shape == (4000,)


def test_noise_policy_log_prob_and_kl():
    pol = G.NoisePolicy((1, 2, 2))
    with torch.no_grad():
        pol.mu.fill_(0.3)
        pol.rho.fill_(-0.2)
    z = pol.sample(7, generator=torch.Generator().manual_seed(4))
    ref = torch.distributions.Normal(0.3, math.exp(-0.2)).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(pol.log_prob(z), ref)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(0.3, math.exp(-0.2)),
                                           torch.distributions.Normal(0.0, 1.0)) * 4
    torch.testing.assert_close(pol.kl_to_standard(), kl.float())


def test_find_gradient_moves_mean_towards_reward():
    """Reward = first coordinate: the policy-gradient step raises mu[0]."""
    pol = G.NoisePolicy((2,))
    opt = torch.optim.SGD(pol.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        z = pol.sample(64, generator=g)
        loss = G.find_loss(pol, z, z[:, 0], pol.log_prob(z).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    mu = pol.mu.detach()
    assert float(mu[0]) > 0.5 and abs(float(mu[1])) < 0.5


def test_bad_inputs():
    D, _ = _gmm()
    with pytest.raises(ValueError, match="sigma_lo"):
        G.reflect(D, D, torch.zeros(2, 2), 1.0, 1.5)
    with pytest.raises(TypeError, match="denoiser"):
        G.reflect(None, D, torch.zeros(2, 2), 1.0, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        G.ClassifierGuidance(D, torch.nn.Linear(2, 2), 1.0, temperature=0)
    with pytest.raises(ValueError, match="shape"):
        G.NoisePolicy(())
    with pytest.raises(ValueError, match="clip"):
        G.find_loss(G.NoisePolicy((2,)), torch.zeros(3, 2), torch.zeros(3), torch.zeros(3), clip=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_config_built_diffusers_models(dtype):
    """The full-scale code path: W2SD with a strong/weak pair of config-built UNet2DModels wrapped as
    DiscreteVPDenoisers, classifier guidance with a random small classifier, FIND's policy over the latents."""
    diffusers = pytest.importorskip("diffusers")
    from dmlab.zoo.nets import DigitClassifier

    def unet(seed):
        torch.manual_seed(seed)
        m = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                  layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                  up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, num_class_embeds=11)
        return m.eval()

    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    strong, weak = DiscreteVPDenoiser(unet(0), ac), DiscreteVPDenoiser(unet(1), ac)
    pol = G.NoisePolicy((1, 8, 8))
    z = pol.sample(2, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([10.0, 3.0, 1.0, 0.0])
    cond = {"class_labels": torch.tensor([1, 2])}
    x = G.sample_w2sd(strong, weak, (z * sig[0]).to(dtype), sig, n_reflect=2, cond=cond)
    assert x.shape == (2, 1, 8, 8) and x.dtype == dtype and torch.isfinite(x).all()
    torch.manual_seed(0)
    cg = G.classifier_guidance(strong, DigitClassifier(widths=(8, 8, 8), features=8), 1.0,
                               uncond={"class_labels": torch.tensor([10, 10])})
    out = cg((z * 3).to(dtype), torch.tensor([3.0, 3.0]), **cond)
    assert out.shape == (2, 1, 8, 8) and out.dtype == dtype and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------- Smooth Diffusion
class _ZeroEps(torch.nn.Module):
    def forward(self, x, t, class_labels=None):
        return torch.zeros_like(x) * x  # eps_theta = 0 (keeps the graph)


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(n, 1, 4, 4, generator=g), torch.randn(n, 1, 4, 4, generator=g)
    ac = torch.tensor([0.9, 0.5, 0.1, 0.01])[:n].view(-1, 1, 1, 1)
    return {"x0": x0, "eps": eps, "ac": ac, "t": torch.arange(n), "y": torch.zeros(n, dtype=torch.long)}


def test_step_variation_exact_for_a_zero_eps_model():
    """eps_theta = 0: x0_hat = x_t / sqrt(ac), so d<x0_hat, n>/d eps = sigma n and the score is ||n||."""
    b = _batch()
    n = torch.randn(b["x0"].shape, generator=torch.Generator().manual_seed(1))
    got = G.step_variation(_ZeroEps(), b, n)
    assert torch.allclose(got, n.flatten(1).norm(dim=1), rtol=1e-5)
    with pytest.raises(ValueError, match="direction n"):
        G.step_variation(_ZeroEps(), b, n[:2])
    with pytest.raises(ValueError, match="ddpm_batch"):
        G.step_variation(_ZeroEps(), {"x0": b["x0"]}, n)


def test_regularizer_ema_target_and_checks():
    r = G.StepVariationRegularizer(2.0, n_reg=2, seed=0)
    loss = r(_ZeroEps(), _batch())
    assert r.a == pytest.approx(r.history[0]) and float(loss) >= 0
    r(_ZeroEps(), _batch())
    assert r.a == pytest.approx(r.history[0] + 0.01 * (r.history[1] - r.history[0]))
    for kw in ({"weight": 0.0}, {"decay": 0.0}, {"n_reg": 0}):
        with pytest.raises(ValueError):
            G.StepVariationRegularizer(**kw)


def test_slerp_and_path_variation():
    z0, z1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p = G.slerp(z0, z1, 5)
    assert p.shape == (5, 1, 2) and torch.allclose(p[0], z0) and torch.allclose(p[-1], z1, atol=1e-6)
    assert torch.allclose(p.norm(dim=-1), torch.ones(5, 1))  # on the circle
    step, score = G.path_variation(p)
    assert float(score) < 1e-5 and float(step) == pytest.approx(2 * math.sin(math.pi / 16), rel=1e-5)
    with pytest.raises(ValueError, match="k must"):
        G.slerp(z0, z1, 1)
    with pytest.raises(ValueError, match="feats must"):
        G.path_variation(p[:2])


def test_ddim_inversion_round_trip_on_a_gaussian():
    """Data N(0, I): D(x, s) = x / (1 + s^2). Inverting then sampling with many Euler steps returns the input."""
    from dmlab.samplers import sample_euler

    D = lambda x, s, **c: x / (1 + s.reshape(-1, *[1] * (x.ndim - 1)) ** 2)  # noqa: E731
    sig = karras(200, 0.002, 10.0).double()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = G.ddim_invert(D, x, sig)
    assert float(z.std()) > 3  # at sigma_max the latent is mostly noise-scaled
    back = sample_euler(D, z, sig)
    assert float((back - x).abs().max()) < 0.05
    with pytest.raises(ValueError, match="sigmas"):
        G.ddim_invert(D, x, sig.flip(0))
