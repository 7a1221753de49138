"""Measuring speed and quality honestly on shared CPUs.

* :func:`time_pair` - time a baseline and a method **interleaved** (B, M, B, M, ...) with one intra-op thread and
  report the **median of the per-pair ratios** with its min and max. Absolute times on a shared 2-core machine
  swing by 10x; ratios of neighbouring runs do not (about ±8 % with one thread on this book's 2-core machine).
* :func:`count_flops` / :func:`flop_ratio` - FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions and attention; elementwise ops are not counted). FlopCounterMode counts a multiply-add as **2 FLOPs**,
  so MACs = FLOPs / 2 (:func:`macs`). FLOP ratios do not depend on load: tests assert on them, never on wall time.
* :func:`psnr` - fidelity of a method's sample to the baseline sample drawn from the same noise.
* :class:`Table` - rows of measurements as a plain-text table (no pandas) and a speed/quality figure, shared by the
  accelerator and sampler chapters and the ``benchmarks/`` scripts; :func:`matched_steps` gives the trivial
  competitor of every accelerator table, *the same sampler with fewer steps at matched FLOPs*.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import textwrap
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["Timing", "time_pair", "num_threads", "count_flops", "FlopAccountant", "flop_ratio", "macs", "psnr", "matched_steps",
           "Table", "format_table"]


@contextlib.contextmanager
def num_threads(n: int = 1):
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous value afterwards."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class Timing:
    """Interleaved timing of a baseline and a method: ``speedup`` = median over pairs of ``t_baseline / t_method``,
    with ``lo``/``hi`` the smallest and largest pair ratio; ``baseline_s``/``method_s`` are median seconds.
    On a CUDA GPU ``baseline_peak_bytes``/``method_peak_bytes`` are the largest extra GPU memory one call
    allocated (``torch.cuda.max_memory_allocated`` above what was allocated before it); None on the CPU."""

    speedup: float
    lo: float
    hi: float
    baseline_s: float
    method_s: float
    pairs: int
    threads: int
    baseline_peak_bytes: int | None = None
    method_peak_bytes: int | None = None

    def __str__(self) -> str:
        return f"{self.speedup:.2f}x [{self.lo:.2f}-{self.hi:.2f}]"


def time_pair(baseline: Callable[[], Any], method: Callable[[], Any], *, pairs: int = 5, warmup: int = 1,
              threads: int = 1, clock: str = "wall") -> Timing:
    """Time ``baseline()`` and ``method()`` interleaved (B, M, B, M, ...) after ``warmup`` rounds of each.

    With ``threads=1`` the per-pair ratios are stable under load; the median of ``pairs`` ratios is
    reported with its range. ``clock="process"`` uses ``time.process_time`` (CPU time of this process) instead of
    wall time. When CUDA is in use, every call is bracketed by ``torch.cuda.synchronize()`` (kernels run
    asynchronously: without it the clock stops before the GPU has finished) and its peak memory is recorded.
    Never assert on the result in a test.
    """
    if not (callable(baseline) and callable(method)):
        raise TypeError("baseline and method must be zero-argument callables, e.g. lambda: sample(...)")
    if not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be an int >= 1 (5 or more for a stable median), got {pairs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if clock not in ("wall", "process"):
        raise ValueError(f"clock must be 'wall' or 'process', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    pb: list[int] = []  # peak bytes per timed call (CUDA only)
    pm: list[int] = []

    def once(fn, peaks=None):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = now()
        fn()
        if cuda:
            torch.cuda.synchronize()
        dt = now() - t0
        if cuda and peaks is not None:
            peaks.append(torch.cuda.max_memory_allocated() - before)
        return dt

    tb, tm = [], []
    with num_threads(threads):
        for _ in range(warmup):
            once(baseline)
            once(method)
        for _ in range(pairs):
            tb.append(once(baseline, pb))
            tm.append(once(method, pm))
    ratios = [b / max(m, 1e-12) for b, m in zip(tb, tm)]
    return Timing(statistics.median(ratios), min(ratios), max(ratios), statistics.median(tb), statistics.median(tm),
                  pairs, threads, max(pb, default=None), max(pm, default=None))


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` as counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add
    is 2 FLOPs; matmul, convolution and attention kernels are counted, elementwise ops are not).

    torch's registry has no entry for the CPU kernel of ``F.scaled_dot_product_attention``
    (``aten._scaled_dot_product_flash_attention_for_cpu``), so without :func:`_cpu_sdpa_mapping` every softmax
    attention on the CPU would count as 0 FLOPs (the same formula as the CUDA kernels is added for it)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as fc:
        fn(*args, **kwargs)
    return int(fc.get_total_flops())


def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode ``custom_mapping`` for the CPU scaled-dot-product-attention kernel (torch's ``sdpa_flop_count``:
    ``QK^T`` and ``PV`` matmuls, as for the CUDA kernels)."""
    import torch.utils.flop_counter as fcm

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fcm.flop_registry or not hasattr(fcm, "sdpa_flop_count"):
        return {}

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fcm.sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_sdpa}


