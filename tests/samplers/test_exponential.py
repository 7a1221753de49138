"""Exponential integrators, UniPC and DEIS: convergence orders against the exact ODE, where the model is evaluated,
identities between solvers, and bad input."""
import pytest
import torch

from dmlab import samplers, schedules
from dmlab.denoisers import RecordingDenoiser
from dmlab.exact import reference_ode
from dmlab.samplers import deis, exponential, unipc
from dmlab.samplers import fit_order

NS = [97, 193, 385, 769]  # = 1 mod 3 and odd: every singlestep group ends on sigma_min

# (id, solver, options, declared order): the option variants. The registry's own entries (DDIM, DPM++2M, 3M, the
# singlestep DPM-Solver-3, UniPC-2/3, DEIS-3 ...) are measured by tests/samplers/test_orders.py from their records.
# UniPC-p with its corrector is of order p + 1.
CASES = [
    ("dpmpp_2m_heun", samplers.sample_dpmpp_2m, {"solver_type": "heun"}, 2),
    ("dpm_multistep_noise_2", samplers.sample_dpm_solver_multistep, {"prediction": "noise"}, 2),
    ("dpm_multistep_noise_3", samplers.sample_dpm_solver_multistep, {"prediction": "noise", "order": 3}, 3),
    ("dpm_solver_1", samplers.sample_dpm_solver, {"order": 1}, 1),
    ("dpm_solver_2", samplers.sample_dpm_solver, {"order": 2}, 2),
    ("dpm_solver_3_heun", samplers.sample_dpm_solver, {"order": 3, "solver_type": "heun"}, 3),
    ("dpm_solver_pp_2s", samplers.sample_dpm_solver, {"order": 2, "prediction": "data"}, 2),
    ("unipc_1", samplers.sample_unipc, {"order": 1}, 2),
    ("unip_2", samplers.sample_unipc, {"order": 2, "corrector": False}, 2),
    ("unipc_2_bh1", samplers.sample_unipc, {"order": 2, "solver_type": "bh1"}, 3),
    ("unipc_2_noise", samplers.sample_unipc, {"order": 2, "prediction": "noise"}, 3),
    ("unip_3", samplers.sample_unipc, {"order": 3, "corrector": False}, 3),
] + [(f"deis_{v}_{o}", samplers.sample_deis, {"variant": v, "order": o}, o) for v in deis.VARIANTS for o in (1, 2)]


@pytest.fixture(scope="module")
def gmm(smooth_gmm_module):
    return smooth_gmm_module  # the smooth mixture of tests/conftest.py


@pytest.fixture(scope="module")
def start_and_refs(gmm):
    x = 20.0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    refs = {n: reference_ode(gmm, x, schedules.karras(n, 0.002, 20.0)[:-1]) for n in NS}
    return x, refs


def at_sigma_min(solver, gmm, x, n, **kw):
    """The state at the last positive sigma (before the final jump to D), where the reference is compared."""
    seen = {}
    solver(gmm, x, schedules.karras(n, 0.002, 20.0), callback=lambda d: seen.update({d["i"]: d["x"]}), **kw)
    return seen[n - 1]


@pytest.mark.parametrize("name, solver, kw, order", CASES, ids=[c[0] for c in CASES])
def test_convergence_order(name, solver, kw, order, gmm, start_and_refs):
    x, refs = start_and_refs
    errs = [(at_sigma_min(solver, gmm, x, n, **kw) - refs[n]).norm().item() for n in NS]
    p = fit_order(NS, errs)
    assert abs(p - order) < 0.25, (name, p, errs)


def test_3m_weights_differ_in_order(gmm, start_and_refs):
    """The doubled D2 weight is what makes 3M third order: the library weight stays second order (module doc)."""
    x, refs = start_and_refs
    e = {v: [(at_sigma_min(samplers.sample_dpmpp_3m, gmm, x, n, variant=v) - refs[n]).norm().item() for n in NS]
         for v in exponential.VARIANTS_3M}
    assert fit_order(NS, e["taylor"]) - fit_order(NS, e["diffusers"]) > 0.7
    assert e["taylor"][-1] < e["diffusers"][-1] / 5


@pytest.mark.parametrize("name, solver, kw, order", CASES, ids=[c[0] for c in CASES])
def test_where_and_how_often_the_model_is_called(name, solver, kw, order, gmm):
    s = schedules.karras(9, 0.01, 10.0)
    rec = RecordingDenoiser(gmm)
    solver(rec, 10 * torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64), s, **kw)
    assert rec.nfe == 9  # one NFE per step, the corrector included
    called = torch.stack([c[0] for c in rec.sigmas])
    assert (called > 0).all()  # never at sigma 0
    torch.testing.assert_close(called, s[:-1], rtol=0, atol=0)  # each grid sigma once, in order


