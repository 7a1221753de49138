"""Every sampler of ``dmlab.samplers.registry.REGISTRY`` in float16 and bfloat16: finite, x's dtype kept, and the ODE
samplers as accurate as the half-precision denoiser allows.

Grids: the EDM grid (``karras(n, 0.002, 80)``) and ``karras(n, 0.002, 1e4)``. Denoisers: an exact 8-D Gaussian mixture
(:class:`dmlab.exact.GMMDenoiser`) and the zoo model ``unet_s`` (2 samples, 6 steps), each run with its input in
the half dtype (the mixture returns the half dtype; the network runs with half weights).

Relative error: ``err = ||x_half - x_64|| / ||x_64||`` over the whole batch, where ``x_64`` is the same sampler on
the same noise (the half noise cast to float64) with the denoiser in float64. An ODE sampler passes when ``err`` is
at most 1 % (float16) / 3 % (bfloat16), or, where the denoiser's own half precision already costs more, when ``err``
is at most 1.05 ``err_D + 1e-5``: ``err_D`` is the same sampler with float64 arithmetic calling the denoiser with
``x`` and ``sigma`` in the half dtype (the error of evaluating the denoiser in half precision, which no sampler can
remove). So the test fails whenever a sampler's own arithmetic loses accuracy in half precision. Stochastic samplers
draw other noise in float32 than in float64: they must be finite and keep the dtype.

``test_report`` prints the worst cases (``pytest -s``).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from dmlab import exact, schedules
from dmlab.samplers.registry import REGISTRY

HALF = {"float16": (torch.float16, 0.01), "bfloat16": (torch.bfloat16, 0.03)}
GRIDS = {"edm": 80.0, "sigma_max 1e4": 1e4}
ROWS: list = []  # (denoiser, sampler, grid, dtype, err, err_D, passed by)


def _gmm():
    g = torch.Generator().manual_seed(0)
    return exact.GMMDenoiser(torch.ones(4), 2 * torch.randn(4, 8, generator=g), torch.full((4,), 0.3))


def _special(name, shape, n, sigmas):
    """How to call the samplers without the shared signature (None: not applicable to this denoiser)."""
    from dmlab.samplers.search import SolverSpec
    from dmlab.samplers.v3 import Statistics

    if name == "dpm_solver_v3":
        return {"statistics": Statistics.trivial(shape=shape)}
    if name == "spec":
        return {"spec": SolverSpec(sigmas.tolist(), (3,) * n, ("data",) * n, (False,) * n)}
    return None


def _run(info, denoiser, x, sigmas, cond, extra):
    kw = dict(extra)
    if cond:
        kw["cond"] = cond
    if info.stochastic:
        kw["generator"] = torch.Generator().manual_seed(0)
    if info.name == "spec":
        return info.fn(denoiser, x, None, **kw)
    return info(denoiser, x, sigmas, **kw)


def _in_half(denoiser, dtype):
    """The denoiser called with x and sigma in ``dtype``, its output in float64 (for float64 arithmetic)."""
    return lambda x, s, **c: denoiser(x.to(dtype), s.to(dtype), **c).double()


def _check(label, info, den64, den_half, noise, n_steps, smax, cond=None, shape=()):
    sigmas = schedules.karras(max(n_steps, info.min_steps), 0.002, smax)
    extra = {} if info.shared_signature else _special(info.name, shape, len(sigmas) - 1, sigmas)
    x0 = noise * sigmas[0]
    ref = None if info.stochastic else _run(info, den64, x0.half().double(), sigmas, cond, extra)
    for dname, (dtype, tol) in HALF.items():
        out = _run(info, den_half[dtype], x0.to(dtype), sigmas, cond, extra)
        out = out[0] if isinstance(out, tuple) else out
        assert out.dtype == dtype, f"{label} {info.name} {dname}: returned {out.dtype}"
        assert torch.isfinite(out).all(), f"{label} {info.name} {dname} on {smax:g}: not finite"
        if info.stochastic:
            continue
        err = float((out.double() - ref).norm() / ref.norm())
        if err <= tol:
            ROWS.append((label, info.name, smax, dname, err, None, "tolerance"))
            continue
        own = _run(info, _in_half(den_half[dtype], dtype), x0.to(dtype).double(), sigmas, cond, extra)
        err_d = float((own - ref).norm() / ref.norm())
        ROWS.append((label, info.name, smax, dname, err, err_d, "denoiser's half precision"))
        assert err <= 1.05 * err_d + 1e-5, (f"{label} {info.name} {dname} on {smax:g}: relative error {err:.2e} > "
                                            f"{tol} and > the half denoiser's own {err_d:.2e}")


def _names(denoiser_kind):
    out = []
    for name, info in REGISTRY.items():
        if info.shared_signature or name in ("dpm_solver_v3", "spec"):
            out.append(name)
    return out


@pytest.mark.parametrize("smax", list(GRIDS.values()), ids=list(GRIDS))
@pytest.mark.parametrize("name", _names("gmm"))
def test_gmm(name, smax):
    g = _gmm()
    noise = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    _check("gmm", REGISTRY[name], g, {dt: g for dt, _ in HALF.values()}, noise, 12, smax, shape=(8,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gmm_mean_reverting_and_mcmc(dtype):
    """The two samplers with their own arguments: MRS (mean-reverting times) and denoising MCMC (exact log_prob)."""
    from dmlab.samplers.mcmc import sample_dmcmc
    from dmlab.samplers.mrs import MeanReverting, exact_mr_model, mr_times, sample_mrs

    g, tol = _gmm(), HALF[str(dtype)[6:]][1]
    noise = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    proc, mu = MeanReverting(), torch.zeros(8)
    model, ts = functools.partial(exact_mr_model(g, proc), mu=mu), mr_times(12, proc)
    ref = sample_mrs(model, noise.to(dtype).double(), mu.double(), ts, process=proc)
    out = sample_mrs(model, noise.to(dtype), mu.to(dtype), ts, process=proc)
    err = float((out.double() - ref).norm() / ref.norm())
    ROWS.append(("gmm", "mrs", 1.0, str(dtype)[6:], err, None, "tolerance"))
    assert out.dtype == dtype and err <= tol
    for smax in GRIDS.values():
        s = schedules.karras(12, 0.002, smax)
        out = sample_dmcmc(g, (noise * s[0]).to(dtype), s, generator=torch.Generator().manual_seed(0))
        assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def unet_s():
    """unet_s in float64 and in both half dtypes (None without the zoo)."""
    try:
        from dmlab import zoo

        den, model = zoo.load_denoiser("unet_s")
    except (FileNotFoundError, ValueError) as err:  # no zoo here (an installed package offline)
        pytest.skip(f"zoo model unet_s unavailable: {err}")
    out = {}
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        d = copy.copy(den)
        d.model = copy.deepcopy(model).to(dtype)
        out[dtype] = d
    return out


@pytest.mark.parametrize("smax", list(GRIDS.values()), ids=list(GRIDS))
def test_zoo_unet_s(unet_s, smax):
    """One zoo model, cheap: 2 samples, 6 steps, every sampler that takes a network."""
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.tensor([3, 7])}
    for name in _names("zoo"):
        _check("unet_s", REGISTRY[name], unet_s[torch.float64], unet_s, noise, 6, smax, cond=cond, shape=(1, 8, 8))


def test_report():
    """The worst relative error per denoiser and dtype, and every case passed by the denoiser's own precision."""
    if not ROWS:
        pytest.skip("run with the tests above")
    for label in sorted({r[0] for r in ROWS}):
        for dname in HALF:
            rows = [r for r in ROWS if r[0] == label and r[3] == dname]
            if rows:
                w = max(rows, key=lambda r: r[4])
                print(f"\n{label} {dname}: worst {w[1]} on sigma_max {w[2]:g}: {w[4]:.2e} "
                      f"({sum(r[6] != 'tolerance' for r in rows)}/{len(rows)} beyond the tolerance, all within the "
                      f"half denoiser's own error)")
                for r in rows:
                    if r[6] != "tolerance":
                        print(f"   {r[1]:20s} sigma_max {r[2]:<6g} err {r[4]:.2e}  half denoiser alone {r[5]:.2e}")
