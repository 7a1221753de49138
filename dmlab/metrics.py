"""Yardsticks: Fréchet distance in a trained feature space, class accuracy of samples, MMD, PSNR/MSE, PCK and exact
Gaussian-mixture metrics.

* :func:`frechet_distance` -- ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` between Gaussians fitted to two
  feature sets (Heusel et al. 2017, the FID formula), in float64 with ``scipy.linalg.sqrtm``.
* :func:`digits_fd` / :func:`digits_fd_floor` -- "digits-FD": that distance in the 64-d penultimate features of the
  zoo's digit classifier, against the held-out test digits; the *floor* is the same statistic between real train
  digits and the test digits at the same sample size, the value a perfect generator would get. Always print both
  (FD is biased upwards at small n, so only numbers at equal n compare).
* :func:`kid` -- kernel inception distance in the same features (Bińkowski et al. 2018): unbiased at small ``n``, so
  it keeps discriminating where FD sits below its floor; :func:`digits_real_like` draws the real digits with the
  same ``n`` and class balance as a generated set, for the floor computed exactly like the samples.
* :func:`class_accuracy` -- the classifier's accuracy on generated samples against the labels asked for.
* :func:`mmd` -- unbiased squared maximum mean discrepancy with a sum of RBF kernels (Gretton et al. 2012).
* :func:`mse`, :func:`psnr` -- fidelity of a sample to a baseline sample from the same noise.
* :func:`pck` -- percentage of correct keypoints at ``alpha`` times the image size (Yang & Ramanan 2013).
* :func:`gmm_log_prob`, :func:`gmm_nll`, :func:`gmm_mode_stats`, :func:`gmm_kl` -- exact metrics for samples of a
  known Gaussian mixture.

Only torch is imported at module level.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["frechet_distance", "feature_stats", "digits_features", "digits_fd", "digits_fd_floor", "kid", "kid_terms", "digits_real_like",
           "class_accuracy", "mmd", "mse", "psnr", "pck", "gmm_log_prob", "gmm_nll", "gmm_mode_stats", "gmm_kl"]


def _check_2d(f, name: str) -> Tensor:
    if not isinstance(f, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, D], got {type(f).__name__}")
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, D] with N >= 2, got {tuple(f.shape)}")
    if not (f.dtype.is_floating_point or f.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must be a real-valued tensor, got {f.dtype}")
    f = f.detach().to("cpu", torch.float64)
    if not torch.isfinite(f).all():
        bad = int((~torch.isfinite(f)).any(1).sum())
        raise ValueError(f"{name} holds NaN or inf in {bad} of {f.shape[0]} rows: a metric of non-finite samples "
                         "means nothing; find where they diverged (e.g. a sampler in half precision) or drop them")
    return f


def _check_gmm(weights, means, covs, dim: int):
    w, mu, cov = (torch.as_tensor(t, dtype=torch.float64) for t in (weights, means, covs))
    if mu.ndim != 2 or w.shape != (mu.shape[0],) or cov.shape != (mu.shape[0], mu.shape[1], mu.shape[1]):
        raise ValueError(f"the mixture must be weights [K], means [K, D], covs [K, D, D]; got {tuple(w.shape)}, "
                         f"{tuple(mu.shape)}, {tuple(cov.shape)}")
    if mu.shape[1] != dim:
        raise ValueError(f"means have dimension {mu.shape[1]}, samples {dim}")
    if not (torch.isfinite(w).all() and torch.isfinite(mu).all() and torch.isfinite(cov).all()):
        raise ValueError("the mixture's weights, means and covs must be finite (found NaN or inf)")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative and not all zero")
    return w, mu, cov


# ----------------------------------------------------------------------------------------------- Fréchet
def feature_stats(f: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of features ``[N, D]`` (float64)."""
    f = _check_2d(f, "features")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]`` (Heusel et al.
    2017; Dowson & Landau 1982 for the formula). Computed in float64; the tiny imaginary part ``sqrtm`` may return
    from round-off is dropped."""
    import numpy as np
    from scipy import linalg

    a, b = _check_2d(a, "a"), _check_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    (mu1, c1), (mu2, c2) = feature_stats(a), feature_stats(b)
    c1, c2 = c1.numpy(), c2.numpy()
    covmean = linalg.sqrtm(c1 @ c2)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        eps = 1e-6 * np.eye(c1.shape[0])
        covmean = linalg.sqrtm((c1 + eps) @ (c2 + eps))
    covmean = np.real(covmean)
    d = (mu1 - mu2).numpy()
    return float(d @ d + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def _classifier(classifier):
    if classifier is None:
        from . import zoo

        return zoo.load("classifier")
    if not callable(getattr(classifier, "features", None)):
        raise TypeError("classifier must have a .features(x) method (e.g. dmlab.zoo.load('classifier'))")
    return classifier


@torch.no_grad()
def digits_features(x: Tensor, classifier=None, *, batch_size: int = 512) -> Tensor:
    """Penultimate features ``[N, 64]`` of digit images ``[N, 1, 8|16, 8|16]`` in ``[-1, 1]``."""
    clf = _classifier(classifier)
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[0] < 1:
        raise ValueError("x must be images [N, 1, H, W] in [-1, 1]")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or inf pixels: features of non-finite images mean nothing; find where the "
                         "samples diverged or drop them")
    p = next(clf.parameters())
    return torch.cat([clf.features(x[i:i + batch_size].to(p.device, p.dtype)).double().cpu()
                      for i in range(0, x.shape[0], batch_size)])


def digits_fd(x: Tensor, *, classifier=None, reference: Tensor | None = None) -> float:
    """digits-FD of images ``x`` against ``reference`` (default: the 359 held-out test digits).

    Report it next to :func:`digits_fd_floor` at the same ``n = len(x)``.
    """
    if reference is None:
        from .data import load_digits

        reference = load_digits("test")[0]
    clf = _classifier(classifier)
    return frechet_distance(digits_features(x.clamp(-1, 1), clf), digits_features(reference, clf))


def digits_fd_floor(n: int, *, generator: torch.Generator, classifier=None, repeats: int = 1,
                    size: int = 8) -> float:
    """Real-vs-real digits-FD: ``n`` real digits against the test digits, averaged over ``repeats`` draws; what a
    generator that reproduces the data distribution exactly would score at this ``n``.

    The ``n`` digits are drawn without replacement from the 719 train-split digits the classifier did *not* learn
    from (the odd rows, :func:`dmlab.zoo.recipes.classifier_rows`), so both sides are images the feature network
    never saw. (Drawing them from the classifier's own training images inflates the "floor" above what good
    generators reach: features of memorised images sit apart from those of new ones.) ``size = 16`` uses the
    upsampled digits on both sides (for 16x16 generators such as ``sd_tiny``)."""
    from .data import load_digits
    from .zoo.recipes import classifier_rows

    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int (the number of generated samples), got {n!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    xtr, _ = load_digits("train", size=size)
    xtr = xtr[classifier_rows("odd", xtr.shape[0])]
    if not 2 <= n <= xtr.shape[0]:
        raise ValueError(f"n must be in [2, {xtr.shape[0]}] (the held-back real digits), got {n}")
    clf = _classifier(classifier)
    ref = digits_features(load_digits("test", size=size)[0], clf)
    feats = digits_features(xtr, clf)
    vals = [frechet_distance(feats[torch.randperm(xtr.shape[0], generator=generator)[:n]], ref)
            for _ in range(repeats)]
    return sum(vals) / len(vals)


def kid(a: Tensor, b: Tensor) -> float:
    """Kernel inception distance: the unbiased squared MMD between feature sets ``a [N, D]`` and ``b [M, D]`` with
    the cubic polynomial kernel ``k(x, y) = (x . y / D + 1)^3`` (Bińkowski et al. 2018, "Demystifying MMD GANs").
    Unbiased over draws of both sets, so it can be negative; against one fixed reference set it carries that set's
    offset, so always print it beside a floor drawn like the samples (:func:`digits_real_like`). For an interval
    bootstrap its per-sample terms (:func:`kid_terms`), not KID itself (resampling duplicates samples and biases it)."""
    a, b = _check_2d(a, "a"), _check_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    d = a.shape[1]
    kaa, kbb, kab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    n, m = a.shape[0], b.shape[0]
    return float((kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1))
                 - 2 * kab.mean())


def kid_terms(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample terms ``[N]`` of :func:`kid` for the samples ``a [N, D]`` against a fixed reference ``b``: their
    mean is exactly ``kid(a, b)`` and their spread is the first-order (delta-method, Hoeffding projection) spread
    of KID over draws of ``a``, so :func:`dmlab.claims.paired_bootstrap` on them gives KID's interval and, for
    two models sampled from the same noise, a paired interval of their KID difference. (Bootstrapping KID itself
    duplicates samples, which biases the unbiased estimator.) Term ``i`` is ``kid + phi_i - mean(phi)`` with
    ``phi_i = 2 (mean_{j != i} k(a_i, a_j) - mean_j k(a_i, b_j))``, the influence of sample ``i``."""
    a, b = _check_2d(a, "a"), _check_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    d, n = a.shape[1], a.shape[0]
    kaa, kab = (a @ a.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    phi = 2 * ((kaa.sum(1) - kaa.diag()) / (n - 1) - kab.mean(1))
    return kid(a, b) + phi - phi.mean()


def digits_real_like(labels: Tensor, *, generator: torch.Generator, size: int = 8) -> Tensor:
    """Real digits ``[N, 1, size, size]`` with exactly the class balance of ``labels`` (one image per label,
    drawn without replacement, per class, with ``generator``) from the train-split digits the zoo classifier did
    not learn from. Score them exactly as the generated set (same ``n``, same features, same reference) to get the
    metric's floor: what a perfect generator of that class mix would score."""
    from .data import load_digits
    from .zoo.recipes import classifier_rows

    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point and not torch.equal(labels, labels.round()):
        raise TypeError(f"labels must be integer digit classes, got non-integer {labels.dtype} values")
    labels = labels.long().cpu()
    if labels.numel() and ((labels < 0) | (labels > 9)).any():
        raise ValueError("labels must be digit classes 0..9")
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor of digit classes, got shape {tuple(labels.shape)}")
    x, y = load_digits("train", size=size)
    rows = classifier_rows("odd", x.shape[0])
    x, y = x[rows], y[rows]
    out = torch.empty((labels.numel(), *x.shape[1:]), dtype=x.dtype)
    for c in labels.unique().tolist():
        want = (labels == c).nonzero().flatten()
        pool = (y == c).nonzero().flatten()
        if len(want) > len(pool):
            raise ValueError(f"class {c}: {len(want)} samples asked for, only {len(pool)} held-back real digits; "
                             "use fewer samples per class")
        out[want] = x[pool[torch.randperm(len(pool), generator=generator)[:len(want)]]]
    return out


@torch.no_grad()
def class_accuracy(x: Tensor, labels: Tensor, *, classifier=None) -> float:
    """Fraction of images ``x`` the digit classifier assigns to ``labels`` (conditional accuracy of samples)."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError("x must be images [N, 1, H, W] in [-1, 1]")
    clf = _classifier(classifier)
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must be integer digit classes, got {labels.dtype}; use labels.long()")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape [{x.shape[0]}], got {tuple(labels.shape)}")
    p = next(clf.parameters())
    pred = torch.cat([clf(x[i:i + 512].clamp(-1, 1).to(p.device, p.dtype)).argmax(1).cpu()
                      for i in range(0, x.shape[0], 512)])
    return float((pred == labels.cpu()).double().mean())


# ----------------------------------------------------------------------------------------------- MMD, fidelity
def mmd(x: Tensor, y: Tensor, *, bandwidths=None) -> float:
    """Unbiased squared MMD between samples ``x [N, ...]`` and ``y [M, ...]`` with the kernel
    ``sum_h exp(-|a-b|^2 / (2 h^2))`` (Gretton et al. 2012). ``bandwidths`` default: the median pairwise distance
    of the pooled samples times (0.5, 1, 2). Flattened, float64. Can be slightly negative when x, y match."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.ndim < 1:
            raise TypeError(f"{name} must be a torch.Tensor of samples [N, ...], got {type(t).__name__}")
    x, y = _check_2d(x.reshape(x.shape[0], -1), "x"), _check_2d(y.reshape(y.shape[0], -1), "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidths is None:
        med = d2[~torch.eye(len(z), dtype=torch.bool)].median().sqrt().item()
        bandwidths = [0.5 * med, med, 2 * med]
        if med == 0:
            raise ValueError("all samples are identical (median pairwise distance 0): pass bandwidths=[...]")
    elif not bandwidths or not all(float(h) > 0 and math.isfinite(float(h)) for h in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty list of positive, finite kernel widths, got {bandwidths!r}")
    k = sum(torch.exp(-d2 / (2 * float(h) ** 2)) for h in bandwidths)
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def mse(x: Tensor, ref: Tensor) -> float:
    """Mean squared error between a sample and a baseline sample (same shape)."""
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    return float((x.double() - ref.double()).pow(2).mean())


def psnr(x: Tensor, ref: Tensor, *, data_range: float = 2.0, reduction: str = "mean") -> Tensor | float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` of ``x`` against ``ref`` (same shape ``[B, ...]``),
    in dB; ``data_range`` is 2 for images in [-1, 1]. Identical samples give ``inf``. The one PSNR of the library
    (``dmlab.bench.psnr`` is this function).

    ``reduction``:

    * ``"mean"`` (default) - the mean over samples of the per-sample PSNR (a float; samples identical to their
      reference, at ``inf``, are left out; ``inf`` if all are): fidelity to a baseline sample from the same noise;
    * ``"none"`` - the ``[B]`` per-sample PSNRs (for intervals: ``claims.bootstrap`` over samples);
    * ``"global"`` - one PSNR of the MSE over all elements (a float): the classical image-restoration number.
    """
    if not isinstance(x, Tensor) or not isinstance(ref, Tensor) or x.shape != ref.shape or x.ndim < 1:
        raise ValueError(f"x and ref must be tensors of the same shape [B, ...], got "
                         f"{getattr(x, 'shape', None)} and {getattr(ref, 'shape', None)}")
    if reduction not in ("mean", "none", "global"):
        raise ValueError(f"reduction must be 'mean', 'none' or 'global', got {reduction!r}")
    diff2 = (x.detach().double() - ref.detach().double()).pow(2)
    if reduction == "global":
        e = float(diff2.mean())
        return math.inf if e == 0 else 10 * math.log10(data_range ** 2 / e)
    p = 10 * torch.log10(data_range ** 2 / diff2.flatten(1).mean(1))  # inf where mse == 0
    if reduction == "none":
        return p
    finite = p[torch.isfinite(p)]
    return float(finite.mean()) if finite.numel() else math.inf


def pck(pred: Tensor, target: Tensor, *, alpha: float = 0.1, size: float | Tensor) -> float:
    """Percentage of correct keypoints: fraction of ``pred [..., 2]`` within ``alpha * size`` of ``target``
    (Yang & Ramanan 2013; for correspondence as in Zhang et al. 2023). ``size`` is the image's max(H, W), or one
    value per keypoint set broadcastable to ``pred.shape[:-1]``."""
    if pred.shape != target.shape or pred.shape[-1] != 2:
        raise ValueError(f"pred and target must both have shape [..., 2], got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive (0.1 is usual), got {alpha}")
    if not (torch.as_tensor(size, dtype=torch.float64) > 0).all():
        raise ValueError(f"size must be positive: the image's max(H, W) in pixels, got {size!r}")
    if not (torch.isfinite(pred).all() and torch.isfinite(target).all()):
        raise ValueError("pred and target must be finite keypoints (found NaN or inf)")
    dist = (pred.double() - target.double()).norm(dim=-1)
    return float((dist <= alpha * torch.as_tensor(size, dtype=torch.float64)).double().mean())


# ----------------------------------------------------------------------------------------------- exact GMM
def gmm_log_prob(x: Tensor, weights: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """Exact ``log p(x)`` ``[N]`` under a Gaussian mixture (weights ``[K]``, means ``[K, D]``, covs ``[K, D, D]``),
    in float64."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [N, D], got {type(x).__name__}")
    x = _check_2d(x, "x") if x.ndim == 2 else _check_2d(x.reshape(x.shape[0], -1), "x")
    w, mu, cov = _check_gmm(weights, means, covs, x.shape[1])
    comp = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    return torch.logsumexp(comp.log_prob(x[:, None, :]) + (w / w.sum()).log(), dim=1)


def gmm_nll(x: Tensor, weights: Tensor, means: Tensor, covs: Tensor) -> float:
    """Mean negative log-likelihood of samples under the true mixture (nats per sample). Equals the cross-entropy
    ``H(q, p) = KL(q || p) + H(q)``; compare with the mixture's own entropy estimate ``gmm_nll(p-samples)``."""
    return float(-gmm_log_prob(x, weights, means, covs).mean())


def gmm_mode_stats(x: Tensor, weights: Tensor, means: Tensor, covs: Tensor, *, n_std: float = 3.0) -> dict:
    """Mode coverage of samples of a mixture: each sample is assigned to its most responsible component.

    Returns ``{"counts": [K], "high_quality": fraction within n_std Mahalanobis of its component,
    "modes_covered": components with at least one sample, "kl_modes": KL(empirical mode frequencies || weights)}``
    (the standard mode-collapse diagnostics of the 2-D mixture benchmarks, e.g. Srivastava et al. 2017)."""
    x = _check_2d(x, "x")
    w, mu, cov = _check_gmm(weights, means, covs, x.shape[1])
    comp = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    lp = comp.log_prob(x[:, None, :]) + (w / w.sum()).log()
    k = lp.argmax(1)
    diff = x - mu[k]
    maha = torch.linalg.solve(cov[k], diff.unsqueeze(-1)).squeeze(-1).mul(diff).sum(-1).sqrt()
    counts = torch.bincount(k, minlength=len(w))
    freq = counts.double() / counts.sum()
    ww = w / w.sum()
    kl = float(torch.where(freq > 0, freq * (freq / ww).log(), torch.zeros_like(freq)).sum())
    return {"counts": counts.tolist(), "high_quality": float((maha <= n_std).double().mean()),
            "modes_covered": int((counts > 0).sum()), "kl_modes": kl}


def gmm_kl(p: tuple, q: tuple, *, n: int, generator: torch.Generator) -> float:
    """Monte Carlo ``KL(p || q)`` between two Gaussian mixtures given as ``(weights, means, covs)``, with ``n``
    samples of ``p`` drawn from ``generator`` (no closed form exists for mixtures; Hershey & Olsen 2007)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (Monte Carlo samples of p), got {n!r}")
    if not (isinstance(p, (tuple, list)) and len(p) == 3 and isinstance(q, (tuple, list)) and len(q) == 3):
        raise TypeError("p and q must each be a (weights, means, covs) tuple")
    w, mu, cov = _check_gmm(*p, torch.as_tensor(p[1]).shape[-1])
    k = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
    L = torch.linalg.cholesky(cov)
    z = torch.randn(n, mu.shape[1], generator=generator, dtype=torch.float64)
    x = mu[k] + (L[k] @ z.unsqueeze(-1)).squeeze(-1)
    return float((gmm_log_prob(x, *p) - gmm_log_prob(x, *q)).mean())
