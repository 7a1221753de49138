"""Mixtures of low-rank Gaussians: the denoiser that learns them is subspace clustering.

Wang, Zhang, Zhang, Chen, Ma, Qu, "Diffusion Models Learn Low-Dimensional Distributions via Subspace Clustering"
(arXiv 2409.02426, paper 66). Data ``x = U_k a`` with ``k ~ pi``, ``a ~ N(0, I_d)`` and orthonormal ``U_k`` ``[n, d]``
(a mixture of low-rank Gaussians, MoLRG). Its exact denoiser in dmlab's VE convention is::

    D(x, sigma) = sum_k w_k(x) U_k U_k^T x / (1 + sigma^2),
    w_k(x) = softmax_k( log pi_k + |U_k^T x|^2 / (2 sigma^2 (1 + sigma^2)) ),

(equal ranks; :func:`lowrank_denoise`). Parametrising a denoiser this way with free ``U_k`` makes denoising score
matching equivalent to *subspace clustering* of the training set, so ``N >= d`` samples per subspace suffice: the
sample complexity grows linearly with the intrinsic dimension, not exponentially with ``n``.

* :func:`molrg` - a random MoLRG as an exact :class:`dmlab.exact.GMMDenoiser` (singular covariances) + its bases.
* :func:`subspace_clustering` - K-subspaces (alternate assignment by projection norm and a rank-``d`` SVD per
  cluster; Bradley & Mangasarian 2000), best of several restarts.
* :func:`train_lowrank_dae` - the paper's parametrised denoiser trained by denoising score matching.
* :func:`subspace_distance`, :func:`generalisation` - how far learned bases / generated samples are from the truth
  and from the training set (memorisation vs generalisation).
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

__all__ = ["molrg", "sample_per_subspace", "lowrank_denoise", "LowRankDenoiser", "subspace_clustering", "train_lowrank_dae",
           "subspace_distance", "generalisation"]


def _check_bases(bases: Tensor) -> Tensor:
    if not isinstance(bases, Tensor) or bases.ndim != 3 or bases.shape[2] > bases.shape[1]:
        raise ValueError("bases must be a tensor [K, n, d] of K orthonormal n x d bases (d <= n)")
    return bases


def molrg(ambient: int, n_subspaces: int, dim: int, *, generator: torch.Generator, weights=None):
    """A random mixture of ``n_subspaces`` low-rank Gaussians of rank ``dim`` in ``R^ambient`` (paper 66's MoLRG).

    Returns ``(gmm, bases)``: an exact :class:`dmlab.exact.GMMDenoiser` with zero means and covariances
    ``U_k U_k^T`` (its ``sample``, ``log_prob`` at ``sigma > 0`` and ``score`` are exact) and the bases
    ``[K, ambient, dim]`` (orthonormal columns, Haar-random from ``generator``)."""
    from ..exact import GMMDenoiser

    for name, v in (("ambient", ambient), ("n_subspaces", n_subspaces), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if dim > ambient:
        raise ValueError(f"dim ({dim}) must not exceed ambient ({ambient})")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator")
    A = torch.randn(n_subspaces, ambient, dim, generator=generator, dtype=torch.float64)
    bases = torch.linalg.qr(A).Q
    w = torch.ones(n_subspaces, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    gmm = GMMDenoiser(w, torch.zeros(n_subspaces, ambient, dtype=torch.float64), bases @ bases.transpose(1, 2))
    return gmm, bases


def sample_per_subspace(bases: Tensor, n: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Exactly ``n`` MoLRG samples ``U_k a`` (``a ~ N(0, I_d)``) from *each* subspace: ``(x [K n, ambient], labels)``.
    (Drawing the component at random, as ``GMMDenoiser.sample`` does, can leave a subspace with too few points when
    ``n`` is small.)"""
    _check_bases(bases)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    K, _, d = bases.shape
    a = torch.randn(K, n, d, generator=generator, dtype=torch.float64)
    x = torch.einsum("knd,kmd->kmn", bases.to(torch.float64), a).reshape(K * n, -1)
    return x, torch.arange(K).repeat_interleave(n)


def lowrank_denoise(x: Tensor, sigma: Tensor, bases: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """The MoLRG posterior mean ``sum_k w_k(x) U_k U_k^T x / (1 + sigma^2)`` (module docstring) for bases of equal
    rank; differentiable in ``bases`` (the parametrised denoiser of paper 66). ``x`` ``[B, n]``, ``sigma`` ``[B]``."""
    _check_bases(bases)
    K = bases.shape[0]
    lw = torch.zeros(K, dtype=x.dtype, device=x.device) if log_weights is None else log_weights.to(x)
    proj = torch.einsum("knd,bn->bkd", bases.to(x.dtype), x)  # U_k^T x
    s2 = sigma.to(x.dtype)[:, None] ** 2
    logits = lw[None] + (proj ** 2).sum(-1) / (2 * s2 * (1 + s2))
    w = torch.softmax(logits, dim=1)
    back = torch.einsum("knd,bkd->bkn", bases.to(x.dtype), proj)  # U_k U_k^T x
    return (w[..., None] * back).sum(1) / (1 + s2)


class LowRankDenoiser:
    """A Denoiser from MoLRG bases (:func:`lowrank_denoise`); ``D(x, sigma)`` with ``x`` ``[B, n]``."""

    def __init__(self, bases: Tensor, weights=None):
        self.bases = _check_bases(bases).detach().to(torch.float64)
        K = self.bases.shape[0]
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_weights = (w / w.sum()).log()

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        from ..denoisers import as_sigma

        if cond:
            raise TypeError(f"LowRankDenoiser takes no conditioning, got {sorted(cond)}")
        sigma = as_sigma(sigma, x)
        out = x.to(torch.float64).clone()
        pos = sigma > 0
        out[pos] = lowrank_denoise(out[pos], sigma[pos].to(torch.float64), self.bases, self.log_weights)
        return out.to(x.dtype)


def _fit_basis(x: Tensor, dim: int) -> Tensor:
    return torch.linalg.svd(x.T, full_matrices=False).U[:, :dim]


def subspace_clustering(x: Tensor, n_subspaces: int, dim: int, *, generator: torch.Generator,
                        n_init: int = 30, iters: int = 30) -> tuple[Tensor, Tensor]:
    """K-subspaces clustering of points ``x`` ``[N, n]`` into ``n_subspaces`` linear subspaces of dimension ``dim``
    (Bradley & Mangasarian 2000): assign each point to the basis with the largest ``|U_k^T x|`` (the MoLRG denoiser's
    responsibilities as ``sigma -> 0``), refit each ``U_k`` by a rank-``dim`` SVD, repeat; keep the restart with the
    smallest residual ``sum |x - U U^T x|^2``. Returns ``(bases [K, n, dim], labels [N])``. By paper 66 this is what
    denoising score matching of the low-rank parametrised denoiser computes."""
    x = x.reshape(len(x), -1).to(torch.float64)
    N, n = x.shape
    if not 1 <= dim <= n:
        raise ValueError(f"dim must lie in [1, {n}], got {dim}")
    if N < n_subspaces:
        raise ValueError(f"need at least n_subspaces = {n_subspaces} points, got {N}")
    best = (math.inf, None, None)
    for _ in range(n_init):
        seeds = torch.randperm(N, generator=generator)[:n_subspaces]
        bases = []
        for s in seeds:  # start from the span of a seed point and random directions
            A = torch.cat([x[s:s + 1].T, torch.randn(n, dim - 1, generator=generator, dtype=torch.float64)], 1)
            bases.append(torch.linalg.qr(A).Q)
        U = torch.stack(bases)
        labels = None
        for _ in range(iters):
            energy = (torch.einsum("knd,bn->bkd", U, x) ** 2).sum(-1)
            new = energy.argmax(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            for k in range(n_subspaces):
                pts = x[labels == k]
                if len(pts) == 0:
                    pts = x[torch.randint(N, (1,), generator=generator)]
                B = _fit_basis(pts, min(dim, len(pts)))
                if B.shape[1] < dim:  # too few points: complete the basis at random
                    R = torch.randn(n, dim - B.shape[1], generator=generator, dtype=torch.float64)
                    B = torch.linalg.qr(torch.cat([B, R], 1)).Q
                U[k] = B
        resid = ((x - torch.einsum("knd,bkd->bkn", U, torch.einsum("knd,bn->bkd", U, x))[torch.arange(N), labels]) ** 2).sum()
        if resid < best[0]:
            best = (float(resid), U.clone(), labels.clone())
    return best[1], best[2]


def train_lowrank_dae(x: Tensor, n_subspaces: int, dim: int, *, generator: torch.Generator, steps: int = 500,
                      lr: float = 0.05, batch: int = 128, sigma_range: tuple = (0.05, 1.0), n_init: int = 5) -> Tensor:
    """Train the paper's parametrised denoiser (free bases ``U_k = qr(W_k).Q``) by denoising score matching on
    ``x`` ``[N, n]`` with ``log sigma`` uniform in ``sigma_range``; returns the learned bases ``[K, n, dim]``.
    Each of ``n_init`` runs starts like :func:`subspace_clustering` (a seed point + small random directions) and
    runs Adam; like any non-convex fit it can stop in a wrong partition, so the run with the lowest loss on a fixed
    evaluation batch is kept (the counterpart of clustering's restarts)."""
    from ..train import FitConfig, fit

    x = x.reshape(len(x), -1).to(torch.float64)
    N, n = x.shape
    lo, hi = math.log(sigma_range[0]), math.log(sigma_range[1])

    def draw(b):
        idx = torch.randint(N, (b,), generator=generator)
        sig = (lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)).exp()
        x0 = x[idx]
        return x0, x0 + sig[:, None] * torch.randn(x0.shape, generator=generator, dtype=torch.float64), sig

    def loss_of(W, x0, xn, sig):
        return (((lowrank_denoise(xn, sig, torch.linalg.qr(W).Q) - x0) ** 2).sum(1) / sig ** 2).mean()

    held = draw(1024)
    best = (math.inf, None)
    for _ in range(n_init):
        seeds = torch.randperm(N, generator=generator)[:n_subspaces]
        W = torch.stack([torch.cat([x[s:s + 1].T, 0.1 * torch.randn(n, dim - 1, generator=generator,
                                                                     dtype=torch.float64)], 1) for s in seeds])
        W.requires_grad_(True)
        fit(lambda b: loss_of(W, *b), None, FitConfig(steps=steps, lr=lr, optimizer="adam"), generator=generator,
            data=lambda g: draw(batch), params=[W])
        with torch.no_grad():
            final = float(loss_of(W, *held))
        if final < best[0]:
            best = (final, W.detach().clone())
    return torch.linalg.qr(best[1]).Q


def subspace_distance(bases: Tensor, truth: Tensor) -> float:
    """``min_perm mean_k |U_k U_k^T - V_pi(k) V_pi(k)^T|_F / sqrt(2 d)``: 0 for the same subspaces, 1 for orthogonal
    ones (the matching over permutations is exhaustive: K is small)."""
    if bases.shape != truth.shape:
        raise ValueError(f"bases {tuple(bases.shape)} and truth {tuple(truth.shape)} must have the same shape")
    P = bases @ bases.transpose(1, 2)
    Q = truth.to(P) @ truth.to(P).transpose(1, 2)
    if P.shape != Q.shape:
        raise ValueError(f"bases {tuple(bases.shape)} and truth {tuple(truth.shape)} must have the same shape")
    K, d = bases.shape[0], bases.shape[2]
    D = torch.linalg.matrix_norm(P[:, None] - Q[None]) / math.sqrt(2 * d)  # [K, K]
    return float(min(sum(D[i, p[i]] for i in range(K)) / K for p in itertools.permutations(range(K))))


def generalisation(samples: Tensor, truth: Tensor, train: Tensor, *, delta: float = 0.1) -> dict:
    """Memorisation vs generalisation of generated ``samples`` (paper 66's measurement).

    ``on_support``: fraction within relative distance ``delta`` of a true subspace (``min_k |x - U_k U_k^T x| /
    |x| < delta``); ``memorised``: fraction within ``delta`` (relative to ``|x|``) of a training point;
    ``generalised``: on the support but not memorised."""
    x = samples.reshape(len(samples), -1).to(torch.float64)
    U = truth.to(torch.float64)
    norm = x.norm(dim=1).clamp_min(1e-12)
    off = (x[:, None] - torch.einsum("knd,bkd->bkn", U, torch.einsum("knd,bn->bkd", U, x))).norm(dim=-1).min(1).values
    near = torch.cdist(x, train.reshape(len(train), -1).to(torch.float64)).min(1).values
    on, mem = off / norm < delta, near / norm < delta
    return {"on_support": float(on.double().mean()), "memorised": float(mem.double().mean()),
            "generalised": float((on & ~mem).double().mean())}
