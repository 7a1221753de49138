"""Glue for the samplers chapters' full-scale cells: a Stable Diffusion pipeline as a guided dmlab denoiser.

Stable Diffusion (Rombach et al. 2022) is an epsilon-prediction UNet on a discrete VP schedule, so
:class:`~dmlab.denoisers.DiscreteVPDenoiser` turns it into ``D(x, sigma, encoder_hidden_states=...)`` and
:func:`~dmlab.denoisers.cfg` adds classifier-free guidance (Ho & Salimans 2022). Any dmlab sampler then runs on
SD's latents unchanged. Used by chapters 04 and 07 with ``DMLAB_SCALE=full`` (``dmlab.hub.load_sd``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..denoisers import DiscreteVPDenoiser, cfg

__all__ = ["sd_guided", "sd_decode"]


@torch.no_grad()
def sd_guided(pipe, prompts: Sequence[str], scale: float = 7.5, negative_prompt: str = ""):
    """``(denoiser, cond, sigma_min, sigma_max, shape)`` for ``prompts`` on a diffusers Stable Diffusion pipeline.

    ``denoiser(x, sigma, **cond)`` is the CFG-guided VE denoiser of the latents (``x = x0 + sigma eps``, latent
    shape ``shape``); sample with e.g. ``sample_dpmpp_2m(denoiser, sigma_max * noise, sigmas, cond=cond)``.
    """
    if isinstance(prompts, str) or not len(prompts):
        raise TypeError("prompts must be a non-empty list of strings (one image per prompt)")
    device = pipe.unet.device
    pos, neg = pipe.encode_prompt(list(prompts), device, 1, True, [negative_prompt] * len(prompts))
    den = DiscreteVPDenoiser.from_scheduler(pipe.unet, pipe.scheduler)
    guided = cfg(den, scale, {"encoder_hidden_states": neg}, batched=True)
    size = pipe.unet.config.sample_size
    shape = (len(prompts), pipe.unet.config.in_channels, size, size)
    return guided, {"encoder_hidden_states": pos}, den.sigma_min, den.sigma_max, shape


@torch.no_grad()
def sd_decode(pipe, latents: Tensor) -> Tensor:
    """Decode clean latents to images in ``[0, 1]`` (``[B, 3, H, W]``, float32 on the CPU)."""
    vae = pipe.vae
    img = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((img.float() + 1) / 2).clamp(0, 1).cpu()
