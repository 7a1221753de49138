"""Vector-field helpers shared by the probes: the score of a denoiser, Jacobians, divergences, adding a field to a
denoiser, and the energy distance between sample sets.

A learned score is read off a denoiser with Tweedie's formula ``s(x, sigma) = (D(x, sigma) - x) / sigma^2``
(Efron 2011; Karras et al. 2022, eq. 3); exact denoisers (:mod:`dmlab.exact`) expose their closed-form ``score``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["score_of", "add_field", "jacobian", "divergence", "energy_distance"]


def score_of(denoiser: Callable, **cond) -> Callable:
    """``s(x, sigma) -> [B, ...]``: the closed-form ``denoiser.score`` when it has one, else Tweedie's
    ``(D(x, sigma) - x) / sigma^2``. ``cond`` is passed to every call (e.g. ``class_labels=...``).
    Differentiable in ``x`` and ``sigma`` (the probes of papers 15, 31 and 59 take derivatives through it)."""
    if not callable(denoiser):
        raise TypeError("denoiser must be callable: D(x, sigma, **cond)")
    from ..denoisers import as_sigma, bcast

    exact = getattr(denoiser, "score", None)

    def score(x: Tensor, sigma) -> Tensor:
        sigma = as_sigma(sigma, x)
        if (sigma <= 0).any():
            raise ValueError("the score is taken at sigma > 0; end schedules at a small positive sigma")
        if callable(exact):
            return exact(x, sigma, **cond)
        return (denoiser(x, sigma, **cond) - x) / bcast(sigma, x) ** 2

    return score


def add_field(denoiser: Callable, field: Callable) -> Callable:
    """A Denoiser -> Denoiser transformer that adds ``field(x, sigma)`` to the denoiser's score:
    ``D'(x, sigma) = D(x, sigma) + sigma^2 field(x, sigma)``, so ``s' = s + field`` (Horvat & Pfister 2024, paper 59:
    a gauge field leaves the sampled marginals unchanged, any other field does not)."""
    if not callable(denoiser) or not callable(field):
        raise TypeError("denoiser and field must be callable: D(x, sigma, **cond), field(x, sigma)")
    from ..denoisers import as_sigma, bcast

    def shifted(x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x)
        return denoiser(x, sigma, **cond) + bcast(sigma, x) ** 2 * field(x, sigma)

    return shifted


def jacobian(fn: Callable, x: Tensor, *args, create_graph: bool = False) -> Tensor:
    """Per-sample Jacobian ``d fn(x)_b / d x_b`` ``[B, d, d]`` of a map ``[B, d] -> [B, d]`` whose samples do not
    interact (one backward pass per output dimension); the denoiser Jacobian of the intrinsic-dimension probe of
    paper 59."""
    if x.ndim != 2:
        raise ValueError(f"x must be [B, d] (flatten images first), got {tuple(x.shape)}")
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True) if not x.requires_grad else x
        y = fn(xr, *args)
        if y.shape != xr.shape:
            raise ValueError(f"fn must map [B, d] to [B, d], got {tuple(y.shape)} from {tuple(xr.shape)}")
        rows = [torch.autograd.grad(y[:, i].sum(), xr, retain_graph=True, create_graph=create_graph)[0]
                for i in range(y.shape[1])]
    return torch.stack(rows, dim=1)


def divergence(y: Tensor, x: Tensor, *, method: str = "exact", n_probes: int = 1,
               generator: torch.Generator | None = None, create_graph: bool = True) -> Tensor:
    """``div_x y`` per sample ``[B]`` for ``y = f(x)`` ``[B, d]`` computed from ``x`` (which requires grad).

    ``"exact"``: the trace of the Jacobian, ``d`` backward passes (low dimension). ``"hutchinson"``: the unbiased
    estimate ``mean_v v^T (dy/dx) v`` over ``n_probes`` Rademacher vectors ``v`` (Hutchinson 1989; used for score
    divergences by Grathwohl et al. 2019), one backward pass per probe."""
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
    if y.shape != x.shape or y.ndim != 2:
        raise ValueError("y and x must both be [B, d]")
    if method == "exact":
        return sum(torch.autograd.grad(y[:, i].sum(), x, retain_graph=True, create_graph=create_graph)[0][:, i]
                   for i in range(y.shape[1]))
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an int >= 1, got {n_probes!r}")
    total = 0
    for _ in range(n_probes):
        v = (torch.randint(0, 2, y.shape, generator=generator) * 2 - 1).to(device=y.device, dtype=y.dtype)
        (g,) = torch.autograd.grad(y, x, grad_outputs=v, retain_graph=True, create_graph=create_graph)
        total = total + (g * v).sum(1)
    return total / n_probes


def energy_distance(a: Tensor, b: Tensor) -> float:
    """Energy distance ``2 E|a - b| - E|a - a'| - E|b - b'|`` between two sample sets ``[N, d]``, ``[M, d]``
    (Székely & Rizzo 2013): zero iff the distributions agree; its finite-sample floor is ``O(1/N)``."""
    a = a.reshape(len(a), -1).to(torch.float64)
    b = b.reshape(len(b), -1).to(torch.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).sum() / (len(a) * (len(a) - 1))
    bb = torch.cdist(b, b).sum() / (len(b) * (len(b) - 1))
    return float(2 * ab - aa - bb)
