"""Toy MLP denoisers for 2-D (and low-dimensional) data, trained in seconds at chapter time.

* :class:`ToyMLP` - the raw network ``F(x_in, c_noise)`` of EDM preconditioning (Karras et al. 2022): an MLP on the
  input concatenated with a Fourier embedding of ``c_noise = log(sigma) / 4``. With ``conservative=True`` it is the
  gradient of a scalar ``E(x_in, c_noise)``, which makes the score of the wrapped denoiser an exact gradient field
  (the "conservative model" of Horvat & Pfister 2024, paper 59; the log-density parametrisation of Deveney et al.
  2025, paper 15); :func:`log_density` then returns that potential.
* :func:`toy_denoiser` - ``EDMPrecond(ToyMLP(...))``.
* :func:`train_toy` - denoising score matching with EDM's log-normal sigma sampling and loss weight, a fixed seed
  (every draw from one ``torch.Generator``), a tqdm bar, and an optional ``regulariser`` hook (e.g. the
  Fokker-Planck residual of :func:`dmlab.probes.fokker_planck.fp_regulariser`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["ToyMLP", "toy_denoiser", "train_toy", "log_density"]


class ToyMLP(nn.Module):
    """``F(x_in, c_noise) -> [B, dim]``: an MLP (SiLU) on ``[x_in, fourier(c_noise)]``.

    Args:
        dim: data dimension (inputs are ``[B, dim]``).
        hidden: width; depth: number of hidden layers.
        n_freq: Fourier frequencies of the sigma embedding (``sin``/``cos`` of ``c_noise * 2^k``, k < n_freq).
        conservative: output ``grad_{x_in} E(x_in, c_noise)`` of a scalar MLP ``E`` instead of a vector.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, n_freq: int = 6, *, conservative: bool = False):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if hidden < 1 or depth < 1 or n_freq < 1:
            raise ValueError("hidden, depth and n_freq must be >= 1")
        self.dim, self.conservative = dim, bool(conservative)
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freq, dtype=torch.float32), persistent=False)
        layers, width = [], dim + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1 if conservative else dim))
        self.net = nn.Sequential(*layers)

    def _embed(self, x_in: Tensor, c_noise: Tensor) -> Tensor:
        c = c_noise.reshape(-1, 1).to(x_in.dtype) * self.freqs.to(x_in.dtype)
        return torch.cat([x_in, torch.sin(c), torch.cos(c)], dim=1)

    def energy(self, x_in: Tensor, c_noise: Tensor) -> Tensor:
        """The scalar ``E(x_in, c_noise)`` ``[B]`` of a conservative model."""
        if not self.conservative:
            raise ValueError("energy() needs ToyMLP(conservative=True)")
        return self.net(self._embed(x_in, c_noise))[:, 0]

    def forward(self, x_in: Tensor, c_noise: Tensor) -> Tensor:
        if x_in.ndim != 2 or x_in.shape[1] != self.dim:
            raise ValueError(f"ToyMLP takes x of shape [B, {self.dim}], got {tuple(x_in.shape)}")
        x_in = x_in.to(self.net[0].weight.dtype)
        if not self.conservative:
            return self.net(self._embed(x_in, c_noise))
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            xi = x_in if x_in.requires_grad else x_in.detach().requires_grad_(True)
            e = self.energy(xi, c_noise).sum()
            (g,) = torch.autograd.grad(e, xi, create_graph=outer)
        return g if outer else g.detach()


