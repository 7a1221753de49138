"""Momentum for multistep diffusion ODE solvers (Wizadwongsa et al. 2024, "Diffusion Sampling with Momentum for
Mitigating Divergence Artifacts", ICLR; official code ``sWizad/momentum-diffusion``, MIT).

High-order multistep solvers have small stability regions; at few steps and strong guidance they diverge and
leave artifacts. The paper adds momentum to the solver's update, in DDIM coordinates ``x_bar = x / alpha``,
``g = sigma_t / alpha``. In dmlab's VE convention these are simply ``x`` and ``sigma``: the ODE is
``dx/dsigma = eps_hat(x, sigma) = (x - D(x, sigma)) / sigma``.

* :func:`sample_hb` - Polyak's heavy ball (HB) on any multistep rule: ``v <- (1 - beta) v + beta * rule(history)``,
  then ``x <- x + (sigma_next - sigma) v`` (rules in noise space) or, for data-space rules such as DPM-Solver++(2M),
  ``x <- (sigma_next / sigma) x + (1 - sigma_next / sigma) v``. ``beta = 1`` is the plain solver. The paper proves
  HB methods first-order for ``beta < 1``.
* :func:`sample_ghvb` - generalised heavy ball (GHVB): ``v <- (1 - beta) v + beta eps_hat``, then an
  Adams-Bashforth-like combination of the ``v``'s with ``beta``-dependent weights (the paper's ``AdamBmixer``);
  fractional ``order = k - 1 + beta`` (``1.8`` is ``k = 2, beta = 0.8``); an integer order is PLMS.
* :class:`MultistepRule` - the interface a solver offers to be wrapped: which space it works in and how it combines
  its history into one update direction. Built-ins: ``plms(k)`` (Adams-Bashforth with the constant PLMS weights)
  and ``dpmpp_2m`` (Lu et al. 2022). :func:`stability_interval` computes a method's real stability interval on the
  test equation ``y' = lam y``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._common import call, half_safe, prepare, report

__all__ = ["MultistepRule", "plms", "DPMPP_2M", "sample_hb", "sample_ghvb", "adams_bashforth_weights",
           "stability_interval"]


def adams_bashforth_weights(k: int, b: float = 1.0) -> list[float]:
    """Weights of the newest-first history in the paper's ``AdamBmixer(k, ets, b)`` (divided by ``b``).

    ``b = 1`` gives the Adams-Bashforth (PLMS) weights for uniform steps: ``[1]``, ``[3/2, -1/2]``,
    ``[23/12, -16/12, 5/12]``, ``[55/24, -59/24, 37/24, -9/24]``; GHVB uses ``b = beta``.
    """
    rows = {1: ([b], 1), 2: ([2 + b, -(2 - b)], 2), 3: ([18 + 5 * b, -(24 - 8 * b), 6 - b], 12),
            4: ([46 + 9 * b, -(78 - 19 * b), 42 - 5 * b, -(10 - b)], 24),
            5: ([1650 + 251 * b, -(3420 - 646 * b), 2880 - 264 * b, -(1380 - 106 * b), 270 - 19 * b], 720)}
    if k not in rows:
        raise ValueError(f"order k must be 1..5 for Adams-Bashforth weights, got {k!r}")
    w, den = rows[k]
    return [c / den / b for c in w]


@dataclass(frozen=True)
class MultistepRule:
    """How a multistep solver turns its history into one update direction (the interface momentum wraps).

    ``space="eps"``: the history holds ``eps_hat_j = (x_j - D_j) / sigma_j`` and the step is
    ``x + (sigma_next - sigma) u``. ``space="x0"``: the history holds ``D_j`` and the step is
    ``(sigma_next / sigma) x + (1 - sigma_next / sigma) u`` (the exponential-integrator form in VE coordinates).
    ``combine(history, sigmas, sigma_next)`` gets the newest-last lists of values and their sigmas.
    """

    name: str
    space: str
    combine: Callable[[list, list, Tensor], Tensor]
    history: int = 1

    def __post_init__(self):
        if self.space not in ("eps", "x0"):
            raise ValueError(f"space must be 'eps' or 'x0', got {self.space!r}")
        if not callable(self.combine):
            raise TypeError("combine must be callable: combine(history, sigmas, sigma_next) -> direction")
        if not isinstance(self.history, int) or self.history < 1:
            raise ValueError("history must be a positive int (how many past values the rule uses)")


def plms(k: int = 2) -> MultistepRule:
    """Adams-Bashforth of order ``k`` with PLMS's constant weights (Liu et al. 2022), lower order while warming up.

    Constant weights on a smoothly varying grid (Karras, log-uniform) keep order ``k``.
    """
    adams_bashforth_weights(k)

    def combine(hist, sig, s_next):
        w = adams_bashforth_weights(min(k, len(hist)))
        return sum(c * h for c, h in zip(w, reversed(hist)))

    return MultistepRule(f"plms{k}", "eps", combine, k)


def _dpmpp_2m(hist, sig, s_next):
    if len(hist) == 1 or s_next == 0:  # first step DDIM; the last (to sigma = 0) first order, as lower_order_final
        return hist[-1]
    h = (sig[-1] / s_next).log()
    r = (sig[-2] / sig[-1]).log() / h
    return hist[-1] + (hist[-1] - hist[-2]) / (2 * r)


DPMPP_2M = MultistepRule("dpmpp_2m", "x0", _dpmpp_2m, 2)
"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) as a data-space rule, ``u = D_i + (D_i - D_{i-1}) / (2 r)``."""


