"""Solver search in a unified solver space (USF / S^3: Liu, Ning, Yang & Wang, ICLR 2024; paper 19).

USF writes every exponential-integrator step as a Taylor expansion of the model output in ``lam = -log(sigma)``
and lets each step choose its own *timestep*, *prediction type* (data ``D`` or noise ``eps``), *order* (how many
earlier evaluations the polynomial uses) and whether a *corrector* re-solves it once the model has been evaluated
at its end. A :class:`SolverSpec` is one point of that space: a plain, saveable record (JSON) of the schedule and
the per-step choices; :meth:`SolverSpec.plan` turns it into a :class:`~dmlab.samplers._plan.Plan` (polynomial
weights by Gauss-Legendre quadrature, so every step is the exact integral of its interpolating polynomial) and
:func:`sample_spec` runs it. DPM-Solver++(2M)/(3M) (Taylor), multistep DPM-Solver and DEIS-logrho are points of
the space (a test checks two of them).

:func:`search_solver` searches the space for a fixed NFE budget on an exact denoiser: the objective is the error of
the state at the last positive sigma against the exact ODE (:func:`state_error`). S^3 fits an MLP predictor of FID
because evaluating a candidate on a real model is expensive; with an exact denoiser a candidate costs milliseconds,
so this is plain elitist evolution on the true objective (and the book says so). The starting points used for the
search and for the reported error are different draws (held-out evaluation).
"""
from __future__ import annotations

import json
import math
import pathlib
import random
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .. import schedules
from ._plan import Plan, Update, sample_plan

__all__ = ["SolverSpec", "sample_spec", "state_error", "search_solver", "baseline_specs", "time_uniform",
           "path_errors", "reduce_errors"]

PREDICTIONS = ("data", "noise")
_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)


# ----------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class SolverSpec:
    """One solver of the unified space: ``sigmas`` (``n + 1``, ending in 0) and, per step, ``orders`` (1-3),
    ``predictions`` (``"data"``/``"noise"``) and ``correctors`` (re-solve ``x_i`` with ``D(x_i)`` as a node).
    Orders are capped by the history available; the step to ``sigma = 0`` returns ``D``."""

    sigmas: tuple
    orders: tuple
    predictions: tuple
    correctors: tuple
    name: str = "spec"

    def __post_init__(self):
        sig = [float(s) for s in self.sigmas]
        object.__setattr__(self, "sigmas", tuple(sig))
        schedules.check_schedule(torch.tensor(sig, dtype=torch.float64), name="SolverSpec.sigmas")
        n = len(sig) - 1
        for field_, allowed in (("orders", (1, 2, 3)), ("predictions", PREDICTIONS), ("correctors", (True, False))):
            v = tuple(getattr(self, field_))
            if len(v) != n:
                raise ValueError(f"SolverSpec.{field_} needs one entry per step ({n}), got {len(v)}")
            if any(e not in allowed or isinstance(e, bool) != (field_ == "correctors") for e in v):
                raise ValueError(f"SolverSpec.{field_} entries must be in {allowed}, got {v}")
            object.__setattr__(self, field_, v)

    @property
    def nfe(self) -> int:
        return len(self.sigmas) - 1

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SolverSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def save(self, path) -> None:
        """Write the spec as JSON (plain numbers and strings)."""
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path) -> "SolverSpec":
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))

    def plan(self) -> Plan:
        """The linear plan of this solver (see the module docstring)."""
        sig, n = list(self.sigmas), self.nfe
        lam = [math.inf if s == 0 else -math.log(s) for s in sig]
        orders = [min(p, i + 1) for i, p in enumerate(self.orders)]
        orders[-1] = 1
        adv, cor = [], []
        for i in range(n):
            if i > 0 and self.correctors[i] and sig[i] > 0:
                q = orders[i - 1]
                nodes = [i] + [i - 1 - k for k in range(q)]
                cor.append(_step(sig, lam, i - 1, i, nodes, self.predictions[i - 1]))
            else:
                cor.append(None)
            if sig[i + 1] == 0:
                adv.append(Update.of(d={i: 1.0}))
            else:
                adv.append(_step(sig, lam, i, i + 1, [i - k for k in range(orders[i])], self.predictions[i]))
        return Plan(tuple(sig), tuple(adv), tuple(cor), tuple(orders), self.name)


