"""DPM-Solver-v3: an ODE solver built on empirical model statistics (Zheng, Lu, Chen & Zhu, NeurIPS 2023; paper 24).

In ``lam = -log(sigma)`` the PF-ODE is ``dx/dlam = D - x``. DPM-Solver-v3 splits the model term with three
*empirical model statistics* (EMS), functions of ``lam`` with the shape of one sample:

* ``l``: the best diagonal linear part of the model, ``l = E[diag(d(x - D)/dx)]`` (so that
  ``f = (1 - l) x - D`` depends on ``x`` as little as possible),
* ``s, b``: the best affine model of how ``f`` changes along a trajectory, ``f' ~ s f + b`` (least squares),

and solves ``dx/dlam = -l x - f`` with the change of variables ``g = e^{-(S - S_s)} f - e^{S_s} (B - B_s)``
(``L, S`` the integrals of ``l, s``; ``B = int e^{-S} b``), which makes ``g`` as flat in ``lam`` as the statistics
allow. One step from ``lam_s`` to ``lam_t`` (the official ``multistep_predictor_update`` without the ``alpha`` factors):

    x_t = e^{L_s - L_t} x_s - e^{-L_t - S_s} (I_t - I_s) g_s - e^{-L_t} (C_t - C_s - B_s (I_t - I_s))
          - e^{L_s - L_t} sum_k E_k g^{(k)}(lam_s),       E_k = int e^{(L + S)(lam) - (L + S)(lam_s)} (lam - lam_s)^k / k!

with ``I = int e^{L + S}``, ``C = int e^{L + S} B`` and the derivatives ``g^{(k)}`` from the polynomial through
earlier evaluations (multistep predictor). The corrector re-solves the step once the model has been evaluated at
its end, with that value as one more node (order + 1, no extra NFE), and keeps ``f`` at the corrected point
(``D <- D + (1 - l)(x_new - x)``), as the official code does.

With trivial statistics (``l = 1, s = b = 0``) ``g = -D`` and the step *is* DPM-Solver++ with Taylor weights:
order 2 = ``sample_dpm_solver_multistep(solver_type="heun")``, order 3 = ``sample_dpmpp_3m(variant="taylor")``
(a test checks both to 1e-12). To make that exact, the statistics are taken piecewise constant between the grid
points of the statistics and of the schedule (trapezoid averages of the grid values, as the official code's
trapezoid rule) and every integral is then done in closed form or by Gauss-Legendre quadrature per cell.

Official code: ``thu-ml/DPM-Solver-v3`` (``dpm_solver_v3.py``); this is our own CPU implementation in the VE
convention. Not in the official solver: arbitrary sigmas (no snapping to the statistics grid). Simplified: no
"pseudo-order" derivative estimates and no "half corrector".
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ._common import call, half_safe, prepare, randn_like, report
from .exponential import check_lof, check_order, lams, need_steps
from .unipc import unipc_orders

__all__ = ["Statistics", "estimate_statistics", "sample_dpm_solver_v3"]

_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


@dataclass
class Statistics:
    """Empirical model statistics on an increasing ``lam`` grid: ``l, s, b`` of shape ``[K, *sample_shape]``
    (or broadcastable, e.g. ``[K, 1, 1, 1]``), float64. ``meta`` records how they were estimated."""

    lam: Tensor
    l: Tensor
    s: Tensor
    b: Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.lam = torch.as_tensor(self.lam, dtype=torch.float64)
        if self.lam.ndim != 1 or len(self.lam) < 2 or not (self.lam[1:] > self.lam[:-1]).all():
            raise ValueError("lam must be a 1-D strictly increasing grid of at least 2 points")
        for name in ("l", "s", "b"):
            v = torch.as_tensor(getattr(self, name), dtype=torch.float64)
            if v.ndim < 1 or v.shape[0] != len(self.lam) or not torch.isfinite(v).all():
                raise ValueError(f"{name} must be finite with shape [K={len(self.lam)}, ...]")
            setattr(self, name, v)

    @classmethod
    def trivial(cls, lam_min: float = -6.0, lam_max: float = 8.0, n: int = 2, shape: tuple = ()) -> "Statistics":
        """``l = 1, s = b = 0``: with these DPM-Solver-v3 is DPM-Solver++ (Taylor weights)."""
        lam = torch.linspace(lam_min, lam_max, n, dtype=torch.float64)
        one = torch.ones((n, *shape), dtype=torch.float64)
        return cls(lam, one, 0 * one, 0 * one, {"kind": "trivial"})

    def save(self, path) -> None:
        """Write to ``path`` (``torch.save`` of tensors and plain values; load with :meth:`load`)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"lam": self.lam, "l": self.l, "s": self.s, "b": self.b, "meta": dict(self.meta)}, path)

    @classmethod
    def load(cls, path) -> "Statistics":
        d = torch.load(pathlib.Path(path), weights_only=True)
        return cls(d["lam"], d["l"], d["s"], d["b"], d.get("meta", {}))


