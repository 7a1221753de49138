"""Tests of dmlab.beyond (chapter 32): time-series diffusion, PDE operators, anomaly scores, rolled sampling."""
import pytest
import torch

from dmlab import beyond as B
from dmlab.data import seasonal_series
from tiny_models import tiny_sd_unet


def g(s=0):
    return torch.Generator().manual_seed(s)


def test_seasonal_series_deterministic_and_checked():
    a, b = seasonal_series(5, generator=g()), seasonal_series(5, generator=g())
    assert a.shape == (5, 48) and torch.equal(a, b)
    noiseless = seasonal_series(3, length=36, noise=0.0, generator=g(1)).double()
    # without noise, level + trend + harmonics: the period-12 difference is the trend step exactly (constant)
    d = noiseless[:, 12:] - noiseless[:, :-12]
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-5)
    with pytest.raises(TypeError, match="Generator"):
        seasonal_series(2, generator=None)
    with pytest.raises(ValueError, match="noise"):
        seasonal_series(2, noise=-1.0, generator=g())


def test_crps_exact_values():
    y = torch.zeros(1, 1)
    assert float(B.crps(torch.tensor([[[0.0], [1.0]]]), y)) == pytest.approx(0.25)
    pt = torch.randn(4, 1, 6, generator=g())
    yy = torch.randn(4, 6, generator=g(1))
    torch.testing.assert_close(B.crps(pt, yy), (pt[:, 0] - yy).abs().mean(1).double())
    with pytest.raises(ValueError, match=r"\[B, S, H\]"):
        B.crps(torch.zeros(2, 3), torch.zeros(2, 3))


def test_seasonal_naive_repeats_last_period():
    ctx = torch.arange(36.0)[None]
    out = B.seasonal_naive(ctx, 14)
    assert out.tolist()[0] == list(range(24, 36)) + [24.0, 25.0]


def test_series_models_and_forecast_reproducible():
    m = B.SeriesDenoiser(hidden=8).eval()
    x, t = torch.randn(3, 48, generator=g()), torch.tensor([0, 5, 99])
    assert m(x, t).shape == (3, 48)
    ctx = torch.randn(2, 36, generator=g(2))
    for mode in ("self_guided", "unguided", "conditional"):
        a = B.forecast(m, ctx, 12, n_samples=3, generator=g(3), mode=mode, steps=4)
        b = B.forecast(m, ctx, 12, n_samples=3, generator=g(3), mode=mode, steps=4)
        assert a.shape == (2, 3, 12) and torch.equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        B.forecast(m, ctx, 12, n_samples=2, generator=g(), mode="bogus")
    r = B.refine(m, ctx, B.seasonal_naive(ctx, 12), generator=g(4), steps=2)
    assert r.shape == (2, 12) and torch.isfinite(r).all()


def test_self_guidance_is_zero_without_an_observation_gap():
    """The guidance term is the gradient of the context error: with a context equal to what the unguided run
    estimates, nothing changes; with a different context, the forecast changes."""
    m = B.SeriesDenoiser(hidden=8).eval()  # an untrained model: only the guidance knows the context
    ctx = torch.full((2, 36), 2.0)
    guided = B.forecast(m, ctx, 12, n_samples=2, generator=g(5), steps=6, scale=1.0)
    plain = B.forecast(m, ctx, 12, n_samples=2, generator=g(5), mode="unguided", steps=6)
    zero = B.forecast(m, ctx, 12, n_samples=2, generator=g(5), steps=6, scale=0.0)
    torch.testing.assert_close(zero, plain)
    assert not torch.allclose(guided, plain)


