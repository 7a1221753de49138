"""Rectification: retrain on the noise-sample pairs of a teacher's ODE (Liu et al. 2023, "Flow Straight and Fast",
rectified flow; Wang et al. 2025, "Rectified Diffusion: Straightness Is Not Your Need in Rectified Flow";
official code ``G-U-N/Rectified-Diffusion``).

The teacher's probability-flow ODE couples each noise ``eps`` with a sample ``x0 = T(eps)``. Rectified flow
retrains a velocity on the *linear* path of each pair, ``x_t = (1 - t) x0 + t eps``; Rectified Diffusion keeps the
model's own diffusion form, ``x_t = alpha_t x0 + sigma_t eps`` with the same fixed pair, and argues that what
matters is a *first-order* path (one DDIM step is exact on it), not a straight one. In the VE convention both paths
are the same line ``x = x0 + sigma eps`` (only the time variable differs), so with an exact coupling both give the
same denoiser ``D(x, sigma) = T(eps(x, sigma))``, constant along each path: one Euler/DDIM step is exact.

* :func:`ode_coupling` - the teacher's pairs; :class:`AffineCouplingDenoiser` - the exact rectified denoiser of an
  affine coupling (the exact teacher of a Gaussian is affine; :meth:`AffineCouplingDenoiser.gaussian`).
* :func:`train_rectified` - fit a small MLP on pairs, in the diffusion form (eps-prediction on the VP path, paper
  23), in the flow form (velocity on the linear path, rectified flow), or on independent pairs (ordinary
  denoising score matching: the un-rectified baseline).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..denoisers import as_sigma, bcast

__all__ = ["ode_coupling", "AffineCouplingDenoiser", "TimeMLP", "train_rectified", "FORMS"]

FORMS = ("diffusion", "flow", "independent")


@torch.no_grad()
def ode_coupling(denoiser: Callable, noise: Tensor, sigmas: Tensor, solver: Callable | None = None,
                 **kw) -> tuple[Tensor, Tensor]:
    """The teacher's pairs ``(eps, x0 = solver(denoiser, sigmas[0] * eps, sigmas))`` (Liu et al. 2023, Alg. 1)."""
    from .ode import sample_heun

    solver = sample_heun if solver is None else solver
    return noise, solver(denoiser, sigmas[0] * noise, sigmas, **kw)


class AffineCouplingDenoiser:
    """The exact denoiser of a deterministic affine coupling ``x0 = A eps + m`` (rectified diffusion = rectified flow).

    Data ``x = x0 + sigma eps = (A + sigma I) eps + m`` determines ``eps``, so ``D(x, sigma) = A eps + m`` with
    ``eps = (A + sigma I)^-1 (x - m)``: constant along every path, which is why one Euler (DDIM) step from any
    ``sigma`` lands exactly on the path's end.
    """

    def __init__(self, A: Tensor, m: Tensor):
        self.A = torch.as_tensor(A, dtype=torch.float64)
        self.m = torch.as_tensor(m, dtype=torch.float64).reshape(-1)
        d = self.m.numel()
        if self.A.shape != (d, d):
            raise ValueError(f"A must be [d, d] = [{d}, {d}] to match m, got {tuple(self.A.shape)}")

    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor, sigma_max: float) -> "AffineCouplingDenoiser":
        """The coupling of the exact PF-ODE of ``N(mean, cov)`` started at ``x = sigma_max * eps``.

        The ODE maps ``x`` at ``sigma_max`` to ``mean + C^1/2 (C + sigma_max^2 I)^-1/2 (x - mean)``.
        """
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        w, v = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
        M = (v * (w.clamp_min(0).sqrt() / (w.clamp_min(0) + sigma_max ** 2).sqrt())) @ v.T
        return cls(sigma_max * M, mean - M @ mean)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x).to(torch.float64)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        eye = torch.eye(self.m.numel(), dtype=torch.float64)
        eps = torch.linalg.solve(self.A[None] + sigma[:, None, None] * eye, (xf - self.m)[..., None])[..., 0]
        return (eps @ self.A.T + self.m).reshape(x.shape).to(x.dtype)