def test_first_order_members_are_one_method(gmm):
    """DDIM = Euler in sigma = DPM-Solver-1 = noise-prediction DPM-Solver-1 = DEIS-1 (any variant) = UniP-1."""
    x = 15 * torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = schedules.karras(12, 0.002, 15.0)
    ref = samplers.sample_euler(gmm, x, s)
    for out in (samplers.sample_ddim(gmm, x, s), samplers.sample_dpm_solver(gmm, x, s, order=1),
                samplers.sample_dpm_solver_multistep(gmm, x, s, order=1, prediction="noise"),
                samplers.sample_deis(gmm, x, s, order=1, variant="tab"),
                samplers.sample_unipc(gmm, x, s, order=1, corrector=False)):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_identities_between_families(gmm):
    """DEIS-logrho = multistep DPM-Solver (noise, Taylor weights); UniP-2 (bh2) = DPM-Solver++(2M);
    UniP-3 (bh2) = DPM-Solver++(3M) with the doubled (Taylor) D2 weight - not with the library weight."""
    x = 15 * torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = schedules.karras(12, 0.002, 15.0)
    for o in (2, 3):
        torch.testing.assert_close(samplers.sample_deis(gmm, x, s, order=o, variant="logrho"),
                                   samplers.sample_dpm_solver_multistep(gmm, x, s, order=o, prediction="noise",
                                                                        solver_type="heun"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(samplers.sample_unipc(gmm, x, s, order=2, corrector=False),
                               samplers.sample_dpmpp_2m(gmm, x, s), rtol=1e-12, atol=1e-12)
    unip3 = samplers.sample_unipc(gmm, x, s, order=3, corrector=False, lower_order_final=False)
    torch.testing.assert_close(unip3, samplers.sample_dpmpp_3m(gmm, x, s, variant="taylor", lower_order_final=False),
                               rtol=1e-12, atol=1e-12)
    lib = samplers.sample_dpmpp_3m(gmm, x, s, variant="diffusers", lower_order_final=False)
    assert (unip3 - lib).abs().max() > 1e-4


def test_step_orders_follow_diffusers_rules():
    assert exponential.multistep_orders(10, 3) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert exponential.multistep_orders(20, 3)[-3:] == [3, 3, 1]
    assert exponential.singlestep_orders(10, 3) == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    assert exponential.singlestep_orders(9, 3) == [1, 2, 3, 1, 2, 3, 1, 2, 1]
    assert exponential.singlestep_orders(8, 2) == [1, 2, 1, 2, 1, 2, 1, 1]
    # "sigma_min": diffusers' final_sigmas_type="sigma_min" rule applied to the last positive sigma
    assert exponential.multistep_orders(11, 3, "sigma_min") == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1, 1]
    assert exponential.multistep_orders(20, 3, "sigma_min")[-3:] == [3, 3, 1]
    assert unipc.unipc_orders(6, 3, "sigma_min") == [1, 2, 3, 2, 1, 1]
    with pytest.raises(ValueError, match="lower_order_final must be"):
        exponential.check_lof("zero")
    plan = unipc.plan_unipc(schedules.karras(6).tolist(), order=3)
    assert plan.orders == (1, 2, 3, 3, 2, 1) and plan.correct[0] is None and plan.correct[5] is not None


@pytest.mark.parametrize("name, solver, kw, order", CASES, ids=[c[0] for c in CASES])
def test_keeps_dtype_and_passes_cond(name, solver, kw, order):
    seen = {}

    def d(x, sigma, **cond):
        seen.update(cond)
        return 0.5 * x / (1 + sigma[:, None, None, None] ** 2)

    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    out = solver(d, x, schedules.karras(5), cond={"class_labels": torch.tensor([1, 2])}, **kw)
    assert out.dtype == torch.float32 and out.shape == x.shape and "class_labels" in seen
    assert torch.isfinite(out).all()
    assert solver(d, x.double(), schedules.karras(5), **kw).dtype == torch.float64


def test_bad_input(smooth_gmm):
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match="at least 3 steps"):
        samplers.sample_dpmpp_3m(smooth_gmm, x, schedules.karras(2))
    with pytest.raises(ValueError, match="at least 3 steps"):
        samplers.sample_dpm_solver(smooth_gmm, x, schedules.karras(2), order=3)
    with pytest.raises(ValueError, match="at least 2 steps"):
        samplers.sample_unipc(smooth_gmm, x, schedules.karras(1), order=2)
    with pytest.raises(ValueError, match="at least 3 steps"):
        samplers.sample_deis(smooth_gmm, x, schedules.karras(2), order=3)
    with pytest.raises(ValueError, match="strictly decreasing"):
        samplers.sample_dpmpp_2m(smooth_gmm, x, torch.tensor([1.0, 2.0, 3.0, 0.0]))
    with pytest.raises(ValueError, match="end in 0"):
        samplers.sample_unipc(smooth_gmm, x, torch.tensor([3.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="unknown variant"):
        samplers.sample_dpmpp_3m(smooth_gmm, x, schedules.karras(4), variant="k-diffusion")
    with pytest.raises(ValueError, match="unknown variant"):
        samplers.sample_deis(smooth_gmm, x, schedules.karras(4), variant="rhoAB")
    with pytest.raises(ValueError, match="unknown solver_type"):
        samplers.sample_unipc(smooth_gmm, x, schedules.karras(4), solver_type="bh3")
    with pytest.raises(ValueError, match="unknown prediction"):
        samplers.sample_dpm_solver(smooth_gmm, x, schedules.karras(4), prediction="v")
    with pytest.raises(ValueError, match="order must be one of"):
        samplers.sample_dpm_solver(smooth_gmm, x, schedules.karras(4), order=4)
    with pytest.raises(ValueError, match="eta must be"):
        samplers.sample_ddim(smooth_gmm, x, schedules.karras(4), eta=-0.1)
    with pytest.raises(TypeError, match="time must be callable"):
        samplers.sample_deis(smooth_gmm, x, schedules.karras(4), variant="tab", time=3.0)


def test_ddim_eta_hands_over_to_the_ancestral_sampler(smooth_gmm):
    x = 5 * torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = schedules.karras(6, 0.01, 5.0)
    a = samplers.sample_ddim(smooth_gmm, x, s, eta=0.5, generator=torch.Generator().manual_seed(6))
    b = samplers.sample_ddpm(smooth_gmm, x, s, eta=0.5, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - samplers.sample_ddim(smooth_gmm, x, s)).abs().max() > 1e-3
