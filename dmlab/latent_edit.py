"""Asymmetric autoencoders for latent editing: a decoder that also sees the unmasked source image.

Latent diffusion (Rombach et al. 2022) edits an image by changing its latent inside a mask and decoding the whole
latent again. The decoder only sees the latent, so the region that should stay untouched comes back with the
autoencoder's reconstruction error, and with leaks from the edited latent through the decoder's receptive field.
Zhu et al. 2023 ("Designing a Better Asymmetric VQGAN for StableDiffusion") keep the encoder and the diffusion
model and give the decoder a *conditional branch*: a small convolutional encoder of the masked source image and
the mask whose features replace the decoder's own features outside the mask at every resolution (their
mask-guided blending; diffusers' ``MaskConditionDecoder`` does the same). Trained on reconstruction with random
masks, plus fully masked inputs so that plain generation (nothing known) still decodes.

:class:`AsymmetricDecoder` wraps any diffusers ``AutoencoderKL`` decoder (the ``sd_tiny`` one or SD 1.5's) with such
a branch (:class:`ConditionBranch`); :func:`random_box_masks` draws the training/evaluation masks;
:func:`train_asymmetric` fine-tunes it (and, at the same steps and batches, the plain decoder as the control);
:func:`edit_latents` builds the editing benchmark (the latent of one image with a box taken from another).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConditionBranch", "AsymmetricDecoder", "random_box_masks", "downsample_mask", "edit_latents",
           "train_asymmetric", "region_psnr", "region_mse", "train_entry", "load_entry"]


def _decoder_levels(decoder: nn.Module) -> list[tuple[int, int]]:
    """``(channels, downsampling factor)`` of the decoder features the branch replaces: the input of every up
    block, then the output of the last one (before ``conv_norm_out``)."""
    if not hasattr(decoder, "up_blocks") or not hasattr(decoder, "conv_norm_out"):
        raise TypeError("decoder must be a diffusers AutoencoderKL decoder (vae.decoder), with up_blocks and "
                        f"conv_norm_out; got {type(decoder).__name__}")
    ups = [b.upsamplers is not None for b in decoder.up_blocks]
    factor = 2 ** sum(ups)
    levels = []
    for b, up in zip(decoder.up_blocks, ups):
        levels.append((b.resnets[0].conv1.in_channels, factor))
        factor //= 2 if up else 1
    levels.append((decoder.conv_norm_out.num_channels, 1))
    return levels


class ConditionBranch(nn.Module):
    """A light encoder of ``cat(masked image, mask)`` giving one feature map per decoder level (full resolution
    first, then stride-2 stages), each with the channels of the decoder feature it is added to."""

    def __init__(self, image_channels: int, levels: list[tuple[int, int]], width: int | None = None):
        super().__init__()
        self.levels = [tuple(lv) for lv in levels]
        factors = sorted({f for _, f in self.levels})
        w = width or self.levels[-1][0]
        self.stem = nn.Sequential(nn.Conv2d(image_channels + 1, w, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(w, w, 3, padding=1))
        self.heads = nn.ModuleList(nn.Conv2d(w, c, 3, padding=1) for c, _ in self.levels)
        self.downs = nn.ModuleList()
        f = 1
        while f < factors[-1]:  # the factors are powers of two
            self.downs.append(nn.Sequential(nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU()))
            f *= 2
        self.factors = factors
        for head in self.heads:  # zero-initialised: training starts at the original decoder
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, masked_image: Tensor, mask: Tensor) -> list[Tensor]:
        h = self.stem(torch.cat([masked_image, mask], 1))
        at = {1: h}
        for i, down in enumerate(self.downs):
            h = at[2 ** (i + 1)] = down(h)
        return [head(at[f]) for head, (_, f) in zip(self.heads, self.levels)]


class AsymmetricDecoder(nn.Module):
    """A copy of ``vae.decoder`` plus a :class:`ConditionBranch` (Zhu et al. 2023).

    ``forward(z, image=None, mask=None)`` decodes the *unscaled* latent ``z`` (``vae.decode``'s input, before
    ``post_quant_conv``). With ``image`` ``[B, C, H, W]`` and ``mask`` ``[B, 1, H, W]`` (1 = to be generated, 0 = keep)
    the branch sees ``image * (1 - mask)`` and ``mask``, and before every up block and before the output head the
    branch's features are added to the decoder's outside the (nearest-downsampled) mask. Without them (or with an
    all-ones mask) it is the plain decoder path on the same weights.

    One deviation from the paper and diffusers' ``MaskConditionDecoder``, which *replace* the features outside the
    mask: here they are *added*, through zero-initialised heads (as ControlNet's zero convolutions), so the
    untrained branch leaves the original decoder exactly and a few hundred CPU steps suffice.
    """

    def __init__(self, vae, width: int | None = None):
        super().__init__()
        if not hasattr(vae, "decoder") or not hasattr(vae, "post_quant_conv"):
            raise TypeError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
        self.decoder = copy.deepcopy(vae.decoder)
        pq = vae.post_quant_conv
        self.post_quant_conv = copy.deepcopy(pq) if pq is not None else nn.Identity()
        self.levels = _decoder_levels(self.decoder)
        self.image_channels = self.decoder.conv_out.out_channels
        self.branch = ConditionBranch(self.image_channels, self.levels, width)

    def forward(self, z: Tensor, image: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if (image is None) != (mask is None):
            raise ValueError("give both image and mask (mask 1 = region to generate), or neither")
        d = self.decoder
        feats = None
        if image is not None:
            if mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:] or image.shape[0] != z.shape[0]:
                raise ValueError(f"mask must be [B, 1, H, W] matching image {tuple(image.shape)}, got "
                                 f"{tuple(mask.shape)}")
            feats = self.branch(image * (1 - mask), mask)
        h = d.mid_block(d.conv_in(self.post_quant_conv(z)))
        for i, block in enumerate(d.up_blocks):
            h = block(self._blend(h, feats, mask, i))
        h = self._blend(h, feats, mask, -1)
        return d.conv_out(d.conv_act(d.conv_norm_out(h)))

    @staticmethod
    def _blend(h, feats, mask, i):
        if feats is None:
            return h
        m = F.interpolate(mask, size=h.shape[-2:], mode="nearest")
        return h + feats[i] * (1 - m)


def random_box_masks(n: int, size: int, *, generator: torch.Generator, grid: int = 1, min_frac: float = 0.25,
                     max_frac: float = 0.6, p_full: float = 0.0) -> Tensor:
    """``[n, 1, size, size]`` masks of one random axis-aligned box each (1 inside), side lengths between
    ``min_frac`` and ``max_frac`` of ``size``, corners on a ``grid`` (the latent's downsampling factor, so the box
    is a box of latent cells too); a fraction ``p_full`` of the masks is all ones (fully masked: generation)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (seeded), e.g. torch.Generator().manual_seed(0)")
    if size % grid or not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"size {size} must be a multiple of grid {grid}; need 0 < min_frac <= max_frac <= 1")
    cells = size // grid
    lo, hi = max(1, round(min_frac * cells)), max(1, round(max_frac * cells))
    hw = torch.randint(lo, hi + 1, (n, 2), generator=generator)
    u = torch.rand(n, 2, generator=generator)
    full = torch.rand(n, generator=generator) < p_full
    m = torch.zeros(n, 1, cells, cells)
    for i in range(n):
        h, w = int(hw[i, 0]), int(hw[i, 1])
        y, x = int(u[i, 0] * (cells - h + 1)), int(u[i, 1] * (cells - w + 1))
        m[i, 0, y:y + h, x:x + w] = 1
    m[full] = 1
    return m.repeat_interleave(grid, -1).repeat_interleave(grid, -2)