# ----------------------------------------------------------------------------------------------- estimation
@torch.no_grad()
def estimate_statistics(denoiser: Callable, data: Tensor, *, lam_min: float, lam_max: float, n_lam: int = 48,
                        n_samples: int = 256, n_probes: int = 2, generator: torch.Generator,
                        path=None, cond: dict | None = None, fd: float = 1e-3, chunk: int = 8192) -> Statistics:
    """Estimate the EMS ``l, s, b`` of ``denoiser`` on data (DPM-Solver-v3, Zheng et al. 2023, Sec. 3.2).

    At each of ``n_lam`` levels uniform in ``lam`` on ``[lam_min, lam_max]`` it draws ``n_samples`` points
    ``x = x0 + sigma z`` (``x0`` from ``data``), and estimates

    * ``l = 1 - E[diag(dD/dx)]`` with ``n_probes`` Rademacher probes and central finite differences,
    * ``f = (1 - l) x - D`` and its derivative along the ODE trajectory through ``x`` (central differences in
      ``lam``, the trajectory followed to first order),
    * ``s, b`` by per-dimension least squares of ``f'`` on ``f``.

    Costs ``n_lam * n_samples * (3 + 2 n_probes)`` denoiser evaluations (batched). With ``path`` the result is
    cached: a file whose recorded settings match is loaded instead (no evaluations); otherwise it is (re)written.
    """
    if not isinstance(data, Tensor) or data.ndim < 2:
        raise ValueError("data must be a tensor [N, ...] of clean samples")
    if not lam_min < lam_max or n_lam < 3:
        raise ValueError("need lam_min < lam_max and n_lam >= 3")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    meta = {"kind": "estimated", "lam_min": float(lam_min), "lam_max": float(lam_max), "n_lam": int(n_lam),
            "n_samples": int(n_samples), "n_probes": int(n_probes), "fd": float(fd),
            "data_shape": list(data.shape), "data_sum": round(float(data.double().sum()), 6)}
    if path is not None and pathlib.Path(path).exists():
        cached = Statistics.load(path)
        if cached.meta == meta:
            return cached
    cond = dict(cond or {})
    shape = tuple(data.shape[1:])
    lam = torch.linspace(lam_min, lam_max, n_lam, dtype=torch.float64)
    K, N = n_lam, n_samples
    sig = (-lam).exp().repeat_interleave(N)  # [K N]
    x0 = data.to(torch.float64)[torch.randint(len(data), (K * N,), generator=generator)]
    x = x0 + sig.reshape(-1, *[1] * len(shape)) * torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    def den(xx, ss):
        outs = [call(denoiser, xx[i:i + chunk], ss[i:i + chunk], cond).to(torch.float64)
                for i in range(0, len(xx), chunk)]
        return torch.cat(outs)

    def per_lam(v):  # [K N, *shape] -> [K, N, *shape]
        return v.reshape(K, N, *shape)

    bs = lambda v: v.reshape(-1, *[1] * len(shape))  # noqa: E731
    D = den(x, sig)
    diag = torch.zeros_like(x)
    for _ in range(n_probes):
        v = torch.randint(0, 2, x.shape, generator=generator).to(torch.float64) * 2 - 1
        eps = bs(fd * sig)
        diag += v * (den(x + eps * v, sig) - den(x - eps * v, sig)) / (2 * eps)
    l = 1 - per_lam(diag / n_probes).mean(1)  # [K, *shape]
    dl = torch.gradient(l, spacing=(lam,), dim=0)[0]
    lK = l.repeat_interleave(N, 0)
    f = (1 - lK) * x - D
    step = D - x  # dx/dlam on the trajectory
    delta = fd
    d_plus = den(x + delta * step, sig * math.exp(-delta))
    d_minus = den(x - delta * step, sig * math.exp(delta))
    f1 = -dl.repeat_interleave(N, 0) * x + (1 - lK) * step - (d_plus - d_minus) / (2 * delta)
    f, f1 = per_lam(f), per_lam(f1)
    fm, f1m = f.mean(1), f1.mean(1)
    var = ((f - fm[:, None]) ** 2).mean(1)
    cov = ((f - fm[:, None]) * (f1 - f1m[:, None])).mean(1)
    s = cov / (var + 1e-8 * var.mean() + 1e-12)
    b = f1m - s * fm
    stats = Statistics(lam, l, s, b, meta)
    if path is not None:
        stats.save(path)
    return stats


