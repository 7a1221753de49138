"""dmlab solvers against diffusers' schedulers on a config-built UNet with the same noise, and the
diffusers adapter (``as_diffusers_scheduler``) inside a real diffusers pipeline.

The schedulers are driven on their own grid: dmlab gets the scheduler's sigmas. Where diffusers ends at its
``sigma_min`` (DEIS; ``final_sigmas_type="sigma_min"``) dmlab's state at that sigma (before its final jump to D) is
compared, rescaled to diffusers' VP latents. The UNet is random, so outputs use ``v_prediction`` to stay O(1)
(``epsilon`` outputs of a random net reach ~500 and make a 1e-4 tolerance meaningless); one epsilon case is kept.
"""
import warnings

import pytest
import torch

from dmlab import samplers, schedules
from dmlab.denoisers import DiscreteVPDenoiser

pytest.importorskip("diffusers")
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def diffusers_loop(sch, unet, noise, n):
    sch.set_timesteps(n)
    x = noise * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(sch.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def make(cls_name, **cfg):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls_name)(**cfg)


def ours(solver, sch, unet, noise, sigmas, stop=None, **kw):
    """dmlab on the scheduler's grid; ``stop`` = index whose state to return, rescaled to VP latents."""
    d = DiscreteVPDenoiser.from_scheduler(unet, sch)
    seen = {}
    out = solver(d, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, callback=lambda c: seen.update({c["i"]: c["x"]}), **kw)
    if stop is None:
        return out
    return seen[stop] * (1 + sigmas[stop] ** 2).rsqrt().to(out.dtype)


def zero_end(sch):
    s = sch.sigmas.double()
    return s if s[-1] == 0 else torch.cat([s, s.new_zeros(1)])


def test_ddim(unet, noise):
    sch = make("DDIMScheduler", set_alpha_to_one=True, clip_sample=False, prediction_type="v_prediction")
    ref = diffusers_loop(sch, unet, noise, 10)
    s = schedules.append_zero(schedules.sigmas_from_alphas_cumprod(sch.alphas_cumprod)[sch.timesteps])
    torch.testing.assert_close(ours(samplers.sample_ddim, sch, unet, noise, s), ref, **TOL)


@pytest.mark.parametrize("n", [8, 20])
@pytest.mark.parametrize("cfg, solver, kw", [
    ({}, samplers.sample_dpmpp_2m, {}),
    ({"solver_type": "heun"}, samplers.sample_dpmpp_2m, {"solver_type": "heun"}),
    ({"solver_order": 3}, samplers.sample_dpmpp_3m, {"variant": "diffusers"}),
    ({"solver_order": 1}, samplers.sample_ddim, {}),
], ids=["2m", "2m_heun", "3m", "1"])
def test_dpm_solver_multistep(unet, noise, n, cfg, solver, kw):
    sch = make("DPMSolverMultistepScheduler", prediction_type="v_prediction", **cfg)
    ref = diffusers_loop(sch, unet, noise, n)
    torch.testing.assert_close(ours(solver, sch, unet, noise, zero_end(sch), **kw), ref, **TOL)


