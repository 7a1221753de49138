"""UniPC: a unified predictor-corrector framework for fast sampling (Zhao et al. 2023, NeurIPS).

UniP-``p`` is a multistep exponential integrator whose higher-order terms are ``B(h) sum_m rho_m D1_m`` with
``D1_m = (M_{i-m} - M_i) / r_m`` and coefficients ``rho`` solved from ``R rho = b`` (``R`` a Vandermonde matrix in
the step ratios ``r_m``, ``b_k = k! h phi_{k+1}(h) / B(h)``). UniC-``p`` re-solves the last step once the model
has been evaluated at its end point, with that new value as one more node: the order rises to ``p + 1`` and no NFE
is added, because the evaluation is the one the next predictor step needs anyway (the corrected point is *not*
re-evaluated). ``B(h) = h`` is ``bh1``; ``B(h) = e^h - 1`` is ``bh2`` (the paper's recommendation for few steps).

Formulas follow diffusers' ``UniPCMultistepScheduler`` (Apache-2.0; data prediction is its default) so the
cross-library test agrees to float rounding; in the VE convention the ``alpha_t`` factors cancel. The last step to
``sigma = 0`` is first order (``D(x, sigma_last)``) and is not corrected.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._common import model_in, per_step_sigmas, prepare, report, work_dtype
from ._plan import Plan, Update
from .exponential import PREDICTIONS, check_choice, check_lof, check_order, lams, lin, need_steps, restart_orders

__all__ = ["sample_unipc", "plan_unipc"]

SOLVER_TYPES = ("bh1", "bh2")


def _rhs(h: float, p: int, prediction: str, solver_type: str):
    """``hh, h phi_1, B(h)`` and the right-hand side ``b`` (length ``p``) of UniPC's order conditions."""
    hh = -h if prediction == "data" else h
    h_phi_1 = math.expm1(hh)
    B_h = hh if solver_type == "bh1" else math.expm1(hh)
    b, h_phi_k, fact = [], h_phi_1 / hh - 1, 1
    for k in range(1, p + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return h_phi_1, B_h, b


def _solve(rks: list, b: list) -> list:
    """Solve ``R rho = b`` with ``R[k][m] = rks[m]^k`` (at most 4x4: Gaussian elimination with partial pivoting in
    plain floats, ~50x cheaper per step than a torch call)."""
    n = len(rks)
    A = [[r ** k for r in rks] + [b[k]] for k in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(A[r][c]))
        A[c], A[p] = A[p], A[c]
        for r in range(c + 1, n):
            f = A[r][c] / A[c][c]
            A[r] = [a - f * q for a, q in zip(A[r], A[c])]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (A[r][n] - sum(A[r][k] * out[k] for k in range(r + 1, n))) / A[r][r]
    return out


def _unipc_update(sigmas, lam, base: int, nodes: list, new: int | None, p: int, prediction: str,
                  solver_type: str, m: str, target: int) -> Update:
    """One UniP (``new is None``) or UniC (``new`` = index of the value at the target) update from ``base``."""
    h = lam[target] - lam[base]
    h_phi_1, B_h, b = _rhs(h, p, prediction, solver_type)
    rks = [(lam[j] - lam[base]) / h for j in nodes] + [1.0]
    D1s = [{j: 1 / r, base: -1 / r} for j, r in zip(nodes, rks)]
    if new is None:  # predictor: p - 1 differences
        rhos = [] if p == 1 else [0.5] if p == 2 else _solve(rks[:-1], b[:-1])
    else:  # corrector: one more node, the value at the target
        rhos = [0.5] if p == 1 else _solve(rks, b)
        D1s = D1s + [{new: 1.0, base: -1.0}]
    res = lin(*zip(rhos, D1s))
    unit = 1.0 if prediction == "data" else sigmas[target]
    a = math.exp(-h) if prediction == "data" else 1.0
    mm = lin((-h_phi_1, {base: 1.0}), (-B_h, res))
    return Update.of(x={base: a}, **{m: {k: unit * v for k, v in mm.items()}})


def unipc_orders(n: int, order: int, lower_order_final=True) -> list:
    """UniPC's per-step orders (diffusers' rule): ``min(order, i + 1)`` and, with ``lower_order_final``, at most the
    number of steps left; ``"sigma_min"`` counts the steps left to the last positive sigma. The step to 0 is first
    order."""
    left = n - 1 if lower_order_final == "sigma_min" else n
    orders = [min(order, i + 1, max(left - i, 1) if lower_order_final else order) for i in range(n)]
    orders[-1] = 1
    return orders


def plan_unipc(sigmas: list, *, order: int = 2, prediction: str = "data", solver_type: str = "bh2",
               corrector: bool = True, disable_corrector: tuple = (), lower_order_final: bool | str = True,
               start: int = 0) -> Plan:
    """UniPC-``order`` (Zhao et al. 2023): UniP predictor + UniC corrector, one NFE per step.

    Step ``i`` has predictor order ``min(order, i + 1)`` (warm-up) and, with ``lower_order_final``, at most the
    number of steps left (diffusers' rule). The corrector at step ``i`` uses the order of step ``i - 1``; it is
    skipped where ``i - 1`` is in ``disable_corrector`` (diffusers' convention) or everywhere if ``corrector=False``.
    ``start``: the first step taken (``restart_orders``: warm-up restarts there, no correction at ``start``).
    """
    order = check_order(order, (1, 2, 3, 4))
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    n = len(sigmas) - 1
    if not start:
        need_steps(n, order, "UniPC")
    lam = lams(sigmas)
    m = "d" if prediction == "data" else "e"
    orders = restart_orders(unipc_orders(n, order, check_lof(lower_order_final)), start)
    adv, cor = [], []
    for i, p in enumerate(orders):
        if corrector and i > start and (i - 1) not in disable_corrector:
            q = orders[i - 1]
            cor.append(_unipc_update(sigmas, lam, i - 1, [i - 1 - k for k in range(1, q)], i, q, prediction,
                                     solver_type, m, i))
        else:
            cor.append(None)
        if sigmas[i + 1] == 0:
            adv.append(Update.of(d={i: 1.0}))
        else:
            adv.append(_unipc_update(sigmas, lam, i, [i - k for k in range(1, p)], None, p, prediction, solver_type,
                                     m, i + 1))
    name = f"unipc_{order}_{solver_type}{'' if corrector else '_nocorr'}"
    return Plan(tuple(sigmas), tuple(adv), tuple(cor), tuple(orders), name)


@torch.no_grad()
def sample_unipc(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                 generator: torch.Generator | None = None, callback: Callable | None = None, order: int = 2,
                 prediction: str = "data", solver_type: str = "bh2", corrector: bool = True,
                 disable_corrector: tuple = (), lower_order_final: bool | str = True) -> Tensor:
    """UniPC (Zhao et al. 2023, Alg. 2-3): UniP-``order`` predictor with the UniC corrector (order ``order + 1``).

    One NFE per step. Step ``i``: evaluate ``M_i`` at ``x_i``; UniC re-solves the previous step with ``M_i`` as one
    more node (the corrected ``x_i^c`` is not re-evaluated); UniP advances ``x_i^c`` with ``M_i`` and the earlier
    outputs. ``corrector=False`` is plain UniP-``order``; ``disable_corrector`` lists steps ``i - 1`` whose
    correction is skipped (diffusers' convention). ``solver_type`` is ``"bh1"`` (``B(h) = h``) or ``"bh2"``
    (``B(h) = e^h - 1``); ``prediction`` ``"data"`` (diffusers' ``predict_x0=True``) or ``"noise"``. Needs at
    least ``order`` steps. With ``order=2, solver_type="bh2"`` this is diffusers' default UniPC.
    """
    order = check_order(order, (1, 2, 3, 4))
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    sig, cond, s = prepare(denoiser, x, sigmas, cond, generator, floats=True)
    batch, xw = per_step_sigmas(sig, x.shape[0]), x.to(work_dtype(x))
    model = model_in(denoiser, cond, x.dtype, xw.dtype)  # D(x, sigma) in the update's dtype
    n = len(s) - 1
    need_steps(n, order, "UniPC")
    orders = unipc_orders(n, order, check_lof(lower_order_final))
    lam = lams(s)
    data = prediction == "data"

    def update(base: int, x_base: Tensor, nodes: list, p: int, target: int, m_new: Tensor | None = None) -> Tensor:
        """UniP-p (``m_new`` None) or UniC-p (``m_new`` = output at the target) from ``base`` to ``target``."""
        h = lam[target] - lam[base]
        h_phi_1, B_h, b = _rhs(h, p, prediction, solver_type)  # h phi_1(h), B(h), b_k = k! h phi_{k+1} / B(h)
        rks = [(lam[j] - lam[base]) / h for j in nodes]  # r_m = (lambda_{i-m} - lambda_i) / h
        D1s = [(M[j] - M[base]) / r for j, r in zip(nodes, rks)]  # D1_m = (M_{i-m} - M_i) / r_m
        if m_new is None:  # UniP: a_p from R_{p-1}(h) a_p = b(h) on the p - 1 nodes
            rhos = [] if p == 1 else [0.5] if p == 2 else _solve(rks, b[:-1])
        else:  # UniC: one more node, r = 1, with D1 = M_{i+1} - M_i
            rhos = [0.5] if p == 1 else _solve(rks + [1.0], b)
            D1s = D1s + [m_new - M[base]]
        res = sum(r * d for r, d in zip(rhos, D1s)) if rhos else 0.0
        if data:  # x_t = (sigma_t / sigma_s) x_s - (e^{-h} - 1) M_s - B(h) sum_m a_m D1_m
            return math.exp(-h) * x_base - h_phi_1 * M[base] - B_h * res
        return x_base - s[target] * (h_phi_1 * M[base] + B_h * res)  # noise: alpha factors cancel in VE

    M, X = {}, {}  # model outputs (D or eps) and states by step index
    for i in range(n):
        denoised = model(xw, batch[i])  # M_i at the predicted x_i
        m_i = denoised if data else (xw - denoised) / s[i]
        if corrector and i > 0 and (i - 1) not in disable_corrector:  # UniC-q: x_i^c from x_{i-1}^c and M_i
            q = orders[i - 1]
            xw = update(i - 1, X[i - 1], [i - 1 - k for k in range(1, q)], q, i, m_i)
        M[i], X[i] = m_i, xw
        report(callback, i, xw, sig[i], sig[i + 1], denoised)
        if s[i + 1] == 0:  # final step: x_0 = D(x, sigma_last), not corrected
            xw = denoised
            break
        p = orders[i]  # UniP-p from x_i^c with M_i, M_{i-1}, ..., M_{i-p+1}
        xw = update(i, xw, [i - k for k in range(1, p)], p, i + 1)
        for j in [j for j in M if j < i - order]:
            del M[j], X[j]
    return xw.to(x.dtype)
