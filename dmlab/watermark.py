"""Watermarks for generated images: one embedded during sampling, one added afterwards, and the attacks they meet.

Safe-SD (Ma et al. 2024, "Safe-SD: Safe and Traceable Stable Diffusion with Text Prompt Trigger for Invisible
Generative Watermarking", paper 30) argues that a watermark implanted *by the generative process* is invisible and
survives edits better than one added to a finished image. Safe-SD trains an injector/extractor and fine-tunes the
latent diffuser; at the scale of this library we test the same contrast with a training-free generative mark:

* :func:`embed_noise` / :func:`extract_noise` -- the bits choose the *signs* of the initial noise (each bit
  repeated over a keyed group of positions and scrambled by keyed signs; the magnitudes stay half-normal, so every
  position is marginally standard normal). Extraction inverts the
  deterministic sampler (Euler ODE run from ``sigma_min`` up to ``sigma_max``, :func:`invert`) and reads the signs
  by majority vote. This is the construction of Gaussian Shading (Yang et al. 2024); Tree-Ring (Wen et al. 2023)
  marks the initial noise in Fourier space.
* :func:`embed_additive` / :func:`extract_additive` -- the post-hoc competitor: an additive spread-spectrum mark
  (Cox et al. 1997), ``x + alpha * sum_k s_k P_k`` with keyed +-1 patterns ``P_k``, read blind by correlation.
* :data:`ATTACKS` -- Gaussian noise, JPEG-style DCT quantisation, crop (border replaced by background), blur.

Bit accuracy is the fraction of payload bits read correctly; 0.5 is chance.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["random_bits", "group_layout", "embed_noise", "extract_noise", "invert", "embed_additive",
           "extract_additive", "bit_accuracy", "psnr", "jpeg_like", "ATTACKS", "attack"]


def random_bits(n: int, n_bits: int, *, generator: torch.Generator) -> Tensor:
    """``[n, n_bits]`` uniform random bits (int64 0/1) from ``generator``."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator")
    return torch.randint(0, 2, (n, n_bits), generator=generator)


def group_layout(shape, n_bits: int, *, key: int) -> Tensor:
    """A keyed assignment of every position of a ``shape`` = ``(C, H, W)`` image to one of ``n_bits`` groups of equal
    size (a permutation from ``torch.Generator().manual_seed(key)``); ``n_bits`` must divide ``C*H*W``."""
    d = math.prod(shape)
    if not (isinstance(n_bits, int) and n_bits >= 1 and d % n_bits == 0):
        raise ValueError(f"n_bits must be a positive int dividing {d} (the number of positions), got {n_bits!r}")
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(key))
    groups = torch.empty(d, dtype=torch.long)
    groups[perm] = torch.arange(d) % n_bits
    return groups.view(*shape)


def _key_signs(shape, key: int) -> Tensor:
    """Keyed +-1 per position: the repeated bits are scrambled with it (the stream-cipher step of Gaussian
    Shading), so that the signs of one image's noise look independent to the model."""
    g = torch.Generator().manual_seed(key + 1)
    return 2.0 * torch.randint(0, 2, tuple(shape), generator=g).float() - 1.0


def _check_bits(bits: Tensor, n_bits: int) -> Tensor:
    if not isinstance(bits, Tensor) or bits.ndim != 2 or bits.shape[1] != n_bits:
        raise ValueError(f"bits must be a [B, {n_bits}] tensor of 0/1, got {getattr(bits, 'shape', bits)!r}")
    return bits.long()


def embed_noise(bits: Tensor, shape, *, key: int, generator: torch.Generator) -> Tensor:
    """Standard-normal initial noise ``[B, *shape]`` whose signs carry ``bits`` ``[B, n_bits]``: ``|eps| * s * k``
    with ``s = +1`` for bit 1 and ``-1`` for bit 0 on the bit's keyed group (:func:`group_layout`) and ``k`` a keyed
    +-1 scrambling per position (without it all positions of a group would share one sign, a visible structure)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator")
    groups = group_layout(shape, bits.shape[1] if isinstance(bits, Tensor) and bits.ndim == 2 else 0, key=key)
    bits = _check_bits(bits, int(groups.max()) + 1)
    mag = torch.randn((bits.shape[0], *shape), generator=generator).abs()
    sign = 2.0 * bits[:, groups.flatten()].view(bits.shape[0], *shape).float() - 1.0
    return mag * sign * _key_signs(shape, key)


def _vote(z: Tensor, groups: Tensor, n_bits: int) -> Tensor:
    flat = z.flatten(1)
    g = groups.flatten().to(flat.device)
    score = torch.zeros(flat.shape[0], n_bits, dtype=flat.dtype, device=flat.device).index_add_(1, g, flat)
    return (score > 0).long().cpu()


@torch.no_grad()
def invert(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None) -> Tensor:
    """Deterministic inversion: Euler steps of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``
    *up* the schedule, from the clean image at ``sigmas[-2]`` (the smallest nonzero sigma) to ``sigmas[0]``;
    returns the standardised noise ``x_T / sigmas[0]`` (DDIM inversion, Song et al. 2021)."""
    if not callable(denoiser):
        raise TypeError("denoiser must be a callable D(x, sigma, **cond)")
    sig = [float(s) for s in sigmas if float(s) > 0][::-1]  # increasing
    if len(sig) < 2:
        raise ValueError("sigmas must hold at least two positive values (a dmlab.schedules grid)")
    cond = dict(cond or {})
    x = x.clone()
    for i in range(len(sig) - 1):
        d = denoiser(x, torch.full((x.shape[0],), sig[i], dtype=x.dtype, device=x.device), **cond)
        x = x + (x - d) / sig[i] * (sig[i + 1] - sig[i])
    return x / sig[-1]


def extract_noise(denoiser: Callable, x: Tensor, sigmas: Tensor, n_bits: int, *, key: int,
                  cond: dict | None = None) -> Tensor:
    """Read the bits of :func:`embed_noise` back from an image: :func:`invert`, then a majority vote of the signs in
    each keyed group. Returns ``[B, n_bits]`` 0/1."""
    z = invert(denoiser, x, sigmas, cond=cond)
    shape = tuple(x.shape[1:])
    return _vote(z * _key_signs(shape, key).to(z), group_layout(shape, n_bits, key=key), n_bits)


def _patterns(shape, n_bits: int, key: int) -> Tensor:
    g = torch.Generator().manual_seed(key)
    p = 2.0 * torch.randint(0, 2, (n_bits, *shape), generator=g).float() - 1.0
    p = p - p.flatten(1).mean(1).view(-1, *[1] * len(shape))  # zero mean: blind to the image's brightness
    return p / (math.sqrt(n_bits) * p.pow(2).mean().sqrt())  # the mark's RMS per pixel is alpha


def embed_additive(x: Tensor, bits: Tensor, *, alpha: float, key: int) -> Tensor:
    """Post-hoc spread-spectrum watermark (Cox et al. 1997): ``x + alpha * sum_k (2 b_k - 1) P_k`` with keyed
    zero-mean +-1 patterns ``P_k`` over the whole image, scaled so that the mark's RMS per pixel is about ``alpha``
    (PSNR about ``20 log10(2 / alpha)`` dB before clipping)."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    p = _patterns(tuple(x.shape[1:]), bits.shape[1], key).to(x)
    s = 2.0 * _check_bits(bits, p.shape[0]).to(x) - 1.0
    return x + alpha * torch.einsum("bk,k...->b...", s, p)


