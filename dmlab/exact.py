"""Exact denoisers: ground truth without pretrained weights.

For a data distribution ``p0`` noised to ``x = x0 + sigma * eps`` the ideal denoiser is the posterior mean
``D(x, sigma) = E[x0 | x]`` and Tweedie's formula gives the score of the noised marginal
``grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2``. Both are closed-form for

* :class:`GaussianDenoiser` - ``x0 ~ N(mu, C)``;
* :class:`GMMDenoiser` - a Gaussian mixture with full (possibly singular) covariances;
* :class:`EmpiricalDenoiser` - the empirical distribution of a finite dataset (the denoiser a perfectly trained
  network converges to, and why such a network can only reproduce its training set); class-conditional through
  ``class_labels`` in ``cond``.

Each exposes ``__call__`` (the denoiser), ``score(x, sigma)``, ``log_prob(x, sigma)`` of the noised marginal and
``sample(n, generator)``. At ``sigma = 0`` the denoiser is the identity. Computations run in float64 and return
``x``'s dtype. :func:`reference_ode` integrates the probability-flow ODE with scipy (DOP853, rtol = atol = 1e-12):
the yardstick samplers are measured against (Song et al. 2021, eq. 13; Karras et al. 2022, eq. 4).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .denoisers import as_sigma, bcast

__all__ = ["ExactDenoiser", "GMMDenoiser", "GaussianDenoiser", "EmpiricalDenoiser", "reference_ode"]

_LOG2PI = math.log(2 * math.pi)


_HALF = (torch.float16, torch.bfloat16)


def _sigma(sigma, x: Tensor) -> Tensor:
    """``as_sigma`` in x's dtype, but float64 for half-precision ``x``: a float16 sigma loses 3 digits, overflows
    above 65504 and underflows below 6e-8, while these denoisers compute in float64 anyway."""
    return as_sigma(sigma, x, dtype=torch.float64 if x.dtype in _HALF else None)


def _out(t: Tensor, x: Tensor, what: str) -> Tensor:
    """A float64 result cast to ``x``'s dtype; in half precision, a value beyond the dtype's range is an error
    naming the fix rather than a silent inf."""
    out = t.reshape(x.shape).to(x.dtype)
    if x.dtype in _HALF and not torch.isfinite(out).all() and torch.isfinite(t).all():
        raise ValueError(f"the {what} reaches {t.abs().max().item():.3g}, beyond {x.dtype}'s largest value "
                         f"{torch.finfo(x.dtype).max:.4g} (a score grows like 1/sigma^2 at small sigma): pass x in "
                         "float32 (x.float()) for this call")
    return out


def _flat(x: Tensor, dim: int) -> Tensor:
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.ndim < 2 or x[0].numel() != dim:
        raise ValueError(f"x must have shape [B, ...] with {dim} values per sample (the data dimension), "
                         f"got {tuple(x.shape)}")
    return x.reshape(x.shape[0], dim).to(torch.float64)


class ExactDenoiser:
    """Shared behaviour: validation, ``score`` from the denoiser (Tweedie), shapes."""

    dim: int
    shape: tuple

    def to(self, device) -> "ExactDenoiser":
        """Move every tensor the denoiser holds to ``device`` (done automatically on the first call with an input
        on another device); returns ``self``."""
        device = torch.device(device)
        for k, v in list(vars(self).items()):
            if isinstance(v, Tensor) and v.device != device:
                setattr(self, k, v.to(device))
        self._device = device
        return self

    def _follow(self, x: Tensor) -> None:
        if getattr(self, "_device", None) != x.device:
            self.to(x.device)

    def denoise(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _call64(self, x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
        """The denoiser in float64, ``[B, dim]``."""
        self._follow(x)
        xf = _flat(x, self.dim)
        B = xf.shape[0]
        for k, v in cond.items():
            if isinstance(v, Tensor) and v.ndim and v.shape[0] != B:
                raise ValueError(f"{k} must have one entry per sample: shape [B] = [{B}], got {tuple(v.shape)}")
        out = xf.clone()
        pos = sigma > 0
        if pos.any():
            sub = {k: (v[pos] if isinstance(v, Tensor) and v.ndim else v) for k, v in cond.items()}
            out[pos] = self.denoise(xf[pos], sigma[pos].to(torch.float64), **sub)
        return out

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = _sigma(sigma, x)
        out = self._call64(x, sigma, cond)
        return _out(out, x, "denoiser output") if x.dtype in _HALF else out.reshape(x.shape).to(x.dtype)

    def score(self, x: Tensor, sigma, **cond) -> Tensor:
        """``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` (Tweedie); needs ``sigma > 0``."""
        sigma = _sigma(sigma, x)
        if (sigma <= 0).any():
            raise ValueError("the score of the empirical/degenerate marginal at sigma = 0 is undefined; use sigma > 0")
        if x.dtype in _HALF:  # (D - x) / sigma^2 over- or underflows in half precision: compute in float64
            s64 = sigma.to(torch.float64)
            d = self._call64(x, s64, cond) - _flat(x, self.dim)
            return _out(d / s64[:, None] ** 2, x, f"score at sigma = {s64.min().item():.3g}")
        return (self(x, sigma, **cond) - x) / bcast(sigma, x) ** 2

    def _check_n(self, n: int, generator) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")


# ----------------------------------------------------------------------------------------------- Gaussian mixtures
class GMMDenoiser(ExactDenoiser):
    """Exact denoiser of a Gaussian mixture ``sum_k w_k N(mu_k, C_k)`` noised to ``sigma``.

    The noised marginal is ``sum_k w_k N(mu_k, C_k + sigma^2 I)``; with responsibilities ``r_k(x)`` the posterior
    mean is ``D = sum_k r_k [mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k)]``. Covariances may be singular (positive
    semi-definite: data on low-dimensional subspaces, as in Wang et al. 2024, paper 66); then ``log_prob`` at
    ``sigma = 0`` is not defined. Each ``C_k`` is eigendecomposed once, so any sigma costs ``O(B K d^2)``.

    Args:
        weights: ``[K]`` non-negative, normalised on construction.
        means: ``[K, d]``.
        covs: ``[K, d, d]`` symmetric positive semi-definite (or ``[K]``/``[K, d]`` for isotropic/diagonal).
        shape: the shape of one sample (``(d,)`` by default, e.g. ``(1, 8, 8)``).
    """

    def __init__(self, weights, means, covs, *, shape: tuple | None = None):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(mu.shape)}")
        K, d = mu.shape
        if K < 1 or d < 1:
            raise ValueError(f"means must have shape [K, d] with K >= 1 components and d >= 1, got {tuple(mu.shape)}")
        if not torch.isfinite(mu).all():
            raise ValueError("means must be finite (found NaN or inf); check how they were computed")
        if w.shape != (K,):
            raise ValueError(f"weights must have shape [K] = [{K}] to match means, got {tuple(w.shape)}")
        if (w < 0).any() or w.sum() <= 0 or not torch.isfinite(w).all():
            raise ValueError("weights must be non-negative, finite and not all zero")
        C = torch.as_tensor(covs, dtype=torch.float64)
        if C.shape == (K,):
            C = C[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif C.shape == (K, d):
            C = torch.diag_embed(C)
        if C.shape != (K, d, d):
            raise ValueError(f"covs must have shape [K, d, d] = [{K}, {d}, {d}] (or [K] / [K, d]), got {tuple(C.shape)}")
        if not torch.isfinite(C).all():
            raise ValueError("covs must be finite (found NaN or inf); a component of infinite variance has no "
                             "denoiser: drop it or give it a finite covariance")
        if not torch.allclose(C, C.transpose(-1, -2), atol=1e-10 * (1 + C.abs().max().item())):
            raise ValueError("covs must be symmetric; use (C + C.mT) / 2")
        lam, U = torch.linalg.eigh(C)
        tol = 1e-10 * max(1.0, lam.abs().max().item())
        if (lam < -tol).any():
            raise ValueError(f"covs must be positive semi-definite; the smallest eigenvalue is {lam.min().item():.3g}")
        self.weights, self.means, self.covs = w / w.sum(), mu, C
        self.eigvals, self.eigvecs = lam.clamp_min(0), U
        self.K, self.dim = K, d
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold {d} values")

    @classmethod
    def isotropic(cls, weights, means, var: float, **kw) -> "GMMDenoiser":
        """A mixture whose every component has covariance ``var * I``."""
        mu = torch.as_tensor(means, dtype=torch.float64)
        return cls(weights, mu, torch.full((mu.shape[0],), float(var), dtype=torch.float64), **kw)

    def _parts(self, xf: Tensor, sigma: Tensor):
        """Per component: coordinates ``z`` in the eigenbasis, ``lam + sigma^2``, log N(x; mu_k, C_k + sigma^2 I)."""
        z = torch.einsum("kdj,bkd->bkj", self.eigvecs, xf[:, None, :] - self.means[None])  # [B, K, d]
        v = self.eigvals[None] + (sigma ** 2)[:, None, None]  # [B, K, d]
        logn = -0.5 * ((z ** 2 / v).sum(-1) + v.log().sum(-1) + self.dim * _LOG2PI)  # [B, K]
        return z, v, logn

    def denoise(self, xf: Tensor, sigma: Tensor, **cond) -> Tensor:
        if cond:
            raise TypeError(f"GMMDenoiser takes no conditioning, got {sorted(cond)}")
        z, v, logn = self._parts(xf, sigma)
        r = torch.softmax(logn + self.weights.log()[None], dim=1)  # [B, K]
        shrunk = torch.einsum("kdj,bkj->bkd", self.eigvecs, z * self.eigvals[None] / v)
        return (r[..., None] * (self.means[None] + shrunk)).sum(1)

    def log_prob(self, x: Tensor, sigma) -> Tensor:
        """``log p_sigma(x)`` of the noised mixture, ``[B]`` (float64)."""
        sigma = _sigma(sigma, x).to(torch.float64)
        self._follow(x)
        if (sigma == 0).any() and (self.eigvals <= 0).any():
            raise ValueError("a mixture with singular covariances has no density at sigma = 0; use sigma > 0")
        _, _, logn = self._parts(_flat(x, self.dim), sigma)
        return torch.logsumexp(logn + self.weights.log()[None], dim=1)

    def score(self, x: Tensor, sigma, **cond) -> Tensor:
        """Exact score ``-sum_k r_k (C_k + sigma^2 I)^-1 (x - mu_k)``; finite at sigma = 0 for non-singular covariances."""
        sigma = _sigma(sigma, x).to(torch.float64)
        self._follow(x)
        z, v, logn = self._parts(_flat(x, self.dim), sigma)
        r = torch.softmax(logn + self.weights.log()[None], dim=1)
        s = -torch.einsum("kdj,bkj->bkd", self.eigvecs, z / v)
        return _out((r[..., None] * s).sum(1), x, f"score at sigma = {sigma.min().item():.3g}")

    def sample(self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False):
        """``n`` draws of the data distribution, shape ``[n, *shape]`` (float64, on the CPU like every random draw);
        optionally the component labels."""
        self._check_n(n, generator)
        k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        root = (self.eigvecs * self.eigvals.sqrt()[:, None, :]).cpu()  # C = root root^T
        x = self.means.cpu()[k] + torch.einsum("nij,nj->ni", root[k], eps)
        x = x.reshape(n, *self.shape)
        return (x, k) if return_labels else x


class GaussianDenoiser(GMMDenoiser):
    """Exact denoiser of one Gaussian ``N(mean, cov)``: ``D = mu + C (C + sigma^2 I)^-1 (x - mu)``."""

    def __init__(self, mean, cov, *, shape: tuple | None = None):
        mu = torch.as_tensor(mean, dtype=torch.float64)
        if mu.ndim != 1:
            raise ValueError(f"mean must have shape [d], got {tuple(mu.shape)}")
        C = torch.as_tensor(cov, dtype=torch.float64)
        if C.ndim == 0:
            C = C * torch.eye(mu.shape[0], dtype=torch.float64)
        elif C.ndim == 1:
            C = torch.diag(C)
        super().__init__(torch.ones(1), mu[None], C[None], shape=shape)


# ----------------------------------------------------------------------------------------------- empirical
class EmpiricalDenoiser(ExactDenoiser):
    """The exact posterior mean of a finite dataset ``{x_i}`` noised to ``sigma``.

    ``p_sigma = (1/N) sum_i N(x_i, sigma^2 I)`` and ``D(x, sigma) = sum_i softmax_i(-|x - x_i|^2 / 2 sigma^2) x_i``.
    A network trained to optimality on the dataset *is* this function, so sampling it only ever returns training
    points: the memorisation lesson of chapter 01. With ``labels`` it is class-conditional: pass
    ``class_labels=[B] int tensor`` (``-1`` for unconditional) in ``cond``.
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None, *, chunk: int = 4096):
        if not isinstance(data, Tensor) or data.ndim < 2 or len(data) < 1 or data[0].numel() < 1:
            got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"data must be a tensor of shape [N, ...] with N >= 1 samples, got {got}")
        if not data.dtype.is_floating_point:
            raise TypeError(f"data must be a floating-point tensor, got {data.dtype}; use data.float()")
        if not torch.isfinite(data).all():
            raise ValueError("data must be finite (found NaN or inf); drop or fix those samples")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int (rows per block, 4096 by default), got {chunk!r}")
        self.shape = tuple(data.shape[1:])
        self.dim = math.prod(self.shape)
        self.data = data.reshape(len(data), self.dim).to(torch.float64)
        self.sq = (self.data ** 2).sum(1)
        self.labels = None
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (len(data),) or labels.dtype.is_floating_point:
                raise ValueError(f"labels must be an integer tensor of shape [N] = [{len(data)}]")
            if (labels < 0).any():
                raise ValueError("labels must be non-negative class indices")
            self.labels = labels.long()
            self.n_classes = int(self.labels.max()) + 1
        self.chunk = int(chunk)

    def _logits(self, xf: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
        d2 = (xf ** 2).sum(1, keepdim=True) - 2 * xf @ self.data.T + self.sq[None]
        logits = -d2.clamp_min(0) / (2 * sigma[:, None] ** 2)
        if class_labels is not None:
            if self.labels is None:
                raise ValueError("class_labels given but the EmpiricalDenoiser was built without labels")
            cl = torch.as_tensor(class_labels, device=xf.device)
            if cl.dtype.is_floating_point or cl.dtype.is_complex or cl.dtype == torch.bool:
                if cl.dtype == torch.bool or not torch.equal(cl, cl.round()):
                    raise TypeError(f"class_labels must be integer class indices, got {cl.dtype} values "
                                    "that are not whole numbers; pass e.g. torch.tensor([...]).long()")
            cl = cl.long().reshape(-1)
            if cl.shape[0] != xf.shape[0]:
                raise ValueError(f"class_labels must have shape [B] = [{xf.shape[0]}]")
            if ((cl < -1) | (cl >= self.n_classes)).any():
                raise ValueError(f"class_labels must lie in [0, {self.n_classes - 1}] (or -1 for unconditional)")
            mask = (cl[:, None] >= 0) & (self.labels[None] != cl[:, None])
            logits = logits.masked_fill(mask, -math.inf)
        return logits

    def denoise(self, xf: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **cond) -> Tensor:
        if cond:
            raise TypeError(f"EmpiricalDenoiser takes only class_labels as conditioning, got {sorted(cond)}")
        outs = []
        for i in range(0, len(xf), self.chunk):
            cl = None if class_labels is None else torch.as_tensor(class_labels).reshape(-1)[i:i + self.chunk]
            w = torch.softmax(self._logits(xf[i:i + self.chunk], sigma[i:i + self.chunk], cl), dim=1)
            outs.append(w @ self.data)
        return torch.cat(outs)

    def log_prob(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        """``log p_sigma(x)``, ``[B]`` (float64); class-conditional with ``class_labels``; needs ``sigma > 0``."""
        sigma = _sigma(sigma, x).to(torch.float64)
        if (sigma <= 0).any():
            raise ValueError("the empirical distribution has no density at sigma = 0; use sigma > 0")
        self._follow(x)
        xf = _flat(x, self.dim)
        logits = self._logits(xf, sigma, class_labels)
        if class_labels is None:
            log_n = torch.full((len(xf),), math.log(len(self.data)), dtype=torch.float64)
        else:
            counts = torch.bincount(self.labels, minlength=self.n_classes).to(torch.float64)
            cl = torch.as_tensor(class_labels).long().reshape(-1)
            log_n = torch.where(cl >= 0, counts[cl.clamp_min(0)].log(), math.log(len(self.data)))
        return torch.logsumexp(logits, 1) - log_n - 0.5 * self.dim * (_LOG2PI + 2 * sigma.log())

    def sample(self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False):
        """``n`` training points drawn uniformly with replacement, shape ``[n, *shape]`` (float64)."""
        self._check_n(n, generator)
        idx = torch.randint(len(self.data), (n,), generator=generator)
        x = self.data.cpu()[idx].reshape(n, *self.shape)
        if return_labels:
            if self.labels is None:
                raise ValueError("this EmpiricalDenoiser has no labels")
            return x, self.labels.cpu()[idx]
        return x

    def nearest(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Distance to, and index of, the nearest training point of each sample in ``x`` (the memorisation test)."""
        self._follow(x)
        xf = _flat(x, self.dim)
        d2 = (xf ** 2).sum(1, keepdim=True) - 2 * xf @ self.data.T + self.sq[None]
        v, i = d2.clamp_min(0).min(1)
        return v.sqrt(), i


# ----------------------------------------------------------------------------------------------- reference ODE
def reference_ode(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                  rtol: float = 1e-12, atol: float = 1e-12, return_path: bool = False) -> Tensor:
    """Solve the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``sigmas[0]`` to ``sigmas[-1]``.

    scipy's ``solve_ivp(method="DOP853")`` at ``rtol = atol = 1e-12`` in float64. When the denoiser has an exact
    ``score`` that is finite at 0 (Gaussian, mixtures with non-singular covariances) the right-hand side is
    written ``-sigma * score(x, sigma)``, so the integration reaches ``sigma = 0`` exactly; otherwise the last sigma
    must be positive. Returns the end point (``x``'s shape and dtype) or, with ``return_path``, the solution at every
    entry of ``sigmas`` (``[len(sigmas), *x.shape]``).
    """
    from scipy.integrate import solve_ivp

    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or not (sigmas[1:] < sigmas[:-1]).all() or sigmas[-1] < 0:
        raise ValueError("sigmas must be a 1-D strictly decreasing tensor of non-negative sigmas (length >= 2)")
    exact_score = isinstance(denoiser, GMMDenoiser) and bool((denoiser.eigvals > 0).all())
    if sigmas[-1] == 0 and not exact_score:
        raise ValueError("this denoiser's ODE is singular at sigma = 0; end the reference at a small positive sigma "
                         "(e.g. sigmas[:-1]) and compare there")
    cond = cond or {}
    shape, dtype = x.shape, x.dtype

    def rhs(s, y):
        xt = torch.from_numpy(y).reshape(shape)
        sig = torch.full((shape[0],), s, dtype=torch.float64)
        if exact_score:
            d = -s * denoiser.score(xt, sig)
        else:
            d = (xt - denoiser(xt, sig, **cond)) / s
        return d.reshape(-1).numpy()

    y0 = x.detach().to(torch.float64).reshape(-1).numpy()
    sol = solve_ivp(rhs, (float(sigmas[0]), float(sigmas[-1])), y0, method="DOP853", rtol=rtol, atol=atol,
                    t_eval=sigmas.numpy() if return_path else None)
    if not sol.success:
        raise RuntimeError(f"reference ODE failed: {sol.message}")
    if return_path:
        return torch.from_numpy(sol.y.T.copy()).reshape(len(sigmas), *shape).to(dtype)
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape).to(dtype)
