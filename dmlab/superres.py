"""Diffusion super-resolution at tiny scale (chapter 28): a conditional x0-prediction SR model, its DDIM sampler,
scale distillation (YONOS-SR), compression by pruning and adversarial distillation (AdcSR), and pixel-aware cross
attention with a degradation-removal module (PASD).

* :class:`SRNet` - a small conditional UNet ``f(x_t, lr_up, t) -> x0`` on ``[N, 1, H, W]`` images in ``[-1, 1]``:
  the noisy HR image and the bicubic-upsampled LR observation are concatenated (SR3, Saharia et al. 2022), time
  enters by FiLM, and the network predicts the residual over the bicubic image. ``residual=s`` diffuses that
  residual itself, scaled to unit variance (``z = (x - lr_up) / s``, as ResShift and most SR diffusion code), with
  the v-prediction preconditioning ``x0 = lr_up + s (alpha_t z_t + sigma_t F)``. ``paca=True`` adds PASD's
  degradation-removal module and pixel-aware cross attention (:class:`DegradationRemoval`,
  :class:`PixelAwareCrossAttention`).
* :func:`alpha_sigma`, :func:`sr_loss`, :func:`sample_sr` - the cosine VP schedule on ``t in [0, 1]``, the x0 loss,
  and DDIM (eta = 0) from pure noise at ``t = 1`` with any number of steps (one step returns ``f(x_1, lr, 1)``).
* :func:`scale_distill_loss` - YONOS-SR's scale distillation (:cite:`noroozi2024you`): the x4 student regresses
  onto the prediction of a frozen x2 teacher that sees the *easier* x2 observation of the same HR image at the same
  ``x_t`` (a target adapted to the noise level, and less uncertain than the ground truth), instead of the HR image.
* :func:`prune_srnet`, :func:`compress_distill_loss` - AdcSR (:cite:`chen2025adversarial`): structured channel pruning
  of a one-step SR model (keep the channels with the largest weight norms), then distillation from the uncompressed
  one-step model with an adversarial term (a small :class:`PatchDiscriminator` on the output's detail).
* :func:`feature_distance` - a perceptual distance (squared distance of unit-normalised multi-scale features, the
  LPIPS form of Zhang et al. 2018) in a *fixed, randomly initialised* conv net: no trained perceptual network loads
  offline, so this is a stand-in that weighs edges and texture, not a calibrated LPIPS.
* :func:`train_sr_models` - every model of the chapter for one training seed (the zoo's ``sr_s*`` recipes).
* :class:`UpscalerX0`, :func:`load_upscaler`, :func:`upscale` - the full-scale path: Stable Diffusion's x4
  upscaler (the base model of YONOS-SR) seen as the same ``f(x_t, lr, t) -> x0`` and sampled by :func:`sample_sr`
  with one or many DDIM steps.

All training goes through :func:`dmlab.train.fit`; every draw comes from an explicit ``torch.Generator``.
Re-implementations from the papers' text, scaled down to 32x32 grey patches (YONOS-SR has no public code; AdcSR's
and PASD's official code bases are Guaishou74851/AdcSR and yangxy/PASD).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import degrade, sr_pairs
from .train import FitConfig, fit

__all__ = ["SRNet", "DegradationRemoval", "PixelAwareCrossAttention", "PatchDiscriminator", "alpha_sigma",
           "upsample", "sr_loss", "sample_sr", "scale_distill_loss", "prune_srnet", "compress_distill_loss",
           "feature_distance", "train_sr_models", "load_sr_models", "SR_MODELS", "UpscalerX0", "load_upscaler",
           "upscale"]

SR_MODELS = ("teacher_x2", "direct", "yonos", "adcsr", "small", "plain", "pasd")


# ----------------------------------------------------------------------------------------------- schedule
def alpha_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    """The cosine VP schedule ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)`` on ``t in [0, 1]``."""
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def upsample(lr: Tensor, scale: int) -> Tensor:
    """Bicubic upsampling by ``scale`` (``align_corners=False``), clamped to ``[-1, 1]``: the classical baseline
    and the conditioning image of every model here."""
    if not isinstance(lr, Tensor) or lr.ndim != 4:
        raise TypeError("upsample: lr must be a tensor [N, C, h, w]")
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def _time_features(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    f = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=t.dtype) / half)
    a = 100.0 * t[:, None] * f[None]
    return torch.cat([a.sin(), a.cos()], 1)


# ----------------------------------------------------------------------------------------------- modules
class _ResBlock(nn.Module):
    """``x + conv2(silu(film_t(conv1(silu(x)))))``; no normalisation, so channels can be pruned exactly."""

    def __init__(self, c: int, emb: int, inner: int | None = None):
        super().__init__()
        inner = c if inner is None else inner
        self.conv1 = nn.Conv2d(c, inner, 3, padding=1)
        self.film = nn.Linear(emb, 2 * inner)
        self.conv2 = nn.Conv2d(inner, c, 3, padding=1)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(x))
        s, b = self.film(e)[:, :, None, None].chunk(2, 1)
        return x + self.conv2(F.silu(h * (1 + s) + b))


class DegradationRemoval(nn.Module):
    """PASD's degradation-removal module (:cite:`yang2024pixelaware`, Sec. 3.2): a small conv encoder of the upsampled
    LR image that gives features at full and half resolution, each with a "clean image" head. Training pulls the
    heads towards the HR image (downsampled to that scale), so the features become insensitive to blur, noise and
    JPEG; they condition the SR network through :class:`PixelAwareCrossAttention`."""

    def __init__(self, width: int):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        self.enc2 = nn.Sequential(nn.SiLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1))
        self.head1 = nn.Conv2d(width, 1, 3, padding=1)
        self.head2 = nn.Conv2d(2 * width, 1, 3, padding=1)

    def forward(self, lr_up: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``([features at H, at H/2], [clean-image estimates at H, at H/2])``."""
        f1 = self.enc1(lr_up)
        f2 = self.enc2(f1)
        return [f1, f2], [self.head1(f1), self.head2(f2)]


