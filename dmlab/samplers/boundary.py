"""Optimal boundary conditions for the diffusion ODE (Ma et al. 2024, "Solving Diffusion ODEs with Optimal Boundary
Conditions for Better Image Super-Resolution", ICLR).

A deterministic sampler is a map ``x0 = h(x_T, y)`` from the starting noise (the ODE's boundary condition) and the
condition ``y``. The paper argues that one ``x_T`` can be good for *every* ``y``, finds it by searching candidates on
a few reference pairs, and reuses it: :func:`search_boundary`. To test the idea exactly, :class:`GMMPosteriorDenoiser`
is the exact conditional denoiser of a linear inverse problem ``y = A x0 + noise`` with a Gaussian-mixture prior:
the posterior is again a mixture (its covariances do not depend on ``y``), noised in closed form.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..denoisers import as_sigma
from ..exact import GMMDenoiser

__all__ = ["GMMPosteriorDenoiser", "search_boundary"]

_LOG2PI = math.log(2 * math.pi)


class GMMPosteriorDenoiser:
    """Exact ``E[x0 | x, y]`` for ``x = x0 + sigma eps``, prior ``x0 ~ sum_k w_k N(mu_k, C_k)``, ``y = A x0 + s n``.

    Per component: ``S_k = A C_k A^T + s^2 I``, ``G_k = C_k A^T S_k^-1``, posterior mean ``m_k(y) = mu_k +
    G_k (y - A mu_k)``, covariance ``P_k = C_k - G_k A C_k`` (independent of ``y``) and weight
    ``∝ w_k N(y; A mu_k, S_k)``; then the noised posterior mixture's denoiser as in :class:`~dmlab.exact.GMMDenoiser`.
    Pass the measurement as ``y=[B, m]`` in ``cond``.
    """

    def __init__(self, prior: GMMDenoiser, A: Tensor, noise_std: float):
        if not isinstance(prior, GMMDenoiser):
            raise TypeError("prior must be a dmlab.exact.GMMDenoiser")
        A = torch.as_tensor(A, dtype=torch.float64)
        if A.ndim != 2 or A.shape[1] != prior.dim:
            raise ValueError(f"A must be [m, d] with d = {prior.dim}, got {tuple(A.shape)}")
        if not noise_std > 0:
            raise ValueError("noise_std must be positive (a noiseless y makes the posterior singular)")
        self.prior, self.A, self.s2 = prior, A, float(noise_std) ** 2
        C, mu = prior.covs, prior.means
        S = A @ C @ A.T + self.s2 * torch.eye(A.shape[0], dtype=torch.float64)
        self.G = C @ A.T @ torch.linalg.inv(S)  # [K, d, m]
        P = C - self.G @ A @ C
        self.P = (P + P.transpose(-1, -2)) / 2
        self.lam, self.U = torch.linalg.eigh(self.P)
        self.lam = self.lam.clamp_min(0)
        self.S_chol = torch.linalg.cholesky(S)
        self.Amu = mu @ A.T  # [K, m]
        self.shape, self.dim = prior.shape, prior.dim

    def posterior(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Log-weights ``[B, K]`` and means ``[B, K, d]`` of ``p(x0 | y)``."""
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1, self.A.shape[0])
        r = y[:, None, :] - self.Amu[None]  # [B, K, m]
        sol = torch.cholesky_solve(r.permute(1, 2, 0), self.S_chol).permute(2, 0, 1)  # S^-1 r
        logdet = 2 * self.S_chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        logn = -0.5 * ((r * sol).sum(-1) + logdet[None] + self.A.shape[0] * _LOG2PI)
        logw = torch.log_softmax(logn + self.prior.weights.log()[None], dim=1)
        means = self.prior.means[None] + torch.einsum("kdm,bkm->bkd", self.G, r)
        return logw, means

    def __call__(self, x: Tensor, sigma, *, y: Tensor, **cond) -> Tensor:
        if cond:
            raise TypeError(f"GMMPosteriorDenoiser takes only y as conditioning, got {sorted(cond)}")
        sigma = as_sigma(sigma, x).to(torch.float64)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        logw, means = self.posterior(y)
        if logw.shape[0] != xf.shape[0]:
            raise ValueError(f"y must have one row per sample: {xf.shape[0]}, got {logw.shape[0]}")
        z = torch.einsum("kdj,bkd->bkj", self.U, xf[:, None, :] - means)
        v = self.lam[None] + (sigma ** 2)[:, None, None]
        logn = -0.5 * ((z ** 2 / v).sum(-1) + v.log().sum(-1))
        r = torch.softmax(logn + logw, dim=1)
        out = (r[..., None] * (means + torch.einsum("kdj,bkj->bkd", self.U, z * self.lam[None] / v))).sum(1)
        out = torch.where((sigma > 0)[:, None], out, xf)
        return out.reshape(x.shape).to(x.dtype)


@torch.no_grad()
def search_boundary(sample: Callable, candidates: Tensor, x_ref: Tensor, y_ref: Tensor,
                    metric: Callable | None = None, *, chunk: int = 4096) -> tuple[int, Tensor]:
    """The boundary condition that serves a reference set best (Ma et al. 2024, eq. 9).

    ``sample(x_T [n, ...], y [n, m]) -> x0 [n, ...]`` is a deterministic conditional sampler. Every candidate
    ``x_T`` (a row of ``candidates``, shared by all references) is run on every reference condition; its score is
    the mean ``metric(x0_hat, x_ref)`` (default: mean squared error per sample) over the references. Returns the
    index of the lowest score and all scores ``[M]``.
    """
    M, R = len(candidates), len(x_ref)
    if len(y_ref) != R or R < 1 or M < 1:
        raise ValueError("need at least one candidate and one reference, with as many y_ref as x_ref")
    metric = metric or (lambda a, b: (a - b).reshape(len(a), -1).pow(2).mean(1))
    xs = candidates[:, None].expand(M, R, *candidates.shape[1:]).reshape(M * R, *candidates.shape[1:])
    ys = y_ref[None].expand(M, *y_ref.shape).reshape(M * R, *y_ref.shape[1:])
    out = torch.cat([sample(xs[i:i + chunk], ys[i:i + chunk]) for i in range(0, M * R, chunk)])
    ref = x_ref[None].expand(M, *x_ref.shape).reshape(M * R, *x_ref.shape[1:])
    scores = metric(out, ref).reshape(M, R).mean(1)
    return int(scores.argmin()), scores