# ----------------------------------------------------------------------------------------------- integrals
def _phi1(z: Tensor) -> Tensor:
    """``(e^z - 1) / z`` with its limit 1 at 0."""
    small = z.abs() < 1e-8
    return torch.where(small, 1 + z / 2, torch.expm1(z) / torch.where(small, torch.ones_like(z), z))


class _Integrals:
    """Cumulative ``L, S, B, I, C`` on the union of the statistics grid and the schedule's ``lam`` (cell-constant
    statistics), and per-step Taylor weights ``E_k``."""

    def __init__(self, stats: Statistics, lam_sched: list, shape: tuple):
        grid = stats.lam
        nodes = torch.unique(torch.cat([grid, torch.tensor(lam_sched, dtype=torch.float64)]))  # sorted
        self.nodes = nodes
        self.index = {v: int((nodes - v).abs().argmin()) for v in lam_sched}
        trap = lambda v: 0.5 * (v[1:] + v[:-1])  # noqa: E731  cell averages of the grid values
        K = len(grid)
        expand = lambda v: v.reshape(K, *[1] * (len(shape) + 1 - v.ndim), *v.shape[1:]).expand(K, *shape)  # noqa: E731
        l, s, b = (expand(stats.l), expand(stats.s), expand(stats.b))
        mid = 0.5 * (nodes[1:] + nodes[:-1])
        cell = (torch.searchsorted(grid, mid) - 1).clamp(0, len(grid) - 2)  # statistics cell of each union cell
        below, above = mid < grid[0], mid > grid[-1]
        pick = lambda v: torch.where(bs(below), v[0], torch.where(bs(above), v[-1], trap(v)[cell]))  # noqa: E731
        bs = lambda m: m.reshape(-1, *[1] * len(shape))  # noqa: E731
        self.lc, self.sc, self.bc = pick(l), pick(s), pick(b)  # [M, *shape]
        self.w = bs(nodes[1:] - nodes[:-1])
        self.l_node = self._interp(grid, l, nodes)
        M = len(nodes)
        zero = torch.zeros((1, *shape), dtype=torch.float64)
        self.L = torch.cat([zero, torch.cumsum(self.lc * self.w, 0)])
        self.S = torch.cat([zero, torch.cumsum(self.sc * self.w, 0)])
        Bc = self.bc * torch.exp(-self.S[:-1]) * self.w * _phi1(-self.sc * self.w)
        self.B = torch.cat([zero, torch.cumsum(Bc, 0)])
        a = self.lc + self.sc
        Icell = torch.exp(self.L[:-1] + self.S[:-1]) * self.w * _phi1(a * self.w)
        self.I = torch.cat([zero, torch.cumsum(Icell, 0)])
        u = 0.5 * self.w[..., None] * (torch.as_tensor(_GL_X) + 1)  # [M-1, *shape?, q] quadrature in each cell
        gw = 0.5 * self.w[..., None] * torch.as_tensor(_GL_W)
        inner = (torch.exp(a[..., None] * u) * u * _phi1(-self.sc[..., None] * u) * gw).sum(-1)
        Ccell = self.B[:-1] * Icell + self.bc * torch.exp(self.L[:-1]) * inner
        self.C = torch.cat([zero, torch.cumsum(Ccell, 0)])
        assert len(self.L) == M

    @staticmethod
    def _interp(grid, v, at):
        idx = torch.searchsorted(grid, at).clamp(1, len(grid) - 1)
        lo, hi = grid[idx - 1], grid[idx]
        w = ((at - lo) / (hi - lo)).clamp(0, 1).reshape(-1, *[1] * (v.ndim - 1))
        return (1 - w) * v[idx - 1] + w * v[idx]

    def taylor(self, i_s: int, i_t: int, k: int) -> Tensor:
        """``E_k = int_{lam_s}^{lam_t} e^{(L+S)(lam) - (L+S)(lam_s)} (lam - lam_s)^k / k! dlam``."""
        base = self.L[i_s] + self.S[i_s]
        out = 0
        for c in range(i_s, i_t):
            w = self.w[c]
            u = 0.5 * w[..., None] * (torch.as_tensor(_GL_X) + 1)
            gw = 0.5 * w[..., None] * torch.as_tensor(_GL_W)
            a = (self.lc[c] + self.sc[c])[..., None]
            off = (self.nodes[c] - self.nodes[i_s])
            expo = (self.L[c] + self.S[c] - base)[..., None] + a * u
            out = out + (torch.exp(expo) * (off + u) ** k / math.factorial(k) * gw).sum(-1)
        return out


