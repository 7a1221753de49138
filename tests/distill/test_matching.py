"""dmlab.distill.matching: DMD / SIM updates against exact scores, the grid judge, the training loop."""
import copy

import pytest
import torch

from dmlab import metrics
from dmlab.data import toy_gmm8_params
from dmlab.exact import GaussianDenoiser, GMMDenoiser
from dmlab.distill import matching as M
from dmlab.zoo.toy import toy_denoiser


def _gauss(mean, var=1.0):
    return GaussianDenoiser(torch.tensor(mean, dtype=torch.float64), var * torch.eye(2, dtype=torch.float64))


def test_dmd_direction_is_the_exact_score_difference():
    # teacher N(0, I), fake N(m, I): D_fake - D_real = m sigma^2 / (1 + sigma^2) at every x
    g = torch.Generator().manual_seed(0)
    real, fake = _gauss([0.0, 0.0]), _gauss([0.5, -1.0])
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    sig = M.sample_sigmas(64, g, 0.1, 5.0, torch.float64)
    xt = x + sig[:, None] * torch.randn(64, 2, generator=g, dtype=torch.float64)
    got = M.dmd_direction(x, xt, sig, real, fake)
    d_real = xt / (1 + sig[:, None] ** 2)
    want = torch.tensor([0.5, -1.0], dtype=torch.float64) * (sig ** 2 / (1 + sig ** 2))[:, None]
    want = want / (x - d_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("normalise", [False, True])
def test_updates_vanish_when_the_fake_score_is_exact(normalise):
    w, mu, cov = toy_gmm8_params(dtype=torch.float64)
    teacher = GMMDenoiser(w, mu, cov)
    g = torch.Generator().manual_seed(1)
    x = teacher.sample(128, g).float().requires_grad_(True)
    sig = M.sample_sigmas(128, g, 0.05, 10.0)
    eps = torch.randn(128, 2, generator=g)
    assert M.dmd_direction(x.detach(), x.detach() + sig[:, None] * eps, sig, teacher, teacher).abs().max() == 0
    (grad,) = torch.autograd.grad(M.sim_loss(x, sig, eps, teacher, teacher, normalise=normalise), x)
    assert grad.abs().max() == 0
    # a fake score shifted right pushes both updates right (the generator then moves left, onto the teacher)
    shifted = GMMDenoiser(w, mu + torch.tensor([0.3, 0.0], dtype=torch.float64), cov)
    d = M.dmd_direction(x.detach(), x.detach() + sig[:, None] * eps, sig, teacher, shifted)
    (grad,) = torch.autograd.grad(M.sim_loss(x, sig, eps, teacher, shifted, normalise=normalise), x)
    assert d[:, 0].mean() > 0.1 and grad[:, 0].mean() > 0


def test_grid_masses_match_exact_samples():
    w, mu, cov = toy_gmm8_params(dtype=torch.float64)
    teacher = GMMDenoiser(w, mu, cov)
    masses = M.grid_masses(teacher, 2.0, 12)  # part of the mass lies outside [-2, 2]^2: the overflow cell
    assert masses.shape == (145,) and abs(float(masses.sum()) - 1) < 1e-9 and masses[-1] > 0.1
    x = teacher.sample(200_000, torch.Generator().manual_seed(2))
    assert float(M.grid_tv(M.grid_cells(x, 2.0, 12), masses)) < 0.01
    # a wrong distribution is far: every sample at the origin
    assert float(M.grid_tv(M.grid_cells(torch.zeros(100, 2), 2.0, 12), masses)) > 0.9
    assert M.grid_cells(torch.tensor([[5.0, 0.0], [float("nan"), 0.0]]), 2.0, 12).tolist() == [144, 144]


@pytest.mark.parametrize("method", ["dmd", "sim"])
def test_distill_moves_a_generator_onto_a_gaussian_teacher(method):
    torch.manual_seed(0)
    teacher = _gauss([1.5, -1.0], 0.1)
    g_den = toy_denoiser(2, 32, 2, seed=0)
    G = M.OneStep(g_den, g_den.net, 10.0)
    fake = toy_denoiser(2, 32, 2, seed=1)
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1.5, -1.0])
    with torch.no_grad():
        before = (G(z).mean(0) - target).norm()
    cfg = M.MatchingConfig(method=method, steps=20, critic_ratio=2, batch=64, lr=1e-2, warmup_critic=10)
    res = M.distill(G, teacher, fake, fake.net, cfg, generator_seed=torch.Generator().manual_seed(0),
                    latent_shape=(2,))
    assert res.steps == cfg.fit_steps == 50
    with torch.no_grad():
        after = (G(z).mean(0) - target).norm()
    assert after < 0.5 * before


