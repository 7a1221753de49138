"""First- and second-order solvers of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``.

Karras et al. 2022 (EDM), Algorithm 1 without stochastic churn: Euler (order 1, one NFE per step) and Heun
(order 2, two NFEs per step except the last, where ``sigma_next = 0`` and Heun's correction would divide by 0).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._common import prepare, report


@torch.no_grad()
def sample_euler(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                 generator: torch.Generator | None = None, callback: Callable | None = None) -> Tensor:
    """Euler steps ``x <- x + (sigma_next - sigma) (x - D(x, sigma)) / sigma`` (EDM Alg. 1, first order).

    One NFE per step (``nfe = n_steps``); the last step lands on ``D(x, sigma_last)`` exactly. ``generator`` is
    accepted for the shared signature and unused (the sampler is deterministic).
    """
    sigmas, cond, sig = prepare(denoiser, x, sigmas, cond, generator, floats=True)  # sig: floats for the arithmetic
    batch = sigmas[:, None].expand(-1, x.shape[0])  # [B] sigmas for the denoiser
    for i in range(len(sig) - 1):
        denoised = denoiser(x, batch[i], **cond)
        report(callback, i, x, sigmas[i], sigmas[i + 1], denoised)
        x = torch.add(x, torch.sub(x, denoised), alpha=(sig[i + 1] - sig[i]) / sig[i])
    return x


@torch.no_grad()
def sample_heun(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                generator: torch.Generator | None = None, callback: Callable | None = None) -> Tensor:
    """Heun's method (EDM Alg. 1, second order): an Euler predictor and a trapezoidal corrector.

    ``nfe = 2 n_steps - 1``: the final step to ``sigma = 0`` is a plain Euler step. The model is never evaluated at 0.
    """
    sigmas, cond, sig = prepare(denoiser, x, sigmas, cond, generator, floats=True)  # sig: floats for the arithmetic
    batch = sigmas[:, None].expand(-1, x.shape[0])  # [B] sigmas for the denoiser
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch[i], **cond)
        report(callback, i, x, sigmas[i], sigmas[i + 1], denoised)
        h = s_next - s
        r = torch.sub(x, denoised)  # slope d = r / s
        x_pred = torch.add(x, r, alpha=h / s)
        if s_next == 0:
            x = x_pred
        else:  # trapezoid: x + h (d + d_next) / 2, with d_next = r_next / s_next
            r_next = torch.sub(x_pred, denoiser(x_pred, batch[i + 1], **cond))
            x = torch.add(x, r, alpha=h / (2 * s)).add_(r_next, alpha=h / (2 * s_next))
    return x
