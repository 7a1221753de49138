"""Read what a frozen network computes: forward hooks that record named submodules, and diffusion features.

* :func:`capture` - a read-only :class:`dmlab.hooks.Handle` that records the outputs of named submodules (defined in
  :mod:`dmlab.hooks`, re-exported here). It never edits the model: the hooks return ``None`` (so the output is
  bit-identical) and every hook is removed when the block ends, also when an exception is raised inside it.
* :func:`extract_features` - the DIFT / SD-DINO recipe (Tang et al. 2023; Zhang et al. 2023, paper 10): noise a clean
  input to one sigma, make *one* denoiser call, read the hooked blocks, average over ``ensemble`` noise draws.
  Works for any denoiser wrapping a diffusers ``UNet2DModel``, ``UNet2DConditionModel`` (pass ``cond=
  {"encoder_hidden_states": ...}``) or ``DiTTransformer2DModel`` (token outputs are reshaped to a grid).
* :func:`vit_features` - the same for a ViT encoder such as ``transformers.Dinov2Model`` (DINOv2, Oquab et al. 2024):
  patch tokens of a layer reshaped to a ``[B, D, H/p, W/p]`` grid, CLS and register tokens dropped.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..hooks import Capture, _check_layers, capture

__all__ = ["Capture", "capture", "extract_features", "vit_features", "tokens_to_grid"]


# ----------------------------------------------------------------------------------------------- token grids
def tokens_to_grid(tokens: Tensor, height: int, width: int, *, n_prefix: int = 0) -> Tensor:
    """``[B, n_prefix + height*width, D]`` tokens -> ``[B, D, height, width]`` (prefix tokens such as CLS and
    registers are dropped); row-major patch order, as ViT/DINOv2 and diffusers' DiT patchify. The token-to-grid step
    of SD-DINO's DINOv2 branch (paper 10)."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape [B, N, D], got {tuple(tokens.shape)}")
    B, N, D = tokens.shape
    if N - n_prefix != height * width:
        raise ValueError(f"{N} tokens minus {n_prefix} prefix tokens do not fill a {height}x{width} grid; "
                         f"check the patch size and the number of CLS/register tokens")
    return tokens[:, n_prefix:].transpose(1, 2).reshape(B, D, height, width)


def _grid_of(h: Tensor, x: Tensor) -> Tensor:
    """A DiT block's ``[B, N, D]`` tokens on the grid of image ``x`` ``[B, C, H, W]``; other outputs unchanged."""
    if h.ndim != 3 or x.ndim != 4:
        return h
    H, W = x.shape[-2:]
    N = h.shape[1]
    p2 = H * W / N
    p = round(p2 ** 0.5)
    if p < 1 or p * p * N != H * W or H % p or W % p:
        return h
    return tokens_to_grid(h, H // p, W // p)


def _repeat_cond(cond: dict, k: int, batch: int) -> dict:
    """Repeat every batch-shaped tensor of ``cond`` ``k`` times along dim 0 (ensemble batching)."""
    out = {}
    for name, v in cond.items():
        if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == batch:
            out[name] = v.repeat(k, *([1] * (v.ndim - 1)))
        else:
            out[name] = v
    return out


@torch.no_grad()
def extract_features(denoiser: Callable, net: nn.Module, x0: Tensor, sigma, layers, *, ensemble: int = 1,
                     generator: torch.Generator | None = None, cond: dict | None = None,
                     batch_ensemble: bool = True) -> dict[str, Tensor]:
    """Diffusion features of clean inputs: noise to ``sigma``, one denoiser call, read the hooked blocks.

    The DIFT recipe (Tang et al. 2023) used by SD-DINO (Zhang et al. 2023, paper 10) and the linear probes of
    "Diffusion models beat GANs on image classification" (Mukhopadhyay et al. 2023, paper 54):
    ``x = x0 + sigma * eps``, ``denoiser(x, sigma, **cond)`` once, ``f = mean_{eps} block(x)`` over ``ensemble``
    independent draws of ``eps`` (all from ``generator``). ``net`` is the network inside ``denoiser`` whose
    submodules ``layers`` name (e.g. ``"up_blocks.1"`` of a ``UNet2DModel``; ``"transformer_blocks.2"`` of a DiT,
    whose ``[B, N, D]`` tokens come back as a ``[B, D, H/p, W/p]`` grid). ``sigma`` is in the VE convention of
    :mod:`dmlab.denoisers` (``DiscreteVPDenoiser`` turns it into the network's timestep). ``sigma = 0`` reads the
    clean input. With ``batch_ensemble`` the draws run as one batch of ``ensemble * B``.

    Returns ``{layer: [B, ...]}`` (float, on the network's device).
    """
    if not callable(denoiser):
        raise TypeError("denoiser must be callable: D(x, sigma, **cond), e.g. DiscreteVPDenoiser(unet, alphas_cumprod)")
    if not isinstance(x0, Tensor) or x0.ndim < 2:
        raise ValueError("x0 must be a tensor of clean inputs [B, ...] (images [B, C, H, W])")
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble must be an int >= 1 (the number of noise draws averaged), got {ensemble!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if cond is not None and not isinstance(cond, dict):
        raise TypeError("cond must be a dict of keyword arguments, e.g. {'encoder_hidden_states': emb}")
    from ..denoisers import as_sigma, bcast

    sig = as_sigma(sigma, x0)  # raises on negative / non-finite sigma
    layers = _check_layers(net, layers)
    cond = dict(cond or {})
    B = x0.shape[0]
    eps = torch.randn((ensemble, *x0.shape), generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    sums: dict[str, Tensor] = {}
    with capture(net, layers) as cap:
        if batch_ensemble:
            x = (x0[None] + bcast(sig, x0)[None] * eps).reshape(ensemble * B, *x0.shape[1:])
            denoiser(x, sig.repeat(ensemble), **_repeat_cond(cond, ensemble, B))
            for n in layers:
                h = _grid_of(cap[n], x)
                sums[n] = h.reshape(ensemble, B, *h.shape[1:]).float().sum(0)
        else:
            for e in range(ensemble):
                denoiser(x0 + bcast(sig, x0) * eps[e], sig, **cond)
                for n in layers:
                    h = _grid_of(cap[n], x0).float()
                    sums[n] = h if n not in sums else sums[n] + h
    return {n: s / ensemble for n, s in sums.items()}


@torch.no_grad()
def vit_features(model: nn.Module, pixel_values: Tensor, layers, *, patch_size: int | None = None,
                 n_prefix: int | None = None) -> dict[str, Tensor]:
    """Patch-token features of a ViT (e.g. ``transformers.Dinov2Model``, DINOv2 of Oquab et al. 2024, the second
    extractor of SD-DINO, paper 10) reshaped to ``[B, D, H/p, W/p]``.

    ``layers`` name submodules such as ``"encoder.layer.11"`` or ``"layernorm"``. The patch size and the number of
    prefix tokens (1 CLS + ``num_register_tokens``) are read from ``model.config`` unless given. The image sides must
    be multiples of the patch size.
    """
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
        raise ValueError("pixel_values must be images [B, C, H, W]")
    cfg = getattr(model, "config", None)
    p = patch_size or getattr(cfg, "patch_size", None)
    if not p:
        raise ValueError("pass patch_size (the model has no config.patch_size)")
    if n_prefix is None:
        n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    H, W = pixel_values.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} must be a multiple of the patch size {p}; resize or crop first")
    layers = _check_layers(model, layers)
    with capture(model, layers) as cap:
        model(pixel_values)
        return {n: tokens_to_grid(cap[n], H // p, W // p, n_prefix=n_prefix).float() for n in layers}