class FlopAccountant:
    """Exact FLOPs of many runs of fixed networks for the price of one profiled call per network.

    Counting a whole sampling run under ``FlopCounterMode`` sends every op through Python and costs several times the
    run. Instead, :meth:`profile` runs a few calls once under :func:`count_flops`'s formulas and charges each op to the
    innermost module running it (its *exclusive* FLOPs, per sample); inside :meth:`counting`, thin wrappers around
    every module's own forward count how often each module **really computes** and on how many samples. The total is
    ``sum(exclusive FLOPs per sample x samples)`` over those executions, which equals ``count_flops`` of the same run
    whenever each module does the same work per sample in every call (fixed shapes). Modules served from a cache never
    reach their own forward and cost nothing, which is how caching accelerators are credited.

    Enter :meth:`counting` **before** applying accelerators (its wrappers must be the innermost); ops outside every
    module are not seen (``profile`` raises if any carry FLOPs).
    """

    def __init__(self, *models):
        from torch import nn

        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise TypeError("FlopAccountant needs the networks (nn.Module) whose FLOPs it accounts")
        self.models = models
        self.per_sample: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.total = 0.0
        self._stack: list[int] = []
        self._batch: list[int] = []
        self._mode = None  # "profile" | "count"
        self._seen: dict[int, int] = {}
        self._excl: dict[int, float] = {}

    def _wrap(self, key: int, root: bool):
        def wrap(call_next, *args, **kwargs):
            if self._mode is None:
                return call_next(*args, **kwargs)
            # the batch is read at the root call, or at the first module that runs when a method bypasses the root
            # forward (early exit runs the blocks itself)
            top = root or not self._batch
            if top:
                x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.ndim), None)
                self._batch.append(int(x.shape[0]) if x is not None else 1)
            self._stack.append(key)
            try:
                if self._mode == "profile":
                    self._seen[key] = self._seen.get(key, 0) + self._batch[-1]
                elif key in self.per_sample:
                    self.total += self.per_sample[key] * self._batch[-1]
                else:
                    raise RuntimeError(f"FlopAccountant: module {self.names[key]!r} computed but was never profiled; "
                                       f"profile with a call that runs it (or use count_flops)")
                return call_next(*args, **kwargs)
            finally:
                self._stack.pop()
                if top:
                    self._batch.pop()
        return wrap

    @contextlib.contextmanager
    def _installed(self, mode: str):
        from .hooks import Handle, patch_forward

        h = Handle("flop_accountant", alters_outputs=False)
        try:
            for m in self.models:
                for name, mod in m.named_modules():
                    self.names[id(mod)] = f"{type(m).__name__}.{name}" if name else type(m).__name__
                    patch_forward(mod, self._wrap(id(mod), name == ""), h)
            self._mode = mode
            yield self
        finally:
            self._mode = None
            h.remove()

    def profile(self, *calls: Callable[[], Any]) -> "FlopAccountant":
        """Run each zero-argument call once and record every module's exclusive FLOPs per sample."""
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        table = {**flop_registry, **{k: shape_wrapper(v) for k, v in _cpu_sdpa_mapping().items()}}
        acct = self

        class _Charge(TorchDispatchMode):
            outside = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                f = table.get(func._overloadpacket)
                if f is not None:
                    n = int(f(*args, **kwargs, out_val=out))
                    if acct._stack:
                        acct._excl[acct._stack[-1]] = acct._excl.get(acct._stack[-1], 0) + n
                    else:
                        self.outside += n
                return out

        self._seen, self._excl = {}, {}
        mode = _Charge()
        with self._installed("profile"), mode:
            for c in calls:
                c()
        if mode.outside:
            raise RuntimeError(f"{mode.outside} FLOPs ran outside the networks {[type(m).__name__ for m in self.models]}; "
                               f"add the module that runs them or use count_flops")
        for k, samples in self._seen.items():
            self.per_sample[k] = self._excl.get(k, 0) / samples
        return self

    @contextlib.contextmanager
    def counting(self):
        """``with acct.counting() as c: run()`` then ``c.total``: FLOPs of the run (reset on entry)."""
        if not self.per_sample:
            raise RuntimeError("call profile(...) first: it measures each module's FLOPs once")
        self.total = 0.0
        with self._installed("count"):
            yield self


def flop_ratio(baseline: Callable[[], Any], method: Callable[[], Any]) -> float:
    """``FLOPs(baseline) / FLOPs(method)``: the speed-up bound a method can reach by doing less arithmetic."""
    fm = count_flops(method)
    if fm == 0:
        raise ValueError("the method performed no counted FLOPs; cannot form a ratio")
    return count_flops(baseline) / fm


