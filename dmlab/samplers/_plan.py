"""Linear-multistep plans: the shared engine of the exponential-integrator samplers.

Every deterministic solver in :mod:`dmlab.samplers.exponential`, :mod:`~dmlab.samplers.unipc`,
:mod:`~dmlab.samplers.deis` and :mod:`~dmlab.samplers.search` is, once the schedule is fixed, a *linear* recipe:
each new state is a weighted sum of earlier states ``X[j]``, denoiser outputs ``D[j]`` and noise predictions
``E[j] = (x_j - D[j]) / sigma_j`` with scalar weights that depend on the sigmas only. A :class:`Plan` holds those
weights (computed once, in float64 Python floats, from the schedule); :func:`run_plan` evaluates the denoiser once
per step and forms the sums with a few ``add_`` calls. That keeps the per-step overhead to a handful of tensor ops
(``benchmarks/samplers.py`` measures it against diffusers) and lets one object back both the stateless
``sample_*`` functions and the stateful diffusers adapter (:mod:`dmlab.samplers.diffusers_compat`), which therefore
produce the same numbers.

A step ``i`` of a plan: evaluate ``D[i] = D(x_i, sigma_i)``; if ``correct[i]`` is set, replace ``x_i`` by that
combination (a corrector such as UniC, which reuses ``D[i]`` evaluated at the uncorrected point); record
``X[i] = x_i``; then ``x_{i+1} = advance[i]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ._common import model_in, prepare, report, work_dtype

KINDS = ("x", "d", "e")


@dataclass(frozen=True)
class Update:
    """``sum(coef * H[kind][index])`` over ``terms = ((kind, index, coef), ...)``; kinds ``x`` (state after any
    correction), ``d`` (denoiser output), ``e`` (noise prediction ``(x_eval - d) / sigma`` at the evaluation point)."""

    terms: tuple

    def __post_init__(self):
        if not self.terms:
            raise ValueError("an Update needs at least one term")
        merged: dict = {}
        for kind, j, c in self.terms:
            if kind not in KINDS:
                raise ValueError(f"unknown term kind {kind!r}; use one of {KINDS}")
            merged[(kind, int(j))] = merged.get((kind, int(j)), 0.0) + float(c)
        object.__setattr__(self, "terms", tuple((k, j, c) for (k, j), c in merged.items()))

    @staticmethod
    def of(**parts: dict) -> "Update":
        """``Update.of(x={i: a}, d={i: b, i - 1: c})``: build from ``{index: coef}`` dicts per kind (the fast path
        the plan builders use: keys are already unique per kind, so no merging or checks)."""
        u = object.__new__(Update)
        object.__setattr__(u, "terms", tuple((k, j, c) for k, d in parts.items() for j, c in d.items()))
        return u


@dataclass(frozen=True)
class Plan:
    """A solver with its schedule fixed: ``advance[i]`` gives ``x_{i+1}``, ``correct[i]`` (or None) corrects ``x_i``.

    ``orders[i]`` is the order of step ``i`` (documentation and tests); ``name`` names the solver.
    """

    sigmas: tuple
    advance: tuple
    correct: tuple
    orders: tuple
    name: str = "plan"
    uses_eps: bool = field(init=False)
    lookback: int = field(init=False)

    def __post_init__(self):
        n = len(self.sigmas) - 1
        if len(self.advance) != n or len(self.correct) != n or len(self.orders) != n:
            raise ValueError(f"a plan over {n} steps needs {n} advance/correct/orders entries")
        back, eps = 0, False
        for i in range(n):
            for upd in (self.advance[i], self.correct[i]):
                if upd is None:
                    continue
                for kind, j, _ in upd.terms:
                    if j > i or (kind == "x" and upd is self.correct[i] and j >= i):
                        raise ValueError(f"step {i} refers to a future value {kind}[{j}]")
                    back, eps = max(back, i - j), eps or kind == "e"
        object.__setattr__(self, "uses_eps", eps)
        object.__setattr__(self, "lookback", back)

    @property
    def n_steps(self) -> int:
        return len(self.sigmas) - 1


def _combine(upd: Update, hist: dict) -> Tensor:
    terms = upd.terms
    if len(terms) == 1 and terms[0][2] == 1.0:  # x = D: the final step, no arithmetic
        return hist[terms[0][0]][terms[0][1]]
    if len(terms) == 2 and abs(terms[0][2] + terms[1][2] - 1.0) < 1e-12:  # a u + (1 - a) v: one kernel
        (k0, j0, c0), (k1, j1, _) = terms
        return torch.lerp(hist[k1][j1], hist[k0][j0], c0)
    (k0, j0, c0), rest = terms[0], terms[1:]
    out = hist[k0][j0] * c0
    for kind, j, c in rest:
        out.add_(hist[kind][j], alpha=c)
    return out


class Stepper:
    """Runs a :class:`Plan` one denoiser output at a time: ``x_next = stepper.step(x_i, D_i)``.

    What :func:`run_plan` does in a loop, exposed for schedulers that receive the model output from outside
    (the diffusers adapter). ``x_i`` must be the state the plan produced (the adapter passes the pipeline's own).
    ``start``: the first step to take (a plan built with the builders' ``start``, whose steps from there on use
    nothing earlier).
    """

    def __init__(self, plan: Plan, start: int = 0):
        if not 0 <= start < plan.n_steps:
            raise ValueError(f"start must be a step index in [0, {plan.n_steps - 1}], got {start}")
        for i in range(start, plan.n_steps):
            for upd in (plan.advance[i], plan.correct[i]):
                if upd is not None and any(j < start for _, j, _ in upd.terms):
                    raise ValueError(f"step {i} of plan {plan.name!r} uses values from before step {start}; build the "
                                     f"plan with start={start}")
        self.plan = plan
        self.i = start
        self.hist = {"x": {}, "d": {}, "e": {}}

    def step(self, x: Tensor, denoised: Tensor) -> tuple[Tensor, Tensor]:
        """Feed ``D(x_i, sigma_i)``; return ``(x_i after correction, x_{i+1})``."""
        p, i, h = self.plan, self.i, self.hist
        if i >= p.n_steps:
            raise RuntimeError(f"the plan has {p.n_steps} steps and all were taken; start a new Stepper")
        h["d"][i] = denoised
        if p.uses_eps:
            h["e"][i] = (x - denoised) / p.sigmas[i]
        if p.correct[i] is not None:
            x = _combine(p.correct[i], h)
        h["x"][i] = x
        x_next = _combine(p.advance[i], h)
        old = i - p.lookback
        for kind in h:
            h[kind].pop(old, None)
        self.i = i + 1
        return x, x_next


def run_plan(plan: Plan, denoiser: Callable, x: Tensor, sigmas: Tensor, cond: dict, callback) -> Tensor:
    """Evaluate ``denoiser`` once per step of ``plan`` (``sigmas`` already on ``x``'s device and dtype)."""
    stepper = Stepper(plan)
    per_step = sigmas[:, None].expand(len(sigmas), x.shape[0]).unbind(0)  # [B] sigma of each step, made once
    for i in range(plan.n_steps):
        denoised = denoiser(x, per_step[i], **cond)
        x_now, x = stepper.step(x, denoised)
        report(callback, i, x_now, sigmas[i], sigmas[i + 1], denoised)
    return x


def sample_plan(builder: Callable, denoiser: Callable, x: Tensor, sigmas: Tensor, cond, generator, callback,
                **options) -> Tensor:
    """Validate, build ``builder(list_of_sigmas, **options)`` and run it: the body of every plan-based sampler.

    The builder validates its options (and the number of steps its order needs) before anything is evaluated. The
    sums are formed in the work dtype (float32 for half-precision ``x``, :func:`._common.work_dtype`), the
    denoiser called in x's dtype, the result returned in x's dtype.
    """
    sig, cond, lst = prepare(denoiser, x, sigmas, cond, generator, floats=True)
    plan = builder(lst, **options)
    work = work_dtype(x)
    with torch.no_grad():
        return run_plan(plan, model_in(denoiser, cond, x.dtype, work), x.to(work), sig, {}, callback).to(x.dtype)
