"""The speed/quality frontier: samplers and accelerators composed, measured on one protocol, one Pareto plot.

A :class:`Stack` is one point: a sampler with a number of steps plus any of the book's accelerators on top,

* **fewer steps / a better solver**: DDIM (Song et al. 2021), DPM-Solver++(2M) (Lu et al. 2022), UniPC (Zhao et al.
  2023) from :mod:`dmlab.samplers`;
* **feature caching**: DeepCache on UNets (Ma et al. 2024; paper 73) or TaylorSeer on DiTs (diffusers' cache, via
  :func:`dmlab.accelerators.apply_taylorseer`), ``cache`` = the interval;
* **T-Stitch** (Pan et al. 2025; paper 1): the first ``stitch`` fraction of the steps on the small model;
* **early exit** (DeeDiff, Tang et al. 2023; paper 53): ``exit`` = the uncertainty threshold (DiT only);
* **linear attention** (LinFusion, Liu et al. 2024; paper 2): ``linear=True`` (DiT only);
* **weight quantization** (fake-quant, :mod:`dmlab.accelerators.quantization`; papers 20, 82): ``wbits``; it does
  not change FLOPs (and CPU fake-quant is slower), only the model's bytes, so its row shows quality and bytes.

A :class:`Family` holds the zoo models a stack runs on (the UNet or the DiT S/L pair and the DiT's trained exit heads
and linear-attention modules). :class:`Frontier` samples every stack from the same noise and labels, counts the
FLOPs **of the whole run while it samples** (FlopCounterMode, the CPU attention kernel included; data-dependent
methods such as early exit need the full batch), and records digits-FD, class accuracy and PSNR to the reference
(by default 50-step DDIM on the large model). :func:`pareto_front` and :meth:`Frontier.figure` give the frontier;
:func:`explorer` is the interactive knob explorer (ipywidgets 7 and 8: only ``Dropdown``, ``Output``,
``HBox``/``VBox``, ``HTML`` and ``observe`` are used).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["Stack", "Family", "Frontier", "composed", "run_with_flops", "pareto_front", "select", "explorer",
           "plot_frontiers", "fd_spread", "SAMPLERS", "KNOBS"]

KNOBS = ("sampler", "steps", "cache", "stitch", "exit", "linear", "wbits")

SAMPLERS = ("ddim", "dpmpp_2m", "unipc")


def run_with_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), FLOPs of that call)``: one run under ``FlopCounterMode`` (2 FLOPs per multiply-add; the CPU
    scaled-dot-product-attention kernel counted as :func:`dmlab.bench.count_flops` does)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..bench import _cpu_sdpa_mapping

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as fc:
        out = fn()
    return out, int(fc.get_total_flops())


def _sampler(name: str) -> Callable:
    from ..samplers.registry import get

    return get(name).fn  # the registry's record (dmlab.samplers.registry)


@dataclass(frozen=True)
class Stack:
    """A sampler with ``steps`` steps and accelerators composed on top (see the module docstring for the papers).

    ``cache``: caching interval (1 = off); ``stitch``: fraction of the steps on the small model (0 = off);
    ``exit``: early-exit threshold (0 = off; DiT; per sample, or per batch when ``cache > 1``, because diffusers'
    transformer caches store whole-batch outputs); ``linear``: linear attention (DiT); ``wbits``: weight bits of
    fake quantization (None = float).
    """

    sampler: str = "ddim"
    steps: int = 50
    cache: int = 1
    stitch: float = 0.0
    exit: float = 0.0
    linear: bool = False
    wbits: int | None = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name, lo in (("steps", 1), ("cache", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo} (cache=1 turns caching off), got {v!r}")
        if self.sampler != "ddim" and self.steps < 2:
            raise ValueError(f"{self.sampler} needs steps >= 2 (its second-order update uses two model calls)")
        if not 0.0 <= float(self.stitch) <= 1.0:
            raise ValueError(f"stitch (the fraction of steps on the small model) must be in [0, 1], got {self.stitch}")
        if not 0.0 <= float(self.exit) <= 1.0:
            raise ValueError(f"exit (the early-exit threshold) must be in [0, 1], got {self.exit}")
        if not isinstance(self.linear, bool):
            raise TypeError(f"linear must be True or False, got {self.linear!r}")
        if self.wbits is not None and (isinstance(self.wbits, bool) or not isinstance(self.wbits, int)
                                       or not 2 <= self.wbits <= 16):
            raise ValueError(f"wbits must be None (float weights) or an int in 2..16, got {self.wbits!r}")

    @property
    def methods(self) -> tuple[str, ...]:
        """The accelerators switched on (beyond the sampler and its steps)."""
        on = [("cache", self.cache > 1), ("stitch", self.stitch > 0), ("exit", self.exit > 0),
              ("linear", self.linear), ("quant", self.wbits is not None)]
        return tuple(n for n, v in on if v)

    @property
    def label(self) -> str:
        parts = [f"{self.sampler} {self.steps}"]
        if self.cache > 1:
            parts.append(f"cache {self.cache}")
        if self.stitch > 0:
            parts.append(f"stitch {self.stitch:g}")
        if self.exit > 0:
            parts.append(f"exit {self.exit:g}")
        if self.linear:
            parts.append("linear attn")
        if self.wbits is not None:
            parts.append(f"W{self.wbits}")
        return " + ".join(parts)

    def but(self, **changes) -> "Stack":
        """A copy with some knobs changed."""
        return replace(self, **changes)


class Family:
    """The models a :class:`Stack` runs on: ``large`` and optional ``small`` as ``(denoiser, network)`` pairs of the
    same kind (``"unet"`` or ``"dit"``), and the DiT's optional trained adapters (``exit_heads``,
    ``linear_modules``)."""

    def __init__(self, kind: str, large: tuple, small: tuple | None = None, *, exit_heads=None,
                 linear_modules=None):
        if kind not in ("unet", "dit"):
            raise ValueError(f"kind must be 'unet' or 'dit', got {kind!r}")
        self.kind, self.large, self.small = kind, large, small
        self.exit_heads, self.linear_modules = exit_heads, linear_modules

    @classmethod
    def from_zoo(cls, kind: str = "unet", *, adapters: bool = True) -> "Family":
        """``unet_l``/``unet_s`` or ``dit_l``/``dit_s`` from the zoo; for the DiT also its registered exit heads
        (``dit_l_exit``) and linear attention (``dit_l_linear``) when ``adapters`` and they exist."""
        from .. import zoo

        if kind not in ("unet", "dit"):
            raise ValueError(f"kind must be 'unet' or 'dit', got {kind!r}")
        large, small = zoo.load_denoiser(f"{kind}_l"), zoo.load_denoiser(f"{kind}_s")
        heads = lin = None
        if kind == "dit" and adapters:
            from .early_exit import load_exit_heads
            from .linear_attention import load_linear_attention

            with contextlib.suppress(FileNotFoundError):
                heads = load_exit_heads("dit_l_exit")
            with contextlib.suppress(FileNotFoundError):
                lin = load_linear_attention("dit_l_linear", large[1])
        return cls(kind, large, small, exit_heads=heads, linear_modules=lin)

    def check(self, stack: Stack) -> None:
        """Raise ``ValueError`` if this family cannot run ``stack``."""
        if stack.stitch > 0 and self.small is None:
            raise ValueError("stitch > 0 needs a small model: Family(kind, large, small=...)")
        if (stack.exit > 0 or stack.linear) and self.kind != "dit":
            raise ValueError("early exit and linear attention need the DiT family (Family.from_zoo('dit'))")
        if stack.exit > 0 and self.exit_heads is None:
            raise ValueError("exit > 0 needs trained exit heads: Family(..., exit_heads=load_exit_heads(...))")
        if stack.linear and self.linear_modules is None:
            raise ValueError("linear=True needs distilled modules: Family(..., linear_modules=...)")

    def sigmas(self, steps: int) -> Tensor:
        from .. import schedules

        return schedules.discrete(steps, self.large[0].sigmas_train, dtype=torch.float32)


@contextlib.contextmanager
def composed(stack: Stack, family: Family, sigmas: Tensor) -> Iterator[tuple[Callable, dict]]:
    """The denoiser of ``stack`` on ``family`` with every accelerator applied (removed on exit), and the handles by
    method name. Order: quantization first (it wraps layers), then linear attention, early exit, caching; T-Stitch
    wraps the denoisers."""
    family.check(stack)
    den_l, net_l = family.large
    handles: dict = {}
    with contextlib.ExitStack() as es:
        if stack.wbits is not None:
            from .quantization import QuantConfig, apply_quantization

            handles["quant"] = es.enter_context(apply_quantization(net_l, QuantConfig(weight_bits=stack.wbits,
                                                                                      act_bits=None)))
        if stack.linear:
            from .linear_attention import LinearAttentionConfig, apply_linear_attention

            handles["linear"] = es.enter_context(apply_linear_attention(
                net_l, LinearAttentionConfig(family.linear_modules)))
        if stack.exit > 0:
            from .early_exit import EarlyExitConfig, apply_early_exit

            per_sample = stack.cache == 1  # diffusers' caches store whole-batch outputs: exit batch-wise with them
            handles["exit"] = es.enter_context(apply_early_exit(net_l, EarlyExitConfig(
                family.exit_heads, stack.exit, per_sample=per_sample)))
        if stack.cache > 1:
            if family.kind == "unet":
                from .caching import DeepCacheConfig, apply_deepcache

                handles["cache"] = es.enter_context(apply_deepcache(net_l, DeepCacheConfig(interval=stack.cache)))
            else:
                from .diffusers_caches import apply_taylorseer

                handles["cache"] = es.enter_context(apply_taylorseer(net_l, interval=stack.cache))
        d = den_l
        if stack.stitch > 0:
            from .tstitch import tstitch

            d = tstitch(family.small[0], den_l, sigmas, stack.stitch)
            handles["stitch"] = d
        yield d, handles


def pareto_front(rows: Sequence[dict], x: str = "flop_speedup", y: str = "fd", *,
                 larger_y_better: bool = False) -> list[dict]:
    """The rows no other row beats on both ``x`` (larger is better) and ``y`` (smaller is better, or larger with
    ``larger_y_better``, e.g. PSNR), sorted by ``x``; rows with a non-finite ``x`` or ``y`` are ignored."""
    missing = [k for k in (x, y) if rows and not any(k in r for r in rows)]
    if missing:
        raise ValueError(f"no row has the column(s) {missing}; the rows have {sorted(set().union(*rows))}: pass x= "
                         "and y= naming columns of the rows (e.g. x='flop_speedup', y='psnr')")
    sgn = -1.0 if larger_y_better else 1.0
    pts = [(r[x], sgn * r[y], r) for r in rows if isinstance(r.get(x), (int, float))
           and isinstance(r.get(y), (int, float)) and math.isfinite(r[x]) and math.isfinite(r[y])]
    front = [r for a, b, r in pts if not any((a2 >= a and b2 <= b) and (a2 > a or b2 < b) for a2, b2, _ in pts)]
    return sorted(front, key=lambda r: r[x])


class Frontier:
    """Every :class:`Stack` sampled from the same noise and labels on one :class:`Family`, with FLOPs of the whole
    run, digits-FD, class accuracy and PSNR to the ``reference`` stack's samples (see the module docstring).

    Rows (``frontier.rows``): ``configuration`` (the stack's label), ``group`` (the methods switched on, or
    ``"steps only"``), the knobs, ``flops`` (GFLOP per sample), ``flop_speedup`` (reference FLOPs / these), ``fd``,
    ``fd_increase`` (relative to the reference), ``acc``, ``psnr``, ``samples``; with early exit also
    ``mean_depth`` and ``per_call`` (the exit handle's stats), with quantization ``mbytes`` (model megabytes).
    """

    def __init__(self, family: Family, labels: Tensor, *, generator: torch.Generator, classifier=None,
                 reference: Stack = Stack("ddim", 50), size: int = 8, channels: int = 1):
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
        self.family, self.classifier = family, classifier
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.noise = torch.randn(len(self.labels), channels, size, size, generator=generator)
        self.rows: list[dict] = []
        self.reference = reference
        self.ref = self.measure(reference, group="reference")

    def sample(self, stack: Stack) -> tuple[Tensor, dict]:
        """Samples of ``stack`` from the frontier's noise and labels, and the accelerators' handles (their stats)."""
        sig = self.family.sigmas(stack.steps)
        with composed(stack, self.family, sig) as (d, handles):
            x = _sampler(stack.sampler)(d, self.noise * sig[0], sig, cond={"class_labels": self.labels})
        return x, handles

    def measure(self, stack: Stack, *, group: str | None = None, name: str | None = None) -> dict:
        """Sample ``stack`` once (FLOPs counted during the run) and add its row."""
        from .. import bench, metrics

        (x, handles), flops = run_with_flops(lambda: self.sample(stack))
        n = len(self.labels)
        row = {"configuration": name or stack.label, "group": group or (" + ".join(stack.methods) or "steps only"),
               "sampler": stack.sampler, "steps": stack.steps, "cache": stack.cache, "stitch": stack.stitch,
               "exit": stack.exit, "linear": stack.linear, "wbits": stack.wbits, "flops": flops / n / 1e9}
        ref = getattr(self, "ref", None)
        row["flop_speedup"] = ref["flops"] / row["flops"] if ref else 1.0
        row["psnr"] = bench.psnr(x, ref["samples"]) if ref else math.inf
        if self.classifier is not None:
            row["fd"] = metrics.digits_fd(x, classifier=self.classifier)
            row["acc"] = metrics.class_accuracy(x, self.labels, classifier=self.classifier)
            row["fd_increase"] = row["fd"] / ref["fd"] - 1 if ref else 0.0
        if "exit" in handles:
            row["mean_depth"] = handles["exit"].stats["mean_depth"]
            row["per_call"] = handles["exit"].stats["per_call"]
        if "quant" in handles:
            row["mbytes"] = handles["quant"].stats.get("bytes", math.nan) / 1e6
        row["samples"] = x
        self.rows.append(row)
        return row

    def matched_steps(self, row: dict, *, sampler: str | None = None) -> dict:
        """The trivial competitor of ``row``: the reference sampler with fewer steps at matched FLOPs (every table's
        row "same sampler, fewer steps, matched FLOPs")."""
        from ..bench import matched_steps

        k = matched_steps(self.reference.steps, row["flop_speedup"])
        s = Stack(sampler or self.reference.sampler, max(k, 1 if (sampler or self.reference.sampler) == "ddim" else 2))
        return self.measure(s, group="same sampler, fewer steps, matched FLOPs",
                            name=f"same sampler, fewer steps, matched FLOPs ({s.label})")

    def pareto(self, x: str = "flop_speedup", y: str = "fd") -> list[dict]:
        """The Pareto front of the rows (``y == "psnr"`` counts larger as better)."""
        return pareto_front(self.rows, x, y, larger_y_better=(y == "psnr"))

    def table(self, columns: Sequence[str] = ("flop_speedup", "fd", "fd_increase", "acc", "psnr"), *,
              digits: int = 3, rows: Sequence[dict] | None = None) -> str:
        from ..bench import format_table

        return format_table(list(rows if rows is not None else self.rows), ["configuration", *columns], digits=digits)

    def figure(self, x: str = "flop_speedup", y: str = "fd", **kw):
        """This frontier alone on a plot (see :func:`plot_frontiers` for the options)."""
        return plot_frontiers({"": self}, x, y, **kw)


# ----------------------------------------------------------------------------------------------- reading
def fd_spread(x: Tensor, ref: Tensor | None = None, *, classifier, generator: torch.Generator,
              reps: int = 30) -> float:
    """Bootstrap standard deviation of digits-FD of samples ``x`` (``reps`` resamples drawn with ``generator``), or,
    given ``ref`` (samples from the same noise and labels, e.g. the reference stack's), of the *difference*
    ``FD(x) - FD(ref)`` with both resampled at the same indices (a paired bootstrap: the two share their noise, so
    their difference is far less noisy than either FD). The size of FD differences sampling noise alone produces
    at this ``n``; resampling with replacement biases each FD upwards a little, so read it as a scale."""
    from .. import metrics
    from ..data import load_digits

    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if ref is not None and ref.shape != x.shape:
        raise ValueError(f"ref must have the shape of x, got {tuple(ref.shape)} and {tuple(x.shape)}")
    f = metrics.digits_features(x.clamp(-1, 1), classifier)
    g = metrics.digits_features(ref.clamp(-1, 1), classifier) if ref is not None else None
    test = metrics.digits_features(load_digits("test")[0], classifier)
    vals = []
    for _ in range(reps):
        i = torch.randint(0, len(f), (len(f),), generator=generator)
        v = metrics.frechet_distance(f[i], test)
        vals.append(v - metrics.frechet_distance(g[i], test) if g is not None else v)
    return float(torch.tensor(vals).std())


def plot_frontiers(frontiers: dict, x: str = "flop_speedup", y: str = "fd", *, target: tuple | None = None,
                   figsize=(9.0, 4.6), title: str = "", logx: bool = True, ax=None, highlight: dict | None = None):
    """Several :class:`Frontier` objects (``{family name: Frontier}``) on one axes: one marker shape and one Pareto
    front line style per family, one colour per group of methods (the same method has the same colour in every
    family); the legend sits outside the axes, in two blocks (methods by colour, families by marker).
    ``target = (x_min, y_max)`` draws the target's corner (``y_max`` may be None), ``highlight`` circles one row.
    Returns the Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    markers, fronts = ["o", "^", "s", "D"], ["--", ":", "-.", (0, (5, 1))]
    groups = sorted({r["group"] for f in frontiers.values() for r in f.rows})
    colour = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    for k, (fam, f) in enumerate(frontiers.items()):
        for g in groups:
            rs = [r for r in f.rows if r["group"] == g and math.isfinite(r.get(y, math.nan))]
            if rs:
                ax.plot([r[x] for r in rs], [r[y] for r in rs], markers[k % 4], color=colour[g], ms=6, ls="",
                        alpha=0.85)
        front = pareto_front(f.rows, x, y, larger_y_better=(y == "psnr")) if any(y in r for r in f.rows) else []
        ax.plot([r[x] for r in front], [r[y] for r in front], ls=fronts[k % 4], color="k", lw=1)
    if target is not None:
        ax.axvline(target[0], color="g", lw=0.8, ls=":")
        if target[1] is not None:
            ax.axhline(target[1], color="g", lw=0.8, ls=":")
    if highlight is not None and math.isfinite(highlight.get(y, math.nan)):
        ax.plot([highlight[x]], [highlight[y]], "o", ms=16, mfc="none", mec="r", mew=2)
    if logx:
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        ax.xaxis.set_major_locator(FixedLocator([v for v in (1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 100)
                                                 if lo <= v <= hi]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel({"flop_speedup": "FLOP speed-up over the reference (log)"}.get(x, x))
    ax.set_ylabel({"fd": "digits-FD (lower is better)", "psnr": "PSNR to the reference, dB"}.get(y, y))
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="s", ls="", color=colour[g], ms=7, label=g) for g in groups]
    for k, fam in enumerate(frontiers):
        name = fam or "configurations"
        handles.append(Line2D([], [], marker=markers[k % 4], ls=fronts[k % 4], color="k", ms=6,
                              label=f"{name} (marker; Pareto front)"))
    ax.legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
              frameon=False)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------- explorer
def select(rows: Sequence[dict], **knobs) -> dict | None:
    """The first row whose knobs equal ``knobs`` (the explorer's lookup), or None if that stack was not measured."""
    for r in rows:
        if all(r.get(k) == v for k, v in knobs.items()):
            return r
    return None


def _fmt_knob(v) -> str:
    return "off" if v is None or v is False else ("on" if v is True else f"{v:g}" if isinstance(v, float) else str(v))


def explorer(frontiers, knobs: Sequence[str] = KNOBS, *, x: str = "flop_speedup", y: str = "fd",
             n_show: int = 10):
    """An ipywidgets explorer of measured frontiers (one :class:`Frontier`, or ``{family name: Frontier}``): one
    dropdown per knob that varies across the rows (and one for the family); the chosen stack is circled on the
    frontier plot, with its numbers and ``n_show`` of its samples. It looks measured rows up and never samples, so
    it also works from stored widget state; an unmeasured combination says so. Works with ipywidgets 7 and 8 (only
    ``Dropdown``, ``HTML``, ``Output``, ``HBox``/``VBox`` and ``observe`` are used)."""
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import clear_output, display

    fams = frontiers if isinstance(frontiers, dict) else {"": frontiers}
    if not fams or not all(isinstance(f, Frontier) for f in fams.values()):
        raise TypeError("frontiers must be a Frontier or a dict {family name: Frontier}")
    unknown = [k for k in knobs if k not in KNOBS]
    if unknown:
        raise ValueError(f"unknown knobs {unknown}; choose from {KNOBS}")
    rows = [{**r, "family": name} for name, f in fams.items() for r in f.rows
            if not r["group"].startswith("same sampler")]
    keys = (["family"] if len(fams) > 1 else []) + [k for k in knobs if len({repr(r[k]) for r in rows}) > 1]
    start = {**next(iter(fams.values())).ref, "family": next(iter(fams))}
    menus = {}
    for k in keys:
        vals = sorted({r[k] for r in rows}, key=lambda v: (v is not None, v if not isinstance(v, str) else 0, str(v)))
        menus[k] = W.Dropdown(options=[(_fmt_knob(v), v) for v in vals], value=start[k], description=k)
    out = W.Output()
    info = W.HTML()

    def show(*_):
        r = select(rows, **{k: m.value for k, m in menus.items()})
        with out:
            clear_output(wait=True)
            if r is None:
                info.value = "<b>not measured</b>: pick another combination (only measured stacks are stored)"
                return
            info.value = (f"<b>{(r['family'] + ': ') if r['family'] else ''}{r['configuration']}</b><br>"
                          f"FLOP speed-up {r['flop_speedup']:.2f}x, digits-FD {r.get('fd', math.nan):.2f}, "
                          f"accuracy {r.get('acc', math.nan):.3f}, PSNR to reference {r['psnr']:.1f} dB")
            fig = plot_frontiers({n: f for n, f in fams.items() if n == r["family"]}, x, y, highlight=r,
                                 figsize=(6.0, 3.6), title=r["configuration"])
            display(fig)
            plt.close(fig)
            from .. import viz

            display(viz.image_grid(r["samples"][:n_show], nrow=n_show))

    for m in menus.values():
        m.observe(show, names="value")
    show()
    return W.HBox([W.VBox([*menus.values(), info]), out])