def downsample_mask(mask: Tensor, factor: int) -> Tensor:
    """The mask on the latent grid: a latent cell is masked when any of its pixels is."""
    return F.max_pool2d(mask, factor)


def edit_latents(z_src: Tensor, z_other: Tensor, mask: Tensor) -> Tensor:
    """The edited latent: ``z_src`` outside the (pixel) ``mask``, ``z_other`` inside it (a stand-in for the latent
    an inpainting sampler writes into the hole; blending the latents is what SD inpainting does at every step)."""
    f = mask.shape[-1] // z_src.shape[-1]
    m = downsample_mask(mask, f)
    return z_src * (1 - m) + z_other * m


def region_mse(x: Tensor, ref: Tensor, region: Tensor) -> Tensor:
    """Per-image mean squared error over the pixels where ``region`` is 1 ``[B]`` (images with an empty region:
    ``nan``)."""
    r = region.expand_as(x)
    return ((x - ref) ** 2 * r).flatten(1).sum(1) / r.flatten(1).sum(1)


def region_psnr(x: Tensor, ref: Tensor, region: Tensor, *, data_range: float = 2.0, floor: float = 1e-8) -> Tensor:
    """Per-image PSNR (dB) over the pixels where ``region`` is 1, the MSE clipped below at ``floor`` (so
    identical regions give a finite value)."""
    return 10 * torch.log10(data_range ** 2 / region_mse(x, ref, region).clamp_min(floor))


