"""Claims: a paper's claim, recorded in the cell that measures it, with its interval and the verdict of one rule.

Every number the paper map shows comes from a :func:`record` call in an executed chapter. The record is displayed in
the chapter (a short Markdown line) and stored in the notebook as that output's metadata under the key :data:`MIME`;
``python -m dmlab.papermap`` collects them. Nothing in the map is typed by hand.

**The verdict rule.** A claim is compared with its *trivial competitor* at matched cost (the same sampler at fewer
steps and matched FLOPs for an accelerator, the best hand-designed solver for a solver, the simplest baseline for a
probe) through a *paired* difference ``method - competitor`` measured on the same noise, samples or calibration
draws, and the difference's confidence interval:

* :func:`bootstrap` -- a two-stage (hierarchical) percentile bootstrap: seeds are resampled with replacement, then
  samples within each drawn seed, the same indices for every paired array (Davison & Hinkley 1997, ch. 3.8; Efron &
  Tibshirani 1993 for the percentile interval). With one seed only the samples are resampled, which ignores what
  the claim depends on; :func:`record` therefore asks for at least :data:`MIN_SEEDS` seeds before it gives a
  quantitative verdict.
* :func:`paired_bootstrap` -- the common case: the mean of per-sample differences (PSNR, error, log-likelihood,
  0/1 correctness).
* :func:`decide` -- ``holds`` when the whole interval is on the claim's side of the threshold, ``does-not-hold``
  when the whole interval is on the other side, ``unresolved`` when it straddles it. No verdict comes from a
  difference inside its interval.

Other statuses: ``demonstrated`` (the mechanism runs and is shown; the paper's claim is not quantitative at this
scale), ``full-scale-only`` (the claim cannot be tested here; the full-scale cell is wired and tested on
config-built models), ``planned`` (no chapter measures it yet; the map's default).

:func:`fmt` prints a value at the precision its interval allows, so that checkpoint cells compare what is
reproducible and readers do not read digits that are noise. Only torch and the standard library are imported.
"""
from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = ["MIME", "STATUSES", "VERDICTS", "MIN_SEEDS", "Interval", "Claim", "bootstrap", "paired_bootstrap",
           "decide", "fmt", "record", "recap"]

MIME = "application/vnd.dmlab.claim+json"
MIN_SEEDS = 3

STATUSES = {
    "holds": "Measured at tiny scale against the trivial competitor at matched cost; the whole interval of the "
             "paired difference lies on the paper's side of the threshold.",
    "does-not-hold": "Measured the same way; the whole interval lies on the other side: in our setting the claim "
                     "failed (the note says what we saw instead).",
    "unresolved": "Measured the same way; the interval straddles the threshold, so this scale cannot decide.",
    "demonstrated": "The mechanism runs in its chapter and is shown (a figure and a check); the claim is not "
                    "quantitative at this scale.",
    "full-scale-only": "The claim needs the paper's full-scale models or data; the full-scale cell is wired "
                       "(`DMLAB_SCALE=full`) and tested on config-built models, and any tiny run is a demonstration.",
    "planned": "It has a home chapter; no chapter records a claim for it yet.",
}
VERDICTS = ("holds", "does-not-hold", "unresolved")