def _rule(method, order: int) -> MultistepRule | str:
    if isinstance(method, MultistepRule):
        return method
    if method == "euler":
        return plms(1)
    if method == "plms":
        return plms(order)
    if method == "dpmpp_2m":
        return DPMPP_2M
    if method == "heun":
        return "heun"
    raise ValueError(f"unknown method {method!r}; use 'euler', 'heun', 'plms' (with order), 'dpmpp_2m' or a MultistepRule")


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1] (1: no momentum; the paper uses 0.8-0.9), got {beta!r}")
    return float(beta)


@half_safe
@torch.no_grad()
def sample_hb(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
              generator: torch.Generator | None = None, callback: Callable | None = None, beta: float = 0.8,
              method: str | MultistepRule = "plms", order: int = 2) -> Tensor:
    """Polyak heavy-ball momentum on a multistep solver (Wizadwongsa et al. 2024, Sec. 4, "HB").

    ``v <- (1 - beta) v + beta u`` with ``u`` the wrapped solver's update direction; ``v`` starts as the first
    ``u``. ``method``: ``"euler"``, ``"plms"`` (Adams-Bashforth of ``order`` 1-5, PLMS weights), ``"dpmpp_2m"``
    (momentum on ``D_i + (D_i - D_{i-1}) / 2r``, as the paper's ``MomentumDPMSolverMultistepScheduler``; here the
    momentum also averages the first, DDIM step), ``"heun"`` (the averaged Heun slope; two NFE per step except
    the last), or any :class:`MultistepRule`. ``beta = 1`` reproduces the plain solver exactly; ``beta < 1`` is
    first order (the paper's theorem) with a larger stability region. One NFE per step (Heun: ``2 n - 1``).
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    beta = _check_beta(beta)
    rule = _rule(method, order)
    hist, hsig, v = [], [], None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoiser, x, s, cond)
        report(callback, i, x, s, s_next, denoised)
        eps = (x - denoised) / s
        if rule == "heun":
            u = eps
            if s_next > 0:
                x_pred = x + (s_next - s) * eps
                u = (eps + (x_pred - call(denoiser, x_pred, s_next, cond)) / s_next) / 2
            space = "eps"
        else:
            hist.append(eps if rule.space == "eps" else denoised)
            hsig.append(s)
            del hist[:-rule.history], hsig[:-rule.history]
            u, space = rule.combine(hist, hsig, s_next), rule.space
        v = u if v is None else (1 - beta) * v + beta * u
        x = x + (s_next - s) * v if space == "eps" else (s_next / s) * x + (1 - s_next / s) * v
    return x


def _ghvb_order(order) -> tuple[int, float]:
    if isinstance(order, bool) or not isinstance(order, (int, float)) or not 0 < order <= 5:
        raise ValueError(f"order must be a number in (0, 5] (GHVB k.beta, e.g. 1.8 = order 2 with beta 0.8), got {order!r}")
    k = math.ceil(order - 1e-12)
    return k, float(order - (k - 1))


@half_safe
@torch.no_grad()
def sample_ghvb(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                generator: torch.Generator | None = None, callback: Callable | None = None,
                order: float = 1.8) -> Tensor:
    """Generalised heavy-ball momentum, GHVB (Wizadwongsa et al. 2024, Sec. 5; the official ``GHVBScheduler``).

    With ``k = ceil(order)`` and ``beta = order - (k - 1)``: ``v <- (1 - beta) v + beta eps_hat`` (``v`` starts as
    the first ``eps_hat``), then ``x <- x + (sigma_next - sigma) sum_j w_j(beta) v_{n-j}`` with the paper's
    ``AdamBmixer`` weights (:func:`adams_bashforth_weights` with ``b = beta``). An integer order is PLMS-``k``;
    ``order`` in ``(k - 1, k)`` trades accuracy for stability. One NFE per step.
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    k, beta = _ghvb_order(order)
    vs, v = [], None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoiser, x, s, cond)
        report(callback, i, x, s, s_next, denoised)
        eps = (x - denoised) / s
        v = eps if v is None else (1 - beta) * v + beta * eps
        vs = (vs + [v])[-k:]
        w = adams_bashforth_weights(len(vs), beta)
        x = x + (s_next - s) * sum(c * h for c, h in zip(w, reversed(vs)))
    return x


