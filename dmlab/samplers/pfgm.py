"""PFGM++ (Xu et al. 2023, "PFGM++: Unlocking the Potential of Physics-Inspired Generative Models", ICML;
official code ``Newbeeer/pfgmpp``).

PFGM++ embeds ``N``-dimensional data in ``N + D`` dimensions and moves samples along the electric field of the
data "charges". With the alignment ``r = sigma sqrt(D)`` the perturbation kernel is
``p_r(x | y) ∝ (|x - y|^2 + r^2)^{-(N + D) / 2}`` (heavy-tailed), sampling is the EDM probability-flow ODE
``dx/dsigma = (x - E[y | x]) / sigma`` with the posterior mean under that kernel, and the prior at ``sigma_max`` is
a multivariate t with ``D`` degrees of freedom. ``D = 1`` is PFGM; ``D -> infinity`` is diffusion (EDM), because
``(1 + u / D)^{-(N+D)/2} -> exp(-u / 2)``.

* :class:`PFGMEmpiricalDenoiser` - the exact PFGM++ posterior mean of a finite dataset (``D = inf``: the Gaussian
  :class:`~dmlab.exact.EmpiricalDenoiser`); every dmlab ODE sampler then samples PFGM++ unchanged.
* :func:`pfgmpp_prior` - draws of the prior: ``sigma z sqrt(D / chi2_D)`` with ``z ~ N(0, I_N)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..denoisers import as_sigma

__all__ = ["PFGMEmpiricalDenoiser", "pfgmpp_prior", "check_D"]


def check_D(D) -> float:
    """Validate the augmentation dimension: a positive int, or ``math.inf`` (diffusion)."""
    if isinstance(D, bool) or not isinstance(D, (int, float)) or not (D == math.inf or (D >= 1 and float(D).is_integer())):
        raise ValueError(f"D must be a positive integer (the number of extra dimensions; 1 is PFGM) or math.inf "
                         f"(diffusion), got {D!r}")
    return float(D)


class PFGMEmpiricalDenoiser:
    """Exact ``E[y | x]`` for data ``{y_i}`` under the PFGM++ kernel at ``r = sigma sqrt(D)`` (Xu et al. 2023, eq. 4).

    Weights ``w_i ∝ (|x - y_i|^2 + D sigma^2)^{-(N + D) / 2}`` (softmax of the log), ``N`` the data dimension;
    ``D = math.inf`` gives the Gaussian weights ``exp(-|x - y_i|^2 / 2 sigma^2)``. The identity at ``sigma = 0``.
    """

    def __init__(self, data: Tensor, D, *, chunk: int = 4096):
        if not isinstance(data, Tensor) or data.ndim < 2 or len(data) < 1:
            raise ValueError("data must be a tensor of shape [n, ...] with n >= 1 points")
        self.D = check_D(D)
        self.shape = tuple(data.shape[1:])
        self.N = math.prod(self.shape)
        self.data = data.reshape(len(data), self.N).to(torch.float64)
        self.sq = (self.data ** 2).sum(1)
        self.chunk = int(chunk)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        if cond:
            raise TypeError(f"PFGMEmpiricalDenoiser takes no conditioning, got {sorted(cond)}")
        sigma = as_sigma(sigma, x).to(torch.float64)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        if xf.shape[1] != self.N:
            raise ValueError(f"x must hold {self.N} values per sample, got {xf.shape[1]}")
        out = xf.clone()
        for i in range(0, len(xf), self.chunk):
            sl = slice(i, i + self.chunk)
            s = sigma[sl]
            pos = s > 0
            if not pos.any():
                continue
            xx, ss = xf[sl][pos], s[pos][:, None]
            d2 = ((xx ** 2).sum(1, keepdim=True) - 2 * xx @ self.data.T + self.sq[None]).clamp_min(0)
            if self.D == math.inf:
                logits = -d2 / (2 * ss ** 2)
            else:
                logits = -(self.N + self.D) / 2 * torch.log(d2 + self.D * ss ** 2)
            res = out[sl].clone()
            res[pos] = torch.softmax(logits, dim=1) @ self.data
            out[sl] = res
        return out.reshape(x.shape).to(x.dtype)


def _chi2(n: int, k: float, generator, dtype) -> Tensor:
    """``n`` draws of chi-square with ``k`` degrees of freedom from ``generator``: a sum of ``k`` squared normals for
    ``k <= 4096``, else the Wilson-Hilferty cube (relative error below 1e-4 there)."""
    if k <= 4096:
        return torch.randn(n, int(k), generator=generator, dtype=torch.float64).pow(2).sum(1).to(dtype)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    c = 2 / (9 * k)
    return (k * (1 - c + z * math.sqrt(c)) ** 3).to(dtype)


def pfgmpp_prior(n: int, shape: tuple, sigma: float, D, *, generator: torch.Generator,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` draws of the PFGM++ prior at ``sigma`` (Xu et al. 2023, App. C.3): ``sigma z sqrt(D / chi2_D)``.

    The paper draws the radius ``R = r sqrt(B / (1 - B))``, ``B ~ Beta(N/2, D/2)``, ``r = sigma sqrt(D)``, and a
    uniform direction; with ``B = chi2_N / (chi2_N + chi2_D)`` and ``z`` supplying both ``chi2_N = |z|^2`` and the
    direction this is a multivariate t with ``D`` degrees of freedom. ``D = math.inf`` gives ``sigma z``.
    """
    D = check_D(D)
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator")
    if not isinstance(n, int) or n < 1 or not sigma > 0:
        raise ValueError("need a positive int n and sigma > 0")
    z = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    if D == math.inf:
        return (sigma * z).to(dtype)
    scale = (D / _chi2(n, D, generator, torch.float64)).sqrt()
    return (sigma * z * scale.reshape(n, *[1] * len(shape))).to(dtype)
