"""The sampler registry, measured: every deterministic sampler's convergence order and NFE on the exact GMM (float64),
the public loops against the plan engine behind the diffusers adapter (to 1e-12), and the shared signature's
behaviour (dtype, cond, bad input, callback)."""
import pytest
import torch

from dmlab import samplers, schedules
from dmlab.denoisers import RecordingDenoiser
from dmlab.exact import reference_ode
from dmlab.samplers import deis, exponential, unipc
from dmlab.samplers._plan import sample_plan
from dmlab.samplers.registry import REGISTRY, deterministic
from dmlab.samplers import fit_order

ORDERS = {name: r.order for name, r in deterministic().items()}  # the declared orders, from the registry
NS = [49, 97, 193, 385]  # = 1 mod 3 and odd: every singlestep group ends on sigma_min
SIGMA_MIN, SIGMA_MAX = 0.002, 20.0


@pytest.fixture(scope="module")
def gmm(smooth_gmm_module):
    return smooth_gmm_module  # the smooth mixture of tests/conftest.py


@pytest.fixture(scope="module")
def start_and_ref(gmm):
    """Every karras(n, 0.002, 20) schedule ends at the same sigma_min: one exact reference serves every n."""
    x = SIGMA_MAX * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x, reference_ode(gmm, x, schedules.karras(NS[0], SIGMA_MIN, SIGMA_MAX)[:-1])


def at_sigma_min(info, gmm, x, n):
    """The state at the last positive sigma (before the final jump to D), where the reference is compared."""
    seen = {}
    info(gmm, x, schedules.karras(n, SIGMA_MIN, SIGMA_MAX), callback=lambda d: seen.update({d["i"]: d["x"]}))
    return seen[n - 1]


@pytest.mark.parametrize("name", list(ORDERS))
def test_declared_order_is_measured(name, gmm, start_and_ref):
    x, ref = start_and_ref
    info = REGISTRY[name]
    errs = [(at_sigma_min(info, gmm, x, n) - ref).norm().item() for n in NS]
    p = fit_order([info.nfe(n) for n in NS], errs)
    assert abs(p - info.order) < 0.3, (name, p, errs)


@pytest.mark.parametrize("name", list(ORDERS))
def test_declared_nfe_and_where_the_model_is_called(name, gmm):
    info, n = REGISTRY[name], 9
    s = schedules.karras(n, 0.01, 10.0)
    rec = RecordingDenoiser(gmm)
    info(rec, 10 * torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64), s)
    assert rec.nfe == info.nfe(n)
    called = torch.stack([c[0] for c in rec.sigmas])
    assert (called > 0).all()  # never at sigma 0
    assert set(called.tolist()) == set(s[:-1].tolist())


def test_registry_records_are_complete():
    import re

    bib = open("book/references.bib").read()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    for name, r in REGISTRY.items():
        assert r.paper in keys, (name, r.paper)
        assert r.name == name and callable(r.fn) and r.nfe(10) >= 10
        assert (r.order is None) or not r.stochastic
    assert set(samplers.__all__) >= {r.fn.__name__ for r in REGISTRY.values()}
    from dmlab.samplers import compare, diffusers_compat

    assert set(diffusers_compat.SOLVERS) == {k for k, r in REGISTRY.items() if r.plan} | {"spec"}
    assert [c[0] for c in compare.DIFFUSERS_CONFIGS] == [e[0] for r in REGISTRY.values() if r.diffusers_candidate
                                                          for e in r.diffusers]


# ----------------------------------------------------------------------------------------------- loop == plan
PLAN_CASES = [("ddim", samplers.sample_ddim, exponential.plan_ddim, {}),
              ("euler", samplers.sample_euler, exponential.plan_ddim, {})]
PLAN_CASES += [(f"2m_{st}_{lof}", samplers.sample_dpmpp_2m, exponential.plan_dpm_solver_multistep,
                {"solver_type": st, "lower_order_final": lof}) for st in ("midpoint", "heun") for lof in (True, False)]