def _step(sig, lam, base: int, target: int, nodes: list, prediction: str) -> Update:
    """Exact integral of the Lagrange polynomial (in ``lam``) through ``nodes`` from ``base`` to ``target``."""
    h = lam[target] - lam[base]
    u = 0.5 * h * (_GL_X + 1)
    wq = 0.5 * h * _GL_W
    ln = np.array([lam[j] - lam[base] for j in nodes])
    weight = np.exp(-(h - u)) if prediction == "data" else -sig[base] * np.exp(-u)  # x_t = a x_s + int w(u) M du
    coefs = {}
    for a, j in enumerate(nodes):
        ell = np.ones_like(u)
        for b in range(len(nodes)):
            if b != a:
                ell = ell * (u - ln[b]) / (ln[a] - ln[b])
        coefs[j] = float((wq * weight * ell).sum())
    a0 = math.exp(-h) if prediction == "data" else 1.0
    return Update.of(x={base: a0}, **{"d" if prediction == "data" else "e": coefs})


def sample_spec(denoiser: Callable, x: Tensor, sigmas: Tensor | None = None, *, spec: SolverSpec,
                cond: dict | None = None, generator: torch.Generator | None = None,
                callback: Callable | None = None) -> Tensor:
    """Run a :class:`SolverSpec` (USF, Liu et al. 2024) on its own schedule (``sigmas`` must be None or equal it)."""
    if not isinstance(spec, SolverSpec):
        raise TypeError("spec must be a dmlab.samplers.search.SolverSpec (e.g. SolverSpec.load(path))")
    own = torch.tensor(spec.sigmas, dtype=torch.float64)
    given = None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
    if given is not None and (given.shape != own.shape or not torch.allclose(given, own)):
        raise ValueError("a SolverSpec carries its own schedule; pass sigmas=None (or spec.sigmas)")
    return sample_plan(lambda _s: spec.plan(), denoiser, x, own, cond, generator, callback)


# ----------------------------------------------------------------------------------------------- objective
def time_uniform(n: int, sigma_min: float, sigma_max: float, power: float = 1.0) -> Tensor:
    """``n`` sigmas uniform in the DDPM training index (diffusers' default ``linspace`` grid) from ``sigma_max`` to
    ``sigma_min``, warped by ``power`` (``t_k = t_hi + (t_lo - t_hi)(k/(n-1))^power``; 1 = uniform), then 0.

    The index is that of the default DDPM betas (linear, 1e-4 to 0.02, 1000 steps), fractional between grid points.
    """
    train = schedules.train_sigmas()
    t_hi, t_lo = (float(v) for v in schedules.sigma_to_index(torch.tensor([sigma_max, sigma_min]), train))
    k = torch.linspace(0, 1, n, dtype=torch.float64) ** power
    sig = schedules.index_to_sigma(t_hi + (t_lo - t_hi) * k, train)
    sig[0], sig[-1] = sigma_max, sigma_min
    return schedules.append_zero(sig)


