"""Flows and stochastic interpolants in the one noise convention (Albergo, Boffi & Vanden-Eijnden 2023,
"Stochastic Interpolants: A Unifying Framework for Flows and Diffusions"; Liu et al. 2023, rectified flow;
Wang et al. 2025, "Rectified Diffusion: Straightness Is Not Your Need in Rectified Flow").

A one-sided Gaussian interpolant ``x_t = a(t) x0 + b(t) eps`` (``a(0) = 1, b(0) = 0``; noise at ``t = 1``) is a
rescaled view of ``x = x0 + sigma eps``: ``sigma = b / a`` and ``x = x_t / a``. So every flow or interpolant model
becomes a dmlab denoiser through an adapter, and every exact denoiser gives the exact velocity field
``v(x_t, t) = E[a' x0 + b' eps | x_t] = a' D + b' eps_hat`` (:func:`velocity_from_denoiser`,
:func:`denoiser_from_velocity`; the linear path ``a = 1 - t, b = t`` is :class:`~dmlab.denoisers.FlowDenoiser`).

:func:`sample_interpolant` integrates the interpolant's family of generative SDEs with identical marginals,
``dX = (v + eps(t) s) dtau + sqrt(2 eps(t)) dW`` (``tau = 1 - t``, ``s`` the score), from ``eps = 0`` (the
probability-flow ODE in the interpolant's own time) to the reverse diffusion SDE. :func:`straightness` is
rectified flow's measure of how straight an ODE's paths are. Couplings and rectification live in
:mod:`dmlab.samplers.rectify`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..denoisers import as_sigma, bcast
from ._common import call, half_safe, prepare, randn_like, report

__all__ = ["Interpolant", "INTERPOLANTS", "get_interpolant", "velocity_from_denoiser", "denoiser_from_velocity",
           "sample_interpolant", "straightness"]


@dataclass(frozen=True)
class Interpolant:
    """``x_t = a(t) x0 + b(t) eps`` on ``t in [0, 1]`` with derivatives ``da, db`` and the inverse ``t_of_sigma``.

    ``sigma(t) = b(t) / a(t)`` must increase from 0 at ``t = 0`` (``a = 1, b = 0``) to infinity at ``t = 1``
    (or at least past every sigma a schedule uses). Use :func:`get_interpolant` for the presets.
    """

    name: str
    a: Callable[[Tensor], Tensor]
    b: Callable[[Tensor], Tensor]
    da: Callable[[Tensor], Tensor]
    db: Callable[[Tensor], Tensor]
    t_of_sigma: Callable[[Tensor], Tensor]

    def sigma(self, t: Tensor) -> Tensor:
        """The VE noise level of time ``t``: ``b(t) / a(t)``."""
        return self.b(t) / self.a(t)

    def diffusion(self, t: Tensor) -> Tensor:
        """``g(t)^2 / 2 = b b' - (a' / a) b^2``: the ``eps(t)`` whose SDE is the reverse diffusion of this path."""
        return self.b(t) * self.db(t) - self.da(t) / self.a(t) * self.b(t) ** 2


_HALF_PI = math.pi / 2
INTERPOLANTS = {
    # rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023); the linear interpolant of paper 76
    "linear": Interpolant("linear", lambda t: 1 - t, lambda t: t, lambda t: -torch.ones_like(t),
                          lambda t: torch.ones_like(t), lambda s: s / (1 + s)),
    # variance-preserving trigonometric path (a^2 + b^2 = 1; the cosine VP schedule, "GVP" in SiT)
    "trig": Interpolant("trig", lambda t: torch.cos(_HALF_PI * t), lambda t: torch.sin(_HALF_PI * t),
                        lambda t: -_HALF_PI * torch.sin(_HALF_PI * t), lambda t: _HALF_PI * torch.cos(_HALF_PI * t),
                        lambda s: torch.atan(s) / _HALF_PI),
}


def get_interpolant(interpolant) -> Interpolant:
    """An :class:`Interpolant` or the name of a preset (``"linear"``, ``"trig"``)."""
    if isinstance(interpolant, Interpolant):
        return interpolant
    if interpolant not in INTERPOLANTS:
        raise ValueError(f"unknown interpolant {interpolant!r}; use one of {sorted(INTERPOLANTS)} or an Interpolant")
    return INTERPOLANTS[interpolant]


def _t_vec(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if t.shape != (x.shape[0],) or ((t <= 0) | (t >= 1)).any():
        raise ValueError("t must be a scalar or [B] tensor with 0 < t < 1 (the interpolant's open interval)")
    return t


def velocity_from_denoiser(denoiser: Callable, interpolant="linear") -> Callable:
    """The exact velocity ``v(x_t, t, **cond) = a' D + b' (x_t - a D) / b`` of an interpolant, from a denoiser.

    ``D`` is evaluated at ``x = x_t / a`` and ``sigma = b / a`` (Albergo et al. 2023, eq. 2.10 with
    ``E[eps | x_t] = (x_t - a D) / b``). With an exact denoiser this is the exact flow-matching target.
    """
    ip = get_interpolant(interpolant)

    def velocity(x_t: Tensor, t, **cond) -> Tensor:
        t = _t_vec(t, x_t)
        a, b = bcast(ip.a(t), x_t), bcast(ip.b(t), x_t)
        d = denoiser(x_t / a, ip.sigma(t), **cond)
        return bcast(ip.da(t), x_t) * d + bcast(ip.db(t), x_t) * (x_t - a * d) / b

    return velocity


def denoiser_from_velocity(velocity: Callable, interpolant="linear") -> Callable:
    """A dmlab denoiser from a velocity field ``v(x_t, t, **cond)`` of an interpolant (paper 76's adapter).

    With ``x_t = a x`` and ``t = t(sigma)``: ``v = a' D + b' eps_hat`` and ``x_t = a D + b eps_hat`` give
    ``D = (b v - b' x_t) / (a' b - a b')``. For ``"linear"`` this is ``x_t - t v``
    (:class:`~dmlab.denoisers.FlowDenoiser`). Not defined at ``sigma = 0``.
    """
    ip = get_interpolant(interpolant)

    def denoiser(x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x)
        t = ip.t_of_sigma(sigma)
        a, b = bcast(ip.a(t), x), bcast(ip.b(t), x)
        x_t = a * x
        v = velocity(x_t, t, **cond).to(x.dtype)
        da, db = bcast(ip.da(t), x), bcast(ip.db(t), x)
        return (b * v - db * x_t) / (da * b - a * db)

    return denoiser


@half_safe
@torch.no_grad()
def sample_interpolant(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                       generator: torch.Generator | None = None, callback: Callable | None = None,
                       interpolant="linear", eps: float | Callable = 0.0,
                       noise_sampler: Callable | None = None) -> Tensor:
    """Euler(-Maruyama) on an interpolant's generative SDE family (Albergo et al. 2023, Sec. 2.4, eq. 2.33).

    The schedule is mapped to the interpolant's time ``t_i = t(sigma_i)`` and the state to ``x_t = a x``; each step
    ``dtau = t_i - t_{i+1}`` is ``X <- X - v dtau + e s dtau + sqrt(2 e dtau) z`` with the exact velocity ``v`` and
    score ``s = -eps_hat / b`` of the denoiser. ``eps`` sets the diffusion ``e(t)``: a number ``lam`` means
    ``lam * g(t)^2 / 2`` (:meth:`Interpolant.diffusion`; ``0`` is the ODE, ``1`` the reverse diffusion SDE of the
    path, any value keeps the marginals); a callable ``e(t)`` is used as is. The last step into ``t = 0`` adds no
    noise. One NFE per step; returns ``x`` in the VE convention (``a(0) = 1``). With ``"linear"`` and ``eps = 0``
    the Euler step in ``t`` equals Euler in ``sigma`` (and DDIM): a flow-matching Euler sampler is DDIM.
    """
    given = sigmas
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    ip = get_interpolant(interpolant)
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError("noise_sampler must be callable: noise_sampler(x) -> unit Gaussian noise shaped like x")
    if not callable(eps) and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0):
        raise ValueError(f"eps must be a number >= 0 (a multiple of g^2/2; 0 is the ODE) or a callable e(t), got {eps!r}")
    # times and coefficients in float64 (0-d tensors keep x's dtype): near t = 1, a(t) = 1 - t loses its digits in
    # float32 and is 0 in half precision
    ts = ip.t_of_sigma(given.to(device=x.device, dtype=torch.float64))
    if not (ts[:-1] < 1).all():
        raise ValueError(f"sigmas[0] = {float(sigmas[0]):g} maps to t >= 1 for interpolant {ip.name!r}; start lower")
    xt = bcast(ip.a(ts[0]).expand(x.shape[0]).to(x.dtype), x) * x
    for i in range(len(sigmas) - 1):
        s, s_next, t, t_next = sigmas[i], sigmas[i + 1], ts[i], ts[i + 1]
        a, b = ip.a(t), ip.b(t)
        denoised = call(denoiser, xt / a, s, cond)
        report(callback, i, xt / a, s, s_next, denoised)
        eps_hat = (xt - a * denoised) / b
        v = ip.da(t) * denoised + ip.db(t) * eps_hat
        dtau = t - t_next
        e = eps(t) if callable(eps) else eps * ip.diffusion(t)
        xt = xt - v * dtau
        if s_next > 0 and e > 0:
            z = randn_like(xt, generator) if noise_sampler is None else noise_sampler(xt)
            xt = xt - e * eps_hat / b * dtau + (2 * e * dtau).sqrt() * z
    return xt / ip.a(ts[-1])


@torch.no_grad()
def straightness(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None) -> float:
    """Rectified flow's straightness ``S = int_0^1 E |(x_1 - x_0) - v(x_t, t)|^2 dt`` (Liu et al. 2023, eq. 6).

    Measured on the paths of the linear interpolant's probability-flow ODE from ``x`` (at ``sigmas[0]``), followed
    with Euler steps in ``t`` on ``sigmas``: ``x_1 - x_0`` is the chord between the path's two ends divided by its
    time span, ``v`` the denoiser's velocity, and the integral the left Riemann sum on the grid (per unit time). Zero iff every path is a
    straight line traversed at constant speed (then one Euler step is exact). Use a fine grid.
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, None)
    ip = INTERPOLANTS["linear"]
    ts = ip.t_of_sigma(sigmas)
    xt = (1 - ts[0]) * x
    path, vs = [xt], []
    for i in range(len(sigmas) - 1):
        d = call(denoiser, xt / (1 - ts[i]), sigmas[i], cond)
        v = -d + (xt - (1 - ts[i]) * d) / ts[i]
        vs.append(v)
        xt = xt - v * (ts[i] - ts[i + 1])
        path.append(xt)
    span = float(ts[0]) - float(ts[-1])
    chord = (path[0] - path[-1]) / span  # the constant velocity of the straight path between the two ends
    dts = (ts[:-1] - ts[1:]).tolist()
    total = sum(dt * (chord - v).reshape(len(x), -1).pow(2).sum(1).mean().item() for dt, v in zip(dts, vs))
    return total / span