PLAN_CASES += [(f"ms_{p}_{o}_{v}", samplers.sample_dpm_solver_multistep, exponential.plan_dpm_solver_multistep,
                {"prediction": p, "order": o, "variant": v, "lower_order_final": "sigma_min"})
               for p in ("data", "noise") for o in (1, 2, 3) for v in ("taylor", "diffusers")]
PLAN_CASES += [(f"single_{p}_{o}_{st}", samplers.sample_dpm_solver, exponential.plan_dpm_solver,
                {"prediction": p, "order": o, "solver_type": st})
               for p in ("data", "noise") for o in (1, 2, 3) for st in ("midpoint", "heun")]
PLAN_CASES += [(f"unipc_{o}_{st}_{p}_{c}", samplers.sample_unipc, unipc.plan_unipc,
                {"order": o, "solver_type": st, "prediction": p, "corrector": c})
               for o in (1, 2, 3, 4) for st in ("bh1", "bh2") for p in ("data", "noise") for c in (True, False)]
PLAN_CASES += [("unipc_disable", samplers.sample_unipc, unipc.plan_unipc, {"order": 3, "disable_corrector": (1, 4),
                                                                           "lower_order_final": False})]
PLAN_CASES += [(f"deis_{v}_{o}", samplers.sample_deis, deis.plan_deis, {"variant": v, "order": o})
               for v in deis.VARIANTS for o in (1, 2, 3)]


@pytest.mark.parametrize("name, loop, builder, kw", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_loop_equals_plan(name, loop, builder, kw, gmm):
    """The readable loop and the plan engine (diffusers adapter, search) compute the same numbers."""
    x = 15 * torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for s in (schedules.karras(11, 0.002, 15.0), schedules.log_uniform(7, 0.01, 15.0)):
        seen_loop, seen_plan = {}, {}
        a = loop(gmm, x, s, callback=lambda d: seen_loop.update({d["i"]: d["x"]}), **kw)
        b = sample_plan(builder, gmm, x, s, None, None, lambda d: seen_plan.update({d["i"]: d["x"]}), **kw)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        for i in seen_plan:  # every intermediate state too (UniPC: the corrected one)
            torch.testing.assert_close(seen_loop[i], seen_plan[i], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------- shared signature
SHARED = [k for k in ORDERS if k not in ("hb", "ghvb", "interpolant")]


@pytest.mark.parametrize("name", SHARED)
def test_keeps_dtype_and_passes_cond(name):
    seen = {}

    def d(x, sigma, **cond):
        seen.update(cond)
        return 0.5 * x / (1 + sigma[:, None, None, None] ** 2)

    info = REGISTRY[name]
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    out = info(d, x, schedules.karras(5), cond={"class_labels": torch.tensor([1, 2])})
    assert out.dtype == torch.float32 and out.shape == x.shape and "class_labels" in seen
    assert info(d, x.double(), schedules.karras(5)).dtype == torch.float64
    # half precision: the update runs in float32, the result comes back in x's dtype, close to the float32 run
    for half in (torch.float16, torch.bfloat16):
        low = info(lambda x, sigma: d(x.float(), sigma.float()).to(x.dtype), x.to(half), schedules.karras(5))
        ref = info(d, x.to(half).float(), schedules.karras(5))
        assert low.dtype == half and (low.float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_bad_input(name, smooth_gmm):
    solver = REGISTRY[name].fn
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match="end in 0"):
        solver(smooth_gmm, x, torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        solver(smooth_gmm, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(TypeError, match="cond must be a dict"):
        solver(smooth_gmm, x, schedules.karras(2), cond=[1])
    with pytest.raises(TypeError, match="callable"):
        solver(None, x, schedules.karras(2))
    with pytest.raises(TypeError, match="floating point"):
        solver(smooth_gmm, torch.ones(2, 2, dtype=torch.long), schedules.karras(2))


def test_callback_sees_every_step(smooth_gmm, gen):
    steps = []
    samplers.sample_heun(smooth_gmm, torch.randn(2, 2, generator=gen), schedules.karras(5),
                         callback=lambda d: steps.append((d["i"], float(d["sigma"]), d["denoised"].shape)))
    assert [s[0] for s in steps] == list(range(5))
