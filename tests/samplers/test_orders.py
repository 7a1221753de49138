import math

import pytest
import torch

from dmlab import samplers, schedules
from dmlab.denoisers import RecordingDenoiser
from dmlab.exact import reference_ode

ORDERS = {samplers.sample_euler: 1, samplers.sample_heun: 2}


def measured_order(solver, gmm, x, ns):
    errs = []
    for n in ns:
        s = schedules.karras(n, 0.002, 20.0)
        errs.append((solver(gmm, x, s) - reference_ode(gmm, x, s)).norm().item())
    # least-squares slope of log err against log n
    ln, le = torch.tensor(ns, dtype=torch.float64).log(), torch.tensor(errs).log()
    return -(((ln - ln.mean()) * (le - le.mean())).sum() / ((ln - ln.mean()) ** 2).sum()).item()


@pytest.mark.parametrize("solver", list(ORDERS), ids=lambda f: f.__name__)
def test_convergence_order(solver, smooth_gmm, gen):
    x = 20.0 * torch.randn(8, 2, generator=gen, dtype=torch.float64)
    p = measured_order(solver, smooth_gmm, x, [16, 32, 64, 128])
    assert abs(p - ORDERS[solver]) < 0.25, p


@pytest.mark.parametrize("solver, nfe", [(samplers.sample_euler, lambda n: n), (samplers.sample_heun, lambda n: 2 * n - 1)],
                         ids=["euler", "heun"])
def test_where_and_how_often_the_model_is_called(solver, nfe, smooth_gmm, gen):
    s = schedules.karras(7, 0.01, 10.0)
    rec = RecordingDenoiser(smooth_gmm)
    solver(rec, 10 * torch.randn(3, 2, generator=gen, dtype=torch.float64), s)
    assert rec.nfe == nfe(7)
    called = torch.stack([c[0] for c in rec.sigmas])
    assert (called > 0).all()  # never at sigma 0
    assert set(called.tolist()) == set(s[:-1].tolist())


@pytest.mark.parametrize("solver", list(ORDERS), ids=lambda f: f.__name__)
def test_keeps_dtype_and_passes_cond(solver, gen):
    seen = {}

    def d(x, sigma, **cond):
        seen.update(cond)
        return torch.zeros_like(x)

    x = torch.randn(2, 1, 4, 4, generator=gen)
    out = solver(d, x, schedules.karras(3), cond={"class_labels": torch.tensor([1, 2])})
    assert out.dtype == torch.float32 and out.shape == x.shape and "class_labels" in seen
    out64 = solver(d, x.double(), schedules.karras(3))
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("solver", list(ORDERS), ids=lambda f: f.__name__)
def test_bad_input(solver, smooth_gmm):
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