def _warped(nfe: int, sigma_min: float, sigma_max: float, rho: float, offsets, family: str = "karras") -> list:
    """``nfe`` evaluation sigmas of a grid family (``"karras"`` with ``rho``, or ``"time"``: :func:`time_uniform`
    with ``power = rho``) with interior points shifted by ``offsets`` (in units of the local log-sigma spacing,
    kept strictly decreasing), then 0."""
    if family == "karras":
        base = schedules.karras(nfe, sigma_min, sigma_max, rho).tolist()[:-1]
    else:
        base = time_uniform(nfe, sigma_min, sigma_max, rho).tolist()[:-1]
    ls = np.log(base)
    for k, o in enumerate(offsets, start=1):
        gap = (ls[k - 1] - ls[k + 1]) / 2 if k + 1 < nfe else 0.0
        ls[k] = ls[k] + float(np.clip(o, -0.45, 0.45)) * gap
    return [float(v) for v in np.exp(ls)] + [0.0]


def path_errors(x: Tensor, reference: Tensor) -> Tensor:
    """Per-path RMS error ``[B]`` (float64)."""
    return ((x.double() - reference.double()) ** 2).flatten(1).mean(1).sqrt()


def reduce_errors(e: Tensor, reduce: str = "rms") -> float:
    """``"rms"``: RMS over all paths (dominated by the worst); ``"gmean"``: geometric mean of per-path errors, the
    typical path (a path that lands in another basin of a memorising denoiser costs a bounded amount)."""
    if reduce == "rms":
        return float((e ** 2).mean().sqrt())
    if reduce == "gmean":
        return float(e.clamp_min(1e-300).log().mean().exp())
    raise ValueError(f"unknown reduce {reduce!r}; use 'rms' or 'gmean'")


def state_error(run: Callable, denoiser: Callable, x: Tensor, reference: Tensor, *, reduce: str = "rms") -> float:
    """Error of the state at the last positive sigma after ``run(recording_denoiser, x)`` (:func:`reduce_errors`).

    The state is the input of the denoiser's *last* call (at the last positive sigma, before the jump to ``D``),
    so its NFE count excludes that final call and a corrector is never applied there: the same quantity a
    diffusers scheduler with ``final_sigmas_type="sigma_min"`` returns.
    """
    last = {}

    def rec(xx, sigma, **cond):
        last["x"] = xx
        return denoiser(xx, sigma, **cond)

    run(rec, x)
    return reduce_errors(path_errors(last["x"], reference), reduce)


def baseline_specs(nfe: int, sigma_min: float, sigma_max: float) -> dict:
    """Named points of the space at ``nfe`` evaluations before ``sigma_min``: DDIM, DPM-Solver++(2M), 3M (Taylor),
    UniPC-like (order 2 + corrector), on the Karras grid (rho = 7)."""
    sig = _warped(nfe + 1, sigma_min, sigma_max, 7.0, [])
    n = nfe + 1
    mk = lambda name, o, c: SolverSpec(sig, (o,) * n, ("data",) * n, (c,) * n, name)  # noqa: E731
    return {"ddim": mk("ddim", 1, False), "dpmpp_2m": mk("dpmpp_2m", 2, False), "dpmpp_3m": mk("dpmpp_3m", 3, False),
            "pc_2": mk("pc_2", 2, True)}