def extract_additive(x: Tensor, n_bits: int, *, key: int) -> Tensor:
    """Blind read-out of :func:`embed_additive`: the sign of the correlation of the mean-removed image with each
    pattern. Returns ``[B, n_bits]`` 0/1."""
    p = _patterns(tuple(x.shape[1:]), n_bits, key).to(x)
    xc = x - x.flatten(1).mean(1).view(-1, *[1] * (x.ndim - 1))
    return (torch.einsum("b...,k...->bk", xc, p) > 0).long().cpu()


def bit_accuracy(read: Tensor, bits: Tensor) -> Tensor:
    """Per-image fraction of bits read correctly ``[B]`` (float64)."""
    if read.shape != bits.shape:
        raise ValueError(f"read and bits must have one shape, got {tuple(read.shape)} and {tuple(bits.shape)}")
    return (read.long() == bits.long()).double().mean(1)


def psnr(x: Tensor, ref: Tensor, *, data_range: float = 2.0, max_db: float = 100.0) -> Tensor:
    """Per-image PSNR in dB ``[B]`` for images in ``[-1, 1]`` (``data_range = 2``), clipped at ``max_db``."""
    mse = (x - ref).pow(2).flatten(1).mean(1).double()
    return (10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30))).clamp(max=max_db)


# ----------------------------------------------------------------------------------------------- attacks
_JPEG_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float64)


def _dct_matrix(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def jpeg_like(x: Tensor, quality: int = 50) -> Tensor:
    """JPEG's lossy step on 8x8 images in ``[-1, 1]``: the orthonormal 8x8 DCT of the 0..255 image, quantised with
    the standard luminance table scaled for ``quality`` (IJG rule), rounded and transformed back (no chroma, no
    entropy coding: those are lossless or absent for one grey channel)."""
    if x.shape[-2:] != (8, 8):
        raise ValueError(f"jpeg_like works on 8x8 blocks, got images of {tuple(x.shape[-2:])}")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(f"quality must be an int in 1..100, got {quality!r}")
    s = 5000 / quality if quality < 50 else 200 - 2 * quality
    q = ((_JPEG_LUMA * s + 50) // 100).clamp(min=1)
    d = _dct_matrix(8)
    v = (x.double().clamp(-1, 1) + 1) * 127.5 - 128
    c = d @ v @ d.T
    v2 = d.T @ (torch.round(c / q) * q) @ d
    return ((v2 + 128) / 127.5 - 1).clamp(-1, 1).to(x.dtype)


def _blur(x: Tensor, sigma: float = 0.7) -> Tensor:
    k = torch.exp(-torch.arange(-1, 2, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = (k[:, None] * k[None]) / k.sum() ** 2
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(xp, k.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1), groups=x.shape[1])


def _crop(x: Tensor, border: int = 1, fill: float = -1.0) -> Tensor:
    out = torch.full_like(x, fill)
    out[..., border:-border, border:-border] = x[..., border:-border, border:-border]
    return out


ATTACKS: dict[str, Callable] = {
    "none": lambda x, g: x,
    "noise 0.2": lambda x, g: (x + 0.2 * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(-1, 1),
    "JPEG q50": lambda x, g: jpeg_like(x, 50),
    "crop 1px": lambda x, g: _crop(x, 1),
    "blur 0.7": lambda x, g: _blur(x, 0.7),
}


def attack(x: Tensor, name: str, *, generator: torch.Generator) -> Tensor:
    """Apply the attack ``name`` of :data:`ATTACKS` (random ones draw from ``generator``) to images in ``[-1, 1]``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator")
    return ATTACKS[name](x.clamp(-1, 1), generator)