def test_dpmpp_2m_epsilon_and_the_3m_variants_differ(unet, noise):
    sch = make("DPMSolverMultistepScheduler")  # diffusers' defaults: epsilon, 2M midpoint, lower_order_final
    ref = diffusers_loop(sch, unet, noise, 10)
    torch.testing.assert_close(ours(samplers.sample_dpmpp_2m, sch, unet, noise, zero_end(sch)), ref, **TOL)
    sch = make("DPMSolverMultistepScheduler", solver_order=3, prediction_type="v_prediction")
    ref = diffusers_loop(sch, unet, noise, 10)
    taylor = ours(samplers.sample_dpmpp_3m, sch, unet, noise, zero_end(sch), variant="taylor")
    assert (taylor - ref).abs().max() > 100 * 1e-4  # the test above could tell the two weights apart


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_solver_singlestep_data(unet, noise, order, solver_type):
    sch = make("DPMSolverSinglestepScheduler", solver_order=order, solver_type=solver_type, prediction_type="v_prediction")
    ref = diffusers_loop(sch, unet, noise, 11)
    out = ours(samplers.sample_dpm_solver, sch, unet, noise, zero_end(sch), order=order, prediction="data",
               solver_type=solver_type)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_singlestep_noise(unet, noise, order):
    # diffusers refuses final_sigmas_type="zero" for noise prediction: it ends at sigma_min; with 13 = 1 mod 2 = 1 mod 3
    # steps its last step is first order, as dmlab's step 12 of 14 (the 14th is the jump to 0)
    sch = make("DPMSolverSinglestepScheduler", solver_order=order, algorithm_type="dpmsolver",
               final_sigmas_type="sigma_min", prediction_type="v_prediction")
    ref = diffusers_loop(sch, unet, noise, 13)
    out = ours(samplers.sample_dpm_solver, sch, unet, noise, zero_end(sch), stop=13, order=order, prediction="noise")
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("n", [7, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector", [True, False])
def test_unipc_bh2(unet, noise, n, order, corrector):
    sch = make("UniPCMultistepScheduler", solver_order=order, prediction_type="v_prediction",
               disable_corrector=[] if corrector else list(range(n)))
    ref = diffusers_loop(sch, unet, noise, n)
    out = ours(samplers.sample_unipc, sch, unet, noise, zero_end(sch), order=order, corrector=corrector)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh1(unet, noise, order):
    # diffusers' bh1 with final_sigmas_type="zero" multiplies B(h) = -inf by 0 in its last step (NaN), so compare
    # at sigma_min; dmlab does not correct the state the final diffusers step returns (disable_corrector)
    n = 12
    sch = make("UniPCMultistepScheduler", solver_order=order, solver_type="bh1", final_sigmas_type="sigma_min",
               lower_order_final=False, prediction_type="v_prediction")
    ref = diffusers_loop(sch, unet, noise, n)
    out = ours(samplers.sample_unipc, sch, unet, noise, zero_end(sch), stop=n, order=order, solver_type="bh1",
               lower_order_final=False, disable_corrector=(n - 1,))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis(unet, noise, order):
    # diffusers' DEIS ends at sigma_min (no final denoising); lower_order_final off on both sides because dmlab has one
    # more step (the jump to 0) and would lower the order one step later
    n = 10
    sch = make("DEISMultistepScheduler", solver_order=order, lower_order_final=False, prediction_type="v_prediction")
    ref = diffusers_loop(sch, unet, noise, n)
    out = ours(samplers.sample_deis, sch, unet, noise, zero_end(sch), stop=n, order=order, variant="logrho",
               lower_order_final=False)
    torch.testing.assert_close(out, ref, **TOL)


def test_euler_and_heun(unet, noise):
    sch = make("EulerDiscreteScheduler", prediction_type="v_prediction")
    ref = diffusers_loop(sch, unet, noise, 10)  # linspace over 999 in 10 steps: integer timesteps
    d = DiscreteVPDenoiser.from_scheduler(unet, sch)
    torch.testing.assert_close(samplers.sample_euler(d, noise * sch.init_noise_sigma, sch.sigmas.double()), ref, **TOL)
    sch = make("HeunDiscreteScheduler", prediction_type="v_prediction", clip_sample=False)  # default clips x0 to [-1, 1]
    ref = diffusers_loop(sch, unet, noise, 10)
    d = DiscreteVPDenoiser.from_scheduler(unet, sch)  # Heun's default betas differ from Euler's
    s = torch.cat([sch.sigmas[::2].double(), torch.zeros(1, dtype=torch.float64)])  # diffusers repeats inner sigmas
    torch.testing.assert_close(samplers.sample_heun(d, noise * sch.init_noise_sigma, s), ref, **TOL)


# ------------------------------------------------------------------------------------------------ the adapter
@pytest.mark.parametrize("solver, options, fn", [
    ("dpmpp_3m", {}, samplers.sample_dpmpp_3m),
    ("unipc", {"order": 3}, samplers.sample_unipc),
    ("deis", {"variant": "tab"}, samplers.sample_deis),
    ("dpm_solver", {"order": 2, "prediction": "data"}, samplers.sample_dpm_solver),
    ("ddim", {}, samplers.sample_ddim),
])
def test_adapter_in_a_pipeline_matches_the_function(unet, solver, options, fn, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    from dmlab.samplers.diffusers_compat import as_diffusers_scheduler

    base = DDPMScheduler(prediction_type="v_prediction")
    sch = as_diffusers_scheduler(solver, base, schedule="karras", **options)
    pipe = DDPMPipeline(unet=unet, scheduler=sch)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=9, generator=torch.Generator().manual_seed(3), output_type="np").images
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    d = DiscreteVPDenoiser.from_scheduler(unet, base)
    s = sch.dmlab_sigmas(9)
    assert s[0] == pytest.approx(float(d.sigmas_train[-1])) and s[-2] == pytest.approx(float(d.sigmas_train[0]))
    x = fn(d, noise * (1 + s[0] ** 2).sqrt(), s, **options)
    expect = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(torch.from_numpy(img), torch.from_numpy(expect), rtol=1e-5, atol=1e-5)
    # a plain config: it saves, reloads and samples the same
    sch.save_config(tmp_path)
    again = type(sch).from_config(type(sch).load_config(tmp_path))
    assert again.config.solver == solver and dict(again.config.options) == options


def test_adapter_validates(unet):
    from dmlab.samplers.diffusers_compat import as_diffusers_scheduler

    with pytest.raises(ValueError, match="unknown solver"):
        as_diffusers_scheduler("dpm++")
    with pytest.raises(ValueError, match="unknown variant"):
        as_diffusers_scheduler("dpmpp_3m", variant="half")
    with pytest.raises(ValueError, match="fixes"):
        as_diffusers_scheduler("dpmpp_2m", order=3)
    with pytest.raises(ValueError, match="unknown schedule"):
        as_diffusers_scheduler("ddim", schedule="cosine")
    sch = as_diffusers_scheduler("unipc", order=3)
    with pytest.raises(ValueError, match="set_timesteps"):
        sch.step(torch.zeros(1, 1, 8, 8), 999, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 3 steps"):
        sch.set_timesteps(2)


@pytest.mark.parametrize("cls_name, cfg, solver, kw", [
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, samplers.sample_dpmpp_3m, {"variant": "diffusers"}),
    ("UniPCMultistepScheduler", {"solver_order": 3}, samplers.sample_unipc, {"order": 3}),
    ("DEISMultistepScheduler", {"solver_order": 3}, samplers.sample_deis, {"order": 3}),
], ids=["dpmpp_3m", "unipc_3", "deis_3"])
def test_sigma_min_rule_on_an_exact_denoiser(smooth_gmm, cls_name, cfg, solver, kw):
    """lower_order_final="sigma_min" reproduces a diffusers scheduler that ends at sigma_min (N < 15) driven by an
    exact denoiser, compared as states at sigma_min (dmlab.samplers.compare)."""
    from dmlab.samplers.compare import diffusers_state_at_end, make_scheduler, state_at_end

    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, s0, s1 = diffusers_state_at_end(cls_name, cfg, smooth_gmm, noise, 10)
    sch = make_scheduler(cls_name, **cfg, final_sigmas_type="sigma_min") if cls_name != "DEISMultistepScheduler" \
        else make_scheduler(cls_name, **cfg)
    sch.set_timesteps(10)
    s = torch.cat([sch.sigmas.double(), torch.zeros(1, dtype=torch.float64)])
    assert float(s[0]) == pytest.approx(s0) and float(s[-2]) == pytest.approx(s1)
    ours = state_at_end(solver, smooth_gmm, noise * (1 + s[0] ** 2).sqrt(), s, lower_order_final="sigma_min", **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    other = state_at_end(solver, smooth_gmm, noise * (1 + s[0] ** 2).sqrt(), s, **kw)
    assert (other - ref).abs().max() > 1e-3  # the default rule lowers a different step


# ------------------------------------------------------------------------------- the adapter started mid-schedule
def _img2img(sch, unet, x0, noise, n, strength, sigmas=None, end=None):
    """What diffusers' img2img pipelines do: ``set_begin_index(t_start)``, noise the image to ``timesteps[t_start]``
    and step to the end (``end``: the number of steps to take, default all)."""
    if sigmas is None:
        sch.set_timesteps(n)
    else:
        sch.set_timesteps(sigmas=sigmas)
    t_start = int(max(n - min(n * strength, n), 0))
    sch.set_begin_index(t_start)
    x = sch.add_noise(x0, noise, sch.timesteps[t_start:t_start + 1])
    with torch.no_grad():
        for t in sch.timesteps[t_start:end]:
            x = sch.step(unet(sch.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "dpm_solver_multistep", "dpm_solver", "unipc", "deis",
                                    "ddim", "euler"])
@pytest.mark.parametrize("k", [7, 8, 9])
def test_adapter_begin_index_with_fewer_steps_than_the_order(solver, k):
    """The issue's reproducer: 10 steps, ``set_begin_index(k)`` with 1-3 left; the order is lowered, not refused."""
    from dmlab.samplers.diffusers_compat import as_diffusers_scheduler

    sch = as_diffusers_scheduler(solver)
    sch.set_timesteps(10)
    sch.set_begin_index(k)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    for t in sch.timesteps[k:]:
        x = sch.step(0.1 * x, t, x).prev_sample
    assert torch.isfinite(x).all() and sch.step_index == 10
    assert all(p <= i - k + 1 for i, p in enumerate(sch._stepper.plan.orders) if i >= k)
    with pytest.raises(ValueError, match="begin index"):
        sch.set_timesteps(10)
        sch.set_begin_index(10)
        sch.step(x, sch.timesteps[-1], x)


@pytest.mark.parametrize("solver, options, cls_name, cfg", [
    ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {}),
    ("dpm_solver_multistep", {"solver_type": "heun"}, "DPMSolverMultistepScheduler", {"solver_type": "heun"}),
    ("dpmpp_3m", {"variant": "diffusers"}, "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("dpm_solver", {"prediction": "data"}, "DPMSolverSinglestepScheduler", {"solver_order": 3}),
    ("unipc", {}, "UniPCMultistepScheduler", {}),
    ("deis", {}, "DEISMultistepScheduler", {"solver_order": 3}),
], ids=["dpmpp_2m", "dpm_solver_multistep_heun", "dpmpp_3m", "dpm_solver_data", "unipc", "deis"])
@pytest.mark.parametrize("strength", [0.05, 0.1, 0.15, 0.5])
def test_adapter_img2img_matches_diffusers(unet, solver, options, cls_name, cfg, strength):
    """An img2img loop (20 steps) with the adapter equals the same loop with diffusers' scheduler of the same
    algorithm on the same grid: the same order lowering after ``set_begin_index`` (1e-5). diffusers' DEIS stops at
    the smallest training sigma: the adapter, which goes on to 0, is compared there."""
    from dmlab.samplers.diffusers_compat import as_diffusers_scheduler

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    ref_sch = make(cls_name, prediction_type="v_prediction", **cfg)
    ref = _img2img(ref_sch, unet, x0, noise, 20, strength)
    ours_sch = as_diffusers_scheduler(solver, ref_sch, **options)
    out = _img2img(ours_sch, unet, x0, noise, 20, strength, sigmas=zero_end(ref_sch), end=len(ref_sch.timesteps))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- the adapter keeps the noise schedule
_SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("cls_name", ["DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_adapter_keeps_zero_terminal_snr_and_spacing(cls_name):
    """``rescale_betas_zero_snr``, ``timestep_spacing`` and ``steps_offset`` of the source scheduler are kept by
    ``as_diffusers_scheduler`` and by ``DmlabScheduler.from_config`` (alphas_cumprod equal to float32 rounding; the
    zero last one set to 2**-24 as diffusers' DPM-Solver does)."""
    from dmlab.samplers.diffusers_compat import as_diffusers_scheduler

    src = make(cls_name, rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=1,
               prediction_type="v_prediction", **_SD_BETAS)
    ref = make("DPMSolverMultistepScheduler", rescale_betas_zero_snr=True, **_SD_BETAS).alphas_cumprod
    plain = make("DPMSolverMultistepScheduler", **_SD_BETAS).alphas_cumprod
    ours = as_diffusers_scheduler("dpmpp_2m", src)
    again = type(ours).from_config(src.config)
    for s in (ours, again):
        assert (s.alphas_cumprod - ref).abs().max() < 1e-6 < (s.alphas_cumprod - plain).abs().max()
        assert s.config.rescale_betas_zero_snr and s.config.prediction_type == "v_prediction"
        assert (s.config.timestep_spacing, s.config.steps_offset) == ("trailing", 1)
    s = as_diffusers_scheduler("ddim", src, schedule="discrete", timestep_spacing="leading")
    assert s.config.timestep_spacing == "leading"  # an explicit argument wins
    s.set_timesteps(10)
    assert torch.isfinite(s.sigmas).all() and float(s.sigmas[0]) < 1e4


def test_adapter_keeps_trained_betas():
    from dmlab.samplers.diffusers_compat import as_diffusers_scheduler

    betas = torch.linspace(1e-4, 0.03, 500).tolist()
    src = make("DDPMScheduler", trained_betas=betas, num_train_timesteps=500)
    for s in (as_diffusers_scheduler("unipc", src), as_diffusers_scheduler("unipc", src.config)):
        torch.testing.assert_close(s.alphas_cumprod, src.alphas_cumprod, rtol=0, atol=1e-6)
    d = DiscreteVPDenoiser.from_scheduler(lambda x, t: x, dict(src.config))
    want = schedules.sigmas_from_alphas_cumprod(src.alphas_cumprod)
    torch.testing.assert_close(d.sigmas_train, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls_name, cfg, match", [
    ("FlowMatchEulerDiscreteScheduler", {}, "flow-matching"),
    ("EDMEulerScheduler", {}, "EDM"),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, "continuous"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, "flow-matching"),
])
def test_schedules_that_are_not_ddpm_are_refused(cls_name, cfg, match):
    """A scheduler whose noise schedule the adapter cannot keep is refused, never read as the default betas."""
    from dmlab.samplers.diffusers_compat import _scheduler_class, as_diffusers_scheduler

    src = make(cls_name, **cfg)
    for build in (lambda: as_diffusers_scheduler("dpmpp_2m", src), lambda: _scheduler_class().from_config(src.config),
                  lambda: DiscreteVPDenoiser.from_scheduler(lambda x, t: x, src),
                  lambda: DiscreteVPDenoiser.from_scheduler(lambda x, t: x, dict(src.config))):
        with pytest.raises(ValueError, match=match):
            build()


def test_zero_snr_from_a_ddim_config_and_instance():
    """DDIM keeps alpha_bar_T = 0; from_scheduler clamps it (instance) or rebuilds it (config dict) the same way."""
    src = make("DDIMScheduler", rescale_betas_zero_snr=True, **_SD_BETAS)
    a = DiscreteVPDenoiser.from_scheduler(lambda x, t: x, src)
    b = DiscreteVPDenoiser.from_scheduler(lambda x, t: x, dict(src.config))
    assert a.sigma_max == pytest.approx(b.sigma_max, rel=1e-4) and a.sigma_max == pytest.approx(4096, rel=1e-3)
