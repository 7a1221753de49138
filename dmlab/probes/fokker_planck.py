"""The Fokker-Planck residual of a learned score, the regulariser that shrinks it, and the ODE-SDE gap it explains.

Deveney, Stanczuk, Kreusser, Budd, Schönlieb, "Closing the ODE-SDE gap in score-based diffusion models through the
Fokker-Planck equation", Phil. Trans. R. Soc. A 2025 (paper 15). In dmlab's VE convention ``x = x0 + sigma eps``
the noised marginals obey the heat equation ``d_sigma p = sigma Laplacian p``, so ``u = log p_sigma`` and its score
``s = grad u`` satisfy::

    log-density form   R_u = d_sigma u - sigma (Laplacian u + |grad u|^2)              = 0,
    score form         R_s = d_sigma s - sigma grad(div s + |s|^2)                    = 0.

A learned score need not satisfy them: then the probability-flow ODE and the reverse SDE driven by the same score
transport the noise to *different* distributions (the paper bounds their distance by the residual). The residual is
computed with autograd: ``d_sigma`` by a Jacobian-vector product, ``div s`` exactly (``d`` backward passes, low
dimension) or by Hutchinson's estimator (higher dimension). The paper's remedy parametrises the log-density (a
*conservative* model, ``dmlab.zoo.toy.ToyMLP(conservative=True)``) and adds ``w E[R_u^2]`` to denoising score
matching (:func:`fp_regulariser`); the score-form residual is the "score FPE" of Lai et al. 2023 (FP-Diffusion).

Residuals are reported in scale-free units: ``sigma R_u`` and ``sigma^2 R_s`` (derivatives in ``log sigma``, scores
multiplied by sigma), which stay O(1) across noise levels.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .fields import divergence, energy_distance, score_of

__all__ = ["score_fp_residual", "log_fp_residual", "fp_regulariser", "ode_sde_gap"]


def _prep(x: Tensor, sigma) -> tuple[Tensor, Tensor]:
    from ..denoisers import as_sigma

    if not isinstance(x, Tensor) or x.ndim != 2 or not x.dtype.is_floating_point:
        raise ValueError("x must be a floating tensor of points [B, d] (flatten images first)")
    sig = as_sigma(sigma, x)
    if (sig <= 0).any():
        raise ValueError("the Fokker-Planck residual is taken at sigma > 0")
    xr = x if x.requires_grad else x.detach().requires_grad_(True)
    sr = sig if sig.requires_grad else sig.detach().clone().requires_grad_(True)
    return xr, sr


def _d_sigma(y: Tensor, sigma: Tensor, create_graph: bool) -> Tensor:
    """Per-sample ``d y_b / d sigma_b`` for ``y`` ``[B, d]`` (row b depends on sigma_b only): a JVP by double backward."""
    v = torch.ones_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(y, sigma, grad_outputs=v, create_graph=True)
    (j,) = torch.autograd.grad(g, v, grad_outputs=torch.ones_like(g), create_graph=create_graph)
    return j


def score_fp_residual(score: Callable, x: Tensor, sigma, *, method: str = "auto", n_probes: int = 1,
                      generator: torch.Generator | None = None, create_graph: bool = False,
                      scaled: bool = True) -> Tensor:
    """The score Fokker-Planck residual ``R_s = d_sigma s - sigma grad(div s + |s|^2)`` ``[B, d]`` (paper 15; the
    score FPE of Lai et al. 2023), ``sigma^2 R_s`` when ``scaled``.

    ``score`` is ``s(x, sigma)`` (:func:`dmlab.probes.fields.score_of` of a denoiser, or an exact ``.score``);
    ``method``: ``"exact"`` divergence, ``"hutchinson"`` with ``n_probes`` Rademacher probes (unbiased, noisy), or
    ``"auto"`` (exact up to 8 dimensions). Zero for the exact score of any distribution (up to float rounding).
    """
    if method == "auto":
        method = "exact" if x.shape[-1] <= 8 else "hutchinson"
    with torch.enable_grad():
        xr, sr = _prep(x, sigma)
        s = score(xr, sr)
        if s.shape != xr.shape:
            raise ValueError(f"score must return [B, d] = {tuple(xr.shape)}, got {tuple(s.shape)}")
        ds = _d_sigma(s, sr, create_graph)
        q = divergence(s, xr, method=method, n_probes=n_probes, generator=generator) + (s ** 2).sum(1)
        (gq,) = torch.autograd.grad(q.sum(), xr, create_graph=create_graph)
        r = ds - sr[:, None] * gq
    r = r * sr.detach()[:, None] ** 2 if scaled else r
    return r if create_graph else r.detach()


def log_fp_residual(log_density: Callable, x: Tensor, sigma, *, create_graph: bool = False,
                    scaled: bool = True) -> Tensor:
    """The log-density Fokker-Planck residual ``R_u = d_sigma u - sigma (Laplacian u + |grad u|^2)`` ``[B]`` of a
    log-density model ``u(x, sigma)`` (paper 15's PINN residual, written for the VE heat equation), ``sigma R_u``
    when ``scaled``. Exact Laplacian (``d`` backward passes). Zero for ``u = log p_sigma`` of any distribution;
    its gradient in ``x`` is the score-form residual."""
    with torch.enable_grad():
        xr, sr = _prep(x, sigma)
        u = log_density(xr, sr)
        if u.shape != (xr.shape[0],):
            raise ValueError(f"log_density must return [B] = [{xr.shape[0]}], got {tuple(u.shape)}")
        (du,) = torch.autograd.grad(u.sum(), sr, create_graph=True)
        (gu,) = torch.autograd.grad(u.sum(), xr, create_graph=True)
        lap = divergence(gu, xr, method="exact", create_graph=create_graph)
        r = du - sr * (lap + (gu ** 2).sum(1))
    r = r * sr.detach() if scaled else r
    return r if create_graph else r.detach()


def fp_regulariser(weight: float, *, kind: str = "log", n_points: int | None = 64,
                   sigma_min: float = 0.05, method: str = "auto") -> Callable:
    """The Fokker-Planck penalty of paper 15 as a training hook for :func:`dmlab.zoo.toy.train_toy`:
    ``weight * mean(R^2)`` at the first ``n_points`` noisy training points of the batch with ``sigma >= sigma_min``
    (the residual of tiny sigmas is dominated by sampling noise and costs the most).

    ``kind="log"``: the paper's log-density residual (needs a conservative toy denoiser, whose potential
    :func:`dmlab.zoo.toy.log_density` is the model's ``u``); ``kind="score"``: the score-form residual of any
    denoiser (Lai et al. 2023).
    """
    if not weight >= 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if kind not in ("log", "score"):
        raise ValueError(f"kind must be 'log' or 'score', got {kind!r}")

    def reg(denoiser, x0, x, sigma, generator):
        if weight == 0:
            return x.new_zeros(())
        keep = sigma >= sigma_min
        xs, ss = x[keep], sigma[keep]
        if n_points is not None:
            xs, ss = xs[:n_points], ss[:n_points]
        if len(xs) == 0:
            return x.new_zeros(())
        if kind == "log":
            from ..zoo.toy import log_density

            r = log_fp_residual(lambda y, s: log_density(denoiser, y, s), xs, ss, create_graph=True)
            return weight * (r ** 2).mean()
        r = score_fp_residual(score_of(denoiser), xs, ss, method=method, generator=generator, create_graph=True)
        return weight * (r ** 2).sum(1).mean()

    return reg


def ode_sde_gap(denoiser: Callable, n: int, *, generator: torch.Generator, sigmas_ode: Tensor,
                sigmas_sde: Tensor, dim: int = 2, log_prob: Callable | None = None,
                reference: Tensor | None = None, dtype: torch.dtype = torch.float64) -> dict:
    """Sample the same model with the probability-flow ODE (Heun) and the reverse SDE (Euler-Maruyama) and measure
    how far apart the two sample sets are (the ODE-SDE gap of paper 15).

    Returns ``{"ode": [n, dim], "sde": [n, dim], "ed_ode_sde": energy distance between them}`` plus, with
    ``log_prob`` (the true data log-density), ``"loglik_ode"``, ``"loglik_sde"`` (mean log-likelihood of each
    sample set under the truth) and ``"loglik_gap"`` (their difference), and with ``reference`` samples of the data,
    ``"ed_ode"`` and ``"ed_sde"`` (energy distance of each to the data). Both samplers start from independent noise
    drawn from ``generator``.
    """
    from ..samplers import sample_heun
    from .density import sample_reverse_sde

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    x_ode = sample_heun(denoiser, sigmas_ode[0] * torch.randn(n, dim, generator=generator, dtype=dtype),
                        sigmas_ode.to(dtype))
    x_sde = sample_reverse_sde(denoiser, sigmas_sde[0] * torch.randn(n, dim, generator=generator, dtype=dtype),
                               sigmas_sde.to(dtype), generator=generator)
    out = {"ode": x_ode, "sde": x_sde, "ed_ode_sde": energy_distance(x_ode, x_sde)}
    if log_prob is not None:
        lo, ls = float(log_prob(x_ode).mean()), float(log_prob(x_sde).mean())
        out.update(loglik_ode=lo, loglik_sde=ls, loglik_gap=lo - ls)
    if reference is not None:
        out.update(ed_ode=energy_distance(x_ode, reference), ed_sde=energy_distance(x_sde, reference))
    return out