def test_pde_solvers_conserve_what_they_must():
    heat = B.pde_trajectories("heat", 4, generator=g()).double()
    adv = B.pde_trajectories("advection", 4, generator=g()).double()
    bur = B.pde_trajectories("burgers", 4, generator=g()).double()
    for u in (heat, adv, bur):  # all three conserve the spatial mean (periodic, conservative form)
        torch.testing.assert_close(u.mean(-1), u[:, :1].mean(-1).expand(-1, u.shape[1]), atol=1e-5, rtol=0)
    n = heat.norm(dim=-1)
    assert (n[:, 1:] <= n[:, :-1] + 1e-6).all()  # heat dissipates
    na = adv.norm(dim=-1)
    torch.testing.assert_close(na, na[:, :1].expand_as(na), atol=1e-4, rtol=0)  # advection keeps the energy
    # same initial state for every family (same generator draws): frame 0 agrees
    torch.testing.assert_close(heat[:, 0], bur[:, 0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="family"):
        B.pde_trajectories("navier", 2, generator=g())


def test_all2all_pairs_and_operator_equivariance():
    assert len(B.all2all_pairs(9)) == 28 and len(B.all2all_pairs(9, consecutive=True)) == 7
    assert (B.all2all_pairs(9)[:, 0] >= 1).all()
    op = B.TimeConditionedOperator(hidden=8).eval()
    u0, u1 = torch.randn(2, 32, generator=g()), torch.randn(2, 32, generator=g(1))
    tau = torch.tensor([0.1, 0.5])
    with torch.no_grad():
        out = op(u0, u1, tau)
        rolled = op(u0.roll(5, -1), u1.roll(5, -1), tau)
    torch.testing.assert_close(rolled, out.roll(5, -1), atol=1e-5, rtol=1e-5)  # circular convolutions commute
    traj = B.pde_trajectories("heat", 3, generator=g())
    assert B.operator_error(op, traj).shape == (3,)


def test_train_entry_roundtrip_tiny():
    cfg = {"task": "poseidon", "seeds": [0], "pretrain_families": ["heat"], "n_per_family": 4, "data_seed": 1,
           "pretrain_steps": 2, "batch": 4, "lr": 1e-3, "hidden": 4, "finetune_family": "allen_cahn",
           "finetune_n": [2], "finetune_data_seed": 2, "finetune_steps": 2, "finetune_batch": 2, "finetune_lr": 1e-3}
    state, log = B.train_entry(cfg)
    models = B.load_entry(state, cfg)
    assert set(models) == {"pretrained", "finetuned", "scratch"} and len(models["finetuned"][2]) == 1
    assert set(log["final_loss"]) == {"pretrained.s0", "finetuned.n2.s0", "scratch.n2.s0"}
    with pytest.raises(ValueError, match="task"):
        B.train_entry({"task": "images"})


def test_anomaly_scores_and_auroc():
    assert B.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert B.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert B.auroc(torch.ones(3), torch.ones(4)) == 0.5
    x = -torch.ones(6, 1, 8, 8)
    line = B.inject_anomalies(x, "line", generator=g())
    assert ((line == 1).flatten(1).sum(1) == 8).all()
    blob = B.inject_anomalies(x, "blob", generator=g())
    assert blob.max() <= 1 and (blob > -1).any()
    # an identity-free check: the exact denoiser of a point mass at -1 repairs any lesion completely
    from dmlab.exact import GaussianDenoiser

    den = GaussianDenoiser(-torch.ones(64), 1e-8, shape=(1, 8, 8))
    s_norm = B.reconstruction_scores(den, x, 0.5, generator=g(1))
    s_anom = B.reconstruction_scores(den, blob, 0.5, generator=g(1))
    assert float(s_norm.max()) < 1e-6 and (s_anom > 1e-3).all()
    torch.testing.assert_close(B.nearest_neighbour_scores(blob, x), (blob + 1).pow(2).flatten(1).sum(1).double())


def test_rolled_denoiser_is_exact_for_shift_equivariant_denoisers_and_reduces_seams():
    from dmlab import exact, samplers, schedules
    from dmlab.accelerators.tiling import seam_score

    def smooth(x, sigma):  # circular, shift-equivariant: rolling must change nothing
        return 0.5 * (x + x.roll(1, -1)) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    x = torch.randn(2, 1, 6, 6, generator=g())
    r = B.rolled(smooth, generator=g(1))
    torch.testing.assert_close(r(x, torch.ones(2)), smooth(x, torch.ones(2)))
    assert r.stats["calls"] == 1
    # a non-periodic Gaussian prior (a smooth ramp field): plain samples seam, rolled ones do not
    i = torch.arange(8, dtype=torch.float64)
    d = (i[:, None] - i[None]).abs()
    k1 = torch.exp(-d / 3.0)
    cov = torch.kron(k1, k1)
    den = exact.GaussianDenoiser(torch.zeros(64), cov, shape=(1, 8, 8))
    sig = schedules.karras(12, 0.01, 50.0)
    z = torch.randn(16, 1, 8, 8, generator=g(2), dtype=torch.float64) * sig[0]
    plain = samplers.sample_heun(den, z, sig)
    roll = samplers.sample_heun(B.rolled(den, generator=g(3)), z, sig)
    assert seam_score(B.tile_mosaic(roll), 8) < seam_score(B.tile_mosaic(plain), 8)
    with pytest.raises(TypeError, match="callable"):
        B.rolled(3, generator=g())


def test_full_scale_path_on_config_built_unet():
    """The full-scale cell's path: SD's denoiser (sd_guided) wrapped by the rolling, sampled, on a tiny UNet."""
    import types

    from diffusers import DDPMScheduler

    from dmlab import samplers, schedules
    from dmlab.samplers.fullscale import sd_guided

    unet = tiny_sd_unet()
    emb = {p: torch.randn(1, 3, 8, generator=g(len(p))) for p in ("", "a brick wall")}
    pipe = types.SimpleNamespace(unet=unet, scheduler=DDPMScheduler(), encode_prompt=lambda ps, d, n, c, neg: (
        torch.cat([emb[p] for p in ps]), torch.cat([emb[p] for p in neg])))
    guided, cond, smin, smax, shape = sd_guided(pipe, ["a brick wall"], 7.5)
    sig = schedules.karras(3, smin, smax, dtype=torch.float32)
    z = torch.randn(shape, generator=g(1)) * sig[0]
    r = B.rolled(guided, generator=g(2))
    with torch.no_grad():
        out = samplers.sample_euler(r, z, sig, cond=cond)
    assert out.shape == shape and torch.isfinite(out).all() and r.stats["calls"] == len(sig) - 1


# ------------------------------------------------------------------------------------------- stable neural SDEs (8)
def test_interpolate_path_is_linear_between_observations_and_held_after_the_last():
    v = torch.tensor([[0.0, 9.0, 2.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(B.interpolate_path(v * m, m), torch.tensor([[0.0, 1.0, 2.0, 2.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match="first point"):
        B.interpolate_path(v, torch.zeros_like(m))


def test_irregular_series_rates_labels_and_errors():
    x, m, y = B.irregular_series(400, missing=0.5, generator=torch.Generator().manual_seed(0))
    assert x.shape == m.shape == (400, 48) and set(y.tolist()) == {0, 1}
    assert bool((m[:, 0] == 1).all()) and abs(float(m[:, 1:].mean()) - 0.5) < 0.03
    assert bool((x[m == 0] == 0).all())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        B.irregular_series(4, missing=1.0, generator=torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        B.irregular_series(4, missing=0.1, generator=0)


def test_sde_classes_reduce_to_the_ode_without_noise_and_differ_with_it():
    x, m, _ = B.irregular_series(8, missing=0.3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    sde = B.NeuralSDEClassifier("lnsde")
    ode = B.NeuralSDEClassifier("ode")
    ode.load_state_dict({k: v for k, v in sde.state_dict().items() if not k.startswith("sigma.")})
    zero = torch.zeros(8, 47, 16)
    assert torch.equal(sde(x, m, zero), ode(x, m, None)) and torch.equal(ode(x, m, zero), ode(x, m))
    eps = torch.randn(8, 47, 16, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(sde(x, m, eps), ode(x, m))
    lsde = B.NeuralSDEClassifier("lsde")
    assert torch.equal(lsde(x, m, eps), lsde(x, m, eps.clone()))  # Euler-Maruyama is deterministic given the noise
    with pytest.raises(ValueError, match="kind must be one of"):
        B.NeuralSDEClassifier("naive")
    with pytest.raises(ValueError, match="noise must be"):
        sde(x, m, torch.zeros(8, 48, 16))


def test_series_classifier_training_learns_and_is_reproducible():
    x, _, y = B.irregular_series(256, missing=0.0, generator=torch.Generator().manual_seed(3))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m, res = B.train_series_classifier(B.GRUClassifier(8), x, y, steps=10, batch_size=16, seed=0)
        runs.append(torch.cat([p.flatten() for p in m.parameters()]))
    assert torch.equal(runs[0], runs[1]) and res.curve[-1][0] == 10
    c = B.classify_correct(m, x[:16], torch.ones(16, 48), y[:16], generator=torch.Generator())
    assert c.dtype == torch.float64 and c.shape == (16,)


def test_gsde_drift_uses_the_logistic_factor_and_trains_from_z0_near_zero():
    # one Euler step of the GSDE by hand: z1 = z0 + tanh(h(z0, c0) * (1 - sigmoid(z0))) dt (zero noise)
    x, m, _ = B.irregular_series(4, missing=0.0, length=2, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    g = B.NeuralSDEClassifier("gsde", hidden=4, width=8, horizon=1.0)
    X = B.interpolate_path(x, m)
    c0 = torch.stack([X[:, 0], torch.zeros(4), m[:, 0]], 1)
    z0 = g.init(c0)
    z1 = z0 + torch.tanh(g.drift(torch.cat([z0, c0], 1)) * (1 - torch.sigmoid(z0))) * 1.0
    assert torch.allclose(g(x, m), g.head(z1), atol=1e-6)
    with torch.no_grad():  # z0 = 0: the paper's bare factor z would freeze z; the logistic one does not
        g.init.weight.zero_()
        g.init.bias.zero_()
    loss = g(x, m, torch.randn(4, 1, 4, generator=torch.Generator().manual_seed(5))).sum()
    loss.backward()
    assert float(g.drift[2].weight.grad.abs().sum()) > 0


def test_correct_by_missing_rate_pairs_masks_across_models():
    x, _, y = B.irregular_series(32, missing=0.0, length=12, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    ode = B.NeuralSDEClassifier("ode", hidden=4, width=8)
    c = B.correct_by_missing_rate([ode, ode], x, y, (0.0, 0.5), seed=3)
    assert c.shape == (2, 2, 32) and c.dtype == torch.float64 and torch.equal(c[:, 0], c[:, 1])
    m0 = B.missing_mask(torch.full((32,), 0.5), 12, generator=torch.Generator().manual_seed(4))
    assert torch.equal(c[1, 0], B.classify_correct(ode, x, m0, y, generator=torch.Generator()))
    with pytest.raises(TypeError, match="seed must be an int"):
        B.correct_by_missing_rate([ode], x, y, (0.0,), seed=None)


# ------------------------------------------------------------------------------------------- DiffTPT (7)
def test_shift_and_standard_views_are_identities_at_zero_strength():
    x = torch.rand(3, 1, 8, 8, generator=g(7)) * 2 - 1
    assert torch.allclose(B.shift_digits(x, generator=g(), angle=0.0, blur=0.0, contrast=1.0), x, atol=1e-6)
    v = B.standard_views(x, 4, generator=g(), angle=0.0, scale=(1.0, 1.0), shift=0.0)
    assert v.shape == (3, 4, 1, 8, 8) and torch.allclose(v, x[:, None].expand_as(v), atol=1e-6)
    s = B.shift_digits(x, generator=g(), angle=90.0, blur=0.0, contrast=1.0)  # a quarter turn either way
    assert all(torch.allclose(s[i], torch.rot90(x[i], 1, (1, 2)), atol=1e-5) or
               torch.allclose(s[i], torch.rot90(x[i], -1, (1, 2)), atol=1e-5) for i in range(3))
    with pytest.raises(TypeError, match="float tensor"):
        B.standard_views(x[0], 2, generator=g())
    with pytest.raises(ValueError, match="contrast"):
        B.shift_digits(x, generator=g(), contrast=0.0)


def test_cosine_filter_keeps_the_most_similar_views():
    fx = torch.tensor([[1.0, 0.0]])
    fv = torch.tensor([[[0.0, 1.0], [1.0, 0.1], [-1.0, 0.0], [2.0, 1.0]]])
    assert B.cosine_filter(fx, fv, 2).tolist() == [[1, 3]]
    with pytest.raises(ValueError, match="keep"):
        B.cosine_filter(fx, fv, 5)


def test_prompt_tuning_is_per_image_lowers_the_entropy_and_is_a_no_op_without_steps():
    fx = torch.randn(4, 6, generator=g(1))
    fv = fx[:, None] + 0.3 * torch.randn(4, 5, 6, generator=g(2))
    emb = torch.nn.functional.normalize(torch.randn(3, 6, generator=g(3)), dim=1)
    assert torch.allclose(B.prompt_tuning(fx, fv, emb, steps=0), B.prompt_logits(fx, emb))
    both = B.prompt_tuning(fx, fv, emb, steps=2, lr=0.05, confident=1.0)
    one = B.prompt_tuning(fx[:1], fv[:1], emb, steps=2, lr=0.05, confident=1.0)
    assert torch.allclose(both[:1], one, atol=1e-6)  # one independent prompt per test image

    def ent(logits):
        p = logits.softmax(-1).mean(1)
        return -(p * p.log()).sum(-1)
    ctx0 = torch.zeros(4, 6)
    e0 = ent(B.prompt_logits(fv, emb, ctx0))
    # the tuned prompt is not returned; check the mechanism on the views instead: one step with a tiny lr
    ctx = ctx0.clone().requires_grad_(True)
    ent(B.prompt_logits(fv, emb, ctx)).sum().backward()
    e1 = ent(B.prompt_logits(fv, emb, (ctx0 - 1e-3 * ctx.grad)))
    assert bool((e1 <= e0 + 1e-7).all())
    assert B.prompt_tuning(fx, fv, emb, steps=1, per_class=True).shape == (4, 3)
    with pytest.raises(ValueError, match="confident"):
        B.prompt_tuning(fx, fv, emb, confident=0.0)


def test_diffusion_views_full_scale_path_on_config_built_unet():
    """The DiffTPT full-scale cell's path: SDEdit views of SD latents by sd_guided's denoiser, on a tiny UNet."""
    import types

    from diffusers import DDPMScheduler

    from dmlab.samplers.fullscale import sd_guided

    unet = tiny_sd_unet()
    pipe = types.SimpleNamespace(unet=unet, scheduler=DDPMScheduler(), encode_prompt=lambda ps, d, n, c, neg: (
        torch.zeros(len(ps), 3, 8), torch.zeros(len(neg), 3, 8)))
    den, cond, smin, smax, shape = sd_guided(pipe, [""] * 6, 1.0)
    z = torch.randn(2, *shape[1:], generator=g(4))
    with torch.no_grad():
        v = B.diffusion_views(den, z, 3, sigma=2.0, steps=2, cond=cond, generator=g(5), clamp=False)
        w = B.diffusion_views(den, z, 3, sigma=2.0, steps=2, cond=cond, generator=g(5), clamp=False)
    assert v.shape == (2, 3, *shape[1:]) and torch.isfinite(v).all() and torch.equal(v, w)
    assert B.cosine_filter(z.flatten(1), v.flatten(2), 2).shape == (2, 2)
