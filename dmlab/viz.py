"""Figures for the book: image grids, 2-D trajectories, error-vs-NFE plots, sigma schedules, denoising strips.

Every function returns a :class:`matplotlib.figure.Figure` with a fixed ``figsize`` (a function of the
input's shape only) and ``dpi=110``; :func:`use_style` (applied by ``dmlab.setup``) gives every other figure of
the book the same look (:data:`STYLE`). Figures are made with ``matplotlib.figure.Figure`` directly, not
through ``pyplot``: nothing is shown, nothing is registered in pyplot's global figure list (so nothing
leaks or is displayed twice in Jupyter), and nothing the caller holds is closed. Show one in a notebook
by making it the cell's last expression (or ``display(fig)``); save it with ``fig.savefig(path)``.

matplotlib is imported inside the functions (``import dmlab.viz`` imports torch only).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from .samplers.convergence import _check_nfe_err, fit_order  # fit_order lives with the samplers

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "STYLE",
    "use_style",
    "legend_outside",
    "colorbar",
    "image_grid",
    "plot_trajectories",
    "fit_order",
    "plot_error_vs_nfe",
    "plot_sigma_schedules",
    "denoising_strip",
]

DPI = 110

# The book's one matplotlib style (``use_style``, applied by ``dmlab.setup``): text >= 9 pt, 110 dpi PNGs, labelled
# light grids, a colour-blind-safe cycle (Okabe & Ito 2008) so that neighbouring series differ, no legend frames.
STYLE = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.figsize": (7.0, 4.2),
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "legend.frameon": False,
    "figure.titlesize": 12,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "viridis",
    "axes.prop_cycle": ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
                        "#999999", "#882255"],
}


def use_style() -> None:
    """Apply :data:`STYLE` to matplotlib (every chapter gets it from ``dmlab.setup``); idempotent."""
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update({k: (cycler(color=v) if k == "axes.prop_cycle" else v) for k, v in STYLE.items()})


def legend_outside(ax: "Axes", **kw):
    """The legend to the right of ``ax``, outside the data (extra keywords go to ``ax.legend``)."""
    kw = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, **kw}
    return ax.legend(**kw)


def colorbar(mappable, ax: "Axes", label: str, **kw):
    """A labelled colourbar beside ``ax`` for a heatmap (``mappable`` is what ``imshow``/``pcolormesh`` returned)."""
    if not label:
        raise ValueError("a colourbar needs a label saying what the colours measure (and its unit)")
    cb = ax.figure.colorbar(mappable, ax=ax, **kw)
    cb.set_label(label)
    return cb


def _new_figure(figsize: tuple[float, float]) -> "Figure":
    """A pyplot-free Figure (Agg canvas), displayed by Jupyter as PNG when returned from a cell."""
    _ensure_inline_png()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI)


def _ensure_inline_png() -> None:
    """In IPython, register the PNG formatter for Figure (pyplot normally does this when it loads the
    inline backend; our figures bypass pyplot)."""
    import sys

    if "IPython" not in sys.modules:
        return
    try:
        from IPython import get_ipython
        from matplotlib.figure import Figure

        ip = get_ipython()
        if ip is None:
            return
        fmt = ip.display_formatter.formatters["image/png"]
        try:
            fmt.lookup_by_type(Figure)
        except KeyError:
            from IPython.core.pylabtools import print_figure

            fmt.for_type(Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight"))
    except Exception:  # pragma: no cover - display is best effort
        return


def _to_cpu_float(x, name: str, fn: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(x)
        except Exception as err:
            raise TypeError(f"{fn}: {name} must be a tensor (or array-like), got {type(x).__name__}") from err
    return t.to(device="cpu", dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# image mosaics
# --------------------------------------------------------------------------------------------------


def _check_images(x, fn: str, name: str = "x") -> Tensor:
    t = _to_cpu_float(x, name, fn)
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(
            f"{fn}: {name} must be [B, C, H, W] with C = 1 (gray) or 3 (RGB), or [B, H, W]; got shape "
            f"{tuple(t.shape)} (for channels-last images use x.permute(0, 3, 1, 2))"
        )
    if t.shape[0] == 0:
        raise ValueError(f"{fn}: {name} holds no images (B = 0)")
    return t


def _mosaic(
    x: Tensor,
    ncol: int,
    titles: Sequence[str] | None,
    title: str | None,
    vmin: float,
    vmax: float,
    cmap: str,
    scale: float,
) -> "Figure":
    """Tile [B, C, H, W] into one axes (fast: a single imshow), transparent gaps, optional tile titles."""
    import numpy as np

    b, c, h, w = x.shape
    nrows = math.ceil(b / ncol)
    ppi = max(h, w) / scale  # image pixels per inch: each tile is `scale` inches on its long side
    pad = max(1, round(max(h, w) / 16))
    band = round(0.22 * ppi)  # room for the titles above a row (only rows that have one)
    bands = [band if titles is not None and any(titles[r * ncol : (r + 1) * ncol]) else 0 for r in range(nrows)]
    row_top = [sum(bands[:r]) + r * (h + pad) for r in range(nrows)]  # first canvas row of each band
    H, W = sum(bands) + nrows * h + (nrows - 1) * pad, ncol * w + (ncol - 1) * pad
    if c == 1:
        canvas = np.full((H, W), np.nan)  # NaN -> the colormap's "bad" colour: transparent
        arr = x[:, 0].numpy()
    else:
        canvas = np.zeros((H, W, 4))  # RGBA, alpha 0 in the gaps
        arr = ((x - vmin) / (vmax - vmin)).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    origins = []
    for k in range(b):
        r, q = divmod(k, ncol)
        y0, x0 = row_top[r] + bands[r], q * (w + pad)
        origins.append((y0, x0))
        if c == 1:
            canvas[y0 : y0 + h, x0 : x0 + w] = arr[k]
        else:
            canvas[y0 : y0 + h, x0 : x0 + w, :3] = arr[k]
            canvas[y0 : y0 + h, x0 : x0 + w, 3] = 1.0

    margin, top_in = 0.05, (0.35 if title else 0.0)
    img_w, img_h = W / ppi, H / ppi
    fig_w, fig_h = round(img_w + 2 * margin, 2), round(img_h + 2 * margin + top_in, 2)
    fig = _new_figure((fig_w, fig_h))
    ax = fig.add_axes((margin / fig_w, margin / fig_h, img_w / fig_w, img_h / fig_h))
    kw = dict(cmap=cmap, vmin=vmin, vmax=vmax) if c == 1 else {}
    ax.imshow(canvas, interpolation="nearest", aspect="auto", extent=(-0.5, W - 0.5, H - 0.5, -0.5), **kw)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_axis_off()
    if titles is not None:
        fs = max(5.0, min(9.0, 8.0 * scale))
        for (y0, x0), t in zip(origins, titles):
            if t:
                ax.text(x0 + w / 2 - 0.5, y0 - 0.5 - 0.02 * ppi, str(t), ha="center", va="bottom", fontsize=fs)
    if title:
        fig.suptitle(str(title), y=1 - 0.05 / fig_h, va="top", fontsize=11)
    return fig


def image_grid(
    x,
    *,
    nrow: int = 8,
    titles: Sequence[str] | None = None,
    title: str | None = None,
    vmin: float = -1.0,
    vmax: float = 1.0,
    cmap: str = "gray",
    scale: float = 1.0,
) -> "Figure":
    """A grid of images as one Figure (one axes holding a single mosaic; no ticks).

    Args:
        x: ``[B, C, H, W]`` with ``C = 1`` (shown with ``cmap``) or ``C = 3`` (RGB), or ``[B, H, W]``;
            values in ``[vmin, vmax]`` (default ``[-1, 1]``; RGB values outside are clipped).
        nrow: images per row (as in ``torchvision.utils.make_grid``); fewer if ``B < nrow``.
        titles: one short label per image (``""`` to skip one), drawn above it.
        title: a title for the whole figure.
        scale: inches per image (long side); ``figsize`` depends only on the shapes and these options.

    Returns:
        the Figure (``fig.axes`` has exactly one axes).
    """
    fn = "image_grid"
    t = _check_images(x, fn)
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"{fn}: nrow (images per row) must be a positive int, got {nrow!r}")
    if titles is not None:
        titles = list(titles)
        if len(titles) != t.shape[0]:
            raise ValueError(f"{fn}: got {len(titles)} titles for {t.shape[0]} images; pass one title per image")
    if not vmax > vmin:
        raise ValueError(f"{fn}: need vmin < vmax, got vmin={vmin}, vmax={vmax}")
    if not scale > 0:
        raise ValueError(f"{fn}: scale (inches per image) must be > 0, got {scale}")
    ncol = min(nrow, t.shape[0])
    return _mosaic(t, ncol, titles, title, float(vmin), float(vmax), cmap, float(scale))


def denoising_strip(xs, sigmas, *, n: int = 4, title: str | None = None, scale: float = 1.0) -> "Figure":
    """Snapshots along sampling trajectories: rows = samples, columns = steps labelled with sigma.

    Args:
        xs: a list of ``T`` tensors ``[B, C, H, W]`` (e.g. the ``x`` or ``denoised`` a sampler's callback
            saw at each step), or one tensor ``[T, B, C, H, W]``; values in ``[-1, 1]``.
        sigmas: ``T`` noise levels (sequence or tensor), used as column labels ``sigma=...``.
        n: how many samples (rows) to show: the first ``min(n, B)``.

    Returns:
        the Figure (one axes holding the mosaic).
    """
    fn = "denoising_strip"
    if isinstance(xs, Tensor):
        if xs.ndim not in (4, 5):
            raise ValueError(
                f"{fn}: xs must be a list of [B, C, H, W] tensors or one [T, B, C, H, W] tensor, "
                f"got shape {tuple(xs.shape)}"
            )
        xs = list(xs.unbind(0))
    if not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise ValueError(f"{fn}: xs must be a non-empty list of [B, C, H, W] tensors (one per snapshot)")
    frames = [_check_images(f, fn, name=f"xs[{i}]") for i, f in enumerate(xs)]
    shape = frames[0].shape
    for i, f in enumerate(frames):
        if f.shape != shape:
            raise ValueError(
                f"{fn}: all snapshots must share one shape; xs[0] is {tuple(shape)}, xs[{i}] is {tuple(f.shape)}"
            )
    s = _to_cpu_float(sigmas, "sigmas", fn).reshape(-1)
    if s.numel() != len(frames):
        raise ValueError(f"{fn}: got {s.numel()} sigmas for {len(frames)} snapshots; pass one sigma per snapshot")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fn}: n (rows) must be a positive int, got {n!r}")
    rows = min(n, shape[0])
    T = len(frames)
    tiles = torch.stack([frames[t][i] for i in range(rows) for t in range(T)])
    titles = [f"σ={_fmt_sigma(v)}" if i == 0 else "" for i in range(rows) for v in s.tolist()]
    return _mosaic(tiles, T, titles, title, -1.0, 1.0, "gray", float(scale))


def _fmt_sigma(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100 or abs(v) < 0.01:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.3g}"


# --------------------------------------------------------------------------------------------------
# 2-D trajectories
# --------------------------------------------------------------------------------------------------


def plot_trajectories(
    traj,
    *,
    ax: "Axes | None" = None,
    data=None,
    max_paths: int = 200,
    color: str = "C0",
    alpha: float = 0.5,
    title: str | None = None,
    lim: float | None = None,
) -> "Figure":
    """2-D sampling trajectories as lines from start (small dot) to end (larger dot), data underneath.

    Args:
        traj: ``[T, B, 2]`` tensor or a list of ``T`` tensors ``[B, 2]`` (e.g. collected by a callback).
        ax: draw into this axes (its figure is returned) instead of a new 5x5-inch figure.
        data: optional ``[N, 2]`` points drawn first as a light gray scatter (the target distribution).
        max_paths: draw at most the first this-many trajectories.
        lim: if given, both axes span ``[-lim, lim]``; else matplotlib's autoscaling (equal aspect).

    Returns:
        the Figure (one axes when ``ax`` is None).
    """
    fn = "plot_trajectories"
    if isinstance(traj, (list, tuple)):
        if len(traj) == 0:
            raise ValueError(f"{fn}: traj is an empty list; pass T >= 1 tensors of shape [B, 2]")
        steps = [_to_cpu_float(p, f"traj[{i}]", fn) for i, p in enumerate(traj)]
        if any(p.shape != steps[0].shape for p in steps):
            shapes = [tuple(p.shape) for p in steps]
            raise ValueError(f"{fn}: all entries of traj must share one shape [B, 2]; got {shapes}")
        t = torch.stack(steps)
    else:
        t = _to_cpu_float(traj, "traj", fn)
    if t.ndim == 2 and t.shape[-1] == 2:
        t = t[:, None]
    if t.ndim != 3 or t.shape[-1] != 2:
        raise ValueError(f"{fn}: traj must be [T, B, 2] (or a list of [B, 2]), got shape {tuple(t.shape)}")
    if isinstance(max_paths, bool) or not isinstance(max_paths, int) or max_paths < 1:
        raise ValueError(f"{fn}: max_paths must be a positive int, got {max_paths!r}")
    if data is not None:
        d = _to_cpu_float(data, "data", fn)
        if d.ndim != 2 or d.shape[-1] != 2:
            raise ValueError(f"{fn}: data must be [N, 2] points, got shape {tuple(d.shape)}")
    if ax is None:
        fig = _new_figure((5.0, 5.0))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    if data is not None:
        ax.scatter(d[:, 0].numpy(), d[:, 1].numpy(), s=2, c="0.75", alpha=0.6, linewidths=0, zorder=0)
    t = t[:, :max_paths].numpy()
    from matplotlib.collections import LineCollection

    segs = t.transpose(1, 0, 2)  # [B, T, 2]
    ax.add_collection(LineCollection(list(segs), colors=color, alpha=alpha, linewidths=0.8, zorder=1))
    ax.scatter(t[0, :, 0], t[0, :, 1], s=4, c=color, alpha=alpha, linewidths=0, zorder=2)
    ax.scatter(t[-1, :, 0], t[-1, :, 1], s=10, c="k", linewidths=0, zorder=3)
    ax.set_aspect("equal")
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    else:
        ax.autoscale_view()
    if title:
        ax.set_title(str(title))
    return fig


# --------------------------------------------------------------------------------------------------
# convergence order
# --------------------------------------------------------------------------------------------------


def plot_error_vs_nfe(
    results: dict, *, title: str | None = None, slopes: bool = True, ylabel: str = "error"
) -> "Figure":
    """Log-log error against NFE, one line per method, each labelled with its fitted order.

    Args:
        results: ``{name: (nfe_list, err_list)}``.
        slopes: append ``(order p)`` from :func:`fit_order` to each legend label.

    Returns:
        a 5.5x4-inch Figure with one axes.
    """
    fn = "plot_error_vs_nfe"
    if not isinstance(results, dict) or not results:
        raise ValueError(f"{fn}: results must be a non-empty dict {{name: (nfe_list, err_list)}}")
    checked = {}
    for name, val in results.items():
        if not isinstance(val, (tuple, list)) or len(val) != 2:
            raise ValueError(f"{fn}: results[{name!r}] must be a pair (nfe_list, err_list)")
        checked[name] = _check_nfe_err(val[0], val[1], f"{fn}: results[{name!r}]")
    fig = _new_figure((5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, (n, e)) in enumerate(checked.items()):
        label = f"{name} (order {fit_order(n, e):.2f})" if slopes else str(name)
        ax.loglog(n, e, marker="o", ms=4, color=f"C{i % 10}", label=label)
    from matplotlib.ticker import NullFormatter

    ticks = sorted({v for n, _ in checked.values() for v in n})
    if len(ticks) <= 12:  # label the NFEs actually measured, as plain numbers
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (denoiser evaluations)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(str(title))
    fig.tight_layout()
    return fig


def plot_sigma_schedules(schedules: dict, *, title: str | None = None) -> "Figure":
    """Sigma against step index for several schedules, log y axis.

    Args:
        schedules: ``{name: sigmas}`` with 1-D ``sigmas`` (the final 0 of a schedule is not drawn: it has
            no place on a log axis).

    Returns:
        a 5.5x4-inch Figure with one axes.
    """
    fn = "plot_sigma_schedules"
    if not isinstance(schedules, dict) or not schedules:
        raise ValueError(f"{fn}: schedules must be a non-empty dict {{name: 1-D sigmas}}")
    fig = _new_figure((5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, sig) in enumerate(schedules.items()):
        s = _to_cpu_float(sig, f"schedules[{name!r}]", fn)
        if s.ndim != 1 or s.numel() == 0:
            raise ValueError(
                f"{fn}: schedules[{name!r}] must be a non-empty 1-D tensor of sigmas, got shape {tuple(s.shape)}"
            )
        if (s < 0).any() or not torch.isfinite(s).all():
            raise ValueError(f"{fn}: schedules[{name!r}] must hold finite sigmas >= 0")
        idx = torch.arange(s.numel())
        keep = s > 0
        ax.semilogy(idx[keep].numpy(), s[keep].numpy(), marker="o", ms=3, color=f"C{i % 10}", label=str(name))
    ax.set_xlabel("step index")
    ax.set_ylabel("σ")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(str(title))
    fig.tight_layout()
    return fig
