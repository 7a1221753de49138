"""First- and second-order solvers of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``.

Karras et al. 2022 (EDM), Algorithm 1 without stochastic churn: Euler (order 1, one NFE per step) and Heun
(order 2, two NFEs per step except the last, where ``sigma_next = 0`` and Heun's correction would divide by 0).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._common import model_in, per_step_sigmas, prepare, report, work_dtype

__all__ = ["sample_euler", "sample_heun"]


@torch.no_grad()
def sample_euler(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                 generator: torch.Generator | None = None, callback: Callable | None = None) -> Tensor:
    """Euler steps of ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM Alg. 1 without churn, first order).

    One NFE per step (``nfe = n_steps``); the last step lands on ``D(x, sigma_last)`` exactly. ``generator`` is
    accepted for the shared signature and unused (the sampler is deterministic). The update is computed in float32
    (float64 for float64 input) and returned in ``x``'s dtype.
    """
    sigmas, cond, sig = prepare(denoiser, x, sigmas, cond, generator, floats=True)  # sig: floats for the arithmetic
    batch, xw = per_step_sigmas(sigmas, x.shape[0]), x.to(work_dtype(x))
    model = model_in(denoiser, cond, x.dtype, xw.dtype)  # D(x, sigma) in the update's dtype
    for i in range(len(sig) - 1):
        denoised = model(xw, batch[i])
        report(callback, i, xw, sigmas[i], sigmas[i + 1], denoised)
        d = (xw - denoised) / sig[i]  # d_i = (x_i - D(x_i; sigma_i)) / sigma_i
        xw = xw + d * (sig[i + 1] - sig[i])  # x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i
    return xw.to(x.dtype)


@torch.no_grad()
def sample_heun(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                generator: torch.Generator | None = None, callback: Callable | None = None) -> Tensor:
    """Heun's method (EDM Alg. 1, second order): an Euler predictor and a trapezoidal corrector.

    ``nfe = 2 n_steps - 1``: the final step to ``sigma = 0`` is a plain Euler step. The model is never evaluated at 0.
    """
    sigmas, cond, sig = prepare(denoiser, x, sigmas, cond, generator, floats=True)  # sig: floats for the arithmetic
    batch, xw = per_step_sigmas(sigmas, x.shape[0]), x.to(work_dtype(x))
    model = model_in(denoiser, cond, x.dtype, xw.dtype)  # D(x, sigma) in the update's dtype
    for i in range(len(sig) - 1):
        denoised = model(xw, batch[i])
        report(callback, i, xw, sigmas[i], sigmas[i + 1], denoised)
        d = (xw - denoised) / sig[i]  # line 5: d_i = (x_i - D(x_i; t_i)) / t_i
        dt = sig[i + 1] - sig[i]
        x_next = xw + d * dt  # line 6: Euler step to t_{i+1}
        if sig[i + 1] != 0:  # lines 7-8: apply the 2nd-order correction
            denoised_next = model(x_next, batch[i + 1])
            d_prime = (x_next - denoised_next) / sig[i + 1]
            x_next = xw + (d + d_prime) * (0.5 * dt)  # x_{i+1} = x_i + (t_{i+1} - t_i)(d_i / 2 + d'_i / 2)
        xw = x_next
    return xw.to(x.dtype)