class TimeMLP(nn.Module):
    """A small MLP ``f(x, t)`` for flat data: ``[x, sin/cos time features] -> width -> width -> d`` (SiLU)."""

    def __init__(self, dim: int, width: int = 128, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freq", 2.0 ** torch.arange(n_freq, dtype=torch.float32) * math.pi)
        self.net = nn.Sequential(nn.Linear(dim + 2 * n_freq, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        f = t.reshape(-1, 1).to(self.freq.dtype) * self.freq
        return self.net(torch.cat([x.to(self.freq.dtype), f.sin(), f.cos()], dim=1))


class _Trained:
    """A trained :class:`TimeMLP` seen as a dmlab denoiser (float64 in, float32 network)."""

    def __init__(self, net: TimeMLP, form: str, prediction: str):
        self.net, self.form, self.prediction = net.eval(), form, prediction

    @torch.no_grad()
    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x)
        xf = x.reshape(x.shape[0], -1)
        if self.form == "flow":
            t = sigma / (1 + sigma)
            xt = bcast(1 - t, xf) * xf
            return (xt - bcast(t, xf) * self.net(xt, t).to(x.dtype)).reshape(x.shape)
        alpha = bcast((1 + sigma ** 2).rsqrt(), xf)  # VP input x_vp = alpha x, time t = 2 atan(sigma) / pi
        out = self.net(alpha * xf, torch.atan(sigma) / (math.pi / 2)).to(x.dtype)
        if self.prediction == "epsilon":
            return (xf - bcast(sigma, xf) * out).reshape(x.shape)
        return (alpha ** 2 * xf - alpha * bcast(sigma, xf) * out).reshape(x.shape)  # v = alpha eps - sigma_t x0


def train_rectified(noise: Tensor, x0: Tensor, *, form: str = "diffusion", prediction: str = "v", steps: int = 2000,
                    batch: int = 256, width: int = 128, lr: float = 2e-3, generator: torch.Generator) -> Callable:
    """Fit a :class:`TimeMLP` on pairs and return it as a dmlab denoiser.

    * ``"diffusion"`` (Rectified Diffusion, paper 23): ``x_t = alpha_t x0 + sigma_t eps`` on the cosine VP path
      (``t ~ U(0, 1)``, ``alpha = cos(pi t / 2)``) with the *paired* ``eps``; ``prediction="v"`` regresses
      ``v = alpha eps - sigma_t x0`` (Salimans & Ho 2022), ``"epsilon"`` regresses ``eps`` (DDPM's form, whose
      ``x0 = x - sigma eps_theta`` amplifies errors by ``sigma`` at high noise).
    * ``"flow"`` (rectified flow): ``x_t = (1 - t) x0 + t eps``, ``t ~ U(0, 1)``, loss ``|v_theta - (eps - x0)|^2``.
    * ``"independent"``: as ``"diffusion"`` but with ``eps`` drawn afresh (ordinary denoising score matching on the
      samples ``x0``): the un-rectified baseline at equal training budget.

    Adam with a cosine learning-rate decay (:func:`dmlab.train.fit`); every draw uses ``generator``.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; use one of {FORMS}")
    if prediction not in ("v", "epsilon"):
        raise ValueError(f"unknown prediction {prediction!r}; use 'v' or 'epsilon' (the flow form always predicts velocity)")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (training draws batches and times from it)")
    if noise.shape != x0.shape or noise.ndim != 2:
        raise ValueError("noise and x0 must be [N, d] pairs of the same shape")
    for name, v in (("steps", steps), ("batch", batch), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))  # the init, from the generator
    net = TimeMLP(noise.shape[1], width)
    from ..train import FitConfig, fit

    e_all, x_all = noise.float(), x0.float()

    def draw(g):
        i = torch.randint(len(x_all), (batch,), generator=g)
        t = torch.rand(batch, generator=g) * 0.998 + 0.001
        x, e = x_all[i], e_all[i]
        if form == "independent":
            e = torch.randn(x.shape, generator=g)
        return x, e, t

    def loss_of(b):
        x, e, t = b
        if form == "flow":
            xt, target = (1 - t[:, None]) * x + t[:, None] * e, e - x
        else:
            a, s = torch.cos(t * math.pi / 2)[:, None], torch.sin(t * math.pi / 2)[:, None]
            xt, target = a * x + s * e, (e if prediction == "epsilon" else a * e - s * x)
        return (net(xt, t) - target).pow(2).sum(1).mean()

    fit(loss_of, net, FitConfig(steps=steps, lr=lr, optimizer="adam", schedule="cosine"), generator=generator,
        data=draw)
    return _Trained(net, "flow" if form == "flow" else "diffusion", prediction)