class PixelAwareCrossAttention(nn.Module):
    """PASD's pixel-aware cross attention (PACA, :cite:`yang2024pixelaware`, Eq. 2): every pixel of the denoiser's feature
    map ``y`` (queries) attends to *all pixels* of the conditioning feature map ``c`` of the same resolution (keys
    and values), ``y + W_o softmax(q k^T / sqrt(d)) v``. Unlike ControlNet's addition, the condition keeps its full
    pixel grid as tokens instead of being summed into ``y``. ``W_o`` starts at zero, so a new PACA is the
    identity (as in PASD, which adds it to a trained network)."""

    def __init__(self, channels: int, cond_channels: int, dim: int = 16):
        super().__init__()
        self.q = nn.Conv2d(channels, dim, 1)
        self.k = nn.Conv2d(cond_channels, dim, 1)
        self.v = nn.Conv2d(cond_channels, dim, 1)
        self.out = nn.Conv2d(dim, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, y: Tensor, c: Tensor) -> Tensor:
        if y.shape[-2:] != c.shape[-2:]:
            raise ValueError(f"PixelAwareCrossAttention: y {tuple(y.shape)} and c {tuple(c.shape)} need the same "
                             "spatial size (PACA pairs feature maps of one resolution)")
        q, k, v = (m(z).flatten(2).transpose(1, 2) for m, z in ((self.q, y), (self.k, c), (self.v, c)))
        a = F.scaled_dot_product_attention(q, k, v)  # [N, HW, dim]
        return y + self.out(a.transpose(1, 2).reshape(y.shape[0], -1, *y.shape[-2:]))


