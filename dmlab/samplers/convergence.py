"""Convergence orders: the slope of error against NFE (used by the order tests, chapters 02-05 and ``dmlab.viz``)."""
from __future__ import annotations

import math

from torch import Tensor

__all__ = ["fit_order"]


def _check_nfe_err(nfe, err, fn: str) -> tuple[list[float], list[float]]:
    n = [float(v) for v in (nfe.tolist() if isinstance(nfe, Tensor) else nfe)]
    e = [float(v) for v in (err.tolist() if isinstance(err, Tensor) else err)]
    if len(n) != len(e):
        raise ValueError(f"{fn}: nfe and err must have the same length, got {len(n)} and {len(e)}")
    if len(n) < 2:
        raise ValueError(f"{fn}: need at least 2 (nfe, err) points to fit a slope, got {len(n)}")
    if not all(math.isfinite(v) and v > 0 for v in n + e):
        raise ValueError(
            f"{fn}: nfe and err must be finite and > 0 for a log-log fit; got nfe={n}, err={e} "
            "(an error of exactly 0 usually means the reference equals the result: check the reference)"
        )
    if len(set(n)) < 2:
        raise ValueError(f"{fn}: need at least 2 distinct nfe values, got {n}")
    return n, e


def fit_order(nfe, err) -> float:
    """The convergence order ``p`` of ``err ~ C * nfe**(-p)``: minus the least-squares slope in log-log.

    A second-order sampler whose error falls 4x when NFE doubles gives ``p = 2``. ``nfe`` and ``err`` are
    equal-length sequences (or 1-D tensors) of positive numbers, at least two distinct ``nfe``.
    """
    n, e = _check_nfe_err(nfe, err, "fit_order")
    lx = [math.log(v) for v in n]
    ly = [math.log(v) for v in e]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    sxy = sum((a - mx) * (b - my) for a, b in zip(lx, ly))
    return -sxy / sxx
