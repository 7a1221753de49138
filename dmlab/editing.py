"""Image editing with a pretrained diffusion model: SDEdit, SINE's model-based guidance, and DiffEditor-style
feature-correspondence drag guidance with a regional SDE.

* :func:`sdedit` -- SDEdit (Meng et al. 2022): noise the source to ``sigma_start`` and denoise it under the edit
  condition. The trivial competitor of every editing method here.
* :class:`ModelGuidance` -- SINE's model-based classifier-free guidance (Zhang et al. 2023, "SINE: SINgle Image
  Editing with Text-to-Image Diffusion Models", paper 50): the model fine-tuned on the single source image carries
  its content, the pretrained model the edit,
  ``D = D_pre(x, null) + w [v (D_ft(x, c_src) - D_pre(x, null)) + (1 - v) (D_pre(x, c_edit) - D_pre(x, null))]``
  for ``sigma > sigma_switch``, plain classifier-free guidance of the pretrained model below it (official code:
  zhang-zx/SINE, ``ldm/models/diffusion/guidance_ddim.py``; reimplemented here).
* :func:`drag_energy`, :class:`DragGuidance`, :func:`sample_drag` -- the score-based gradient guidance of
  DragonDiffusion / DiffEditor (Mou et al. 2024, "DiffEditor: Boosting Accuracy and Flexibility on Diffusion-based
  Image Editing", paper 70; official code MC-E/DragonDiffusion, ``src/models/dragondiff.py``): an energy built from
  the denoiser's intermediate features (read through :func:`dmlab.hooks.capture`) asks the features of the edited
  image at the target region to match the source's at the handle region, and those outside the edit region to stay;
  its gradient is added to the score. DiffEditor's regional SDE injects fresh noise only inside the edit region
  while the rest follows the deterministic ODE.

Every denoiser is ``D(x, sigma, **cond)`` in the VE convention of :mod:`dmlab.denoisers`; samplers come from
:mod:`dmlab.samplers`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .denoisers import as_sigma, bcast
from .hooks import _check_layers, capture

__all__ = ["sdedit", "ModelGuidance", "model_guidance", "drag_energy", "DragGuidance", "sample_drag",
           "shift_image", "ink_centroid"]


def _check_den(d, name: str) -> None:
    if not callable(d):
        raise TypeError(f"{name} must be a denoiser: a callable D(x, sigma, **cond)")


@torch.no_grad()
def sdedit(denoiser: Callable, x_src: Tensor, sigmas: Tensor, *, cond: dict | None = None,
           generator: torch.Generator, sampler: Callable | None = None, noise: Tensor | None = None) -> Tensor:
    """SDEdit (Meng et al. 2022): ``x = x_src + sigmas[0] * eps``, then ``sampler`` (default Euler) down ``sigmas``
    under ``cond``. ``sigmas[0]`` is the edit strength (0: no edit; the model's ``sigma_max``: a fresh sample).
    ``eps`` is drawn from ``generator`` on the CPU unless given as ``noise``."""
    from .samplers import sample_euler

    _check_den(denoiser, "denoiser")
    if not isinstance(x_src, Tensor) or x_src.ndim < 2:
        raise ValueError("x_src must be a batch of source images [B, C, H, W]")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2 or float(sigmas[-1]) != 0.0:
        raise ValueError("sigmas must be a decreasing 1-D schedule ending in 0 (dmlab.schedules.karras)")
    if noise is None:
        noise = torch.randn(x_src.shape, generator=generator, dtype=x_src.dtype)
    x = x_src + float(sigmas[0]) * noise.to(x_src.device)
    return (sampler or sample_euler)(denoiser, x, sigmas.to(x_src.device), cond=cond)


class ModelGuidance:
    """SINE's model-based guidance (paper 50) as a denoiser of the edit condition (see the module docstring).

    ``pretrained(x, sigma, **cond)`` is the pretrained denoiser, ``finetuned`` the one fine-tuned on the source
    image, ``source_cond`` the condition it was fine-tuned with, ``null_cond`` the unconditional one. ``v`` in
    ``[0, 1]`` weighs content (fine-tuned) against edit (pretrained); ``sigma_switch``: below it only the pretrained
    model guides. ``calls`` counts network calls (3 per evaluation above the switch, 2 below).
    """

    def __init__(self, pretrained: Callable, finetuned: Callable, *, scale: float, v: float, source_cond: dict,
                 null_cond: dict, sigma_switch: float = 0.0):
        _check_den(pretrained, "pretrained")
        _check_den(finetuned, "finetuned")
        if not (isinstance(source_cond, dict) and isinstance(null_cond, dict)):
            raise TypeError("source_cond and null_cond must be dicts of keyword arguments, e.g. "
                            "{'class_labels': torch.full((B,), 10)}")
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"v must be in [0, 1] (1: only the fine-tuned model's content), got {v!r}")
        if not (math.isfinite(float(scale)) and math.isfinite(float(sigma_switch)) and sigma_switch >= 0):
            raise ValueError("scale must be finite and sigma_switch a finite number >= 0")
        self.pre, self.ft, self.scale, self.v = pretrained, finetuned, float(scale), float(v)
        self.source_cond, self.null_cond, self.sigma_switch = source_cond, null_cond, float(sigma_switch)
        self.calls = 0

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x)
        d_u = self.pre(x, sigma, **self.null_cond)
        d_c = self.pre(x, sigma, **cond)
        self.calls += 2
        out = d_u + self.scale * (d_c - d_u)
        hi = sigma > self.sigma_switch
        if hi.any() and self.v > 0:
            d_f = self.ft(x, sigma, **self.source_cond)
            self.calls += 1
            mixed = d_u + self.scale * (self.v * (d_f - d_u) + (1 - self.v) * (d_c - d_u))
            out = torch.where(bcast(hi, x), mixed, out)
        return out


def model_guidance(pretrained: Callable, finetuned: Callable, **kw) -> ModelGuidance:
    """SINE's model-based guidance: see :class:`ModelGuidance`."""
    return ModelGuidance(pretrained, finetuned, **kw)


# ----------------------------------------------------------------------------------------------- drag editing
def shift_image(x: Tensor, dy: int, dx: int, fill: float = -1.0) -> Tensor:
    """``x`` ``[B, C, H, W]`` moved by ``(dy, dx)`` pixels, the uncovered border filled with ``fill`` (the
    background; -1 is white paper for the digits)."""
    if not (isinstance(dy, int) and isinstance(dx, int)):
        raise TypeError("dy and dx must be integer pixel shifts")
    out = torch.full_like(x, fill)
    H, W = x.shape[-2:]
    if abs(dy) >= H or abs(dx) >= W:
        return out
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        x[..., max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def ink_centroid(x: Tensor) -> Tensor:
    """Centre of mass ``[B, 2]`` (row, column) of the ink ``(x + 1) / 2`` of images in ``[-1, 1]``."""
    w = ((x.clamp(-1, 1) + 1) / 2).sum(1)  # [B, H, W]
    H, W = w.shape[-2:]
    r = torch.arange(H, dtype=w.dtype)[:, None]
    c = torch.arange(W, dtype=w.dtype)[None, :]
    m = w.sum((-2, -1)).clamp_min(1e-8)
    return torch.stack([(w * r).sum((-2, -1)) / m, (w * c).sum((-2, -1)) / m], 1)


def _resize_mask(mask: Tensor, f: Tensor) -> Tensor:
    if mask.shape[-2:] == f.shape[-2:]:
        return mask.to(f.dtype)
    return torch.nn.functional.interpolate(mask.to(f.dtype), size=f.shape[-2:], mode="area")


def drag_energy(feat: Tensor, ref: Tensor, target: Tensor, keep: Tensor, shift: tuple[int, int], *,
                w_edit: float = 1.0, w_keep: float = 1.0) -> Tensor:
    """DragonDiffusion's correspondence energy (paper 70), per sample ``[B]``.

    ``feat``/``ref``: features ``[B, D, h, w]`` of the image being edited and of the source. The content at the
    handle must reappear moved by ``shift = (dy, dx)`` image pixels: the edit term is the mean ``1 - cos`` between
    ``feat`` and the moved ``ref`` over the ``target`` mask ``[B, 1, H, W]``; the keep term the mean ``1 - cos``
    between ``feat`` and ``ref`` over the ``keep`` mask. The feature grid must divide the image grid so that the
    shift is a whole number of feature cells."""
    if feat.shape != ref.shape or feat.ndim != 4:
        raise ValueError(f"feat and ref must be [B, D, h, w] of one shape, got {tuple(feat.shape)}, "
                         f"{tuple(ref.shape)}")
    H, W = target.shape[-2:]
    h, w = feat.shape[-2:]
    fy, fx = shift[0] * h / H, shift[1] * w / W
    if fy != int(fy) or fx != int(fx):
        raise ValueError(f"shift {shift} is not a whole number of cells of the {h}x{w} feature grid of a {H}x{W} "
                         "image: choose a finer layer or a multiple shift")
    moved = shift_image(ref, int(fy), int(fx), fill=0.0)
    t, k = _resize_mask(target, feat), _resize_mask(keep, feat)
    cos_t = torch.nn.functional.cosine_similarity(feat, moved, dim=1, eps=1e-6)[:, None]
    cos_k = torch.nn.functional.cosine_similarity(feat, ref, dim=1, eps=1e-6)[:, None]
    e_edit = ((1 - cos_t) * t).sum((-3, -2, -1)) / t.sum((-3, -2, -1)).clamp_min(1e-8)
    e_keep = ((1 - cos_k) * k).sum((-3, -2, -1)) / k.sum((-3, -2, -1)).clamp_min(1e-8)
    return w_edit * e_edit + w_keep * e_keep


class DragGuidance:
    """Score-based gradient guidance on feature correspondences (DragonDiffusion / DiffEditor, paper 70) as a
    denoiser: ``D_g(x) = D(x) - scale * sigma * g``, the score plus ``-(scale / sigma) g``, with ``g`` the gradient
    of the energy ``E`` normalised per sample to unit RMS (DragonDiffusion sets its step sizes relative to the
    gradient's size).

    ``E`` is :func:`drag_energy` between the features of ``layer`` of ``net`` (captured during the denoiser call on
    ``x``) and reference features of the source at the same sigma, ``ref_fn(sigma) -> [B, D, h, w]``.
    ``scale = 0`` is the plain denoiser, bit for bit. ``sigma_min_guide``: no guidance below it.
    """

    def __init__(self, denoiser: Callable, net: torch.nn.Module, layer: str, ref_fn: Callable, *, target: Tensor,
                 keep: Tensor, shift: tuple[int, int], scale: float, sigma_min_guide: float = 0.0,
                 w_keep: float = 1.0):
        _check_den(denoiser, "denoiser")
        self.layer = _check_layers(net, [layer])[0]
        if not math.isfinite(float(scale)) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        self.den, self.net, self.ref_fn = denoiser, net, ref_fn
        self.target, self.keep, self.shift = target, keep, (int(shift[0]), int(shift[1]))
        self.scale, self.sigma_min_guide, self.w_keep = float(scale), float(sigma_min_guide), float(w_keep)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x)
        if self.scale == 0 or bool((sigma <= self.sigma_min_guide).all()):
            with torch.no_grad():
                return self.den(x, sigma, **cond)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            with capture(self.net, [self.layer], detach=False) as cap:
                d = self.den(xg, sigma, **cond)
            feat = cap[self.layer]
            e = drag_energy(feat, self.ref_fn(sigma).to(feat.dtype), self.target, self.keep, self.shift,
                            w_keep=self.w_keep)
            (g,) = torch.autograd.grad(e.sum(), xg)
        g = g / g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, *[1] * (x.ndim - 1))
        on = bcast((sigma > self.sigma_min_guide).to(x.dtype), x)
        return (d - on * self.scale * bcast(sigma, x) * g).detach()


