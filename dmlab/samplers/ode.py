"""First- and second-order solvers of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``.

Karras et al. 2022 (EDM), Algorithm 1 without stochastic churn: Euler (order 1, one NFE per step) and Heun
(order 2, two NFEs per step except the last, where ``sigma_next = 0`` and Heun's correction would divide by 0).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._common import call, prepare, report


@torch.no_grad()
def sample_euler(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                 generator: torch.Generator | None = None, callback: Callable | None = None) -> Tensor:
    """Euler steps ``x <- x + (sigma_next - sigma) (x - D(x, sigma)) / sigma`` (EDM Alg. 1, first order).

    One NFE per step (``nfe = n_steps``); the last step lands on ``D(x, sigma_last)`` exactly. ``generator`` is
    accepted for the shared signature and unused (the sampler is deterministic).
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoiser, x, s, cond)
        report(callback, i, x, s, s_next, denoised)
        x = x + (s_next - s) * (x - denoised) / s
    return x


@torch.no_grad()
def sample_heun(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                generator: torch.Generator | None = None, callback: Callable | None = None) -> Tensor:
    """Heun's method (EDM Alg. 1, second order): an Euler predictor and a trapezoidal corrector.

    ``nfe = 2 n_steps - 1``: the final step to ``sigma = 0`` is a plain Euler step. The model is never evaluated at 0.
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoiser, x, s, cond)
        report(callback, i, x, s, s_next, denoised)
        d = (x - denoised) / s
        x_pred = x + (s_next - s) * d
        if s_next == 0:
            x = x_pred
        else:
            d_next = (x_pred - call(denoiser, x_pred, s_next, cond)) / s_next
            x = x + (s_next - s) * (d + d_next) / 2
    return x
