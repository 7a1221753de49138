"""MRS: fast samplers for mean-reverting diffusion (Li et al. 2025, "MRS: A Fast Sampler for Mean Reverting
Diffusion based on ODE and SDE Solvers", ICLR; official code ``grrrute/mr-sampler``).

A mean-reverting SDE (IR-SDE, Luo et al. 2023) ``dx = theta (mu - x) dt + g dW`` with ``g^2 = 2 lam^2 theta``
pulls a clean image ``x0`` towards a degraded one ``mu``; its marginal is
``x_t = mu + alpha(t) (x0 - mu) + lam sqrt(1 - alpha^2) eps`` with ``alpha = exp(-theta t)``. Restoration samples
it backwards from ``N(mu, lam^2 I)``, originally with 100+ Euler-Maruyama steps. In dmlab's convention
``y = (x_t - mu) / alpha = (x0 - mu) + sigma eps`` with ``sigma = lam sqrt(1 - alpha^2) / alpha``: the
mean-reverting process *is* a VE diffusion of ``x0 - mu``, and MRS's semi-analytic ODE/SDE solutions are the
DPM-Solver++ (data prediction) updates applied to ``x - mu`` (the paper's eq. 13/18, checked in the tests).

* :class:`MeanReverting` - the process (constant ``theta``, stationary std ``lam``) and its conversions.
* :func:`mr_denoiser` - a model ``D_mr(x_t, t) -> x0_hat`` in mean-reverting coordinates as a VE denoiser of
  ``x0 - mu``; :func:`exact_mr_model` - the other way, from an exact dmlab denoiser of the clean data.
* :func:`sample_mrs` - MRS-ODE (orders 1-3) and MRS-SDE (orders 1-2); :func:`sample_mr_euler_maruyama` - the
  IR-SDE baseline (Euler-Maruyama in ``t``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..denoisers import as_sigma, bcast
from ._common import randn_like

__all__ = ["MeanReverting", "mr_denoiser", "exact_mr_model", "sample_mrs", "sample_mr_euler_maruyama", "mr_times"]


@dataclass(frozen=True)
class MeanReverting:
    """``dx = theta (mu - x) dt + sqrt(2 lam^2 theta) dW`` on ``t in [0, 1]``; ``alpha(t) = exp(-theta t)``."""

    theta: float = 5.0
    lam: float = 1.0

    def __post_init__(self):
        if not self.theta > 0 or not self.lam > 0:
            raise ValueError(f"theta and lam must be positive, got theta={self.theta}, lam={self.lam}")

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-self.theta * torch.as_tensor(t, dtype=torch.float64))

    def std(self, t: Tensor) -> Tensor:
        """The noise std of ``x_t``: ``lam sqrt(1 - alpha^2)``."""
        return self.lam * (-torch.expm1(-2 * self.theta * torch.as_tensor(t, dtype=torch.float64))).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        """The VE noise level of ``y = (x_t - mu) / alpha``: ``lam sqrt(1 - alpha^2) / alpha``."""
        return self.std(t) / self.alpha(t)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.log1p((s / self.lam) ** 2) / (2 * self.theta)

    def marginal(self, x0: Tensor, mu: Tensor, t: float, eps: Tensor) -> Tensor:
        """``x_t = mu + alpha (x0 - mu) + std eps``."""
        return mu + float(self.alpha(t)) * (x0 - mu) + float(self.std(t)) * eps


def mr_times(n_steps: int, process: "MeanReverting | None" = None, *, t_max: float = 1.0, sigma_min: float = 0.002,
             spacing: str = "lambda") -> Tensor:
    """``n_steps + 1`` decreasing times from ``t_max`` to the time of ``sigma_min``, then 0.

    ``spacing="lambda"``: uniform in ``log sigma`` (the grid exponential integrators want, DPM-Solver's "logSNR");
    ``"t"``: uniform in ``t`` (the IR-SDE grid).
    """
    process = MeanReverting() if process is None else process
    if not isinstance(n_steps, int) or n_steps < 1 or not 0 < t_max <= 1:
        raise ValueError("need a positive int n_steps and 0 < t_max <= 1")
    s_max = float(process.sigma(torch.tensor(t_max)))
    if not 0 < sigma_min < s_max:
        raise ValueError(f"need 0 < sigma_min < sigma(t_max) = {s_max:.4g}")
    t_min = float(process.t_of_sigma(torch.tensor(sigma_min)))
    if spacing == "lambda":
        s = torch.linspace(math.log(s_max), math.log(sigma_min), n_steps, dtype=torch.float64).exp()
        ts = process.t_of_sigma(s)
        ts[0] = t_max
    elif spacing == "t":
        ts = torch.linspace(t_max, t_min, n_steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; use 'lambda' or 't'")
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


def mr_denoiser(model: Callable, mu: Tensor, process: MeanReverting) -> Callable:
    """A VE denoiser of ``x0 - mu`` from a data-prediction model ``model(x_t, t, **cond) -> x0_hat`` (``t`` ``[B]``)."""

    def denoiser(y: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, y)
        t = process.t_of_sigma(sigma).to(y.dtype)
        x_t = mu + bcast(process.alpha(t).to(y.dtype), y) * y
        return model(x_t, t, **cond) - mu

    return denoiser


def exact_mr_model(denoiser: Callable, process: MeanReverting) -> Callable:
    """``model(x_t, t, mu=...) -> E[x0 | x_t]`` of the mean-reverting process from an exact denoiser of ``x0``.

    ``y = (x_t - mu) / alpha = (x0 - mu) + sigma eps``, so ``E[x0 | x_t] = D(y + mu, sigma)`` (shifting the data
    by ``-mu`` shifts the denoiser).
    """

    def model(x_t: Tensor, t: Tensor, *, mu: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        a = bcast(process.alpha(t).to(x_t.dtype), x_t)
        return denoiser((x_t - mu) / a + mu, process.sigma(t).to(x_t.dtype))

    return model


def _check_times(ts: Tensor) -> Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or len(ts) < 2 or ts[-1] != 0 or not (ts[1:] < ts[:-1]).all() or ts[0] > 1:
        raise ValueError("ts must be a 1-D strictly decreasing tensor of times in (0, 1] ending in 0 "
                         "(use dmlab.samplers.mrs.mr_times(n, process))")
    return ts


@torch.no_grad()
def sample_mrs(model: Callable, x: Tensor, mu: Tensor, ts: Tensor, *, process: MeanReverting | None = None,
               order: int = 2, stochastic: bool = False, cond: dict | None = None,
               generator: torch.Generator | None = None, callback: Callable | None = None,
               noise_sampler: Callable | None = None) -> Tensor:
    """MRS (Li et al. 2025): the semi-analytic ODE (orders 1-3) or SDE (orders 1-2) solver of mean-reverting diffusion.

    ``x`` is the start at ``ts[0]`` (e.g. ``mu + lam * randn``), ``mu`` the degraded image (the process's mean),
    ``model(x_t, t, **cond) -> x0_hat`` a data-prediction model in mean-reverting coordinates (wrap a noise or
    velocity model by the usual conversions). The state becomes ``y = (x - mu) / alpha`` and the times VE sigmas;
    the ODE is DPM-Solver++(k)M (``dmlab.samplers.exponential``), the SDE SDE-DPM-Solver++
    (:func:`~dmlab.samplers.sde.sample_dpmpp_2m_sde`), each on ``y``; then ``x = mu + y`` at ``t = 0``. One NFE per
    step; the last step returns ``x0_hat``. ``noise_sampler`` (SDE only) as in :mod:`dmlab.samplers.sde`.
    """
    process = MeanReverting() if process is None else process
    ts = _check_times(ts)
    if order not in ((1, 2, 3) if not stochastic else (1, 2)) or isinstance(order, bool):
        raise ValueError(f"order must be 1, 2 or 3 for the ODE and 1 or 2 for the SDE, got {order!r}")
    sigmas = process.sigma(ts).to(x.dtype)
    y = (x - mu) / float(process.alpha(ts[0]))
    den = mr_denoiser(model, mu, process)
    kw = dict(cond=cond, callback=callback)
    if stochastic:
        from .sde import sample_dpmpp_2m_sde

        y = sample_dpmpp_2m_sde(den, y, sigmas, generator=generator, order=order, noise_sampler=noise_sampler, **kw)
    else:
        from .exponential import sample_dpm_solver_multistep

        y = sample_dpm_solver_multistep(den, y, sigmas, order=order, prediction="data", **kw)
    return mu + y


@torch.no_grad()
def sample_mr_euler_maruyama(model: Callable, x: Tensor, mu: Tensor, ts: Tensor, *,
                             process: MeanReverting | None = None, cond: dict | None = None,
                             generator: torch.Generator | None = None, noise_sampler: Callable | None = None) -> Tensor:
    """The IR-SDE sampler (Luo et al. 2023): Euler-Maruyama in ``t`` on the reverse mean-reverting SDE.

    ``dx = [theta (mu - x) - g^2 score] dt + g dW_bar`` with ``g^2 = 2 lam^2 theta`` and the score
    ``-(x - mu - alpha (x0_hat - mu)) / std^2``; the last step to ``t = 0`` returns ``x0_hat``. One NFE per step.
    """
    process = MeanReverting() if process is None else process
    ts = _check_times(ts)
    cond = dict(cond or {})
    g2 = 2 * process.lam ** 2 * process.theta
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        x0 = model(x, t.expand(x.shape[0]).to(x.dtype), **cond)
        if t_next == 0:
            x = x0
            break
        a, sd = float(process.alpha(t)), float(process.std(t))
        score = -(x - mu - a * (x0 - mu)) / sd ** 2
        dt = float(t - t_next)
        z = randn_like(x, generator) if noise_sampler is None else noise_sampler(x)
        x = x - (process.theta * (mu - x) - g2 * score) * dt + math.sqrt(g2 * dt) * z
    return x