def test_gan_head_and_generator_train():
    teacher = _gauss([0.0, 0.0])
    g_den, fake = toy_denoiser(2, 16, 2, seed=0), toy_denoiser(2, 16, 2, seed=1)
    G = M.OneStep(g_den, g_den.net, 10.0)
    head = M.ToyFeatures(fake)
    h0, g0 = copy.deepcopy(head.head.state_dict()), copy.deepcopy(g_den.net.state_dict())
    cfg = M.MatchingConfig(steps=1, critic_ratio=3, batch=16, gan_weight=0.5, warmup_critic=2)
    M.distill(G, teacher, fake, fake.net, cfg, generator_seed=torch.Generator().manual_seed(0), latent_shape=(2,),
              real_sample=lambda n, g: teacher.sample(n, g), gan_head=head)
    assert not torch.equal(head.head.weight, h0["weight"])
    assert any(not torch.equal(p, g0[k]) for k, p in g_den.net.state_dict().items())


def test_full_scale_path_on_a_config_built_conditional_unet():
    """The SD 1.5 cell's code path: DiscreteVPDenoiser teachers, copies as generator and fake score, prompt
    embeddings as conditioning."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from dmlab.denoisers import DiscreteVPDenoiser

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=4, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=4).eval().requires_grad_(False)
    sched = DDPMScheduler()
    real = DiscreteVPDenoiser.from_scheduler(unet, sched)
    g_unet, f_unet = copy.deepcopy(unet).requires_grad_(True), copy.deepcopy(unet).requires_grad_(True)
    G = M.OneStep(DiscreteVPDenoiser.from_scheduler(g_unet, sched), g_unet, 80.0)
    fake = DiscreteVPDenoiser.from_scheduler(f_unet, sched)
    emb = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    t0 = {k: v.clone() for k, v in unet.state_dict().items()}
    g0 = {k: v.clone() for k, v in g_unet.state_dict().items()}
    for method in ("sim",):  # SIM backpropagates through both UNets; DMD only calls them
        cfg = M.MatchingConfig(method=method, steps=1, critic_ratio=1, batch=2, lr=1e-3, sigma_max=80.0,
                               warmup_critic=1)
        res = M.distill(G, real, fake, f_unet, cfg, generator_seed=torch.Generator().manual_seed(0),
                        latent_shape=(4, 4, 4), cond_sample=lambda n, g: {"encoder_hidden_states": emb.expand(n, -1, -1)})
        assert res.steps == 2 and all(map(lambda v: v == v, res.losses))
    assert all(torch.equal(v, t0[k]) for k, v in unet.state_dict().items())  # the teacher is frozen
    assert any(not torch.equal(v, g0[k]) for k, v in g_unet.state_dict().items())


def test_mmd_finetune_loss_is_metrics_mmd_and_differentiable():
    g = torch.Generator().manual_seed(0)
    fx = torch.randn(40, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    fy = torch.randn(50, 5, generator=g, dtype=torch.float64) + 0.5
    loss = M.mmd_finetune_loss(fx, fy)
    z = torch.cat([fx.detach(), fy])
    d2 = torch.cdist(z, z).pow(2)
    med = d2[~torch.eye(90, dtype=torch.bool)].median().sqrt().item()
    ref = metrics.mmd(fx.detach(), fy, bandwidths=[0.5 * med, med, 2 * med])
    assert abs(float(loss.detach()) - ref) < 1e-9 and ref > 0
    (grad,) = torch.autograd.grad(loss, fx)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        M.MatchingConfig(method="gan")
    with pytest.raises(ValueError, match="sigma_min"):
        M.MatchingConfig(sigma_min=1.0, sigma_max=0.5)
    d = toy_denoiser(2, 8, 1)
    with pytest.raises(ValueError, match="real_sample"):
        M.distill(M.OneStep(d, d.net, 10.0), d, d, d.net, M.MatchingConfig(gan_weight=0.1),
                  generator_seed=torch.Generator(), latent_shape=(2,))
    with pytest.raises(TypeError, match="OneStep"):
        M.distill(d, d, d, d.net, M.MatchingConfig(), generator_seed=torch.Generator(), latent_shape=(2,))
    with pytest.raises(ValueError, match="points"):
        M.grid_cells(torch.zeros(3, 3), 1.0, 4)


def test_mmd_finetune_moves_few_step_samples_onto_the_data():
    from dmlab import schedules
    from dmlab.samplers import sample_euler

    target = _gauss([1.0, -0.5], 0.05)
    den = toy_denoiser(2, 32, 2, seed=0)
    sig = schedules.karras(2, 0.002, 10.0)
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(4))

    def err():
        with torch.no_grad():
            return (sample_euler(den, z * sig[0], sig).mean(0) - torch.tensor([1.0, -0.5])).norm()

    before = err()
    res = M.mmd_finetune(den, den.net, sample_euler, sig, M.MMDConfig(steps=25, batch=64, lr=1e-2),
                         generator_seed=torch.Generator().manual_seed(0), latent_shape=(2,),
                         real_sample=lambda n, g: target.sample(n, g))
    assert res.steps == 25 and err() < 0.5 * before
    assert M.differentiable(sample_euler) is not sample_euler  # the no_grad wrapper is removed
    with pytest.raises(ValueError, match="MMDConfig"):
        M.MMDConfig(steps=1)