def stability_interval(kind: str = "hb", order: int | float = 2, beta: float = 1.0, *, z_min: float = -8.0,
                       n: int = 8001) -> float:
    """Left end ``z*`` of the real stability interval ``[z*, 0]`` of a momentum method on ``y' = lam y``.

    ``z = h lam`` with a constant step ``h``. ``kind="hb"``: HB on PLMS-``order`` with ``beta``; ``kind="ghvb"``:
    GHVB with fractional ``order`` (``beta`` ignored). The method is linear in its state, so its amplification
    matrix is assembled column by column and ``z`` is stable when the spectral radius is at most 1
    (the root-locus analysis of Wizadwongsa et al. 2024, Sec. 3). Returns ``z_min`` if stable on the whole grid.
    """
    if kind == "hb":
        k, b = int(order), _check_beta(beta)
        if k != order or not 1 <= k <= 5:
            raise ValueError(f"HB needs an integer order 1..5, got {order!r}")
    elif kind == "ghvb":
        k, b = _ghvb_order(order)
    else:
        raise ValueError(f"unknown kind {kind!r}; use 'hb' or 'ghvb'")
    size = k + 1  # hb: (y_n, v_n, y_{n-1}..y_{n-k+1}); ghvb: (y_n, v_{n-1}..v_{n-k})

    def step(state: Sequence[float], z: float) -> list[float]:
        y, rest = state[0], list(state[1:])
        if kind == "hb":
            v, ys = rest[0], [y] + rest[1:]
            u = sum(c * z * yy for c, yy in zip(adams_bashforth_weights(k), ys))
            v = (1 - b) * v + b * u
            return [y + v, v] + ys[:-1]
        vs = rest  # newest first
        v = (1 - b) * vs[0] + b * z * y
        hist = [v] + vs[:-1]
        return [y + sum(c * h for c, h in zip(adams_bashforth_weights(k, b), hist))] + hist

    eye = torch.eye(size, dtype=torch.float64).tolist()
    left = 0.0
    for z in torch.linspace(0, z_min, n).tolist()[1:]:
        M = torch.tensor([step(e, z) for e in eye], dtype=torch.float64).T
        if torch.linalg.eigvals(M).abs().max().item() > 1 + 1e-9:
            return left
        left = z
    return left