# ----------------------------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile confidence interval ``[low, high]`` at ``level``, from ``n`` samples per
    seed and ``seeds`` seeds."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    n: int = 0
    seeds: int = 1

    def __post_init__(self):
        for k in ("estimate", "low", "high"):
            if not isinstance(getattr(self, k), (int, float)) or math.isnan(getattr(self, k)):
                raise ValueError(f"Interval.{k} must be a number (not NaN), got {getattr(self, k)!r}")
        if not self.low <= self.high:
            raise ValueError(f"Interval needs low <= high, got [{self.low}, {self.high}]")

    @property
    def width(self) -> float:
        return self.high - self.low

    def __str__(self) -> str:
        return fmt(self)

    def to_dict(self) -> dict:
        return {k: _round(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _as_stack(a, name: str) -> Tensor:
    """Per-sample values as ``[seeds, n, ...]`` (a 1-D input is one seed; a list holds one tensor per seed)."""
    if isinstance(a, (list, tuple)):
        if not a or not all(isinstance(t, Tensor) for t in a):
            raise TypeError(f"{name} must be a tensor [seeds, n, ...] or a non-empty list of tensors, one per seed")
        if len({tuple(t.shape) for t in a}) != 1:
            raise ValueError(f"{name}: every seed needs the same number of samples, got "
                             f"{[tuple(t.shape) for t in a]}")
        a = torch.stack(list(a))
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [seeds, n, ...] (or [n] for one seed), got {type(a).__name__}")
    if a.ndim == 1:
        a = a[None]
    if a.ndim < 2 or a.shape[1] < 2:
        raise ValueError(f"{name} must have shape [seeds, n, ...] with n >= 2 samples, got {tuple(a.shape)}")
    return a.detach().cpu()


def bootstrap(statistic: Callable[..., float], *data, generator: torch.Generator, n_boot: int = 1000,
              level: float = 0.95) -> Interval:
    """Percentile interval of ``statistic(*data)`` by a two-stage paired bootstrap.

    Each array in ``data`` is ``[seeds, n, ...]`` (a 1-D array is ``[n]``, one seed; features of one seed are
    ``f[None]``), with entry ``[s, i]`` of every
    array belonging to the same sample (same noise, same image): the arrays are resampled at the *same* indices.
    Each replicate draws ``seeds`` seeds with replacement (only when there are at least 2) and ``n`` samples with
    replacement within each drawn seed, and calls ``statistic`` on the ``[seeds, n, ...]`` gathers. The estimate is
    ``statistic`` on the data as given. Set-level metrics (Fréchet distance, KID, accuracy) work the same way as
    means: pass features and let ``statistic`` compute the metric of the resampled set.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if not callable(statistic):
        raise TypeError("statistic must be a callable taking the resampled arrays and returning a float")
    if not data:
        raise ValueError("give at least one array of per-sample values")
    if not (isinstance(n_boot, int) and n_boot >= 100):
        raise ValueError(f"n_boot must be an int >= 100 (the tails need replicates), got {n_boot!r}")
    if not 0.5 < level < 1:
        raise ValueError(f"level must be in (0.5, 1), e.g. 0.95, got {level!r}")
    arrays = [_as_stack(a, f"data[{k}]") for k, a in enumerate(data)]
    S, N = arrays[0].shape[:2]
    if any(a.shape[:2] != (S, N) for a in arrays):
        raise ValueError("paired arrays need the same [seeds, n]: got "
                         f"{[tuple(a.shape[:2]) for a in arrays]}")
    est = float(statistic(*arrays))
    reps = []
    for _ in range(n_boot):
        s = torch.randint(0, S, (S,), generator=generator) if S > 1 else torch.zeros(1, dtype=torch.long)
        i = torch.randint(0, N, (S, N), generator=generator)
        reps.append(float(statistic(*[a[s[:, None], i] for a in arrays])))
    r = torch.tensor(reps, dtype=torch.float64)
    r = r[torch.isfinite(r)]
    if r.numel() < n_boot // 2:
        raise ValueError("the statistic was not finite on most bootstrap replicates; check it on the raw data")
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(r, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return Interval(est, min(lo, est), max(hi, est), level, int(N), int(S))


def paired_bootstrap(method, competitor=None, *, generator: torch.Generator, n_boot: int = 2000,
                     level: float = 0.95) -> Interval:
    """Interval of the mean paired difference ``mean(method - competitor)`` of per-sample values
    ``[seeds, n]`` (or the mean of ``method`` alone when ``competitor`` is None). Non-finite pairs (an ``inf``
    PSNR of identical samples) are refused: clip them first and say so."""
    m = _as_stack(method, "method").double()
    if competitor is None:
        d = m
    else:
        c = _as_stack(competitor, "competitor").double()
        if c.shape != m.shape:
            raise ValueError(f"method and competitor must be paired (same shape), got {tuple(m.shape)} and "
                             f"{tuple(c.shape)}")
        d = m - c
    if not torch.isfinite(d).all():
        raise ValueError("per-sample values contain inf/NaN (e.g. PSNR of identical samples): clip them to a stated "
                         "maximum before the bootstrap")
    d = d.flatten(2).mean(2) if d.ndim > 2 else d
    return bootstrap(lambda x: float(x.mean()), d, generator=generator, n_boot=n_boot, level=level)


def decide(diff: Interval, *, threshold: float = 0.0, better: str = "higher") -> str:
    """The verdict rule: ``holds`` if the whole interval of ``method - competitor`` is beyond ``threshold`` on the
    claim's side (``better="higher"``: above it; ``"lower"``: below it), ``does-not-hold`` if the whole interval is
    on the other side, ``unresolved`` otherwise. A non-inferiority claim ("as good as, within 0.5 dB") uses a
    threshold of ``-0.5`` with ``better="higher"``."""
    if not isinstance(diff, Interval):
        raise TypeError("diff must be an Interval (from claims.paired_bootstrap or claims.bootstrap)")
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    lo, hi = (diff.low, diff.high) if better == "higher" else (-diff.high, -diff.low)
    t = threshold if better == "higher" else -threshold
    if lo > t:
        return "holds"
    if hi < t:
        return "does-not-hold"
    return "unresolved"


# ----------------------------------------------------------------------------------------------- printing
def _round(v: float, sig: int = 6) -> float:
    if not math.isfinite(v) or v == 0:
        return v
    return float(f"{v:.{sig}g}")


def _decimals(width: float) -> int:
    """Decimals that show an interval of this width to about two significant digits."""
    if not math.isfinite(width) or width <= 0:
        return 4
    return max(0, min(8, 1 - math.floor(math.log10(width))))


def fmt(value, interval: Interval | None = None, *, unit: str = "") -> str:
    """``value [low, high]`` at the precision the interval allows (two significant digits of its width), e.g.
    ``fmt(Interval(0.1234, 0.11, 0.14))`` is ``'0.123 [0.110, 0.140]'``. ``fmt(interval)`` prints the interval's
    own estimate; a plain number without an interval prints with 3 significant digits."""
    if isinstance(value, Interval):
        value, interval = value.estimate, value
    u = f" {unit}" if unit else ""
    if interval is None:
        return f"{float(value):.3g}{u}"
    d = _decimals(interval.width)
    return f"{value:.{d}f}{u} [{interval.low:.{d}f}, {interval.high:.{d}f}]"


# ----------------------------------------------------------------------------------------------- records
@dataclass
class Claim:
    """One measured claim of one paper (see :func:`record`)."""

    paper: int
    claim: str
    status: str
    metric: str = ""
    method: str = ""
    competitor: str = ""
    value: float | None = None
    competitor_value: float | None = None
    diff: dict | None = None
    threshold: float = 0.0
    better: str = "higher"
    n: int = 0
    seeds: int = 0
    note: str = ""
    primary: bool = True
    extra: dict = field(default_factory=dict)

    def markdown(self) -> str:
        head = f"**Claim record, paper {self.paper}** (`{self.status}`): {self.claim}"
        parts = []
        if self.metric:
            vals = []
            if self.value is not None:
                vals.append(f"{self.method or 'method'} {fmt(self.value)}")
            if self.competitor_value is not None:
                vals.append(f"{self.competitor or 'competitor'} {fmt(self.competitor_value)}")
            elif self.competitor:
                vals.append(f"vs {self.competitor}")
            parts.append(f"{self.metric}: " + ", ".join(vals) if vals else self.metric)
        if self.diff:
            iv = Interval(**self.diff)
            side = ">" if self.better == "higher" else "<"
            parts.append(f"difference {fmt(iv)} ({round(iv.level * 100)}% interval; claim needs {side} "
                         f"{self.threshold:g}); n = {self.n}, {self.seeds} seeds")
        if self.note:
            parts.append(self.note)
        return head + ("  \n" + "; ".join(parts) if parts else "")

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("value", "competitor_value", "threshold"):
            if isinstance(d[k], float):
                d[k] = _round(d[k])
        return d


def record(paper: int, claim: str, *, status: str | None = None, metric: str = "", method: str = "",
           competitor: str = "", value: float | None = None, competitor_value: float | None = None,
           diff: Interval | None = None, threshold: float = 0.0, better: str = "higher", note: str = "",
           primary: bool = True, display: bool = True, **extra) -> Claim:
    """Record a paper's claim where it is measured, and show it.

    ``diff`` is the interval of the paired difference ``method - competitor`` (:func:`paired_bootstrap`,
    :func:`bootstrap`); the status then comes from :func:`decide` with ``threshold``/``better`` (passing a
    ``status`` that disagrees with the rule is an error). Quantitative verdicts need ``diff`` with at least
    :data:`MIN_SEEDS` seeds. Without ``diff`` the status must be ``demonstrated`` or ``full-scale-only``.
    ``primary=False`` marks a sub-claim: the paper's status in the map is its primary record's. ``extra`` keeps
    further numbers (plain floats/ints/strings) with the record.
    """
    if not (isinstance(paper, int) and not isinstance(paper, bool) and 1 <= paper <= 82):
        raise ValueError(f"paper must be the paper's number 1..82 (as in the paper map), got {paper!r}")
    if not (isinstance(claim, str) and claim.strip()):
        raise ValueError("claim must be the paper's claim in one sentence")
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
    if status == "planned":
        raise ValueError("'planned' is the map's default for papers without records; do not record it")
    for k, v in (("value", value), ("competitor_value", competitor_value)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"{k} must be a finite number or None, got {v!r}")
    for k, v in extra.items():
        if not isinstance(v, (int, float, str, bool)) or (isinstance(v, float) and not math.isfinite(v)):
            raise TypeError(f"extra field {k}={v!r}: only finite numbers, strings and booleans are kept")
    if diff is not None:
        rule = decide(diff, threshold=threshold, better=better)
        if diff.seeds < MIN_SEEDS:
            raise ValueError(f"paper {paper}: the interval comes from {diff.seeds} seed(s); a verdict needs at least "
                             f"{MIN_SEEDS} seeds of what the claim depends on (noise, calibration draws, training "
                             "runs). Measure more seeds, or record status='demonstrated' without diff")
        if status is not None and status not in VERDICTS:
            raise ValueError(f"paper {paper}: status {status!r} with a measured diff; leave status=None and let "
                             "the verdict rule decide")
        if status is not None and status != rule:
            raise ValueError(f"paper {paper}: status {status!r} contradicts the verdict rule ({rule}: interval "
                             f"{fmt(diff)} against threshold {threshold:g}, {better} is better)")
        status = rule
    elif status is None or status in VERDICTS:
        raise ValueError(f"paper {paper}: a verdict ({', '.join(VERDICTS)}) needs diff=Interval of the paired "
                         "difference; without one, record status='demonstrated' or 'full-scale-only'")
    c = Claim(paper=paper, claim=claim.strip(), status=status, metric=metric, method=method, competitor=competitor,
              value=None if value is None else float(value),
              competitor_value=None if competitor_value is None else float(competitor_value),
              diff=None if diff is None else diff.to_dict(), threshold=float(threshold), better=better,
              n=0 if diff is None else diff.n, seeds=0 if diff is None else diff.seeds, note=note,
              primary=primary, extra={k: (_round(v) if isinstance(v, float) else v) for k, v in extra.items()})
    if display:
        from IPython.display import display as _display

        _display({"text/markdown": c.markdown(), "text/plain": c.markdown()}, metadata={MIME: c.to_json()},
                 raw=True)
    return c


def recap(records, *, width: int = 88) -> str:
    """A chapter's claim records as plain text at most ``width`` characters wide: per record one line with the
    paper, its status and the difference with its interval, then the claim (sub-claims marked ``(sub)``) shortened
    to one indented line."""
    records = list(records)
    head = f"{'paper':>5s}  {'status':14s} difference [95% interval]"
    out = [head, "-" * len(head)]
    for c in records:
        iv = fmt(Interval(**c.diff)) if c.diff else "-"
        out.append(f"{c.paper:5d}  {c.status:14s} {iv}")
        text = ("" if c.primary else "(sub) ") + c.claim
        out.append(" " * 7 + textwrap.shorten(text, width - 7, placeholder=" ..."))
    return "\n".join(out)


def from_notebook(path) -> list[Claim]:
    """Every claim recorded in an executed notebook's stored outputs, in cell order."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    out = []
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []) or []:
            d = (o.get("metadata") or {}).get(MIME)
            if d is not None:
                if isinstance(d, str):
                    d = json.loads(d)
                out.append(Claim(**d))
    return out
