"""A frozen diffusion model as a classifier, two ways.

* :func:`diffusion_classify` - the Diffusion Classifier of Li et al. 2023 ("Your diffusion model is secretly a
  zero-shot classifier", paper 33). Pick the condition ``c`` whose denoiser best predicts the added noise,

  .. math:: \\hat c = \\arg\\min_c \\; \\mathbb E_{\\sigma, \\varepsilon}\\, w(\\sigma)\\,
            \\lVert \\varepsilon - \\hat\\varepsilon_\\theta(x_0 + \\sigma\\varepsilon, \\sigma, c) \\rVert^2 ,

  a Monte-Carlo estimate of the (weighted) ELBO of ``log p(x0 | c)``. As in the official ``eval_prob_adaptive.py``:
  the *same* ``(sigma, eps)`` pairs are used for every candidate class (variance reduction), sigmas come from a
  stratified timestep grid ``t = T//n//2, T//n//2 + T//n, ...`` (:func:`classifier_sigmas`), and classes are pruned
  adaptively over rounds (``n_samples=(50, 500), to_keep=(5, 1)``: 50 pairs for every class, keep the best 5,
  evaluate those on 500 pairs in all, keep 1). ``weighting="uniform"`` is the paper's plain mean over timesteps;
  ``weighting="elbo"`` weights each sigma by its share of ``log sigma``, which makes the score an estimate of
  ``-log p(x0 | c)`` up to a class-independent constant (see below) - with the *exact* class-conditional denoiser it
  is the Bayes classifier.
* :func:`pooled_features`, :func:`linear_probe`, :func:`probe_grid` - "Diffusion models beat GANs on image
  classification" (Mukhopadhyay et al. 2023, paper 54): noise the image to one sigma, run the denoiser once, pool
  one block's feature map and fit a linear classifier; sweep (block x sigma).

Why the ELBO weighting gives log-likelihood ratios: for ``x = x0 + sigma eps`` and the exact posterior mean ``D_c``
(Kong et al. 2023, the pointwise I-MMSE identity; change of variables ``snr = sigma^-2``)

.. math:: \\log p(x_0 \\mid c_1) - \\log p(x_0 \\mid c_2) = \\int_0^\\infty \\Big(
          \\mathbb E\\lVert\\varepsilon - \\hat\\varepsilon_{c_2}\\rVert^2 - \\mathbb E\\lVert\\varepsilon -
          \\hat\\varepsilon_{c_1}\\rVert^2\\Big)\\, d\\log\\sigma ,

with ``eps_hat = (x - D_c(x, sigma)) / sigma`` and squared norms summed over all ``d`` dimensions. Errors here are
per-element means (as the paper prints them), so ``-d * score`` is the log-likelihood up to a constant
(:meth:`ClassifierResult.log_likelihood`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["classifier_sigmas", "round_indices", "ClassifierResult", "diffusion_classify", "prune_table",
           "ClassConditional",
           "label_conds", "pooled_features", "linear_probe", "probe_grid"]

LOSSES = ("l2", "l1", "huber")
WEIGHTINGS = ("uniform", "elbo")


# ----------------------------------------------------------------------------------------------- grids
def classifier_sigmas(denoiser=None, n: int = 100, *, sigma_min: float | None = None,
                      sigma_max: float | None = None) -> Tensor:
    """The stratified evaluation grid of the Diffusion Classifier (Li et al. 2023, paper 33), ``[n]`` increasing.

    For a network on a discrete VP schedule (a :class:`dmlab.denoisers.DiscreteVPDenoiser`, which has
    ``sigmas_train``) this is the official grid ``t = range(T//n//2, T, T//n)[:n]`` mapped to its training sigmas.
    Otherwise (exact denoisers, EDM networks) give ``sigma_min`` and ``sigma_max``: the grid is the ``n`` midpoints
    of equal cells in ``log sigma`` (the same stratification, in the variable the ELBO is uniform in).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (the number of grid sigmas), got {n!r}")
    st = getattr(denoiser, "sigmas_train", None)
    if st is not None and sigma_min is None and sigma_max is None:
        T = len(st)
        if n > T:
            raise ValueError(f"n = {n} exceeds the {T} training timesteps")
        t = list(range(T // n // 2, T, T // n))[:n]
        return torch.as_tensor(st, dtype=torch.float64)[t]
    if sigma_min is None or sigma_max is None:
        raise ValueError("this denoiser has no discrete training schedule (sigmas_train); pass sigma_min and "
                         "sigma_max, e.g. classifier_sigmas(D, 100, sigma_min=1e-3, sigma_max=1e3)")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.exp(lo + u * (hi - lo))


def round_indices(n_full: int, n: int) -> list[int]:
    """Indices of the ``n``-point stratified subset of an ``n_full``-point grid, as the official code picks a
    round's timesteps: ``range(n_full)[n_full//n//2 :: n_full//n][:n]``."""
    if not 1 <= n <= n_full:
        raise ValueError(f"need 1 <= n <= n_full, got n={n}, n_full={n_full}")
    step = n_full // n
    return list(range(n_full))[step // 2::step][:n]


def _log_cells(sigmas: Tensor) -> Tensor:
    """Width in ``log sigma`` of each grid point's cell (midpoints between neighbours; mirrored at the ends)."""
    ls = sigmas.log()
    if len(ls) == 1:
        return torch.ones(1, dtype=torch.float64)
    mid = (ls[1:] + ls[:-1]) / 2
    edges = torch.cat([2 * ls[:1] - mid[:1], mid, 2 * ls[-1:] - mid[-1:]])
    return edges[1:] - edges[:-1]


# ----------------------------------------------------------------------------------------------- classifier
@dataclass
class ClassifierResult:
    """What :func:`diffusion_classify` (and :func:`prune_table`) return.

    ``pred [B]`` the predicted row of ``conds``; ``scores [B, C]`` the weighted mean error of each candidate over the
    pairs it was evaluated on (``inf`` for classes never evaluated); ``table [B, C, n]`` the mean error (over trials)
    of every evaluated (class, grid sigma) pair, NaN elsewhere; ``sigmas [n]`` the grid; ``nfe`` denoiser evaluations
    per image; ``dim`` values per image.
    """

    pred: Tensor
    scores: Tensor
    table: Tensor
    sigmas: Tensor
    nfe: int
    dim: int
    weighting: str
    loss: str
    n_trials: int = 1

    @property
    def n_evals(self) -> Tensor:
        """``[B, C]``: how many (sigma, eps) pairs each class was scored on."""
        return (~self.table.isnan()).sum(2) * self.n_trials

    def accuracy(self, labels: Tensor) -> float:
        """Fraction of ``pred`` equal to ``labels``."""
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape != self.pred.shape:
            raise ValueError(f"labels must have shape {tuple(self.pred.shape)}, got {tuple(labels.shape)}")
        return float((self.pred.cpu() == labels.cpu()).double().mean())

    def log_likelihood(self) -> Tensor:
        """``-dim * scores``: the estimate of ``log p(x0 | c)`` up to a class-independent constant, ``[B, C]``.
        Only meaningful with ``weighting="elbo"``, ``loss="l2"`` and every class evaluated on the full grid."""
        if self.weighting != "elbo" or self.loss != "l2":
            raise ValueError("log_likelihood needs weighting='elbo' and loss='l2' (the ELBO is an L2 integral "
                             "over log sigma)")
        return -self.dim * self.scores


def label_conds(n_classes: int, key: str = "class_labels") -> dict:
    """``{key: arange(n_classes)}``: one candidate row per class label (class-conditional UNet / DiT)."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    return {key: torch.arange(n_classes)}


def _check_conds(conds) -> int:
    if not isinstance(conds, dict) or not conds:
        raise TypeError("conds must be a non-empty dict of tensors with one row per candidate class, e.g. "
                        "label_conds(10) or {'encoder_hidden_states': text_embeddings[10, L, D]}")
    sizes = set()
    for k, v in conds.items():
        if not isinstance(v, Tensor) or v.ndim < 1:
            raise TypeError(f"conds[{k!r}] must be a tensor whose first dimension indexes the candidate classes")
        sizes.add(v.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"every tensor in conds must have the same number of rows (classes), got {sorted(sizes)}")
    C = sizes.pop()
    if C < 2:
        raise ValueError("conds must hold at least 2 candidate classes")
    return C


def _err(eps: Tensor, eps_hat: Tensor, loss: str) -> Tensor:
    d = eps_hat - eps
    if loss == "l2":
        e = d.square()
    elif loss == "l1":
        e = d.abs()
    else:  # huber, delta = 1 (torch's default, as the official code)
        a = d.abs()
        e = torch.where(a < 1, 0.5 * d.square(), a - 0.5)
    return e.reshape(e.shape[0], -1).mean(1)


def _check_schedule(n_samples, to_keep, C: int) -> tuple[list[int], list[int]]:
    n_samples, to_keep = [int(n) for n in n_samples], [int(k) for k in to_keep]
    if not n_samples or len(n_samples) != len(to_keep):
        raise ValueError("n_samples and to_keep must be non-empty and of equal length (one entry per round)")
    if any(b < a for a, b in zip(n_samples, n_samples[1:])) or n_samples[0] < 1:
        raise ValueError(f"n_samples must be positive and non-decreasing, got {n_samples}")
    if any(b > a for a, b in zip(to_keep, to_keep[1:])) or to_keep[-1] < 1 or to_keep[0] > C:
        raise ValueError(f"to_keep must be non-increasing, within [1, {C}] (the number of classes), got {to_keep}")
    return n_samples, to_keep


def _check_grid(sigmas, need: int) -> Tensor:
    grid = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if len(grid) < need or (grid <= 0).any() or not torch.isfinite(grid).all():
        raise ValueError(f"sigmas must hold at least max(n_samples) = {need} finite positive values")
    if len(grid) > 1 and not (grid[1:] > grid[:-1]).all():
        raise ValueError("sigmas must be strictly increasing (the grid is ordered like the timesteps)")
    return grid


def _weights(grid: Tensor, weighting) -> Tensor:
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        return _log_cells(grid) if weighting == "elbo" else torch.ones(len(grid), dtype=torch.float64)
    raise TypeError(f"weighting must be one of {WEIGHTINGS}")


def _scores(table: Tensor, w: Tensor) -> Tensor:
    ok = ~table.isnan()
    wsum = torch.where(ok, table * w, torch.zeros_like(table)).sum(2)
    wtot = (ok * w).sum(2)
    return torch.where(wtot > 0, wsum / wtot.clamp_min(1e-300), torch.full_like(wsum, math.inf))


def _run_rounds(B: int, C: int, n_full: int, n_samples, to_keep, w: Tensor, fill) -> tuple[Tensor, Tensor, int]:
    """The adaptive schedule of the official ``eval_prob_adaptive.py``; ``fill(table, remaining, new)`` writes the
    errors of the classes ``remaining [B, k]`` at grid indices ``new``. Returns ``(pred, table, evaluations)``."""
    table = torch.full((B, C, n_full), math.nan, dtype=torch.float64)
    remaining = torch.arange(C).expand(B, C)
    done: list[int] = []
    evals = 0
    for n, keep in zip(n_samples, to_keep):
        new = [j for j in round_indices(n_full, n) if j not in done]
        done += new
        if new:
            fill(table, remaining, new)
            evals += remaining.shape[1] * len(new)
        cur = _scores(table, w).gather(1, remaining)
        remaining = remaining.gather(1, cur.argsort(dim=1, stable=True)[:, :keep])
    sc = _scores(table, w).gather(1, remaining)
    return remaining.gather(1, sc.argmin(1, keepdim=True)).squeeze(1), table, evals


@torch.no_grad()
def diffusion_classify(denoiser: Callable, x0: Tensor, conds: dict, *, n_samples: Sequence[int] = (25,),
                       to_keep: Sequence[int] = (1,), sigmas: Tensor | None = None, n_trials: int = 1,
                       loss: str = "l2", weighting: str = "uniform", shared_noise: bool = True,
                       generator: torch.Generator, batch_size: int = 1024) -> ClassifierResult:
    """Classify clean inputs ``x0 [B, ...]`` by per-class denoising error (Li et al. 2023, paper 33).

    Args:
        denoiser: ``D(x, sigma[B], **cond)`` in the VE convention (a ``DiscreteVPDenoiser`` around an
            eps-network gives exactly the paper's ``||eps - eps_theta(x_t, t, c)||``: ``eps_hat = (x - D) / sigma``).
        conds: candidate conditions, every tensor with one row per class (:func:`label_conds`, or text embeddings
            of one prompt per class).
        n_samples, to_keep: the adaptive schedule; round ``r`` brings the classes still in the race up to
            ``n_samples[r]`` grid sigmas (pairs already evaluated are reused) and keeps the ``to_keep[r]`` lowest
            scores. ``(50, 500), (5, 1)`` is the paper's; ``(n,), (1,)`` evaluates every class on ``n`` pairs.
        sigmas: the full evaluation grid (increasing, all > 0), at least ``max(n_samples)`` long; default
            :func:`classifier_sigmas` ``(denoiser, max(n_samples))``.
        n_trials: noise draws per grid sigma.
        loss: ``"l2"`` (default), ``"l1"`` or ``"huber"``; per-element mean as in the official code.
        weighting: ``"uniform"`` (the paper: a plain mean over timesteps) or ``"elbo"`` (weights = ``log sigma``
            cell widths, scaled so that the score is the quadrature of the integral over the whole grid).
        shared_noise: the same ``eps`` for every class (paper); ``False`` draws independent noise per class (the
            ablation the paper uses to motivate sharing).
        generator: every noise draw comes from it. The noise of the whole grid is drawn up front (per image, grid
            sigma and trial; and per class when not shared), so a pruned run reads exactly the errors a full run
            would: :func:`prune_table` on a full table reproduces it.

    Returns a :class:`ClassifierResult`; ``nfe`` counts denoiser evaluations (batch rows) per image.
    """
    if not callable(denoiser):
        raise TypeError("denoiser must be callable: D(x, sigma, **cond)")
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.dtype.is_floating_point:
        raise ValueError("x0 must be a floating tensor of clean inputs [B, ...]")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    C = _check_conds(conds)
    n_samples, to_keep = _check_schedule(n_samples, to_keep, C)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be an int >= 1, got {n_trials!r}")
    grid = _check_grid(classifier_sigmas(denoiser, max(n_samples)) if sigmas is None else sigmas, max(n_samples))
    w = _weights(grid, weighting)
    B, shape, dev, dt = x0.shape[0], x0.shape[1:], x0.device, x0.dtype
    m = n_trials
    eps_all = torch.randn((B, 1 if shared_noise else C, len(grid), m, *shape), generator=generator, dtype=dt)
    unsq = [1] * len(shape)

    def fill(table: Tensor, remaining: Tensor, new: list[int]) -> None:
        k, J = remaining.shape[1], len(new)
        bi = torch.arange(B)[:, None, None, None].expand(B, k, J, m).reshape(-1)
        ci = remaining[:, :, None, None].expand(B, k, J, m).reshape(-1)
        ji = torch.as_tensor(new)[None, None, :, None].expand(B, k, J, m).reshape(-1)
        ti = torch.arange(m)[None, None, None, :].expand(B, k, J, m).reshape(-1)
        errs = torch.empty(len(bi), dtype=torch.float64)
        for i in range(0, len(bi), batch_size):
            sl = slice(i, i + batch_size)
            e = eps_all[bi[sl], 0 if shared_noise else ci[sl], ji[sl], ti[sl]].to(dev)
            s = grid[ji[sl]].to(dev, dt)
            x = x0[bi[sl].to(dev)] + s.reshape(-1, *unsq) * e
            cond = {key: v[ci[sl].to(v.device)] for key, v in conds.items()}
            eps_hat = (x - denoiser(x, s, **cond).to(dt)) / s.reshape(-1, *unsq)
            errs[sl] = _err(e, eps_hat, loss).double().cpu()
        table[torch.arange(B)[:, None, None], remaining[:, :, None], torch.as_tensor(new)[None, None, :]] = \
            errs.reshape(B, k, J, m).mean(3)

    pred, table, evals = _run_rounds(B, C, len(grid), n_samples, to_keep, w, fill)
    return _result(pred, table, grid, w, evals * m, math.prod(shape), weighting, loss, m)


def _result(pred, table, grid, w, nfe, dim, weighting, loss, m) -> ClassifierResult:
    scores = _scores(table, w)
    if weighting == "elbo":
        scores = scores * w.sum()
    return ClassifierResult(pred=pred, scores=scores, table=table, sigmas=grid, nfe=nfe, dim=dim,
                            weighting=weighting, loss=loss, n_trials=m)


def prune_table(result: ClassifierResult, n_samples: Sequence[int], to_keep: Sequence[int], *,
                weighting: str | None = None) -> ClassifierResult:
    """Replay an adaptive schedule on the errors of a run that evaluated every class on its whole grid, without
    new denoiser calls (Li et al. 2023, paper 33: accuracy against the evaluation budget from one table).

    With ``max(n_samples)`` equal to the table's grid size this is exactly what :func:`diffusion_classify` with
    these ``n_samples``/``to_keep`` and the same generator state returns. A smaller ``max(n_samples)`` uses the
    stratified subset :func:`round_indices` of the table's grid as its grid (same noise draws; the grid is offset
    from :func:`classifier_sigmas` of that size by less than one cell)."""
    if not isinstance(result, ClassifierResult):
        raise TypeError("result must be a ClassifierResult of a full-grid run")
    B, C, n_full = result.table.shape
    n_samples, to_keep = _check_schedule(n_samples, to_keep, C)
    if max(n_samples) > n_full:
        raise ValueError(f"max(n_samples) = {max(n_samples)} exceeds the table's grid of {n_full}")
    weighting = result.weighting if weighting is None else weighting
    sub = result.sigmas if max(n_samples) == n_full else None
    if sub is None:  # a smaller budget uses the stratified subset of the table's grid as its own grid
        idx = round_indices(n_full, max(n_samples))
        sub_table, grid = result.table[:, :, idx], result.sigmas[idx]
    else:
        sub_table, grid = result.table, result.sigmas
    w = _weights(grid, weighting)

    def fill(table: Tensor, remaining: Tensor, new: list[int]) -> None:
        vals = sub_table[torch.arange(B)[:, None, None], remaining[:, :, None], torch.as_tensor(new)[None, None, :]]
        if vals.isnan().any():
            raise ValueError("the table lacks some (class, sigma) errors this schedule needs; run diffusion_classify "
                             "with n_samples=(n_full,), to_keep=(1,) first")
        table[torch.arange(B)[:, None, None], remaining[:, :, None], torch.as_tensor(new)[None, None, :]] = vals

    pred, table, evals = _run_rounds(B, C, len(grid), n_samples, to_keep, w, fill)
    return _result(pred, table, grid, w, evals * result.n_trials, result.dim, weighting, result.loss,
                   result.n_trials)


class ClassConditional:
    """``D(x, sigma, class_labels=y)`` that sends each row to ``denoisers[y]``: a class-conditional denoiser built
    from one (exact) denoiser per class, e.g. one :class:`dmlab.exact.GMMDenoiser` per class of a mixture - the
    exact model the Diffusion Classifier (paper 33) is the Bayes classifier of."""

    def __init__(self, denoisers: Sequence[Callable]):
        denoisers = list(denoisers)
        if len(denoisers) < 2 or not all(callable(d) for d in denoisers):
            raise TypeError("denoisers must be a sequence of at least 2 callables D(x, sigma)")
        self.denoisers = denoisers

    def __call__(self, x: Tensor, sigma, class_labels: Tensor) -> Tensor:
        from ..denoisers import as_sigma

        sigma = as_sigma(sigma, x)
        y = torch.as_tensor(class_labels, device=x.device).long().reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"class_labels must have shape [B] = [{x.shape[0]}]")
        if ((y < 0) | (y >= len(self.denoisers))).any():
            raise ValueError(f"class_labels must lie in [0, {len(self.denoisers) - 1}]")
        out = torch.empty_like(x)
        for c in y.unique().tolist():
            m = y == c
            out[m] = self.denoisers[c](x[m], sigma[m]).to(x.dtype)
        return out


# ----------------------------------------------------------------------------------------------- linear probes
@torch.no_grad()
def pooled_features(denoiser: Callable, net, x0: Tensor, sigma: float, layers, *, pool: int = 1,
                    ensemble: int = 1, generator: torch.Generator, cond: dict | None = None,
                    batch_size: int = 256) -> dict[str, Tensor]:
    """Features of one forward pass at noise level ``sigma``, average-pooled to ``pool x pool`` and flattened:
    ``{layer: [N, C * pool^2]}`` (Mukhopadhyay et al. 2023, paper 54: noise to ``t``, one pass, pool a block).

    Built on :func:`dmlab.probes.extract_features` (``ensemble`` noise draws averaged). ``cond`` tensors with
    ``N`` rows are sliced with the batch.
    """
    import torch.nn.functional as F

    from .capture import extract_features

    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"pool must be an int >= 1 (output grid side), got {pool!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator")
    N = x0.shape[0]
    out: dict[str, list] = {}
    for i in range(0, N, batch_size):
        sub = None if cond is None else {k: (v[i:i + batch_size] if isinstance(v, Tensor) and v.ndim and
                                             v.shape[0] == N else v) for k, v in cond.items()}
        f = extract_features(denoiser, net, x0[i:i + batch_size], sigma, layers, ensemble=ensemble,
                             generator=generator, cond=sub)
        for name, h in f.items():
            if h.ndim == 4:
                h = F.adaptive_avg_pool2d(h, pool)
            out.setdefault(name, []).append(h.reshape(h.shape[0], -1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def linear_probe(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, *, C: float = 1.0,
                 max_iter: int = 2000) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (the linear head of
    Mukhopadhyay et al. 2023, paper 54; scikit-learn ``LogisticRegression``, lbfgs, deterministic)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    a, b = (torch.as_tensor(f).reshape(len(f), -1).double().numpy() for f in (f_train, f_test))
    ya, yb = (torch.as_tensor(y).reshape(-1).numpy() for y in (y_train, y_test))
    if a.shape[0] != ya.shape[0] or b.shape[0] != yb.shape[0] or a.shape[1] != b.shape[1]:
        raise ValueError(f"shapes do not match: train {a.shape} / {ya.shape}, test {b.shape} / {yb.shape}")
    sc = StandardScaler().fit(a)
    clf = LogisticRegression(C=C, max_iter=max_iter).fit(sc.transform(a), ya)
    return float(np.mean(clf.predict(sc.transform(b)) == yb))


def probe_grid(denoiser: Callable, net, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
               layers: Sequence[str], sigmas: Sequence[float], *, pool: int = 1, ensemble: int = 1,
               generator: torch.Generator, cond_train: dict | None = None, cond_test: dict | None = None,
               C: float = 1.0) -> Tensor:
    """Linear-probe test accuracy for every (block, sigma): ``[len(layers), len(sigmas)]`` (float64).

    The sweep of Mukhopadhyay et al. 2023 (paper 54) over U-Net blocks and noise levels; ``sigma = 0`` reads the
    clean image.
    """
    layers = list(layers)
    acc = torch.zeros(len(layers), len(sigmas), dtype=torch.float64)
    for j, s in enumerate(sigmas):
        ftr = pooled_features(denoiser, net, x_train, s, layers, pool=pool, ensemble=ensemble, generator=generator,
                              cond=cond_train)
        fte = pooled_features(denoiser, net, x_test, s, layers, pool=pool, ensemble=ensemble, generator=generator,
                              cond=cond_test)
        for i, name in enumerate(layers):
            acc[i, j] = linear_probe(ftr[name], y_train, fte[name], y_test, C=C)
    return acc
