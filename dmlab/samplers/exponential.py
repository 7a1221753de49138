"""Exponential integrators of the probability-flow ODE: DDIM, DPM-Solver (singlestep, orders 1-3), DPM-Solver++
2M / 3M and multistep DPM-Solver.

In ``lam = -log(sigma)`` the ODE ``dx/dsigma = (x - D) / sigma`` becomes ``dx/dlam = D - x``: linear in ``x``
with a constant coefficient, so its solution from ``lam_s`` to ``lam_t = lam_s + h`` is exact in the linear part,

    x_t = e^{-h} x_s + int_0^h e^{-(h - u)} D(lam_s + u) du            (data prediction, DPM-Solver++)
    x_t = x_s + int_{sigma_s}^{sigma_t} eps(sigma) dsigma                (noise prediction, DPM-Solver)

and the solvers differ only in how they approximate ``D`` (or ``eps``) inside the integral: a Taylor polynomial in
``lam`` whose derivatives come from earlier evaluations (*multistep*) or from extra stages inside the step
(*singlestep*). In the VE convention the VP scalings ``alpha_t`` of the papers cancel: DDIM (eta = 0), DPM-Solver-1,
DPM-Solver++(1), DEIS-1 and Euler in sigma are the same step ``x_t = (sigma_t/sigma_s) x_s + (1 - sigma_t/sigma_s) D``.

Papers: Song, Meng & Ermon 2021 (DDIM); Lu et al. 2022, "DPM-Solver" (singlestep, noise prediction);
Lu et al. 2022, "DPM-Solver++" (data prediction, multistep 2M/3M). Formulas follow diffusers'
``DPMSolverMultistepScheduler`` / ``DPMSolverSinglestepScheduler`` (Apache-2.0) so the cross-library tests can
agree to float rounding; the code is our own.

**The 3M finding.** diffusers and k-diffusion build ``D2 = (D1_0 - D1_1) / (r0 + r1)``, which is ``h^2 D''/2``,
and weight it by ``phi_3 = (e^{-h} - 1 + h)/h^2 - 1/2``; the Taylor term needs ``phi_3 * h^2 D''``, i.e. twice
that weight. ``variant="diffusers"`` keeps the library weight (measured order 2), ``variant="taylor"`` doubles it
(order 3; it equals DPM-Solver-v3 with trivial statistics). Chapter 03 prints both measured orders.

**Warm-up.** Multistep solvers start at order 1 (then 2); that first step's local error ``O(h^2)`` stays in the
global error, shrunk only by the contraction of the flow (about ``sigma_min / sigma_max``), so a third-order
multistep method drifts towards order 2 at very many steps (chapter 03 measures it up to 3073 steps).

All samplers here share the signature of :mod:`dmlab.samplers` and run on the plan engine of
:mod:`dmlab.samplers._plan` (weights computed once per call in float64; a few tensor ops per step). The final
step to ``sigma = 0`` is always first order: it returns ``D(x, sigma_last)`` and never evaluates the model at 0.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._common import model_in, per_step_sigmas, prepare, report, work_dtype
from ._plan import Plan, Update

__all__ = ["sample_ddim", "sample_dpm_solver", "sample_dpm_solver_multistep", "sample_dpmpp_2m", "sample_dpmpp_3m",
           "sample_dpmpp_3m_taylor", "sample_dpmpp_3m_diffusers", "plan_ddim", "plan_dpm_solver",
           "plan_dpm_solver_multistep", "multistep_orders", "singlestep_orders"]

PREDICTIONS = ("data", "noise")
SOLVER_TYPES = ("midpoint", "heun")
VARIANTS_3M = ("taylor", "diffusers")


# ----------------------------------------------------------------------------------------------- helpers
def lams(sigmas: list) -> list:
    """``lam = -log(sigma)`` of each sigma (``inf`` at 0)."""
    return [math.inf if s == 0 else -math.log(s) for s in sigmas]


def lin(*pairs) -> dict:
    """``sum(c * d)`` of ``(c, {index: coef})`` pairs: linear combinations of stored values by index."""
    out: dict = {}
    for c, d in pairs:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + c * v
    return out


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use one of {choices}")


def check_order(order, allowed=(1, 2, 3)) -> int:
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(f"order must be one of {allowed}, got {order!r}")
    return int(order)


def need_steps(n: int, order: int, what: str) -> None:
    """Raise if a schedule of ``n`` steps is too short for a solver of ``order``."""
    if n < order:
        raise ValueError(f"{what} of order {order} needs at least {order} steps, got {n}; pass a longer schedule "
                         f"(e.g. dmlab.schedules.karras({max(order, 5)})) or a lower order")


def restart_orders(orders: list, start: int) -> list:
    """Per-step orders of a solver started at step ``start`` of its schedule (img2img, inpainting and refiner
    pipelines call diffusers' ``set_begin_index(start)``): no earlier outputs exist, so the warm-up restarts there,
    ``min(p, i - start + 1)``, and the final-step rules keep counting the whole schedule, as diffusers' multistep
    and singlestep schedulers lower the order. Steps before ``start`` keep their orders (they are never taken)."""
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(orders):
        raise ValueError(f"start must be an int step index in [0, {len(orders) - 1}], got {start!r}")
    return [p if i < start else min(p, i - start + 1) for i, p in enumerate(orders)]


def check_lof(value):
    """``lower_order_final`` is True, False or ``"sigma_min"``."""
    if value not in (True, False, "sigma_min"):
        raise ValueError(f"lower_order_final must be True, False or 'sigma_min', got {value!r}")
    return value


def multistep_orders(n: int, order: int, lower_order_final=True) -> list:
    """Per-step orders of a multistep solver, as diffusers' ``DPMSolverMultistepScheduler`` chooses them.

    Warm-up ``min(order, i + 1)``; the final step (to ``sigma = 0``) is first order; with ``lower_order_final`` and
    fewer than 15 steps the second-to-last step has order at most 2 (Lu et al. 2022, for stability at few steps).
    ``lower_order_final="sigma_min"`` applies diffusers' rule for ``final_sigmas_type="sigma_min"`` to the last
    *positive* sigma instead: with fewer than 15 steps before it, the step into it is first order and the one before
    at most second order (use it to compare states at the last positive sigma with such a diffusers scheduler).
    """
    orders = [min(order, i + 1) for i in range(n)]
    if lower_order_final == "sigma_min":
        if 2 <= n < 16:
            orders[-2] = 1
            if n >= 3:
                orders[-3] = min(orders[-3], 2)
    elif lower_order_final and n < 15 and n >= 2:
        orders[-2] = min(orders[-2], 2)
    orders[-1] = 1
    return orders


def singlestep_orders(n: int, order: int) -> list:
    """Per-step orders of singlestep DPM-Solver (diffusers' ``get_order_list`` with ``lower_order_final``).

    Steps are grouped: a group ``[1, 2, 3]`` is one third-order step whose two inner stages are the next two grid
    points. The final step (to ``sigma = 0``) is first order.
    """
    if order == 3:
        k, r = divmod(n, 3)
        orders = [1, 2, 3] * (k - 1) + [1, 2] + [1] if r == 0 else [1, 2, 3] * k + ([1] if r == 1 else [1, 2])
    elif order == 2:
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        orders = [1] * n
    orders[-1] = 1
    return orders


def _phis(h: float, prediction: str):
    """The exponential-integrator weights of one step of length ``h`` in ``lam``.

    Returns ``(a, w0, w1, w2)``: ``x_t = a x_s + w0 M + w1 (h M') + w2 (h^2 M'')`` to third order, where ``M`` is
    ``D`` (data) or ``eps`` (noise) and ``sigma_s = 1`` units are folded in by the caller for noise prediction.
    Data: ``w0 = 1 - e^{-h}``, ``w1 = (h - 1 + e^{-h})/h``, ``w2 = (h^2/2 - h + 1 - e^{-h})/h^2``.
    """
    if prediction == "data":
        em1 = math.expm1(-h)
        return math.exp(-h), -em1, em1 / h + 1, -((em1 + h) / h ** 2 - 0.5)
    ep1 = math.expm1(h)  # noise: per unit sigma_t, x_t = x_s - sigma_t [ (e^h-1) M + ((e^h-1)/h - 1) hM' + ... ]
    return 1.0, -ep1, -(ep1 / h - 1), -((ep1 - h) / h ** 2 - 0.5)


# ----------------------------------------------------------------------------------------------- plans
def plan_ddim(sigmas: list, *, start: int = 0) -> Plan:
    """DDIM with ``eta = 0`` (Song et al. 2021): ``x_t = (sigma_t/sigma_s) x_s + (1 - sigma_t/sigma_s) D`` per step."""
    return plan_dpm_solver_multistep(sigmas, order=1, name="ddim", start=start)


def plan_dpm_solver_multistep(sigmas: list, *, order: int = 2, prediction: str = "data",
                              solver_type: str = "midpoint", variant: str = "taylor",
                              lower_order_final: bool | str = True, name: str | None = None, start: int = 0) -> Plan:
    """Multistep DPM-Solver(++) of ``order`` 1-3 (Lu et al. 2022, DPM-Solver++ Alg. 2 and its order-3 extension).

    ``prediction="data"`` integrates ``D`` (DPM-Solver++), ``"noise"`` integrates ``eps`` (multistep DPM-Solver).
    ``solver_type`` picks diffusers' second-order formula (``"midpoint"``: ``-0.5 (e^{-h}-1) D1``; ``"heun"``: the
    Taylor weight ``phi_2``); ``variant`` the weight of the second difference at order 3 (module docstring).
    ``start``: the first step taken (:func:`restart_orders`; a schedule shorter than ``order`` is then fine).
    """
    order = check_order(order)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("variant", variant, VARIANTS_3M)
    n = len(sigmas) - 1
    if not start:
        need_steps(n, order, "multistep DPM-Solver")
    lam = lams(sigmas)
    orders = restart_orders(multistep_orders(n, order, check_lof(lower_order_final)), start)
    m = "d" if prediction == "data" else "e"
    w2_scale = 2.0 if variant == "taylor" else 1.0
    adv = []
    for i, p in enumerate(orders):
        if sigmas[i + 1] == 0:
            adv.append(Update.of(d={i: 1.0}))
            continue
        h = lam[i + 1] - lam[i]
        a, w0, w1, w2 = _phis(h, prediction)
        unit = 1.0 if prediction == "data" else sigmas[i + 1]
        if p == 1:
            mm = {i: w0}
        elif p == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            D1 = {i: 1 / r0, i - 1: -1 / r0}
            half = 0.5 * w0 if solver_type == "midpoint" else w1
            mm = lin((w0, {i: 1.0}), (half, D1))
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            D1_0, D1_1 = {i: 1 / r0, i - 1: -1 / r0}, {i - 1: 1 / r1, i - 2: -1 / r1}
            diff = lin((1.0, D1_0), (-1.0, D1_1))
            D1 = lin((1.0, D1_0), (r0 / (r0 + r1), diff))
            D2 = lin((1 / (r0 + r1), diff))
            mm = lin((w0, {i: 1.0}), (w1, D1), (w2_scale * w2, D2))
        adv.append(Update.of(x={i: a}, **{m: {k: unit * v for k, v in mm.items()}}))
    label = name or f"dpm_solver{'pp' if prediction == 'data' else ''}_{order}m"
    return Plan(tuple(sigmas), tuple(adv), (None,) * n, tuple(orders), label)


def plan_dpm_solver(sigmas: list, *, order: int = 3, prediction: str = "noise", solver_type: str = "midpoint",
                    start: int = 0) -> Plan:
    """Singlestep DPM-Solver-``order`` (Lu et al. 2022, Alg. 1 / DPM-Solver-2, -3), grouped as diffusers does.

    Every grid point is one model evaluation; a step of order ``k`` goes from the group's first point to the point
    after its ``k``-th, using the ``k - 1`` points in between as its inner stages (``r1 = 1/3, r2 = 2/3`` of the
    paper when the grid is uniform in ``lam``). ``solver_type="midpoint"`` is the paper's formula (exact for those
    ``r``), ``"heun"`` the general Taylor one. ``start``: the first step taken (:func:`restart_orders`: a group cut
    by it starts at ``start`` with a lower order, as diffusers' singlestep scheduler does).
    """
    order = check_order(order)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    n = len(sigmas) - 1
    if not start:
        need_steps(n, order, "singlestep DPM-Solver")
    lam = lams(sigmas)
    orders = restart_orders(singlestep_orders(n, order), start)
    m = "d" if prediction == "data" else "e"
    adv = []
    for i, p in enumerate(orders):
        if sigmas[i + 1] == 0:
            adv.append(Update.of(d={i: 1.0}))
            continue
        b = i - (p - 1)  # the group's first point: the step starts there
        h = lam[i + 1] - lam[b]
        a, w0, w1, w2 = _phis(h, prediction)
        unit = 1.0 if prediction == "data" else sigmas[i + 1]
        if p == 1:
            mm = {i: w0}
        elif p == 2:
            r0 = (lam[i] - lam[b]) / h
            D1 = {i: 1 / r0, b: -1 / r0}
            mm = lin((w0, {b: 1.0}), (0.5 * w0 if solver_type == "midpoint" else w1, D1))
        else:
            r0, r1 = (lam[i] - lam[b]) / h, (lam[i - 1] - lam[b]) / h
            D1_0, D1_1 = {i - 1: 1 / r1, b: -1 / r1}, {i: 1 / r0, b: -1 / r0}
            if solver_type == "midpoint":
                mm = lin((w0, {b: 1.0}), (w1, D1_1))
            else:
                D1 = lin((r0 / (r0 - r1), D1_0), (-r1 / (r0 - r1), D1_1))
                D2 = lin((2 / (r0 - r1), D1_1), (-2 / (r0 - r1), D1_0))
                mm = lin((w0, {b: 1.0}), (w1, D1), (w2, D2))
        adv.append(Update.of(x={b: a}, **{m: {k: unit * v for k, v in mm.items()}}))
    return Plan(tuple(sigmas), tuple(adv), (None,) * n, tuple(orders), f"dpm_solver_{order}s_{prediction}")


# ----------------------------------------------------------------------------------------------- samplers
# The public samplers are plain loops, one line of the paper's algorithm per line of code. The plans above compute
# the same numbers (tests/samplers/test_registry.py checks loop == plan to 1e-12 in float64) and back the diffusers
# adapter and the solver search. Every update is computed in float32 (float64 for float64 input); x's dtype is kept.
def _loop_setup(denoiser, x, sigmas, cond, generator):
    """Shared start of the loops: checked schedule (tensor and floats), the model ``D(x, sigma)`` in the update's
    dtype (cond bound), per-step ``[B]`` sigmas (in x's dtype) and ``x`` in the update's dtype."""
    sig, cond, s = prepare(denoiser, x, sigmas, cond, generator, floats=True)
    xw = x.to(work_dtype(x))
    return sig, model_in(denoiser, cond, x.dtype, xw.dtype), s, per_step_sigmas(sig, x.shape[0]), xw


@torch.no_grad()
def sample_ddim(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                generator: torch.Generator | None = None, callback: Callable | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12 with ``sigma_t = 0``): ``x_next = D + sigma_next * eps_hat``, 1 NFE/step.

    With ``eta = 0`` (the default) it is deterministic and identical to Euler in sigma and to DPM-Solver-1 (first
    order). ``eta > 0`` is DDIM's stochastic family, implemented in :func:`dmlab.samplers.sample_ddpm` (samplers
    of the reverse SDE) and called from here with the same ``generator``.
    """
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0 (0: deterministic DDIM, 1: DDPM), got {eta!r}")
    if eta > 0:
        from .sde import sample_ddpm

        return sample_ddpm(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=float(eta))
    sig, model, s, batch, xw = _loop_setup(denoiser, x, sigmas, cond, generator)
    for i in range(len(s) - 1):
        denoised = model(xw, batch[i])  # x0_hat = D(x_i, sigma_i)
        report(callback, i, xw, sig[i], sig[i + 1], denoised)
        xw = torch.lerp(denoised, xw, s[i + 1] / s[i])  # x_next = D + sigma_next * (x - D) / sigma
    return xw.to(x.dtype)


@torch.no_grad()
def sample_dpm_solver_multistep(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                                generator: torch.Generator | None = None, callback: Callable | None = None,
                                order: int = 2, prediction: str = "data", solver_type: str = "midpoint",
                                variant: str = "taylor", lower_order_final: bool | str = True) -> Tensor:
    """Multistep DPM-Solver(++) (Lu et al. 2022b, Alg. 2 and its order-3 extension): one NFE per step.

    ``prediction="data"`` integrates ``D`` (DPM-Solver++), ``"noise"`` the noise prediction ``eps = (x - D) / sigma``
    (multistep DPM-Solver, Lu et al. 2022a). Warm-up ``min(order, i + 1)`` and ``lower_order_final`` as diffusers
    (:func:`multistep_orders`). ``solver_type``: ``"midpoint"`` weights the first difference ``D1`` by
    ``-(e^{-h} - 1) / 2`` (the paper's Alg. 2), ``"heun"`` by the Taylor weight ``phi_2``; ``variant`` is the weight
    of the second difference at order 3 (module docstring). :func:`sample_dpmpp_2m` and :func:`sample_dpmpp_3m`
    are the common presets. Needs at least ``order`` steps.
    """
    order = check_order(order)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("variant", variant, VARIANTS_3M)
    sig, model, s, batch, xw = _loop_setup(denoiser, x, sigmas, cond, generator)
    n = len(s) - 1
    need_steps(n, order, "multistep DPM-Solver")
    orders = multistep_orders(n, order, check_lof(lower_order_final))
    lam = lams(s)  # lambda_i = -log(sigma_i): half log-SNR in the VE convention
    w2_scale = 2.0 if variant == "taylor" else 1.0
    M = []  # the last three model outputs (D or eps), newest last
    for i in range(n):
        denoised = model(xw, batch[i])
        report(callback, i, xw, sig[i], sig[i + 1], denoised)
        M = (M + [denoised if prediction == "data" else (xw - denoised) / s[i]])[-3:]
        if s[i + 1] == 0:  # final step: x_0 = D(x, sigma_last), never evaluating the model at 0
            xw = denoised
            break
        h = lam[i + 1] - lam[i]  # h_i = lambda_{i+1} - lambda_i
        a, w0, w1, w2 = _phis(h, prediction)  # e^{-h}, 1 - e^{-h}, phi_2, phi_3 weights (noise: per unit sigma)
        p = orders[i]
        if p == 1:  # DPM-Solver(++)-1 = DDIM
            m = w0 * M[-1]
        elif p == 2:  # Alg. 2, line 5: r_i = h_{i-1} / h_i, D1 = (M_i - M_{i-1}) / r_i
            r0 = (lam[i] - lam[i - 1]) / h
            D1 = (M[-1] - M[-2]) / r0
            m = w0 * M[-1] + (0.5 * w0 if solver_type == "midpoint" else w1) * D1
        else:  # order 3: first and second divided differences from the last three outputs
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            D1_0, D1_1 = (M[-1] - M[-2]) / r0, (M[-2] - M[-3]) / r1
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)  # ~ h M'
            D2 = (D1_0 - D1_1) / (r0 + r1)  # ~ h^2 M'' / 2
            m = w0 * M[-1] + w1 * D1 + (w2_scale * w2) * D2
        # data: x_{i+1} = (sigma_{i+1} / sigma_i) x_i + m;  noise: x_{i+1} = x_i + sigma_{i+1} m
        xw = a * xw + m if prediction == "data" else xw + s[i + 1] * m
    return xw.to(x.dtype)


def sample_dpmpp_2m(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                    generator: torch.Generator | None = None, callback: Callable | None = None,
                    solver_type: str = "midpoint", lower_order_final: bool | str = True) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), written out as the paper's loop (k-diffusion style).

    Per step ``h = lambda_{i+1} - lambda_i``, ``r = h_{i-1} / h``:
    ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - (e^{-h} - 1) ((1 + 1/(2r)) D_i - D_{i-1} / (2r))``;
    the first step is DDIM and the last returns ``D(x, sigma_last)``. Second order, one NFE per step. Equals
    k-diffusion's ``sample_dpmpp_2m`` and diffusers' default ``DPMSolverMultistepScheduler``. ``solver_type="heun"``
    (diffusers' option) and ``lower_order_final`` go to :func:`sample_dpm_solver_multistep`.
    """
    if solver_type != "midpoint" or lower_order_final is not True:
        return sample_dpm_solver_multistep(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback,
                                           order=2, solver_type=solver_type, lower_order_final=lower_order_final)
    with torch.no_grad():
        sig, model, s, batch, xw = _loop_setup(denoiser, x, sigmas, cond, generator)
        n, old = len(s) - 1, None
        for i in range(n):
            denoised = model(xw, batch[i])  # D_i = D(x_i, sigma_i)
            report(callback, i, xw, sig[i], sig[i + 1], denoised)
            if s[i + 1] == 0:  # last step: x_0 = D_i
                xw = denoised
                break
            h = math.log(s[i] / s[i + 1])  # h_i = lambda_{i+1} - lambda_i, lambda = -log sigma
            if old is None:  # first step: first order (DDIM)
                d = denoised
            else:  # D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h_i
                r = h_old / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            xw = (s[i + 1] / s[i]) * xw - math.expm1(-h) * d  # x_{i+1} = (sigma_{i+1}/sigma_i) x_i - (e^{-h}-1) D
            old, h_old = denoised, h
        return xw.to(x.dtype)


def sample_dpmpp_3m(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                    generator: torch.Generator | None = None, callback: Callable | None = None,
                    variant: str = "taylor", lower_order_final: bool | str = True) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b): third-order multistep with data prediction, one NFE per step.

    The loop is :func:`sample_dpm_solver_multistep` at ``order=3``: ``x_{i+1} = e^{-h} x_i + (1 - e^{-h}) D_i +
    phi_2 D1 + w phi_3 D2`` with the first and second divided differences ``D1, D2`` of the last three outputs.
    ``variant="taylor"`` (default) uses ``w = 2`` (order 3, measured); ``variant="diffusers"`` ``w = 1`` as diffusers
    and k-diffusion do (order 2, measured). Needs >= 3 steps.
    """
    return sample_dpm_solver_multistep(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback,
                                       order=3, variant=variant, lower_order_final=lower_order_final)


def sample_dpmpp_3m_taylor(denoiser: Callable, x: Tensor, sigmas: Tensor, **kw) -> Tensor:
    """DPM-Solver++(3M) with the Taylor-exact weight ``2 phi_3`` on ``D2`` (order 3): :func:`sample_dpmpp_3m`."""
    return sample_dpmpp_3m(denoiser, x, sigmas, variant="taylor", **kw)


def sample_dpmpp_3m_diffusers(denoiser: Callable, x: Tensor, sigmas: Tensor, **kw) -> Tensor:
    """DPM-Solver++(3M) exactly as diffusers / k-diffusion weight ``D2`` (measured order 2): :func:`sample_dpmpp_3m`."""
    return sample_dpmpp_3m(denoiser, x, sigmas, variant="diffusers", **kw)


@torch.no_grad()
def sample_dpm_solver(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                      generator: torch.Generator | None = None, callback: Callable | None = None, order: int = 3,
                      prediction: str = "noise", solver_type: str = "midpoint") -> Tensor:
    """Singlestep DPM-Solver-1/2/3 (Lu et al. 2022a, Alg. 1 with DPM-Solver-2/-3); ``prediction="data"`` gives
    singlestep DPM-Solver++ (Lu et al. 2022b, Alg. 1).

    One NFE per grid point: the grid is cut into groups (:func:`singlestep_orders`, diffusers' rule); a group
    ``[1, 2, 3]`` is one DPM-Solver-3 step from its first point ``s`` whose two inner stages ``u_1, u_2`` are the next
    two grid points, reached by the first- and second-order updates from ``s``. ``solver_type="midpoint"`` is the
    paper's formula (exact for its ``r_1 = 1/3, r_2 = 2/3``: use :func:`dmlab.schedules.log_uniform`), ``"heun"``
    the general Taylor one. This is diffusers' ``DPMSolverSinglestepScheduler``. Needs at least ``order`` steps.
    """
    order = check_order(order)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    sig, model, s, batch, xw = _loop_setup(denoiser, x, sigmas, cond, generator)
    n = len(s) - 1
    need_steps(n, order, "singlestep DPM-Solver")
    lam = lams(s)
    for i, p in enumerate(singlestep_orders(n, order)):
        denoised = model(xw, batch[i])
        report(callback, i, xw, sig[i], sig[i + 1], denoised)
        if s[i + 1] == 0:  # final step: x_0 = D(x, sigma_last)
            xw = denoised
            break
        m_i = denoised if prediction == "data" else (xw - denoised) / s[i]
        if p == 1:  # a new step starts at s = sigma_i: remember x_s and the model there
            b, x_s, M = i, xw, [m_i]
        else:  # the inner stage u_{p-1} = x_i was evaluated: keep its output
            M.append(m_i)
        h = lam[i + 1] - lam[b]  # the step (or stage) from s to sigma_{i+1}
        a, w0, w1, w2 = _phis(h, prediction)
        if p == 1:  # DPM-Solver-1 (= DDIM)
            m = w0 * M[0]
        elif p == 2:  # DPM-Solver-2: D1 = (M(u_1) - M(s)) / r_1
            r = (lam[i] - lam[b]) / h
            m = w0 * M[0] + (0.5 * w0 if solver_type == "midpoint" else w1) * ((M[1] - M[0]) / r)
        else:  # DPM-Solver-3 with stages r_1 = (lam(u_1) - lam_s) / h, r_2 = (lam(u_2) - lam_s) / h
            r1, r2 = (lam[i - 1] - lam[b]) / h, (lam[i] - lam[b]) / h
            D1_1, D1_2 = (M[1] - M[0]) / r1, (M[2] - M[0]) / r2
            if solver_type == "midpoint":  # the paper: only the second stage's difference, weighted by phi_2
                m = w0 * M[0] + w1 * D1_2
            else:  # Taylor: first and second derivative from both stages
                D1 = (r2 * D1_1 - r1 * D1_2) / (r2 - r1)
                D2 = 2 * (D1_2 - D1_1) / (r2 - r1)
                m = w0 * M[0] + w1 * D1 + w2 * D2
        xw = a * x_s + m if prediction == "data" else x_s + s[i + 1] * m
    return xw.to(x.dtype)
