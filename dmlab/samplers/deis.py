"""DEIS: Fast Sampling of Diffusion Models with Exponential Integrator (Zhang & Chen, ICLR 2023; paper 81).

The noise-prediction form of the PF-ODE in the VE convention is ``x_t = x_s + int_{sigma_s}^{sigma_t} eps dsigma``
(``rho = sigma_VP / alpha`` of the paper *is* our ``sigma``). DEIS replaces ``eps`` by the Lagrange polynomial
through the last ``order`` evaluations and integrates it exactly:

    x_{i+1} = x_i + sum_j c_ij eps_j,      c_ij = int_{sigma_i}^{sigma_{i+1}} l_j(v(sigma)) dsigma

The variants differ in the variable ``v`` the polynomial lives in: ``"tab"`` the diffusion time ``t`` (tAB-DEIS),
``"rhoab"`` ``rho = sigma`` itself (rhoAB-DEIS: Adams-Bashforth in sigma, i.e. k-diffusion's LMS), ``"logrho"``
``log(sigma)`` (diffusers' ``DEISMultistepScheduler``). Order 1 is DDIM for all three. A polynomial in ``log rho``
integrated against ``drho`` is also exactly what multistep DPM-Solver with noise prediction and the Taylor
(``heun``) weights computes, so ``variant="logrho"`` equals
``sample_dpm_solver_multistep(prediction="noise", solver_type="heun")`` (a test checks it).

The weights ``c_ij`` are computed by 16-point Gauss-Legendre quadrature in ``log sigma`` (float64; accurate to
rounding for steps of moderate length in ``log sigma``). The time map of ``"tab"`` defaults to the continuous VP-linear schedule of
Song et al. 2021 (``beta_min = 0.1, beta_max = 20``), the paper's setting; pass ``time=callable`` for another.
Warm-up and ``lower_order_final`` follow diffusers; the last step to ``sigma = 0`` returns ``D(x, sigma_last)``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ._common import model_in, per_step_sigmas, prepare, report, work_dtype
from ._plan import Plan, Update
from .exponential import check_choice, check_lof, check_order, multistep_orders, need_steps, restart_orders

__all__ = ["sample_deis", "plan_deis", "vp_linear_time"]

VARIANTS = ("tab", "rhoab", "logrho")
_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)


def vp_linear_time(sigma, beta_min: float = 0.1, beta_max: float = 20.0):
    """The VP time ``t`` of a VE sigma under ``log alpha_bar(t) = -beta_min t - (beta_max - beta_min) t^2 / 2``."""
    s = np.asarray(sigma, dtype=np.float64)
    db = beta_max - beta_min
    return (-beta_min + np.sqrt(beta_min ** 2 + 2 * db * np.log1p(s ** 2))) / db


def _variable(variant: str, time: Callable | None) -> Callable:
    if variant == "rhoab":
        return lambda s: s
    if variant == "logrho":
        return np.log
    return (lambda s: np.asarray(time(s), dtype=np.float64)) if time is not None else vp_linear_time


def deis_weights(sig_nodes: list, sig_from: float, sig_to: float, v: Callable) -> list:
    """``int_{sig_from}^{sig_to} l_j(v(sigma)) dsigma`` for the Lagrange basis ``l_j`` on ``v(sig_nodes)``."""
    ua, ub = math.log(sig_from), math.log(sig_to)
    u = 0.5 * (ub - ua) * _GL_X + 0.5 * (ub + ua)
    s = np.exp(u)
    w = 0.5 * (ub - ua) * _GL_W * s  # dsigma = sigma du
    vq, vn = v(s), np.asarray(v(np.asarray(sig_nodes, dtype=np.float64)), dtype=np.float64)
    out = []
    for j in range(len(sig_nodes)):
        ell = np.ones_like(vq)
        for k in range(len(sig_nodes)):
            if k != j:
                ell = ell * (vq - vn[k]) / (vn[j] - vn[k])
        out.append(float((w * ell).sum()))
    return out


def plan_deis(sigmas: list, *, order: int = 3, variant: str = "logrho", time: Callable | None = None,
              lower_order_final: bool | str = True, start: int = 0) -> Plan:
    """The DEIS multistep plan (see the module docstring): ``x_{i+1} = x_i + sum_j c_ij eps_j``; ``start``: the first
    step taken (``restart_orders``)."""
    order = check_order(order)
    check_choice("variant", variant, VARIANTS)
    if time is not None and not callable(time):
        raise TypeError("time must be callable: time(sigma as a float64 numpy array) -> t, increasing in sigma")
    n = len(sigmas) - 1
    if not start:
        need_steps(n, order, "DEIS")
    v = _variable(variant, time)
    orders = restart_orders(multistep_orders(n, order, check_lof(lower_order_final)), start)
    adv = []
    for i, p in enumerate(orders):
        if sigmas[i + 1] == 0:
            adv.append(Update.of(d={i: 1.0}))
            continue
        nodes = [i - k for k in range(p)]
        c = deis_weights([sigmas[j] for j in nodes], sigmas[i], sigmas[i + 1], v)
        adv.append(Update.of(x={i: 1.0}, e=dict(zip(nodes, c))))
    return Plan(tuple(sigmas), tuple(adv), (None,) * n, tuple(orders), f"deis_{variant}_{order}")


@torch.no_grad()
def sample_deis(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                generator: torch.Generator | None = None, callback: Callable | None = None, order: int = 3,
                variant: str = "logrho", time: Callable | None = None, lower_order_final: bool | str = True) -> Tensor:
    """DEIS (Zhang & Chen 2023, Alg. 1 / eq. 15): exponential integrator with a polynomial extrapolation of ``eps``.

    One NFE per step: ``x_{i+1} = x_i + sum_j C_ij eps_{i-j}``, ``C_ij = int_{sigma_i}^{sigma_{i+1}} l_j(v) dsigma``
    over the Lagrange basis ``l_j`` of the last ``order`` evaluations in the variable ``v`` of ``variant``:
    ``"tab"`` (the diffusion time ``t``; ``time(sigma) -> t`` maps sigmas to it, default the VP-linear time),
    ``"rhoab"`` (``rho = sigma``) or ``"logrho"`` (``log rho``; diffusers' default). ``order`` 1-3 (order 1 is
    DDIM). Needs at least ``order`` steps.
    """
    order = check_order(order)
    check_choice("variant", variant, VARIANTS)
    if time is not None and not callable(time):
        raise TypeError("time must be callable: time(sigma as a float64 numpy array) -> t, increasing in sigma")
    sig, cond, s = prepare(denoiser, x, sigmas, cond, generator, floats=True)
    batch, xw = per_step_sigmas(sig, x.shape[0]), x.to(work_dtype(x))
    model = model_in(denoiser, cond, x.dtype, xw.dtype)  # D(x, sigma) in the update's dtype
    n = len(s) - 1
    need_steps(n, order, "DEIS")
    v = _variable(variant, time)
    orders = multistep_orders(n, order, check_lof(lower_order_final))
    eps = []  # eps_i, eps_{i-1}, ... newest first
    for i in range(n):
        denoised = model(xw, batch[i])
        report(callback, i, xw, sig[i], sig[i + 1], denoised)
        if s[i + 1] == 0:  # final step: x_0 = D(x, sigma_last)
            xw = denoised
            break
        eps = [(xw - denoised) / s[i]] + eps[: order - 1]  # eps_i = (x_i - D_i) / sigma_i
        p = orders[i]
        C = deis_weights(s[i - p + 1: i + 1][::-1], s[i], s[i + 1], v)  # C_ij of the nodes i, i-1, ..., i-p+1
        xw = xw + sum(c * e for c, e in zip(C, eps))  # x_{i+1} = x_i + sum_j C_ij eps_{i-j}
    return xw.to(x.dtype)
