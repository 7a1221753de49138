"""Uniform affine (asymmetric) fake quantization: the arithmetic every post-training quantization paper builds on.

A ``b``-bit quantizer with range ``[lo, hi]`` (``lo <= 0 <= hi`` so that zero is exact) has

.. math::  \\Delta = \\frac{hi - lo}{2^b - 1},\\quad z = \\mathrm{round}(-lo / \\Delta),\\quad
           q = \\mathrm{clamp}(\\mathrm{round}(x / \\Delta) + z,\\ 0,\\ 2^b - 1),\\quad \\hat x = (q - z)\\,\\Delta .

"Fake" (simulated) quantization returns :math:`\\hat x` in floating point, as the official code of Q-Diffusion
(Li et al., ICCV 2023, arXiv 2302.04304; ``qdiff/quant_layer.py`` ``UniformAffineQuantizer``), PTQ4DM (Shang et al.,
CVPR 2023, arXiv 2211.15736), TFMQ-DM (Huang et al., CVPR 2024, arXiv 2311.16503) and QuEST (Wang et al., ICCV 2025,
arXiv 2402.03666) all do (BRECQ/AdaRound lineage, Nagel et al. 2020). This module is a re-implementation from the
formula above.

* :func:`qparams` - scale and zero point from a range (scalar, or one per output channel);
* :func:`fake_quant` - quantize-dequantize; with ``ste=True`` the straight-through estimator
  (Bengio et al. 2013) lets gradients pass (QuEST's fine-tuning);
* :func:`minmax_range` / :func:`mse_range` (:func:`mse_shrink`) - range selection: the observed min/max, or the clipped range with the
  smallest quantization MSE on a grid of shrink factors (Q-Diffusion's and BRECQ's ``mse`` initialisation, with
  ``p = 2``).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_bits", "qparams", "fake_quant", "minmax_range", "mse_shrink", "mse_range", "SHRINK_GRID"]

#: shrink factors tried by :func:`mse_range`: the range ``[a lo, a hi]`` for ``a`` = 1.00, 0.98, ..., 0.20
SHRINK_GRID = tuple(round(1 - 0.02 * i, 2) for i in range(41))


def check_bits(bits, name: str = "bits", *, allow_none: bool = False) -> None:
    """Raise a ValueError that says what to do unless ``bits`` is an int in 2..16 (or None when allowed)."""
    if bits is None and allow_none:
        return
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        hint = " (or None to keep this operand in floating point)" if allow_none else ""
        raise ValueError(f"{name} must be an int in 2..16{hint}, got {bits!r}; 8 is the usual choice, 4 is aggressive")


def qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` of a ``bits``-bit asymmetric quantizer for the range ``[lo, hi]`` (elementwise).

    The range is first widened to contain 0 (``lo <- min(lo, 0)``, ``hi <- max(hi, 0)``) so that zero - padding,
    ReLU/SiLU floors - is represented exactly; an empty range gets a tiny positive scale.
    """
    check_bits(bits)
    lo = torch.clamp(torch.as_tensor(lo), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi), min=0.0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-8)
    zero_point = torch.round(-lo / scale)
    return scale, zero_point


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, *, ste: bool = False) -> Tensor:
    """Quantize-dequantize ``x``: ``(clamp(round(x / scale) + zero_point, 0, 2^bits - 1) - zero_point) * scale``.

    ``scale``/``zero_point`` broadcast against ``x`` (a scalar for per-tensor, ``[C, 1, ...]`` per channel).
    ``ste=True``: forward value as above, gradient of the identity (straight-through estimator).
    """
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1)
    xq = (q - zero_point) * scale
    if ste:
        return x + (xq - x).detach()
    return xq


def _per_row(x: Tensor, per_channel: bool) -> Tensor:
    return x.detach().reshape(x.shape[0], -1) if per_channel else x.detach().reshape(1, -1)


def _shape_like(v: Tensor, x: Tensor, per_channel: bool) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))) if per_channel else v.reshape(())


def minmax_range(x: Tensor, *, per_channel: bool = False) -> tuple[Tensor, Tensor]:
    """Observed ``(min, max)`` of ``x``: scalars, or one per output channel (dim 0) shaped to broadcast against
    ``x``."""
    r = _per_row(x, per_channel)
    return _shape_like(r.amin(1), x, per_channel), _shape_like(r.amax(1), x, per_channel)


def mse_shrink(x: Tensor, bits: int, *, per_channel: bool = False, lo: Tensor | None = None,
               hi: Tensor | None = None, grid=SHRINK_GRID) -> Tensor:
    """The shrink factor ``a`` from ``grid`` whose range ``[a lo, a hi]`` gives the smallest mean squared
    quantization error on ``x``: a scalar tensor, or one per output channel (dim 0) with ``per_channel``.

    ``lo``/``hi`` default to the min/max of ``x``. Clipping a few outliers buys a finer step for everything else -
    the ``mse`` range initialisation of Q-Diffusion/BRECQ (with ``p = 2``).
    """
    check_bits(bits)
    r = _per_row(x, per_channel).float()
    if lo is None or hi is None:
        lo_, hi_ = r.amin(1), r.amax(1)
    else:
        lo_, hi_ = lo.reshape(-1).float().expand(r.shape[0]), hi.reshape(-1).float().expand(r.shape[0])
    g = torch.tensor(grid, dtype=torch.float32, device=r.device)
    errs = []
    chunk = max(1, (1 << 23) // max(1, r.numel()))  # candidates per pass: about 8M values in flight
    for i in range(0, len(g), chunk):
        a = g[i:i + chunk, None]                                   # [k, 1]
        s, z = qparams(lo_[None, :] * a, hi_[None, :] * a, bits)     # [k, rows]
        errs.append((fake_quant(r[None], s[..., None], z[..., None], bits) - r[None]).pow(2).mean(2))
    err = torch.cat(errs)                                          # [len(grid), rows]
    best_a = g[err.argmin(0)].cpu()  # first minimum: the widest range among equals
    return best_a if per_channel else best_a.reshape(())


def mse_range(x: Tensor, bits: int, *, per_channel: bool = False, lo: Tensor | None = None,
              hi: Tensor | None = None, grid=SHRINK_GRID) -> tuple[Tensor, Tensor]:
    """The clipped range ``(a lo, a hi)`` with the shrink factor ``a`` of :func:`mse_shrink`, shaped like
    :func:`minmax_range`'s output."""
    if lo is None or hi is None:
        lo, hi = minmax_range(x, per_channel=per_channel)
    a = mse_shrink(x, bits, per_channel=per_channel, lo=lo, hi=hi, grid=grid)
    a = _shape_like(a, x, per_channel).to(lo.dtype) if per_channel else a.to(lo.dtype)
    return lo * a, hi * a