class SRNet(nn.Module):
    """A conditional SR denoiser ``f(x_t, lr_up, t) -> x0`` (x0-prediction), as a residual over ``lr_up``.

    Two resolutions (``width`` channels at ``H``, ``2 width`` at ``H/2``), one residual block with FiLM time
    conditioning per stage (:class:`_ResBlock`), additive skip. ``cond="concat"`` feeds ``lr_up`` as an input
    channel next to ``x_t`` (SR3) and predicts the residual over ``lr_up``; ``cond="latent"`` feeds it only through
    a latent: the LR image encoded at ``H/2`` and added to the features there (ControlNet-style addition; a plain
    latent-conditioned model whose output is decoded from its features, with no pixel path from ``lr_up``);
    ``paca=True`` (with ``cond="latent"``) adds PASD's :class:`DegradationRemoval` and a
    :class:`PixelAwareCrossAttention` on the ``H/2`` grid, the tiny model's latent grid (PASD's PACA also acts on
    the UNet's latent-resolution feature maps; full-resolution attention would cost 2.6 s per training step here).

    ``residual=s`` (a float; ``None``: off) makes the model diffuse the scaled residual ``z = (x - lr_up) / s``
    instead of the HR image: ``x`` in :meth:`forward` is then the noisy state ``z_t`` and the output is
    ``x0 = lr_up + s (alpha_t z_t + sigma_t F(z_t, lr_up, t))`` (v-prediction preconditioning for unit-variance
    data), with ``F``'s last layer at zero, so an untrained model's one-step output is exactly ``lr_up``.
    :func:`sample_sr`, :func:`sr_loss` and the distillation losses handle the state (``model.residual_scale``).
    """

    def __init__(self, width: int = 16, emb: int = 32, cond: str = "concat", paca: bool = False,
                 inner: tuple[int, int, int, int] | None = None, residual: float | None = None):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"SRNet: width must be an int >= 1, got {width!r}")
        if residual is not None and (isinstance(residual, bool) or not isinstance(residual, (int, float))
                                     or residual <= 0):
            raise ValueError(f"SRNet: residual must be None or a scale > 0 (e.g. 0.13), got {residual!r}")
        if cond not in ("concat", "latent"):
            raise ValueError(f"SRNet: cond must be 'concat' or 'latent', got {cond!r}")
        if paca and cond != "latent":
            raise ValueError("SRNet: paca=True needs cond='latent' (PACA is PASD's addition to a latent model)")
        self.config = {"width": width, "emb": emb, "cond": cond, "paca": bool(paca),
                       "inner": None if inner is None else list(inner),
                       "residual": None if residual is None else float(residual)}
        self.residual_scale = self.config["residual"]
        w, w2 = width, 2 * width
        inner = inner or (w, w2, w2, w)
        self.temb = nn.Linear(emb, emb)
        self.inc = nn.Conv2d(2 if cond == "concat" else 1, w, 3, padding=1)
        self.rb1 = _ResBlock(w, emb, inner[0])
        self.down = nn.Conv2d(w, w2, 3, stride=2, padding=1)
        self.rb2 = _ResBlock(w2, emb, inner[1])
        self.rb3 = _ResBlock(w2, emb, inner[2])
        self.up = nn.Conv2d(w2, w, 3, padding=1)
        self.rb4 = _ResBlock(w, emb, inner[3])
        self.outc = nn.Conv2d(w, 1, 3, padding=1)
        if cond == "concat" or residual is not None:  # untrained, it returns lr_up: training starts at bicubic
            nn.init.zeros_(self.outc.weight)
            nn.init.zeros_(self.outc.bias)
        if cond == "latent":
            self.lat = nn.Sequential(nn.Conv2d(1, w2, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(w2, w2, 3, padding=1))
        if paca:
            self.drm = DegradationRemoval(w)
            self.paca = PixelAwareCrossAttention(w2, w2)

    def forward(self, x: Tensor, lr_up: Tensor, t: Tensor, *, return_aux: bool = False):
        if x.shape != lr_up.shape or x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"SRNet: x and lr_up must both be [N, 1, H, W], got {tuple(x.shape)} and "
                             f"{tuple(lr_up.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        e = F.silu(self.temb(_time_features(t, self.config["emb"])))
        h1 = self.inc(torch.cat([x, lr_up], 1) if self.config["cond"] == "concat" else x)
        aux = None
        h1 = self.rb1(h1, e)
        h2 = self.down(h1)
        if self.config["cond"] == "latent":
            h2 = h2 + self.lat(lr_up)
        if self.config["paca"]:
            feats, aux = self.drm(lr_up)
            h2 = self.paca(h2, feats[1])
        h2 = self.rb3(self.rb2(h2, e), e)
        h = self.rb4(h1 + self.up(F.interpolate(h2, scale_factor=2, mode="nearest")), e)
        out = self.outc(F.silu(h))
        if self.residual_scale is not None:  # preconditioned: x0 = lr_up + s (alpha_t z_t + sigma_t F)
            a, sg = alpha_sigma(t)
            out = lr_up + self.residual_scale * (a[:, None, None, None] * x + sg[:, None, None, None] * out)
        elif self.config["cond"] == "concat":
            out = out + lr_up
        return (out, aux) if return_aux else out


class PatchDiscriminator(nn.Module):
    """A small conv critic ``D(detail, lr_up) -> logits [N]`` on the detail ``x - lr_up`` an SR model adds (AdcSR's
    adversarial term at tiny scale; AdcSR's own discriminator works on the teacher's features)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, width, 3, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv2d(2 * width, 1, 3, padding=1))

    def forward(self, x: Tensor, lr_up: Tensor) -> Tensor:
        return self.net(torch.cat([x - lr_up, lr_up], 1)).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------- losses, sampler
def _noised(hr: Tensor, generator: torch.Generator, one_step: float = 0.0) -> tuple[Tensor, Tensor]:
    t = torch.rand(hr.shape[0], generator=generator)
    t[: int(one_step * hr.shape[0])] = 1.0  # this fraction of the batch at t = 1, the one-step point
    a, s = alpha_sigma(t)
    eps = torch.randn(hr.shape, generator=generator)
    return a[:, None, None, None] * hr + s[:, None, None, None] * eps, t


def _to_state(model, x: Tensor, lr_up: Tensor) -> Tensor:
    """An HR-space image as the state ``model`` diffuses: itself, or ``(x - lr_up) / s`` for a residual model."""
    s = getattr(model, "residual_scale", None)
    return x if s is None else (x - lr_up) / s


def _from_state(model, z: Tensor, lr_up: Tensor) -> Tensor:
    s = getattr(model, "residual_scale", None)
    return z if s is None else lr_up + s * z


def _mse(model, pred: Tensor, target: Tensor) -> Tensor:
    """Squared error of two HR-space images in the units of ``model``'s state (residual units when residual)."""
    s = getattr(model, "residual_scale", None)
    return (pred - target).pow(2).mean() / (1.0 if s is None else s * s)


def sr_loss(model: SRNet, hr: Tensor, lr_up: Tensor, *, generator: torch.Generator, aux_weight: float = 0.1,
            one_step: float = 0.0) -> Tensor:
    """The x0 loss ``|f(alpha_t x + sigma_t eps, lr_up, t) - hr|^2`` with ``t ~ U(0, 1)``, where the diffused state
    ``x`` is ``hr`` or, for a residual model (``SRNet(residual=s)``), the scaled residual ``(hr - lr_up) / s``
    (the loss then in those units); plus, with PACA, ``aux_weight`` times the L1 loss of the degradation-removal
    heads against the HR image at their scale. ``one_step``: the fraction of the batch drawn at ``t = 1`` instead
    (where one-step sampling evaluates the model)."""
    x_t, t = _noised(_to_state(model, hr, lr_up), generator, one_step)
    pred, aux = model(x_t, lr_up, t, return_aux=True)
    loss = _mse(model, pred, hr)
    if aux is not None:
        loss = loss + aux_weight * ((aux[0] - hr).abs().mean() + (aux[1] - F.avg_pool2d(hr, 2)).abs().mean())
    return loss


def scale_distill_loss(student: SRNet, teacher: SRNet, hr: Tensor, lr_up: Tensor, lr_up_teacher: Tensor, *,
                       generator: torch.Generator, one_step: float = 0.0) -> Tensor:
    """YONOS-SR's scale distillation: ``|f_student(x_t, lr_up, t) - f_teacher(x_t, lr_up_teacher, t)|^2`` where the
    frozen teacher sees the observation at the smaller scale (``lr_up_teacher``, e.g. x2) of the same HR image and
    the student the larger one (``lr_up``, x4), at the same noisy ``x_t`` (the same HR-space image: for residual
    models, the student's state ``z_t`` is ``(x_t - lr_up) / s`` and the teacher's ``(x_t - lr_up_teacher) / s``)."""
    z_t, t = _noised(_to_state(student, hr, lr_up), generator, one_step)
    with torch.no_grad():
        target = teacher(_to_state(teacher, _from_state(student, z_t, lr_up), lr_up_teacher), lr_up_teacher, t)
    return _mse(student, student(z_t, lr_up, t), target)


@torch.no_grad()
def sample_sr(model: SRNet, lr_up: Tensor, steps: int, *, noise: Tensor | None = None,
              generator: torch.Generator | None = None, clip: float | None = 1.0) -> Tensor:
    """DDIM (eta = 0) with x0-prediction from ``x_1 = noise`` to ``t = 0`` in ``steps`` uniform steps in ``t``:
    ``x_s = alpha_s x0_hat + sigma_s (x_t - alpha_t x0_hat) / sigma_t``, ``x0_hat`` clamped to ``[-clip, clip]``
    (``None``: not clamped, for latents). One step returns ``f(x_1, lr_up, 1)``.
    A residual model (``SRNet(residual=s)``) runs the same DDIM on its state ``(x - lr_up) / s``, starting at
    ``noise``; the returned image is in HR space either way.
    Give ``noise`` (the shape of ``lr_up``; a latent model may have other channels) to pair methods on the same
    draw, or a ``generator``. ``model`` is any ``f(x_t, lr_up, t) -> x0``: an :class:`SRNet` or, at full scale, an
    :class:`UpscalerX0`."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sample_sr: steps must be an int >= 1, got {steps!r}")
    if noise is None:
        if not isinstance(generator, torch.Generator):
            raise TypeError("sample_sr: give noise= (a tensor like lr_up) or generator= (a torch.Generator)")
        noise = torch.randn(lr_up.shape, generator=generator)
    if noise.shape[0] != lr_up.shape[0] or noise.shape[2:] != lr_up.shape[2:]:
        raise ValueError(f"sample_sr: noise {tuple(noise.shape)} must match lr_up {tuple(lr_up.shape)} in batch and "
                         "spatial size")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x = noise.to(lr_up.dtype)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        x0 = model(x, lr_up, t.to(x.dtype))
        x0 = x0 if clip is None else x0.clamp(-clip, clip)
        if i == steps - 1:
            return x0
        x0 = _to_state(model, x0, lr_up)
        (a_t, s_t), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
        x = (a_s * x0 + s_s * (x - a_t * x0) / s_t).to(x.dtype)
    return x  # pragma: no cover


# ----------------------------------------------------------------------------------------------- AdcSR
def _importance(weight_out: list[Tensor], weight_in: list[Tensor]) -> Tensor:
    """Per-channel L1 norm of the filters that write a channel plus those that read it."""
    s = sum(w.abs().flatten(1).sum(1) for w in weight_out)
    return s + sum(w.abs().transpose(0, 1).flatten(1).sum(1) for w in weight_in)


def prune_srnet(model: SRNet, keep: float) -> SRNet:
    """AdcSR's structured pruning step on a concat-conditioned :class:`SRNet`: a narrower ``SRNet`` whose channels
    are the fraction ``keep`` of the original's with the largest weight norms (the residual stream at each
    resolution and the inside of each residual block chosen separately), weights copied. ``keep=1`` gives a
    network with the same function (channels kept in their order)."""
    if not isinstance(model, SRNet) or model.config["cond"] != "concat" or model.config["paca"]:
        raise TypeError("prune_srnet: model must be an SRNet with cond='concat' and paca=False")
    if not (isinstance(keep, float) and 0 < keep <= 1):
        raise ValueError(f"prune_srnet: keep must be a float in (0, 1], got {keep!r}")
    m, w = model, model.config["width"]
    wk = max(1, round(w * keep))

    def top(score, k):
        return torch.sort(torch.topk(score, k).indices).values

    i1 = top(_importance([m.inc.weight, m.rb1.conv2.weight, m.up.weight, m.rb4.conv2.weight],
                         [m.rb1.conv1.weight, m.down.weight, m.rb4.conv1.weight, m.outc.weight]), wk)
    i2 = top(_importance([m.down.weight, m.rb2.conv2.weight, m.rb3.conv2.weight],
                         [m.rb2.conv1.weight, m.rb3.conv1.weight, m.up.weight]), 2 * wk)
    inner = [top(_importance([b.conv1.weight], [b.conv2.weight]), max(1, round(b.conv1.out_channels * keep)))
             for b in (m.rb1, m.rb2, m.rb3, m.rb4)]
    new = SRNet(wk, m.config["emb"], inner=tuple(len(i) for i in inner), residual=m.config.get("residual"))
    sd, out = m.state_dict(), {}
    stream = {"rb1": i1, "rb2": i2, "rb3": i2, "rb4": i1}
    for (name, blk), idx in zip((("rb1", 0), ("rb2", 1), ("rb3", 2), ("rb4", 3)), inner):
        ii, io = idx, stream[name]
        out[f"{name}.conv1.weight"] = sd[f"{name}.conv1.weight"][ii][:, io]
        out[f"{name}.conv1.bias"] = sd[f"{name}.conv1.bias"][ii]
        out[f"{name}.film.weight"] = sd[f"{name}.film.weight"][torch.cat([ii, ii + len(sd[f"{name}.conv1.bias"])])]
        out[f"{name}.film.bias"] = sd[f"{name}.film.bias"][torch.cat([ii, ii + len(sd[f"{name}.conv1.bias"])])]
        out[f"{name}.conv2.weight"] = sd[f"{name}.conv2.weight"][io][:, ii]
        out[f"{name}.conv2.bias"] = sd[f"{name}.conv2.bias"][io]
    out["temb.weight"], out["temb.bias"] = sd["temb.weight"], sd["temb.bias"]
    out["inc.weight"], out["inc.bias"] = sd["inc.weight"][i1], sd["inc.bias"][i1]
    out["down.weight"], out["down.bias"] = sd["down.weight"][i2][:, i1], sd["down.bias"][i2]
    out["up.weight"], out["up.bias"] = sd["up.weight"][i1][:, i2], sd["up.bias"][i1]
    out["outc.weight"], out["outc.bias"] = sd["outc.weight"][:, i1], sd["outc.bias"]
    new.load_state_dict(out)
    return new


def compress_distill_loss(student: SRNet, teacher: SRNet, disc: PatchDiscriminator | None, hr: Tensor,
                          lr_up: Tensor, *, generator: torch.Generator, adversarial: float = 0.0) -> Tensor:
    """AdcSR's distillation of a one-step SR model into a compressed one: the student's one-step output (``t = 1``,
    the same noise for both) regresses onto the teacher's, plus ``adversarial`` times a non-saturating GAN term
    against ``disc``, which learns the real HR detail against the student's (both terms in one loss; the
    generator term sees a frozen copy of ``disc``)."""
    noise = torch.randn(hr.shape, generator=generator)
    one = torch.ones(hr.shape[0])
    with torch.no_grad():
        target = teacher(noise, lr_up, one)
    pred = student(noise, lr_up, one)
    loss = _mse(student, pred, target)
    if adversarial > 0:
        if disc is None:
            raise ValueError("compress_distill_loss: adversarial > 0 needs disc= (a PatchDiscriminator)")
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        g_logit = torch.func.functional_call(disc, frozen, (pred, lr_up))
        d_loss = F.softplus(-disc(hr, lr_up)).mean() + F.softplus(disc(pred.detach(), lr_up)).mean()
        loss = loss + adversarial * F.softplus(-g_logit).mean() + d_loss
    return loss


# ----------------------------------------------------------------------------------------------- yardstick
_FEATURE_NET: list = []


def _feature_net() -> nn.Module:
    if not _FEATURE_NET:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2028)
            net = nn.ModuleList([nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                 nn.Conv2d(32, 32, 3, stride=2, padding=1)])
        for p in net.parameters():
            p.requires_grad_(False)
        _FEATURE_NET.append(net.double().eval())
    return _FEATURE_NET[0]


def feature_distance(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image perceptual distance ``[N]``: the mean over three scales of the squared distance between
    channel-unit-normalised features of ``x`` and ``ref`` in a fixed conv net with seeded random weights (the LPIPS
    form without its trained weights; 0 for identical images). Lower is better."""
    if not isinstance(x, Tensor) or x.shape != ref.shape or x.ndim != 4 or x.shape[1] != 1:
        raise ValueError("feature_distance: x and ref must be [N, 1, H, W] tensors of the same shape")
    a, b, d = x.double(), ref.double(), 0.0
    for conv in _feature_net():
        a, b = F.relu(conv(a)), F.relu(conv(b))
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = d + (na - nb).pow(2).sum(1).mean((1, 2))
    return (d / 3).float()