def macs(flops: float) -> float:
    """Multiply-accumulates from FlopCounterMode FLOPs: ``flops / 2``."""
    return flops / 2


from .metrics import psnr  # noqa: E402  the one PSNR (per-sample mean by default; reduction="none" / "global")


def matched_steps(n_steps: int, speedup: float) -> int:
    """Steps of *the same sampler with fewer steps* at the FLOPs of a method with this FLOP ``speedup`` over
    ``n_steps`` steps: ``max(1, round(n_steps / speedup))`` (every accelerator table has this row)."""
    if not n_steps >= 1 or not speedup > 0:
        raise ValueError(f"need n_steps >= 1 and speedup > 0, got {n_steps}, {speedup}")
    return max(1, round(n_steps / speedup))


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}f}"
    return "-" if v is None else str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, *, digits: int = 2,
                 title: str | None = None, width: int | None = 88) -> str:
    """A plain-text table of ``rows`` (dicts), columns in first-seen order unless given; floats with ``digits``.

    When the table would be wider than ``width`` characters (88, the book's code width; ``None``: no limit), the
    first column (the row labels) is narrowed and long labels wrap onto continuation lines, indented by two spaces.
    """
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c), digits) for c in columns] for r in rows]
    widths = [max(len(str(c)), *(len(row[i]) for row in cells)) if cells else len(str(c)) for i, c in enumerate(columns)]
    if width is not None and sum(widths) + 2 * (len(widths) - 1) > width:
        rest = sum(widths[1:]) + 2 * (len(widths) - 1)
        widths[0] = max(len(str(columns[0])), 12, width - rest)
    line = lambda vals: "  ".join(  # noqa: E731
        v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    def body(row):
        if len(row[0]) <= widths[0]:
            return [line(row)]
        label = textwrap.wrap(row[0], widths[0], subsequent_indent="  ", break_on_hyphens=False)
        # the numbers go on the label's last line: a wrapped label reads top to bottom into its values
        return label[:-1] + [line([label[-1], *row[1:]])]

    out = [line([str(c) for c in columns]), "  ".join("-" * w for w in widths)]
    out += [ln for r in cells for ln in body(r)]
    return "\n".join(([title] if title else []) + out)


class Table:
    """Speed/quality measurements, one row per configuration (``Table.add(name, **metrics)``).

    ``text()`` is a pandas-free table for printing; ``figure(x, y)`` a scatter of one metric against another with
    every point labelled (``group`` column values are joined by lines, e.g. one line per method's knob sweep).
    """

    def __init__(self, title: str = "", columns: Sequence[str] | None = None):
        self.title = title
        self.columns = list(columns) if columns is not None else None
        self.rows: list[dict] = []

    def add(self, name: str, **metrics) -> dict:
        row = {"configuration": name, **metrics}
        self.rows.append(row)
        return row

    def __getitem__(self, name: str) -> dict:
        for r in self.rows:
            if r["configuration"] == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r['configuration'] for r in self.rows]}")

    def text(self, digits: int = 2) -> str:
        cols = ["configuration", *self.columns] if self.columns else None
        return format_table(self.rows, cols, digits=digits, title=self.title or None)

    def __str__(self) -> str:
        return self.text()

    def figure(self, x: str = "flop_speedup", y: str = "psnr", *, group: str | None = "group",
               figsize: tuple[float, float] = (5.5, 3.6), title: str | None = None, logx: bool = False,
               label: bool = True):
        """A matplotlib Figure of ``y`` against ``x`` for every row that has both (PNG-friendly, fixed size)."""
        import matplotlib.pyplot as plt

        pts = [r for r in self.rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
               and math.isfinite(r[x]) and math.isfinite(r[y])]
        fig, ax = plt.subplots(figsize=figsize, dpi=90)
        groups: dict = {}
        for r in pts:
            groups.setdefault(r.get(group) if group else None, []).append(r)
        for g, rs in groups.items():
            rs = sorted(rs, key=lambda r: r[x])
            style = "o-" if g is not None and len(rs) > 1 else "o"
            ax.plot([r[x] for r in rs], [r[y] for r in rs], style, label=g if g is not None else None, ms=5)
            if label:
                for r in rs:
                    ax.annotate(str(r["configuration"]), (r[x], r[y]), textcoords="offset points", xytext=(3, 3),
                                fontsize=7)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logx:
            ax.set_xscale("log")
        if any(g is not None for g in groups):
            ax.legend(fontsize=7)
        ax.set_title(title if title is not None else self.title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig


def rows_from(items: Iterable[tuple[str, dict]]) -> list[dict]:
    """``[(name, metrics), ...]`` -> rows for :func:`format_table`."""
    return [{"configuration": n, **m} for n, m in items]
