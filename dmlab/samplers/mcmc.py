"""Denoising MCMC (Kim & Ye 2022, "Denoising MCMC for Accelerating Diffusion-Based Generative Models";
official code ``1202kbs/DMCMC``).

DMCMC runs a Markov chain on the *product space* of data and noise level, with target
``pi(x, sigma) = p_sigma(x) pi(sigma)``, and hands each chain state ``(x, sigma)`` to an ordinary reverse-ODE/SDE
integrator that only has to travel from ``sigma`` (not from ``sigma_max``) down to 0. Because the chain stays near
the data manifold, the integration is short. The paper's chain is Denoising Langevin Gibbs (DLG): alternate

1. a Langevin step in ``x`` at the current level, ``x <- x + e s(x, sigma) + sqrt(2 e) z`` with ``e = c sigma^2``
   and the score ``s = (D(x, sigma) - x) / sigma^2`` (one NFE);
2. a Gibbs step for ``sigma`` given ``x``: draw from ``p(sigma | x) ∝ p_sigma(x) pi(sigma)`` on a grid of levels.
   The paper trains a noise-level classifier for it; an exact denoiser (``dmlab.exact``) gives it in closed form
   through ``log_prob``.

:func:`sample_dmcmc` implements DLG plus the integration; :func:`sigma_posterior_exact` is the exact Gibbs
distribution.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..denoisers import bcast
from ._common import call, half_safe, prepare, randn_like, report

__all__ = ["sample_dmcmc", "sigma_posterior_exact"]


def sigma_posterior_exact(denoiser, x: Tensor, grid: Tensor, log_prior: Tensor) -> Tensor:
    """Log-probabilities ``[B, K]`` of ``p(sigma_k | x) ∝ p_sigma_k(x) pi_k`` from an exact ``denoiser.log_prob``."""
    lp = torch.stack([denoiser.log_prob(x, s.expand(x.shape[0])) for s in grid.to(torch.float64)], dim=1)
    return torch.log_softmax(lp + log_prior.to(lp), dim=1)


@half_safe
@torch.no_grad()
def sample_dmcmc(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                 generator: torch.Generator | None = None, callback: Callable | None = None,
                 grid: Tensor | None = None, log_prior: Tensor | None = None, n_samples: int = 1, burn_in: int = 20,
                 thin: int = 5, step: float = 0.1, integrator: Callable | None = None,
                 sigma_posterior: Callable | None = None, return_info: bool = False):
    """Denoising Langevin Gibbs (Kim & Ye 2022, Alg. 1 "DLG") followed by integration from each chain's level.

    Args:
        x: ``[B, ...]`` the chains' start at ``grid[0]`` (e.g. ``grid[0] * randn``); ``B`` chains run in parallel.
        sigmas: the integrator's schedule (strictly decreasing, ending in 0); every chain level must be one of its
            entries, and a chain at ``sigmas[j]`` is integrated with ``integrator(denoiser, x, sigmas[j:])``.
        grid: the levels the chain may visit (default ``sigmas[:-1]``), each an entry of ``sigmas``.
        log_prior: ``[K]`` log prior ``pi(sigma)`` over ``grid`` (default uniform). The chain's levels are
            distributed as ``pi`` at equilibrium, so the prior sets the integration cost.
        n_samples, burn_in, thin: after ``burn_in`` DLG iterations a state is taken every ``thin`` iterations, until
            ``n_samples`` per chain (returned chain-major: ``[n_samples * B, ...]``, sample ``j`` of every chain
            together).
        step: the Langevin step ``e = step * sigma^2``.
        integrator: any dmlab sampler (default :func:`~dmlab.samplers.sample_heun`); stochastic ones get
            ``generator``.
        sigma_posterior: ``f(x, grid, log_prior) -> [B, K]`` log-probabilities of the Gibbs step (a noise-level
            classifier); default :func:`sigma_posterior_exact`, which needs ``denoiser.log_prob``.
        return_info: also return ``{"nfe_chain", "nfe_integrate", "nfe_per_sample", "levels", "states"}`` (the chain
            states handed to the integrator, and their levels).

    One NFE per DLG iteration (the Gibbs step is not counted: it costs a small classifier in the paper and nothing
    here), plus the integrator's NFE from each level.
    """
    from .ode import sample_heun

    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    integrator = sample_heun if integrator is None else integrator
    if not callable(integrator):
        raise TypeError("integrator must be a dmlab sampler: integrator(denoiser, x, sigmas, ...)")
    grid = sigmas[:-1] if grid is None else torch.as_tensor(grid, dtype=sigmas.dtype, device=sigmas.device)
    if grid.ndim != 1 or len(grid) < 1 or (grid <= 0).any():
        raise ValueError("grid must be a 1-D tensor of positive sigmas (the levels the chain may visit)")
    idx = [int((sigmas - g).abs().argmin()) for g in grid]
    if any(not torch.isclose(sigmas[j], g, rtol=1e-6, atol=0) for j, g in zip(idx, grid)):
        raise ValueError("every grid level must be an entry of sigmas (the chain hands its state to the integrator "
                         "at that entry); build the schedule first and take grid = sigmas[a:b]")
    K = len(grid)
    log_prior = torch.zeros(K, dtype=torch.float64) if log_prior is None else torch.as_tensor(log_prior, dtype=torch.float64)
    if log_prior.shape != (K,) or torch.isnan(log_prior).any():
        raise ValueError(f"log_prior must have shape [K] = [{K}] (one log-weight per grid level)")
    for name, v, lo in (("n_samples", n_samples, 1), ("burn_in", burn_in, 0), ("thin", thin, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(step, (int, float)) or not step > 0:
        raise ValueError(f"step must be positive (Langevin step = step * sigma^2), got {step!r}")
    if sigma_posterior is None:
        if not hasattr(denoiser, "log_prob"):
            raise TypeError("the exact Gibbs step needs denoiser.log_prob (a dmlab.exact denoiser); for a network "
                            "pass sigma_posterior=f(x, grid, log_prior) -> [B, K] log-probabilities (a noise classifier)")
        sigma_posterior = lambda xx, gg, lp: sigma_posterior_exact(denoiser, xx, gg, lp)  # noqa: E731

    B = x.shape[0]
    level = torch.zeros(B, dtype=torch.long)  # chains start at grid[0]
    states, levels = [], []
    n_iter = burn_in + (n_samples - 1) * thin + 1
    for it in range(n_iter):
        s = grid[level].to(x.dtype)
        denoised = call(denoiser, x, s, cond)
        report(callback, it, x, s, s, denoised)
        e = bcast(step * s ** 2, x)
        x = x + e * (denoised - x) / bcast(s, x) ** 2 + (2 * e).sqrt() * randn_like(x, generator)
        logp = sigma_posterior(x, grid, log_prior).to(torch.float64)
        level = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1).cpu()
        if it >= burn_in and (it - burn_in) % thin == 0:
            states.append(x.clone())
            levels.append(level.clone())
    xs, lv = torch.cat(states), torch.cat(levels)
    out = torch.empty_like(xs)
    nfe_int = 0
    for k in lv.unique().tolist():
        m = lv == k
        sub = {key: (val.repeat(n_samples, *[1] * (val.ndim - 1))[m] if isinstance(val, Tensor) and val.ndim
                     and val.shape[0] == B else val) for key, val in cond.items()}
        count = _Counter(denoiser)
        kw = {"generator": generator} if _takes_generator(integrator) else {}
        out[m] = integrator(count, xs[m], sigmas[idx[k]:], cond=sub, **kw)
        nfe_int += count.calls * int(m.sum())
    if not return_info:
        return out
    n = len(out)
    return out, {"nfe_chain": n_iter, "nfe_integrate": nfe_int / n, "nfe_per_sample": n_iter / n_samples + nfe_int / n,
                 "levels": grid[lv], "states": xs}


class _Counter:
    """Counts batched calls (one call = one NFE for every sample in the batch)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


def _takes_generator(fn) -> bool:
    import inspect

    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