# ----------------------------------------------------------------------------------------------- zoo recipe
def _draw(config: dict, scales=(4,)):
    size, n = config["size"], config["batch"]

    def draw(g):
        hr, lrs = None, []
        for s in scales:
            h, lr = sr_pairs("train", n, size=size, scale=s, generator=g)
            hr = h if hr is None else hr
            if s != scales[0]:  # the same HR patches, a fresh degradation at this scale
                lr = degrade(hr, s, generator=g)
            lrs.append(upsample(lr, s))
        return (hr, *lrs)
    return draw


def _seeded(cls, seed: int, *args, **kw) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(*args, **kw)


def train_sr_models(config: dict, seed: int, *, progress: bool = False) -> tuple[dict, dict]:
    """The models of chapter 28 for one training ``seed`` (the zoo recipes ``sr_s{seed}`` and ``pasd_s{seed}``;
    ``config`` is the recipe's model dict: ``part``, ``width``, ``size``, ``batch``, ``lr`` and the step counts).
    One generator (``2800 + seed``, ``2900 + seed`` for ``part="pasd"``) draws everything, in this order.
    Optional keys: ``residual`` (every model is ``SRNet(residual=...)``) and ``one_step`` (the fraction of each
    diffusion batch drawn at ``t = 1``, for every diffusion loss alike).

    ``part="sr"`` (YONOS-SR and AdcSR), saved: ``yonos``, ``direct``, ``adcsr``, ``small``:

    * ``teacher_x2`` (not saved): :func:`sr_loss` at x2 for ``steps_teacher`` steps;
    * ``yonos``: initialised from the teacher, :func:`scale_distill_loss` at x4 for ``steps_student`` steps;
    * ``direct``: :func:`sr_loss` at x4 from scratch for ``steps_teacher + steps_student`` steps (the same total
      number of optimizer steps as teacher plus student);
    * ``adcsr``: :func:`prune_srnet` of ``yonos`` to ``keep``, then :func:`compress_distill_loss` (with
      ``adversarial``) for ``steps_compress`` steps;
    * ``small``: the pruned architecture trained from scratch by the one-step x0 loss at ``t = 1`` for the same
      ``steps_compress`` steps (AdcSR's trivial competitor).

    ``part="pasd"``, saved: ``plain`` and ``pasd``, latent-conditioned SRNets without and with PACA
    (:func:`sr_loss` at x4, ``steps_pasd`` steps each).

    Returns ``(state dict with keys "model.param", log)``.
    """
    c = dict(config)
    if c.get("part") not in ("sr", "pasd"):
        raise ValueError(f"train_sr_models: config['part'] must be 'sr' or 'pasd', got {c.get('part')!r}")
    g = torch.Generator().manual_seed((2800 if c["part"] == "sr" else 2900) + int(seed))
    w = int(c["width"])
    res = c.get("residual")  # None: diffuse the HR image; s: diffuse the scaled residual (hr - bicubic) / s
    one = float(c.get("one_step", 0.0))  # fraction of each diffusion batch at t = 1
    nseed = lambda: int(torch.randint(2 ** 31, (1,), generator=g))  # noqa: E731

    def cfg(steps):
        return FitConfig(steps=steps, lr=c["lr"], schedule="cosine", warmup=min(50, steps // 10), grad_clip=1.0,
                         progress=progress)

    models, log = {}, {"seconds": {}, "final_loss": {}}

    def run(name, model, loss, steps, scales, trained=None):
        r = fit(loss, trained or model, cfg(steps), generator=g, data=_draw(c, scales))
        models[name] = model
        log["seconds"][name], log["final_loss"][name] = round(r.seconds, 1), round(r.curve[-1][1], 6)

    if c["part"] == "pasd":
        for name, paca in (("plain", False), ("pasd", True)):
            m = _seeded(SRNet, nseed(), w, cond="latent", paca=paca, residual=res)
            run(name, m, lambda b, m=m: sr_loss(m, b[0], b[1], generator=g, one_step=one), c["steps_pasd"], (4,))
    else:
        teacher = _seeded(SRNet, nseed(), w, residual=res)
        run("teacher_x2", teacher, lambda b: sr_loss(teacher, b[0], b[1], generator=g, one_step=one),
            c["steps_teacher"], (2,))
        student = SRNet(w, residual=res)
        student.load_state_dict(teacher.state_dict())
        run("yonos", student, lambda b: scale_distill_loss(student, teacher, b[0], b[1], b[2], generator=g,
                                                           one_step=one), c["steps_student"], (4, 2))
        direct = _seeded(SRNet, nseed(), w, residual=res)
        run("direct", direct, lambda b: sr_loss(direct, b[0], b[1], generator=g, one_step=one),
            c["steps_teacher"] + c["steps_student"], (4,))
        pruned = prune_srnet(student, float(c["keep"]))
        disc = _seeded(PatchDiscriminator, nseed())
        run("adcsr", pruned, lambda b: compress_distill_loss(pruned, student, disc, b[0], b[1], generator=g,
                                                             adversarial=float(c["adversarial"])),
            c["steps_compress"], (4,), trained=nn.ModuleDict({"student": pruned, "disc": disc}))
        small = _seeded(SRNet, nseed(), pruned.config["width"], inner=tuple(pruned.config["inner"]), residual=res)

        def one_step_loss(b):
            noise = torch.randn(b[0].shape, generator=g)
            return _mse(small, small(noise, b[1], torch.ones(b[0].shape[0])), b[0])
        run("small", small, one_step_loss, c["steps_compress"], (4,))
        del models["teacher_x2"]
    state = {f"{k}.{p}": v.detach().clone().contiguous() for k, m in models.items() for p, v in m.state_dict().items()}
    log["configs"] = {k: m.config for k, m in models.items()}
    return state, log


def load_sr_models(state: dict, configs: dict) -> nn.ModuleDict:
    """The models of :func:`train_sr_models` from its state dict and ``log["configs"]``, as an ``nn.ModuleDict``
    of :class:`SRNet` by name (eval mode)."""
    out = nn.ModuleDict()
    for name, cfg in configs.items():
        cfg = dict(cfg)
        if cfg.get("inner") is not None:
            cfg["inner"] = tuple(cfg["inner"])
        m = SRNet(**cfg)
        m.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
        out[name] = m
    return out.eval()


# ----------------------------------------------------------------------------------------------- full scale
UPSCALER = "stabilityai/stable-diffusion-x4-upscaler"


class UpscalerX0(nn.Module):
    """A latent SR UNet with the interface of Stable Diffusion's x4 upscaler (input: the latent concatenated with
    the noised LR image, ``class_labels`` = the LR noise level, text embeddings) as ``f(x_t, lr, t) -> x0`` on this
    module's time ``t in [0, 1]``: ``t`` goes to the discrete timestep whose ``alpha_bar`` is nearest to
    ``cos^2(pi t / 2)``, and the UNet's v- or eps-prediction is turned into x0 with that step's ``alpha_bar``.
    (SD's schedule keeps a little signal at its last step, so ``t = 1`` is its last step: the usual one-step
    approximation.)"""

    def __init__(self, unet: nn.Module, scheduler, prompt_embeds: Tensor, noise_level: int = 20):
        super().__init__()
        self.unet, self.emb, self.noise_level = unet, prompt_embeds, int(noise_level)
        self.register_buffer("alphas_cumprod", torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64))
        self.prediction = scheduler.config.prediction_type
        if self.prediction not in ("v_prediction", "epsilon"):
            raise ValueError(f"UpscalerX0: prediction_type {self.prediction!r} is not supported (v or epsilon)")

    def forward(self, x: Tensor, lr: Tensor, t) -> Tensor:
        target = math.cos(0.5 * math.pi * float(t)) ** 2
        k = int((self.alphas_cumprod - target).abs().argmin())
        ab = self.alphas_cumprod[k]
        a, s = float(ab.sqrt()), float((1 - ab).sqrt())
        n = x.shape[0]
        out = self.unet(torch.cat([x, lr.to(x.dtype)], 1), torch.full((n,), k, device=x.device),
                        encoder_hidden_states=self.emb.expand(n, *self.emb.shape[1:]).to(x.dtype),
                        class_labels=torch.full((n,), self.noise_level, device=x.device)).sample
        return a * x - s * out if self.prediction == "v_prediction" else (x - s * out) / a