def _derivatives(lam_nodes: list, g: list, order: int) -> list:
    """``g^{(1..order-1)}`` at ``lam_nodes[0]`` from the polynomial through ``(lam_nodes, g)`` (Vandermonde)."""
    n = order - 1
    if n == 0:
        return []
    R = torch.tensor([[(lj - lam_nodes[0]) ** k / math.factorial(k) for k in range(1, n + 1)]
                      for lj in lam_nodes[1:n + 1]], dtype=torch.float64)
    Rinv = torch.linalg.inv(R)
    diffs = [gj - g[0] for gj in g[1:n + 1]]
    return [sum(Rinv[k, j].item() * diffs[j] for j in range(n)) for k in range(n)]


# ----------------------------------------------------------------------------------------------- sampler
@half_safe
@torch.no_grad()
def sample_dpm_solver_v3(denoiser: Callable, x: Tensor, sigmas: Tensor, *, statistics: Statistics,
                         cond: dict | None = None, generator: torch.Generator | None = None,
                         callback: Callable | None = None, order: int = 3, corrector: bool = True,
                         lower_order_final: bool | str = True) -> Tensor:
    """DPM-Solver-v3 (Zheng et al. 2023): multistep predictor(-corrector) on empirical model statistics, 1 NFE/step.

    ``statistics`` from :func:`estimate_statistics` (or :meth:`Statistics.trivial`: then it is DPM-Solver++).
    Predictor order ``min(order, i + 1)`` and, with ``lower_order_final``, at most the steps left (the official
    rule); the corrector (``corrector=True``) raises it by one at no NFE. The last step returns ``D(x, sigma_last)``.
    Statistics outside their ``lam`` range are extended by their end values.
    """
    sig, cond = prepare(denoiser, x, sigmas, cond, generator)
    order = check_order(order)
    if not isinstance(statistics, Statistics):
        raise TypeError("statistics must be a dmlab.samplers.v3.Statistics (estimate_statistics or Statistics.trivial)")
    shape = tuple(x.shape[1:])
    try:
        torch.broadcast_shapes(statistics.l.shape[1:], shape)
    except RuntimeError:
        raise ValueError(f"statistics of sample shape {tuple(statistics.l.shape[1:])} do not fit x's {shape}") from None
    slist = sigmas.detach().to("cpu", torch.float64).tolist()
    n = len(slist) - 1
    need_steps(n, order, "DPM-Solver-v3")
    lam = lams(slist)
    J = _Integrals(statistics, [v for v in lam if math.isfinite(v)], shape)
    idx = [J.index[v] for v in lam[:n]]
    orders = unipc_orders(n, order, check_lof(lower_order_final))
    cast = lambda t: t.to(device=x.device, dtype=x.dtype)  # noqa: E731
    L, S, B, I, C = J.L, J.S, J.B, J.I, J.C
    xs, fs = {}, {}

    def solve(base: int, target_node: int, nodes: list, x_base: Tensor) -> Tensor:
        """One v3 step from evaluation ``base`` to union node ``target_node`` with g-nodes ``nodes`` (indices)."""
        i_s, i_t = idx[base], target_node
        lam_n = [J.nodes[idx[j]].item() if j is not None else J.nodes[i_t].item() for j in nodes]
        g = []
        for j in nodes:
            i_j = idx[j] if j is not None else i_t
            gj = cast(torch.exp(S[i_s] - S[i_j])) * fs[j if j is not None else "new"]
            g.append(gj - cast(torch.exp(S[i_s]) * (B[i_j] - B[i_s])))
        out = cast(torch.exp(L[i_s] - L[i_t])) * x_base
        out = out - cast(torch.exp(-L[i_t] - S[i_s]) * (I[i_t] - I[i_s])) * g[0]
        out = out - cast(torch.exp(-L[i_t]) * (C[i_t] - C[i_s] - B[i_s] * (I[i_t] - I[i_s])))
        for k, gk in enumerate(_derivatives(lam_n, g, len(nodes)), start=1):
            out = out - cast(torch.exp(L[i_s] - L[i_t]) * J.taylor(i_s, i_t, k)) * gk
        return out

    for i in range(n):
        s = sig[i]
        denoised = call(denoiser, x, s, cond)
        l_i = cast(J.l_node[idx[i]])
        if corrector and i > 0 and math.isfinite(lam[i]):
            fs["new"] = (1 - l_i) * x - denoised
            q = orders[i - 1]
            x_new = solve(i - 1, idx[i], [i - 1, None] + [i - 1 - k for k in range(1, q)], xs[i - 1])
            denoised = denoised + (1 - l_i) * (x_new - x)  # keep f at the corrected point
            x = x_new
        xs[i], fs[i] = x, (1 - l_i) * x - denoised
        report(callback, i, x, s, sig[i + 1], denoised)
        if slist[i + 1] == 0:
            x = denoised
        else:
            p = orders[i]
            x = solve(i, idx[i + 1], [i - k for k in range(p)], x)
        for d in (xs, fs):
            d.pop(i - order - 1, None)
    return x
