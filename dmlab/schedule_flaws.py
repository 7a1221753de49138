"""Schedule flaws and their fixes: zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps are Flawed") and One More Step (Hu et al. 2024, "One More Step: A Versatile Plug-and-Play Module for Rectifying
Diffusion Schedule Flaws and Enhancing Low-Frequency Controls", CVPR; official code ``mhh0318/OneMoreStep``).

Stable Diffusion's schedule ends at ``alpha_bar_T = 0.0047`` (``sigma_T = 14.6`` in dmlab's convention), yet sampling
starts from pure noise, as if ``sigma_T`` were infinite. The data's low-frequency content (mean brightness: a
direction whose variance grows with the number of pixels) is not drowned at ``sigma_T``, so the model never learns to
invent it from nothing and the samples' brightness collapses towards the average. The fixes:

* :func:`rescale_zero_terminal_snr` - shift and scale ``sqrt(alpha_bar)`` so the last one is 0 (Lin et al. 2024,
  Alg. 1; equals diffusers' ``rescale_betas_zero_snr=True``) - then ``sigma_T = inf``;
* :func:`one_more_step` - keep the model, prepend one step from SNR 0: a small model's ``x0_hat = E[x0 | c]`` at pure
  noise and one DDIM step to ``sigma_T``: ``x = x0_hat + sigma_T z`` (the OMS paper's Sec. 3);
* :func:`prior_mean` - the exact ``E[x0 | c]`` of an exact denoiser (its limit at ``sigma -> inf``), the ideal OMS
  module; :func:`start_sigma` - the sigma a discrete schedule really starts from under each ``timestep_spacing``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import schedules

__all__ = ["rescale_zero_terminal_snr", "terminal_sigma", "start_sigma", "one_more_step", "prior_mean"]


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last ``alpha_bar`` is exactly 0 (Lin et al. 2024, Alg. 1).

    ``s = sqrt(alpha_bar)`` becomes ``(s - s_T) s_0 / (s_0 - s_T)``: the first value is kept, the last is 0, the
    shape in between is linear in ``s``. Float64 in, float64 out.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or len(betas) < 2 or ((betas <= 0) | (betas >= 1)).any():
        raise ValueError("betas must be a 1-D tensor of values in (0, 1) (e.g. dmlab.schedules.betas_for(...))")
    s = torch.cumprod(1 - betas, 0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    abar = s ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def terminal_sigma(betas: Tensor) -> float:
    """``sigma_T = sqrt((1 - alpha_bar_T) / alpha_bar_T)`` of a discrete schedule (``inf`` at zero terminal SNR)."""
    abar = torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0)[-1]
    return float("inf") if abar <= 0 else float(((1 - abar) / abar).sqrt())


def start_sigma(betas: Tensor, n_steps: int, spacing: str = "leading", steps_offset: int = 0) -> float:
    """The sigma of the first timestep a diffusers scheduler visits (Lin et al. 2024, Sec. 3.3: "leading" and
    "linspace" spacings never start at the last training step; "trailing" does)."""
    abar = torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0)
    t0 = int(schedules.ddpm_timesteps(n_steps, len(abar), spacing, steps_offset)[0])
    a = abar[t0]
    return float("inf") if a <= 0 else float(((1 - a) / a).sqrt())


def one_more_step(x0_hat: Tensor, z: Tensor, sigma_start: float) -> Tensor:
    """One More Step (Hu et al. 2024): a DDIM step from SNR 0 to ``sigma_start``, ``x = x0_hat + sigma_start z``.

    At SNR 0 the noisy sample *is* the noise ``z`` (``x_vp = z``), so DDIM's ``eps_hat = z`` and its step to
    ``sigma_start`` gives ``x0_hat + sigma_start z`` in the VE convention. ``x0_hat`` is the OMS module's prediction,
    whose ideal is ``E[x0 | c]`` (:func:`prior_mean`); it carries the low-frequency content (brightness) the
    frozen model cannot invent. Continue with any sampler from ``sigma_start``.
    """
    if not isinstance(x0_hat, Tensor) or not isinstance(z, Tensor):
        raise TypeError("x0_hat and z must be tensors")
    if not sigma_start > 0 or sigma_start == float("inf"):
        raise ValueError(f"sigma_start must be finite and positive (the frozen model's first sigma), got {sigma_start}")
    return x0_hat.expand_as(z) + sigma_start * z


@torch.no_grad()
def prior_mean(denoiser: Callable, like: Tensor, *, sigma_inf: float = 1e8, **cond) -> Tensor:
    """``E[x0 | c]``: the denoiser at ``x = 0``, ``sigma = sigma_inf`` (its SNR -> 0 limit, exact to ``O(1/sigma^2)``).

    For an exact denoiser (``dmlab.exact``) this is the ideal One-More-Step module; ``like`` gives batch, shape and
    dtype (use float64 for exact denoisers).
    """
    if not sigma_inf > 1e3:
        raise ValueError("sigma_inf must be large (it stands for SNR 0); the default 1e8 suits float64")
    return denoiser(torch.zeros_like(like), torch.full((like.shape[0],), float(sigma_inf), dtype=like.dtype), **cond)