def toy_denoiser(dim: int = 2, hidden: int = 128, depth: int = 3, *, sigma_data: float = 1.0,
                 conservative: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A fresh ``EDMPrecond(ToyMLP(dim, hidden, depth))`` initialised from ``seed`` (a forked RNG: the global
    stream is untouched). ``denoiser.net`` is the ``ToyMLP``."""
    from ..denoisers import EDMPrecond

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyMLP(dim, hidden, depth, conservative=conservative).to(dtype)
    return EDMPrecond(net, sigma_data=sigma_data)


def log_density(denoiser, x: Tensor, sigma) -> Tensor:
    """The potential ``u(x, sigma)`` whose gradient is the score of a conservative toy denoiser ``[B]``.

    With ``D = c_skip x + c_out grad E(c_in x)`` the score ``(D - x) / sigma^2`` is ``grad_x u`` for
    ``u = (c_skip - 1) |x|^2 / (2 sigma^2) + c_out E(c_in x, c_noise) / (c_in sigma^2)``; ``u`` is a log density up to
    a sigma-dependent constant that score matching cannot see (the Fokker-Planck residual of paper 15 pins it).
    """
    from ..denoisers import as_sigma

    net = getattr(denoiser, "net", None)
    if not isinstance(net, ToyMLP) or not net.conservative:
        raise ValueError("log_density needs a conservative toy denoiser: toy_denoiser(..., conservative=True)")
    sigma = as_sigma(sigma, x)
    c_skip, c_out, c_in, c_noise = denoiser.coefficients(sigma)
    e = net.energy(c_in[:, None] * x, c_noise)
    return (c_skip - 1) * (x ** 2).sum(1) / (2 * sigma ** 2) + c_out * e / (c_in * sigma ** 2)


def train_toy(denoiser, data: Tensor, *, steps: int = 2000, batch: int = 256, lr: float = 2e-3,
              p_mean: float = -1.0, p_std: float = 1.4, generator: torch.Generator,
              regulariser: Callable | None = None, progress: bool = True, desc: str = "toy") -> list[float]:
    """Train a toy denoiser in place by denoising score matching (EDM loss, Karras et al. 2022, eq. 2 and sec. 5).

    Each step draws a minibatch of ``data`` ``[N, dim]``, ``log sigma ~ N(p_mean, p_std^2)`` and
    ``x = x0 + sigma * eps``, and minimises ``lambda(sigma) |D(x, sigma) - x0|^2`` with
    ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``. Adam with a cosine learning-rate decay (:func:`dmlab.train.fit`).
    ``regulariser(denoiser, x0, x, sigma, generator) -> scalar`` is added to the loss when given (the hook for the
    Fokker-Planck regulariser of paper 15). Every random draw uses ``generator``. Returns the loss per step.
    """
    net = getattr(denoiser, "net", None)
    if not isinstance(net, nn.Module):
        raise TypeError("denoiser must wrap a torch module in .net (use toy_denoiser)")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator: every draw of the training run goes through it")
    if not isinstance(data, Tensor) or data.ndim != 2:
        raise ValueError(f"data must be [N, dim] points, got {tuple(data.shape) if isinstance(data, Tensor) else type(data)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or batch < 1:
        raise ValueError("steps and batch must be positive ints")
    if regulariser is not None and not callable(regulariser):
        raise TypeError("regulariser must be callable as regulariser(denoiser, x0, x, sigma, generator) -> scalar")
    from ..train import FitConfig, fit

    p = next(net.parameters())
    data = data.to(p.dtype)
    sd = denoiser.sigma_data

    def draw(g):
        idx = torch.randint(len(data), (batch,), generator=g)
        x0 = data[idx]
        sigma = (p_mean + p_std * torch.randn(batch, generator=g, dtype=p.dtype)).exp()
        return x0, sigma, x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=p.dtype)

    def loss(b):
        x0, sigma, x = b
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        value = (weight * ((denoiser(x, sigma) - x0) ** 2).sum(1)).mean() / x0.shape[1]
        if regulariser is not None:
            value = value + regulariser(denoiser, x0, x, sigma, generator)
        return value

    cfg = FitConfig(steps=steps, lr=lr, optimizer="adam", schedule="cosine", log_every=100, progress=progress,
                    desc=desc)
    return fit(loss, net, cfg, generator=generator, data=draw).losses