@torch.no_grad()
def sample_drag(denoiser: Callable, x: Tensor, sigmas: Tensor, *, region: Tensor | None = None, eta: float = 0.0,
                cond: dict | None = None, generator: torch.Generator | None = None) -> Tensor:
    """DDIM-style sampling with DiffEditor's regional SDE (paper 70): each step is the deterministic Euler (ODE)
    step outside ``region`` and, inside it, the ancestral step that re-draws a fraction ``eta`` of the noise
    (``eta = 0``: the ODE everywhere; ``region = None`` with ``eta > 0``: a global SDE). ``denoiser`` may be a
    :class:`DragGuidance`. Noise comes from ``generator`` on the CPU."""
    _check_den(denoiser, "denoiser")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if eta > 0 and not isinstance(generator, torch.Generator):
        raise TypeError("eta > 0 draws noise: pass generator=torch.Generator")
    cond = dict(cond or {})
    sig = [float(s) for s in sigmas]
    m = torch.ones_like(x[:, :1]) if region is None else region.to(x.dtype)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        d = denoiser(x, torch.full((x.shape[0],), s, dtype=x.dtype), **cond)
        x_ode = d + (x - d) * (s_next / s)
        if eta > 0 and s_next > 0:
            # ancestral split (Karras et al. 2022 / DDIM eta): s_up^2 + s_down^2 = s_next^2
            s_up = min(s_next, eta * s_next * math.sqrt(max(0.0, 1 - (s_next / s) ** 2)))
            s_down = math.sqrt(s_next ** 2 - s_up ** 2)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x_sde = d + (x - d) * (s_down / s) + s_up * z
            x = m * x_sde + (1 - m) * x_ode
        else:
            x = x_ode
    return x