def search_solver(denoiser: Callable, x_search: Tensor, *, nfe: int, sigma_min: float, sigma_max: float,
                  reference: Tensor | None = None, n_candidates: int = 200, population: int = 16, seed: int = 0,
                  name: str | None = None, path=None, reduce: str = "rms") -> tuple[SolverSpec, float]:
    """Search the unified space for the solver with the smallest :func:`state_error` at ``nfe`` evaluations.

    The schedule goes from ``sigma_max`` to ``sigma_min`` (both fixed, then 0); searched: the grid family (Karras
    with ``rho`` in ``[1, 12]``, or uniform in DDPM time warped by a power in ``[0.4, 2.5]``), per-point shifts of the interior sigmas, per-step order (1-3), prediction type and corrector.
    Elitist evolution: baselines (DDIM, 2M, 3M, order 2-3 with corrector, diffusers-like lower final orders, on both
    grid families) seed a population of ``population``; each of the
    ``n_candidates`` children mutates one or two choices of a random parent. ``reference`` is the exact ODE state at
    ``sigma_min`` from ``x_search`` (computed with :func:`dmlab.exact.reference_ode` if None). The best spec is
    returned (and saved to ``path`` as JSON) with its search error; evaluate it on fresh starting points.
    ``reduce`` is how per-path errors are combined (:func:`reduce_errors`).
    """
    if not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"nfe must be an int >= 2, got {nfe!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError("need 0 < sigma_min < sigma_max")
    if reference is None:
        from ..exact import reference_ode

        reference = reference_ode(denoiser, x_search, torch.tensor([sigma_max, sigma_min], dtype=torch.float64))
    rng = random.Random(seed)
    n = nfe + 1

    def build(g) -> SolverSpec:
        return SolverSpec(_warped(n, sigma_min, sigma_max, g["rho"], g["off"], g["fam"]), g["ord"], g["pred"],
                          g["cor"], name or f"searched_nfe{nfe}")

    def score(g) -> float:
        try:
            spec = build(g)
            e = state_error(lambda d, xx: sample_spec(d, xx, spec=spec), denoiser, x_search, reference, reduce=reduce)
        except (ValueError, RuntimeError):
            return math.inf
        return e if math.isfinite(e) else math.inf

    def genome(o, c, rho=7.0, fam="karras"):
        return {"fam": fam, "rho": rho, "off": [0.0] * (n - 2), "ord": (o,) * n, "pred": ("data",) * n,
                "cor": (c,) * n}

    from .exponential import multistep_orders

    pop = [genome(1, False), genome(2, False), genome(3, False), genome(2, True), genome(3, True),
           genome(2, False, 1.0, "time"), genome(2, True, 1.0, "time"), genome(3, False, 1.0, "time")]
    for o in (2, 3):  # diffusers-like: lower orders into the last positive sigma, on both grid families
        for fam, p in (("time", 1.0), ("karras", 7.0)):
            g = genome(o, False, p, fam)
            g["ord"] = tuple(multistep_orders(n, o, "sigma_min"))
            pop.append(g)
    while len(pop) < population:
        fam = rng.choice(["karras", "time"])
        pop.append(genome(rng.choice([1, 2, 3]), rng.random() < 0.5,
                          rng.uniform(1.0, 12.0) if fam == "karras" else rng.uniform(0.5, 2.0), fam))
    scored = sorted(((score(g), k, g) for k, g in enumerate(pop)), key=lambda t: t[:2])[:population]

    def mutate(g):
        g = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in g.items()}
        for _ in range(rng.choice([1, 1, 2])):
            what = rng.choice(["rho", "off", "ord", "pred", "cor", "fam"])
            i = rng.randrange(n)
            if what == "fam":
                g["fam"], g["rho"] = ("time", 1.0) if g["fam"] == "karras" else ("karras", 7.0)
            elif what == "rho":
                lim = (1.0, 12.0) if g["fam"] == "karras" else (0.4, 2.5)
                g["rho"] = float(np.clip(g["rho"] * math.exp(rng.gauss(0, 0.3)), *lim))
            elif what == "off" and g["off"]:
                k = rng.randrange(len(g["off"]))
                g["off"][k] = float(np.clip(g["off"][k] + rng.gauss(0, 0.15), -0.45, 0.45))
            elif what == "ord":
                g["ord"][i] = rng.choice([1, 2, 3])
            elif what == "pred":
                g["pred"][i] = rng.choice(PREDICTIONS)
            else:
                g["cor"][i] = not g["cor"][i]
        return {k: (tuple(v) if k != "off" and isinstance(v, list) else v) for k, v in g.items()}

    for k in range(n_candidates):
        child = mutate(rng.choice(scored)[2])
        scored.append((score(child), population + k, child))
        scored = sorted(scored, key=lambda t: t[:2])[:population]
    best_err, _, best = scored[0]
    spec = build(best)
    if path is not None:
        spec.save(path)
    return spec, best_err