def train_asymmetric(vae, images: Tensor, *, steps: int, batch: int, lr: float, seed: int, width: int | None = None,
                     p_full: float = 0.25, min_frac: float = 0.25, max_frac: float = 0.6,
                     train_decoder: bool = False, progress: bool = False) -> dict:
    """Train, with the encoder frozen and the same batches/masks, (a) an :class:`AsymmetricDecoder` on
    reconstruction with random box masks (a fraction ``p_full`` fully masked): its branch only, or with
    ``train_decoder`` the decoder too (as the paper does, with far more data and steps), (b) the plain decoder
    fine-tuned for the same steps (the control). Returns ``{"asym": module, "plain": module, "log": {...}}``."""
    from .train import FitConfig, fit

    if not isinstance(images, Tensor) or images.dim() != 4:
        raise TypeError("images must be a [N, C, H, W] tensor in [-1, 1]")
    with torch.no_grad():
        vae = vae.eval()
        lat = torch.cat([vae.encode(images[i:i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
    size = images.shape[-1]
    grid = size // lat.shape[-1]
    out, log = {}, {}
    for name in ("asym", "plain"):
        torch.manual_seed(seed)  # the branch's initialisation
        model = AsymmetricDecoder(vae, width)
        gen = torch.Generator().manual_seed(10_000 + seed)

        def data(g):
            idx = torch.randint(0, len(images), (batch,), generator=g)
            m = random_box_masks(batch, size, generator=g, grid=grid, min_frac=min_frac, max_frac=max_frac,
                                 p_full=p_full)
            return {"x": images[idx], "z": lat[idx], "m": m}

        if name == "asym":
            if not train_decoder:
                for p in [*model.decoder.parameters(), *model.post_quant_conv.parameters()]:
                    p.requires_grad_(False)

            def loss(b):
                return (model(b["z"], b["x"], b["m"]) - b["x"]).pow(2).mean()
        else:
            for p in model.branch.parameters():
                p.requires_grad_(False)

            def loss(b):
                return (model(b["z"]) - b["x"]).pow(2).mean()
        cfg = FitConfig(steps=steps, lr=lr, schedule="cosine", warmup=min(20, steps // 10), grad_clip=1.0,
                        progress=progress, desc=f"{name} s{seed}")
        res = fit(loss, model, cfg, generator=gen, data=data)
        out[name] = model.eval()
        log[name] = {"final_loss": float(sum(res.losses[-20:]) / len(res.losses[-20:])), "seconds": res.seconds}
    out["log"] = log
    return out


def train_entry(config: dict, progress: bool = False) -> tuple[dict, dict]:
    """Train the zoo entry ``asym_decoder``: for every seed of ``config["seeds"]``, :func:`train_asymmetric` on the
    train digits (16x16) with ``sd_tiny``'s frozen encoder. Returns ``(state dict, log)``; the plain control keeps
    only its decoder weights."""
    from .data import load_digits
    from .zoo import load

    vae = load("sd_tiny").vae
    x = load_digits("train", size=16)[0]
    state, log = {}, {}
    for s in config["seeds"]:
        r = train_asymmetric(vae, x, steps=config["steps"], batch=config["batch"], lr=config["lr"], seed=s,
                             width=config.get("width"), p_full=config["p_full"],
                             train_decoder=config.get("train_decoder", False), progress=progress)
        state.update(_entry_state(r["asym"], r["plain"], s, config.get("train_decoder", False)))
        log[f"s{s}"] = r["log"]
    return state, {"final_loss": {f"{m}.s{s}": log[f"s{s}"][m]["final_loss"] for s in config["seeds"]
                                  for m in ("asym", "plain")}}


def _entry_state(asym, plain, seed, train_decoder):
    """What the entry stores: the asymmetric decoder (its branch only when the decoder stayed frozen: it is
    ``sd_tiny``'s) and the plain control's decoder in float16 (the entry stays under 1 MB)."""
    state = {}
    for k, v in asym.state_dict().items():
        if train_decoder or k.startswith("branch."):
            state[f"asym.s{seed}.{k}"] = v.contiguous()
    for k, v in plain.state_dict().items():
        if not k.startswith("branch."):
            state[f"plain.s{seed}.{k}"] = v.half().contiguous()
    return state


def load_entry(state: dict, config: dict, vae=None) -> dict:
    """``ModuleDict({"asym": [AsymmetricDecoder per seed], "plain": [...]})`` from :func:`train_entry`'s state dict (the plain
    control as an :class:`AsymmetricDecoder` whose branch is never called; weights not stored are ``vae``'s)."""
    if vae is None:
        from .zoo import load

        vae = load("sd_tiny").vae
    out = {"asym": [], "plain": []}
    for m in out:
        for s in config["seeds"]:
            d = AsymmetricDecoder(vae, config.get("width"))
            pre = f"{m}.s{s}."
            d.load_state_dict({k[len(pre):]: v.float() for k, v in state.items() if k.startswith(pre)}, strict=False)
            out[m].append(d.eval())
    return nn.ModuleDict({m: nn.ModuleList(v) for m, v in out.items()})
