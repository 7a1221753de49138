"""dmlab.distill.consistency: boundary conditions, exact teacher steps, training loops that learn, full-scale path."""
import pytest
import torch

from dmlab import exact, schedules
from dmlab.distill import consistency as cm
from dmlab.zoo.toy import toy_denoiser
from tiny_models import tiny_sd_unet


def _gauss():
    return exact.GaussianDenoiser(torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]))


def test_consistency_fn_boundary_and_one_step_limit():
    st = toy_denoiser(2, 16, 3)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(cm.consistency_fn(st, x, 0.002), x)  # f(x, sigma_min) = x for any network
        # f is one Euler step of the student's denoiser to sigma_min
        s = torch.full((5,), 3.0)
        ref = x + (0.002 - 3.0) * (x - st(x, s)) / 3.0
        torch.testing.assert_close(cm.consistency_fn(st, x, s), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sigma_min"):
        cm.consistency_fn(st, x, 0.001)


def test_teacher_step_ode_is_ddim_and_both_steps_are_consistent():
    g = _gauss()
    gen = torch.Generator().manual_seed(2)
    n = 200_000
    x0 = g.sample(n, gen)
    hi, lo = torch.full((n,), 2.0, dtype=torch.float64), torch.full((n,), 0.7, dtype=torch.float64)
    x_hi = x0 + 2.0 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    ode = cm.teacher_step(g, x_hi[:4], hi[:4], lo[:4])
    d = g(x_hi[:4], hi[:4])
    torch.testing.assert_close(ode, x_hi[:4] + (0.7 - 2.0) * (x_hi[:4] - d) / 2.0)  # one Euler (= DDIM) step
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    out = cm.teacher_step(g, x_hi, hi, lo, eta=1.0, z=z)
    assert (out.mean(0) - g.means[0]).abs().max() < 0.02  # the mean is kept at any step size
    # a first-order step: over a short step both land on the noised law N(mu, C + 1.9^2 I) to MC precision
    lo2 = torch.full((n,), 1.9, dtype=torch.float64)
    cov_true = g.covs[0] + 1.9 ** 2 * torch.eye(2, dtype=torch.float64)
    for eta in (0.0, 1.0):
        out = cm.teacher_step(g, x_hi, hi, lo2, eta=eta, z=z)
        assert (torch.cov(out.T) - cov_true).abs().max() < 0.06
    with pytest.raises(ValueError, match="noise z"):
        cm.teacher_step(g, x_hi[:4], hi[:4], lo[:4], eta=1.0)


def test_sample_consistency_one_step_is_the_student_and_multistep_renoises():
    st = toy_denoiser(2, 16, 3)
    x = 20 * torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one = cm.sample_consistency(st, x, torch.tensor([20.0, 0.0]))
        torch.testing.assert_close(one, cm.consistency_fn(st, x, torch.full((6,), 20.0)))
    a = cm.sample_consistency(st, x, torch.tensor([20.0, 1.0, 0.0]), generator=torch.Generator().manual_seed(4))
    b = cm.sample_consistency(st, x, torch.tensor([20.0, 1.0, 0.0]), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="generator"):
        cm.sample_consistency(st, x, torch.tensor([20.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="end with 0"):
        cm.sample_consistency(st, x, torch.tensor([20.0, 1.0]))


def test_distill_pairs_learns_an_affine_coupling():
    """A Gaussian teacher's ODE coupling is affine: a one-step student fits it far better than its init."""
    g = _gauss()
    from dmlab.samplers.rectify import AffineCouplingDenoiser

    aff = AffineCouplingDenoiser.gaussian(g.means[0], g.covs[0], 20.0)
    e = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0 = aff.A @ e.T
    x0 = (x0.T + aff.m).float()
    st = toy_denoiser(2, 32, 3)
    before = (cm.sample_consistency(st, 20 * e.float(), torch.tensor([20.0, 0.0])) - x0).norm(dim=1).mean()
    res = cm.distill_pairs(st, e, x0, sigma_max=20.0, steps=150, batch=128, generator=torch.Generator().manual_seed(6))
    after = (cm.sample_consistency(st, 20 * e.float(), torch.tensor([20.0, 0.0])) - x0).norm(dim=1).mean()
    assert res.complete and after < 0.1 * before and after < 0.15


@pytest.mark.parametrize("kw", [dict(solver="ode"), dict(solver="sde", eta=0.5, adversarial=0.2)])
def test_consistency_distill_reduces_one_step_error_on_a_gaussian(kw):
    g = _gauss()
    sig = schedules.karras(10, 0.002, 20.0)[:-1]
    e = torch.randn(1000, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    from dmlab.samplers.rectify import AffineCouplingDenoiser

    aff = AffineCouplingDenoiser.gaussian(g.means[0], g.covs[0], 20.0)
    target = (e @ aff.A.T + aff.m).float()  # the exact ODE end points of these noises
    st = toy_denoiser(2, 32, 3)
    if kw.get("adversarial"):
        kw = dict(kw, discriminator=cm.Discriminator(2, 16))
    one = torch.tensor([20.0, 0.0])
    before = (cm.sample_consistency(st, 20 * e.float(), one) - target).norm(dim=1).mean()
    res = cm.consistency_distill(st, g, lambda gen, n: g.sample(n, gen).float(), sig, steps=200, batch=64,
                                 generator=torch.Generator().manual_seed(8), **kw)
    after = (cm.sample_consistency(st, 20 * e.float(), one) - target).norm(dim=1).mean()
    # the stochastic target averages over trajectories (a bias the adversarial term has to undo): a looser bound
    assert res.complete and after < (0.3 if kw["solver"] == "ode" else 0.5) * before
    with pytest.raises(ValueError, match="sigma_min > 0"):
        cm.consistency_distill(st, g, lambda gen, n: g.sample(n, gen), schedules.karras(4, 0.002, 20.0), steps=1,
                               generator=torch.Generator())
    with pytest.raises(ValueError, match="discriminator"):
        cm.consistency_distill(st, g, lambda gen, n: g.sample(n, gen), sig, adversarial=0.1, steps=1,
                               generator=torch.Generator())


def test_boot_boundary_and_data_free_learning():
    g = _gauss()
    torch.manual_seed(0)
    bs = cm.BootStudent(2, 20.0, 32)
    e = torch.randn(1000, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(bs(e, torch.full((1000,), 20.0)), 20.0 * e)  # g(eps, sigma_max) = sigma_max eps
    from dmlab.samplers.rectify import AffineCouplingDenoiser

    aff = AffineCouplingDenoiser.gaussian(g.means[0], g.covs[0], 20.0)
    target = (e.double() @ aff.A.T + aff.m).float()
    before = (bs.sample(e) - target).norm(dim=1).mean()
    data_calls = []

    class Teacher:  # counts that only the denoiser is used: no data sample is drawn
        def __call__(self, x, s):
            data_calls.append(x.shape[0])
            return g(x, s)

    res = cm.boot_distill(bs, Teacher(), schedules.karras(10, 0.002, 20.0), shape=(2,), steps=200, batch=64,
                          generator=torch.Generator().manual_seed(10))
    after = (bs.sample(e) - target).norm(dim=1).mean()
    assert res.complete and len(data_calls) == 200 and after < 0.3 * before
    with pytest.raises(ValueError, match="end at 0"):
        cm.boot_distill(bs, g, schedules.karras(10, 0.002, 20.0)[:-1], shape=(2,), steps=1,
                        generator=torch.Generator())


def test_bad_inputs():
    st = toy_denoiser(2, 8, 1)
    with pytest.raises(TypeError, match="generator"):
        cm.distill_pairs(st, torch.zeros(4, 2), torch.zeros(4, 2), sigma_max=1.0, generator=None)
    with pytest.raises(ValueError, match="same shape"):
        cm.distill_pairs(st, torch.zeros(4, 2), torch.zeros(3, 2), sigma_max=1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="unknown solver"):
        cm.consistency_distill(st, _gauss(), lambda g, n: None, schedules.karras(4, 0.002, 20.0)[:-1],
                               solver="heun", generator=torch.Generator())
    with pytest.raises(TypeError, match="nn.Module"):
        cm.distill_pairs(lambda x, s: x, torch.zeros(4, 2), torch.zeros(4, 2), sigma_max=1.0,
                         generator=torch.Generator())


def test_full_scale_path_on_a_config_built_unet():
    """The full-scale cell's path: a diffusers UNet student behind DiscreteVPDenoiser, distilled from a teacher
    UNet with class conditioning through consistency_distill (module= the UNet), SCott's SDE step + critic."""
    from diffusers import DDPMScheduler, UNet2DModel

    from dmlab.denoisers import DiscreteVPDenoiser

    def unet(seed):
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                           num_class_embeds=11, norm_num_groups=4)

    sched = DDPMScheduler(num_train_timesteps=100)
    teacher = DiscreteVPDenoiser.from_scheduler(unet(0).eval(), sched)
    net = unet(1)
    student = DiscreteVPDenoiser.from_scheduler(net, sched)
    before = [p.detach().clone() for p in net.parameters()]
    sig = schedules.karras(5, teacher.sigma_min, teacher.sigma_max)[:-1]

    def data(gen, n):
        return torch.randn(n, 1, 8, 8, generator=gen), {"class_labels": torch.randint(10, (n,), generator=gen)}

    res = cm.consistency_distill(student, teacher, data, sig, solver="sde", eta=0.5, adversarial=0.1,
                                 discriminator=cm.Discriminator(64, 8), module=net, steps=2, batch=4,
                                 sigma_min=teacher.sigma_min, generator=torch.Generator().manual_seed(0))
    assert res.complete and all(torch.isfinite(torch.tensor(res.losses)))
    assert any((p - b).abs().max() > 0 for p, b in zip(net.parameters(), before))
    x = teacher.sigma_max * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = cm.sample_consistency(student, x, torch.tensor([teacher.sigma_max, 1.0, 0.0]),
                                cond={"class_labels": torch.tensor([3, 7])}, generator=torch.Generator(),
                                sigma_min=teacher.sigma_min)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_ring_students_recipe_is_deterministic_and_the_zoo_entry_loads():
    from dmlab import zoo

    cfg = dict(zoo.get_recipe("ring_students").model, seeds=[0], steps=3, batch=16, n_pairs=32)
    a, log = cm.train_ring_students(cfg)
    b, _ = cm.train_ring_students(cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # a run is a function of its seed
    assert set(log["final_loss"]["0"]) == set(cm.RING_METHODS) - {"rf2"}
    students = zoo.load("ring_students")
    assert {m: len(v) for m, v in students.items()} == {m: 3 for m in cm.RING_METHODS}
    e = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(students["boot"][1](e, torch.full((8,), 20.0)), 20.0 * e)
    with pytest.raises(ValueError, match="no weights"):
        cm.load_ring_students({k: v for k, v in a.items() if not k.startswith("boot")}, cfg)
    with pytest.raises(ValueError, match="model dict"):
        cm.train_ring_students({"seeds": [0]})


def test_full_scale_cell_path_with_a_guided_text_teacher():
    """The chapter's SD cell on a config-built text-conditional UNet: CFG teacher from ``sd_guided``, a copy of the UNet
    as student with only its attention projections trainable, latents + per-row text embeddings as data."""
    import copy
    import math
    import types

    from diffusers import DDPMScheduler

    from dmlab.denoisers import DiscreteVPDenoiser
    from dmlab.samplers.fullscale import sd_guided

    unet = tiny_sd_unet()
    gen = torch.Generator().manual_seed(3)
    emb = {p: torch.randn(1, 3, 8, generator=gen) for p in ("", "a lighthouse")}
    pipe = types.SimpleNamespace(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100),
                                 encode_prompt=lambda prompts, device, n, cfg, neg: (
                                     torch.cat([emb[p] for p in prompts]), torch.cat([emb[p] for p in neg])))
    D, cond, smin, smax, shape = sd_guided(pipe, ["a lighthouse"] * 2, scale=3.0)
    lat = torch.randn(shape, generator=gen)  # stands in for the teacher's own samples
    student_unet = copy.deepcopy(unet).train()
    for name, p in student_unet.named_parameters():
        p.requires_grad_(any(k in name for k in ("to_q", "to_k", "to_v", "to_out")))
    frozen = {n: p.detach().clone() for n, p in student_unet.named_parameters() if not p.requires_grad}
    student = DiscreteVPDenoiser.from_scheduler(student_unet, pipe.scheduler)
    e = cond["encoder_hidden_states"]

    def latents(g, n):
        i = torch.randint(len(lat), (n,), generator=g)
        return lat[i], {"encoder_hidden_states": e[i]}

    critic = cm.Discriminator(math.prod(shape[1:]), 8)
    res = cm.consistency_distill(student, D, latents, schedules.karras(6, smin, smax)[:-1], solver="sde", eta=0.5,
                                 adversarial=0.3, discriminator=critic, module=student_unet, steps=2, batch=2,
                                 lr=1e-3, sigma_min=smin, generator=torch.Generator().manual_seed(0))
    assert res.complete and all(torch.isfinite(torch.tensor(res.losses)))
    named = dict(student_unet.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in frozen.items())  # only the attention projections moved
    assert any(not torch.equal(named[n], p) for n, p in unet.named_parameters() if "to_q" in n)
    two = cm.sample_consistency(student, smax * torch.randn(shape, generator=gen), torch.tensor([smax, 1.0, 0.0]),
                                cond=cond, generator=gen, sigma_min=smin)
    assert two.shape == shape and torch.isfinite(two).all()
