import math

import pytest
import torch

from dmlab import schedules as S


@pytest.mark.parametrize("grid", [lambda n: S.karras(n), lambda n: S.log_uniform(n), lambda n: S.vp_linear(n),
                                  lambda n: S.vp_cosine(n)])
@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_grids_are_schedules(grid, n):
    s = grid(n)
    assert s.shape == (n + 1,)
    S.check_schedule(s)  # strictly decreasing, ends in 0


def test_karras_endpoints_and_rho():
    s = S.karras(10, 0.01, 50.0, rho=7)
    assert s[0].item() == pytest.approx(50.0) and s[-2].item() == pytest.approx(0.01)
    # rho = 1 is uniform in sigma; large rho tends to uniform in log-sigma
    assert torch.allclose(S.karras(4, 1.0, 4.0, rho=1)[:-1], torch.tensor([4.0, 3, 2, 1], dtype=torch.float64))
    lu = S.log_uniform(5, 0.1, 10.0)
    assert torch.allclose(lu[:-1].log().diff(), torch.full((4,), -math.log(100) / 4, dtype=torch.float64))


def test_vp_linear_matches_formula():
    s = S.vp_linear(3, t_min=0.5, t_max=1.0)
    t = torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64)
    abar = torch.exp(-0.1 * t - 0.5 * 19.9 * t ** 2)
    assert torch.allclose(s[:-1], ((1 - abar) / abar).sqrt())


def test_conversions_roundtrip():
    sig = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    a, st = S.alpha_sigma_t(sig)
    assert torch.allclose(a ** 2 + st ** 2, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(S.sigma_from_alpha_sigma_t(a, st), sig)
    assert torch.allclose(S.sigma_from_lam(S.lam(sig)), sig)
    assert torch.allclose(S.snr(sig), 1 / sig ** 2)


def test_discrete_index_roundtrip_and_diffusers_betas():
    from diffusers import DDPMScheduler

    st = S.train_sigmas(1000, 0.00085, 0.012, "scaled_linear")
    sch = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref = ((1 - sch.alphas_cumprod) / sch.alphas_cumprod).sqrt().double()
    assert torch.allclose(st, ref, rtol=1e-6)
    idx = torch.tensor([0.0, 1.0, 10.0, 499.0, 999.0])
    assert torch.allclose(S.sigma_to_index(S.index_to_sigma(idx, st), st), idx.double(), atol=1e-9)
    t = S.sigma_to_index(torch.tensor(1e6), st)
    assert t.item() == 999.0  # clamped


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_timesteps_match_diffusers(spacing):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sch.set_timesteps(10)
    ours = S.ddpm_timesteps(10, 1000, spacing, steps_offset=1 if spacing == "leading" else 0)
    assert torch.equal(ours, sch.timesteps.long())


@pytest.mark.parametrize("bad, msg", [
    (torch.tensor([3.0, 2.0, 1.0]), "end in 0"),
    (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
    (torch.tensor([[1.0, 0.0]]), "1-D"),
    (torch.tensor([0.0]), "at least"),
    (torch.tensor([2.0, float("nan"), 0.0]), "finite"),
    (torch.tensor([1.0, -1.0, 0.0]), "non-negative"),
])
def test_bad_schedules_raise(bad, msg):
    with pytest.raises(ValueError, match=msg):
        S.check_schedule(bad)


def test_bad_grid_arguments_raise():
    with pytest.raises(ValueError, match="n_steps"):
        S.karras(0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        S.karras(5, 10.0, 1.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        S.betas_for(10, beta_schedule="nope")
    with pytest.raises(ValueError, match="spacing"):
        S.ddpm_timesteps(5, spacing="nope")
    with pytest.raises(TypeError, match="torch.Tensor"):
        S.check_schedule([1.0, 0.0])


def test_a_reversed_schedule_is_named_first():
    s = S.karras(5)
    for rev in (s.flip(0), s[:-1].flip(0)):
        with pytest.raises(ValueError, match=r"increases.*flip\(0\)"):
            S.check_schedule(rev)


@pytest.mark.parametrize("kw", [dict(sigma_min=1e-8), dict(sigma_max=1e5)])
def test_half_precision_grids_that_do_not_fit_are_refused(kw):
    with pytest.raises(ValueError, match="float16.*float32"):
        S.karras(10, dtype=torch.float16, **kw)
    with pytest.raises(ValueError, match="bfloat16"):
        S.log_uniform(2000, dtype=torch.bfloat16)


def test_half_precision_grids_that_fit_are_unchanged():
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for f in (S.karras, S.log_uniform):
            s = f(10, dtype=dt)
            assert torch.equal(s, f(10).to(dt)) and S.check_schedule(s) is s
    with pytest.raises(ValueError, match="float16 holds sigmas up to"):
        S.check_schedule(torch.tensor([1e5, 1.0, 0.0]).half())
    alpha, sigma_t = S.alpha_sigma_t(torch.tensor([1000.0, 1e4]).half())
    assert torch.isfinite(alpha).all() and (alpha > 0).all() and torch.isfinite(sigma_t).all()
