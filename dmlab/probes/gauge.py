"""Gauge freedom, conservativity and intrinsic dimension of a learned score field.

Horvat & Pfister, "On gauge freedom, conservativity and intrinsic dimensionality estimation in diffusion models",
ICLR 2024 (paper 59). A learned field ``s_theta(x, sigma)`` need not be a gradient. Split it in ``L^2(p_sigma)`` as

    s_theta = grad phi + r,        E_p[<r, grad psi>] = 0 for every psi   (equivalently div(p_sigma r) = 0).

The remainder ``r`` is a *gauge* field: adding it to the score leaves the continuity / Fokker-Planck equations, and so
every sampled marginal, unchanged. Exact sampling (and exact likelihoods) hold iff the conservative part ``grad phi``
is the true score, so conservativity is neither necessary nor sufficient for sampling. Local quantities read off the
field's Jacobian, such as the intrinsic dimension, do see ``r``.

* :func:`skew_gauge` - a gauge field for any density: ``r = A s`` with ``A`` skew-symmetric
  (``div(p A grad log p) = div(A grad p) = 0``); in 2-D, ``A = c J`` rotates the score by 90 degrees.
* :func:`helmholtz_split` - the ``L^2(p)`` projection onto gradients, by least squares over a basis of potentials
  (quadratics and Gaussian bumps) fitted on samples of ``p_sigma``.
* :func:`jacobian_asymmetry` - ``|J - J^T| / |J|`` of the field's Jacobian (0 for a gradient field).
* :func:`intrinsic_dimension` - the number of tangent directions from the denoiser Jacobian ``I + sigma^2 grad s``
  near the data (eigenvalues near 1 along the manifold, near 0 across it), or from the singular values of score
  vectors around a point (Stanczuk et al. 2024, the estimator the paper analyses).
* :func:`mle_dimension` - the Levina & Bickel (2004) nearest-neighbour estimator, a classical yardstick.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .fields import jacobian, score_of

__all__ = ["skew_gauge", "helmholtz_split", "HelmholtzSplit", "jacobian_asymmetry", "intrinsic_dimension",
           "IDResult", "mle_dimension"]


def skew_gauge(score: Callable, A=None, *, scale: float = 1.0) -> Callable:
    """The gauge field ``r(x, sigma) = scale * A s(x, sigma)`` for a skew-symmetric ``A`` ``[d, d]`` (default: the
    2-D rotation ``J = [[0, -1], [1, 0]]``). ``div(p_sigma r) = 0`` when ``s`` is the true score of ``p_sigma``, so
    ``s + r`` samples the same marginals with different (swirling) trajectories (paper 59)."""
    if A is None:
        A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    A = torch.as_tensor(A, dtype=torch.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or not torch.allclose(A, -A.T):
        raise ValueError("A must be a square skew-symmetric matrix (A = -A.T); a symmetric part is not a gauge")

    def field(x: Tensor, sigma) -> Tensor:
        s = score(x, sigma)
        return scale * s.flatten(1) @ A.to(s).T

    return field


@dataclass
class HelmholtzSplit:
    """The ``L^2(p)`` split of a field into ``grad phi`` and a gauge remainder (:func:`helmholtz_split`).

    ``centers``, ``bandwidth`` and ``coef`` define ``phi``; ``fraction`` is ``E|r|^2 / E|s|^2`` on the fitting
    samples (0: conservative; the share of the field's energy that is gauge)."""

    centers: Tensor
    bandwidth: float
    coef: Tensor
    fraction: float

    def _grads(self, x: Tensor) -> Tensor:
        """Gradients of every basis potential at ``x``: ``[B, m, d]``."""
        x = x.to(torch.float64)
        B, d = x.shape
        eye = torch.eye(d, dtype=torch.float64).expand(B, d, d)  # grad of x_i
        iu = torch.triu_indices(d, d)
        # grad of x_i x_j / 2 (i <= j): e_i x_j / 2 + e_j x_i / 2
        quad = 0.5 * (eye[:, iu[0], :] * x[:, iu[1], None] + eye[:, iu[1], :] * x[:, iu[0], None])
        diff = x[:, None, :] - self.centers[None]  # [B, c, d]
        bump = torch.exp(-(diff ** 2).sum(-1) / (2 * self.bandwidth ** 2))
        rbf = -diff / self.bandwidth ** 2 * bump[..., None]
        return torch.cat([eye, quad, rbf], dim=1)

    def conservative(self, x: Tensor) -> Tensor:
        """``grad phi(x)`` ``[B, d]``."""
        return torch.einsum("bmd,m->bd", self._grads(x), self.coef)

    def remainder(self, field: Callable, x: Tensor, sigma) -> Tensor:
        """``r = s - grad phi`` at ``x``."""
        return field(x, sigma).to(torch.float64) - self.conservative(x)


def helmholtz_split(field: Callable, x: Tensor, sigma, *, n_centers: int = 200, bandwidth: float | None = None,
                    ridge: float = 1e-8, generator: torch.Generator | None = None) -> HelmholtzSplit:
    """Project ``field(x, sigma)`` onto gradient fields in ``L^2(p_sigma)`` (paper 59's decomposition).

    ``x`` ``[N, d]`` are samples of ``p_sigma`` (the weighting measure). ``phi`` is sought in the span of
    ``x_i``, ``x_i x_j`` and ``n_centers`` Gaussian bumps centred on a random subset of ``x`` (width ``bandwidth``,
    by default a quarter of the median distance between centres); the coefficients minimise
    ``mean |s - grad phi|^2 + ridge |c|^2``. The residual is orthogonal to every basis gradient, the discrete form of
    ``div(p r) = 0``."""
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError("x must be samples [N, d] of the noised distribution")
    N, d = x.shape
    if isinstance(n_centers, bool) or not isinstance(n_centers, int) or not 1 <= n_centers <= N:
        raise ValueError(f"n_centers must be an int in [1, N = {N}], got {n_centers!r}")
    xd = x.detach().to(torch.float64)
    idx = torch.randperm(N, generator=generator)[:n_centers]
    centers = xd[idx]
    if bandwidth is None:
        bandwidth = 0.25 * float(torch.cdist(centers, centers).median()) if n_centers > 1 else 1.0
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    with torch.no_grad():
        s = field(x.detach(), sigma).detach().to(torch.float64).reshape(N, d)
    split = HelmholtzSplit(centers, float(bandwidth), torch.zeros(0), 0.0)
    G = split._grads(xd)  # [N, m, d]
    m = G.shape[1]
    Gm = G.permute(0, 2, 1).reshape(N * d, m)
    lhs = Gm.T @ Gm / N + ridge * torch.eye(m, dtype=torch.float64)
    coef = torch.linalg.solve(lhs, Gm.T @ s.reshape(-1) / N)
    split.coef = coef
    r = s - torch.einsum("bmd,m->bd", G, coef)
    split.fraction = float((r ** 2).sum() / (s ** 2).sum().clamp_min(1e-300))
    return split


def jacobian_asymmetry(field: Callable, x: Tensor, sigma) -> Tensor:
    """``|J - J^T|_F / |J|_F`` per point ``[B]`` for the Jacobian ``J`` of ``field(x, sigma)``: 0 for a gradient
    field; in 2-D ``|J - J^T|_F = sqrt(2) |curl|``."""
    from ..denoisers import as_sigma

    sig = as_sigma(sigma, x)
    J = jacobian(lambda y: field(y, sig), x.reshape(len(x), -1).to(torch.float64))
    return torch.linalg.matrix_norm(J - J.transpose(1, 2)) / torch.linalg.matrix_norm(J).clamp_min(1e-300)


@dataclass
class IDResult:
    """Per-point intrinsic-dimension estimates: ``dims`` (threshold rule), ``gap_dims`` (largest spectral gap) and
    the sorted (descending) ``spectrum`` ``[B, d]`` they were read from."""

    dims: Tensor
    gap_dims: Tensor
    spectrum: Tensor

    def mode(self, which: str = "dims") -> int:
        """The most frequent estimate over the points."""
        return int(torch.mode(getattr(self, which)).values)


def _largest_gap(spec: Tensor) -> Tensor:
    """Number of entries above the largest drop between consecutive sorted (descending) values."""
    gaps = spec[:, :-1] - spec[:, 1:]
    return gaps.argmax(1) + 1


def intrinsic_dimension(denoiser: Callable, x: Tensor, sigma: float, *, method: str = "jacobian",
                        threshold: float = 0.5, n_perturb: int | None = None,
                        generator: torch.Generator | None = None, cond: dict | None = None) -> IDResult:
    """Estimate the intrinsic dimension of the data near the points ``x`` ``[B, ...]`` at noise level ``sigma``.

    ``"jacobian"`` (paper 59): the singular values of the denoiser Jacobian ``dD/dx = I + sigma^2 grad s``; for data
    on a ``k``-dimensional manifold and ``sigma`` small against its curvature (but larger than the gaps between
    training points, for an empirical denoiser) ``k`` of them are near 1 (tangent) and the rest near 0 (normal).
    ``dims`` counts values above ``threshold``; ``gap_dims`` puts the cut at the largest gap.
    ``"normal_svd"`` (Stanczuk et al. 2024): at each point draw ``n_perturb`` (default ``4 d``) points
    ``x + sigma eps``, stack their scores times sigma and take singular values: the normal space is spanned by the
    large ones; the spectrum is ``1 - (s_i / s_max)`` so that, again, tangent directions sit near 1.
    """
    from ..denoisers import as_sigma

    if method not in ("jacobian", "normal_svd"):
        raise ValueError(f"method must be 'jacobian' or 'normal_svd', got {method!r}")
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError("x must be points [B, ...] near the data")
    if not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0 (a small noise level, e.g. 0.05 of the data scale), got {sigma}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    cond = dict(cond or {})
    B, shape = x.shape[0], x.shape[1:]
    d = x[0].numel()

    def flat_denoiser(y: Tensor) -> Tensor:
        c = {k: v for k, v in cond.items()}
        return denoiser(y.reshape(len(y), *shape), as_sigma(sigma, y), **c).reshape(len(y), d)

    if method == "jacobian":
        J = jacobian(flat_denoiser, x.reshape(B, d).detach().to(torch.float64))
        spec = torch.linalg.svdvals(J)
    else:
        k = n_perturb or 4 * d
        score = score_of(denoiser, **cond)
        specs = []
        for b in range(B):
            xb = x[b:b + 1].to(torch.float64) + sigma * torch.randn(k, *shape, generator=generator,
                                                                    dtype=torch.float64)
            with torch.no_grad():
                S = (sigma * score(xb, torch.full((k,), float(sigma), dtype=torch.float64))).reshape(k, d)
            sv = torch.linalg.svdvals(S)
            specs.append((1 - sv / sv.max().clamp_min(1e-300)).flip(0))
        spec = torch.stack(specs)
        # tangent directions have the *smallest* score singular values: spec = 1 - s/s_max sorted descending
    dims = (spec > threshold).sum(1)
    return IDResult(dims=dims, gap_dims=_largest_gap(spec), spectrum=spec)


def mle_dimension(data: Tensor, k: int = 10) -> float:
    """The Levina-Bickel (2004) maximum-likelihood intrinsic dimension of a point cloud ``[N, ...]`` from its
    ``k`` nearest neighbours (the MacKay-Ghahramani average of the inverse per-point estimates)."""
    x = data.reshape(len(data), -1).to(torch.float64)
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k < len(x):
        raise ValueError(f"k must be an int in [2, N), got {k!r}")
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    T = dist.topk(k, largest=False).values  # [N, k], ascending
    inv = torch.log(T[:, -1:] / T[:, :-1]).sum(1) / (k - 1)  # 1 / m_hat(x)
    return float(1 / inv.mean())