def load_upscaler(*, device: str | None = None, dtype=None, require_gpu: bool = True):
    """Stable Diffusion's x4 upscaler (``StableDiffusionUpscalePipeline``, the base model YONOS-SR distils) through
    :func:`dmlab.hub.resolve` (a clear error offline or without a GPU)."""
    from . import hub

    device, local = hub.resolve(UPSCALER, family="sd", probe_file="model_index.json", device=device,
                                require_gpu=require_gpu)
    from diffusers import StableDiffusionUpscalePipeline

    dt = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    pipe = StableDiffusionUpscalePipeline.from_pretrained(UPSCALER, torch_dtype=dt, local_files_only=local)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def upscale(pipe, lr_rgb: Tensor, steps: int, *, generator: torch.Generator, prompt_embeds: Tensor | None = None,
            noise_level: int = 20) -> Tensor:
    """x4 SR of ``lr_rgb`` ``[N, 3, h, w]`` in ``[-1, 1]`` with the upscaler ``pipe`` (``unet``, ``vae``,
    ``scheduler``, ``low_res_scheduler``; ``text_encoder``/``tokenizer`` when ``prompt_embeds`` is None: the empty
    prompt) by :func:`sample_sr` with ``steps`` DDIM steps. ``generator`` draws the LR noise and then the initial
    latent, so two calls with equal seeds share them. Returns ``[N, 3, 4h, 4w]`` in ``[-1, 1]`` (the VAE decodes x4
    for the real upscaler)."""
    p = next(pipe.unet.parameters())
    if prompt_embeds is None:
        ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        prompt_embeds = pipe.text_encoder(ids.to(p.device))[0]
    lvl = torch.full((lr_rgb.shape[0],), int(noise_level), dtype=torch.long)
    lr = pipe.low_res_scheduler.add_noise(lr_rgb.float(), torch.randn(lr_rgb.shape, generator=generator), lvl)
    noise = torch.randn((lr.shape[0], pipe.vae.config.latent_channels, *lr.shape[-2:]), generator=generator)
    f = UpscalerX0(pipe.unet, pipe.scheduler, prompt_embeds.to(p.device, p.dtype), noise_level).to(p.device)
    lat = sample_sr(f, lr.to(p.device, p.dtype), steps, noise=noise.to(p.device, p.dtype), clip=None)
    img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    return img.float().clamp(-1.0, 1.0).cpu()
