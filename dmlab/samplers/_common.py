"""What every sampler shares: input checks, the per-step callback, calling the denoiser with ``cond``."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..schedules import schedule_floats


def prepare(denoiser: Callable, x: Tensor, sigmas: Tensor, cond: dict | None, generator, *, min_steps: int = 1,
            floats: bool = False):
    """Validate the shared arguments; return ``(sigmas on x's device/dtype, cond dict)``, and with ``floats`` also the
    schedule as a list of Python floats (for step arithmetic and branching without tensor ops)."""
    if not callable(denoiser):
        raise TypeError("denoiser must be callable: D(x, sigma[B], **cond) -> x0_hat (see dmlab.denoisers)")
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise TypeError("x must be a torch.Tensor of shape [B, ...] (the starting noise times sigmas[0])")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    lst = schedule_floats(sigmas, min_steps=min_steps)
    if cond is not None and not isinstance(cond, dict):
        raise TypeError("cond must be a dict of keyword arguments for the denoiser, e.g. {'class_labels': y}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    out = sigmas.to(device=x.device, dtype=x.dtype), dict(cond or {})
    return (*out, lst) if floats else out


def call(denoiser: Callable, x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
    """``denoiser(x, sigma[B], **cond)``."""
    return denoiser(x, sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma, **cond)


def report(callback, i, x, sigma, sigma_next, denoised) -> None:
    """Check the denoiser's output has ``x``'s shape (a broadcastable wrong shape would silently give wrong samples),
    then invoke a callback with the k-diffusion dict ``{i, x, sigma, sigma_next, denoised}``."""
    if denoised.shape != x.shape:
        raise ValueError(f"the denoiser returned shape {tuple(denoised.shape)} for x of shape {tuple(x.shape)}; a "
                         "Denoiser must return x0_hat with x's shape (see dmlab.denoisers)")
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def randn_like(x: Tensor, generator) -> Tensor:
    """Unit Gaussian noise shaped like ``x``, drawn on the CPU from ``generator`` (same bits everywhere)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype a sampler's update is computed in: float64 for float64 input, float32 otherwise (float16 and
    bfloat16 states lose the small differences multistep solvers are made of)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_step_sigmas(sigmas: Tensor, batch: int) -> tuple:
    """The ``[B]`` sigma tensor of each step, made once (a view per step: no per-step allocation)."""
    return sigmas[:, None].expand(len(sigmas), batch).unbind(0)


def model_in(denoiser: Callable, cond: dict | None, dtype: torch.dtype, work: torch.dtype) -> Callable:
    """``model(x, sigma) = D(x, sigma, **cond)`` called in the model's ``dtype`` (x's), returning the ``work`` dtype
    of the update; no wrapper at all when both agree and there is no ``cond`` (no per-step cost). With
    ``cond=None`` the model takes the condition itself: ``model(x, sigma, **cond)``."""
    if dtype == work:
        return (lambda x, s: denoiser(x, s, **cond)) if cond else denoiser
    if cond is None:
        return _InDtype(denoiser, dtype, work)
    return lambda x, s: denoiser(x.to(dtype), s.to(dtype), **cond).to(work)


class _InDtype:
    """``D(x, sigma, **cond)`` called in ``dtype``, returning ``work``; other attributes (``log_prob``, ...) are the
    denoiser's own."""

    def __init__(self, denoiser: Callable, dtype: torch.dtype, work: torch.dtype):
        self.denoiser, self.dtype, self.work = denoiser, dtype, work

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return self.denoiser(x.to(self.dtype), sigma.to(self.dtype), **cond).to(self.work)

    def __getattr__(self, name):
        return getattr(self.denoiser, name)


def half_safe(sampler: Callable) -> Callable:
    """Run a sampler written in x's dtype in the work dtype (:func:`work_dtype`) when x is float16/bfloat16: the
    state, the noise and every update in float32, the denoiser called with x in its own half dtype
    (:func:`model_in`), the result returned in x's dtype. Half precision loses the small differences multistep and
    momentum updates are made of, and overflows or divides 0/0 in the stochastic samplers' step sizes. The loops
    of the ODE solvers do the same inline (``work_dtype`` + ``model_in``); this is the wrapper for the others.
    The arguments are checked in x's dtype first (a schedule that overflows it is refused as without the wrapper).
    """
    import functools

    @functools.wraps(sampler)
    def run(denoiser: Callable, x: Tensor, sigmas: Tensor, *args, **kwargs) -> Tensor:
        if not (isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16) and callable(denoiser)):
            return sampler(denoiser, x, sigmas, *args, **kwargs)
        prepare(denoiser, x, sigmas, kwargs.get("cond"), kwargs.get("generator"))
        work = work_dtype(x)
        out = sampler(model_in(denoiser, None, x.dtype, work), x.to(work), sigmas, *args, **kwargs)
        if isinstance(out, tuple):  # (samples, info): the samples in x's dtype
            return (out[0].to(x.dtype), *out[1:])
        return out.to(x.dtype)

    return run
