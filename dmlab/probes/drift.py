"""How much each U-Net block's output moves between sampling steps: the analysis of Faster Diffusion (Li et al.
2024, "Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model Inference", paper 35).

The paper's observation (its analysis section and Fig. 3, on Stable Diffusion with 50 DDIM steps): the *encoder*
blocks' features change gently from one time step to the next while the *decoder* blocks' features change a lot -
which is what lets encoder propagation (:func:`dmlab.accelerators.apply_encoder_propagation`) reuse encoder features.
No analysis code was released (the official ``utils_sd.py`` holds only the accelerator); as we read the paper, its
measures are, per block ``b`` with output ``f_b^s`` at sampling step ``s``:

* the mean squared difference between adjacent steps, ``MSE(f_b^s, f_b^{s-1})`` (its Fig. 3a) -
  :func:`adjacent_mse`;
* the Frobenius norm of the channel-averaged 2-D feature map at every step, ``|| mean_c f_b^s ||_F``, whose spread
  over the trajectory (the standard deviation over steps) is small for encoder and large for decoder blocks (its
  Fig. 3b-c) - :func:`fnorm_curve`.

Both depend on a block's feature scale, which differs between blocks; we therefore also report the scale-free
relative change ``||f^s - f^{s-1}||_F / ||f^{s-1}||_F`` (:func:`relative_change`) and the coefficient of variation of
the F-norm curve. The paper's statements are about SD-1.5's UNet; :func:`feature_drift` measures them on any
diffusers UNet (our zoo models or SD at full scale) along a sampler's trajectory, with forward hooks that change
nothing (:func:`dmlab.probes.capture`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..anatomy import unet_blocks  # re-exported: the encoder / decoder split lives in dmlab.anatomy

__all__ = ["unet_blocks", "relative_change", "adjacent_mse", "fnorm_curve", "DriftReport", "trajectory_features",
           "feature_drift"]


def _check_history(h) -> Tensor:
    if isinstance(h, (list, tuple)):
        if not h or not all(isinstance(t, Tensor) for t in h):
            raise TypeError("history must be a non-empty list of tensors (one per step) or a tensor [S, B, ...]")
        h = torch.stack(list(h))
    if not isinstance(h, Tensor) or h.ndim < 2:
        raise ValueError("history must be a tensor [S, B, ...]: S steps of a block's output for a batch of B")
    if h.shape[0] < 2:
        raise ValueError("need at least 2 steps to measure a change between adjacent steps")
    return h.double()


def relative_change(history) -> Tensor:
    """``||f^s - f^{s-1}||_F / ||f^{s-1}||_F`` for ``s = 1 .. S-1``, per sample then averaged over the batch:
    ``[S-1]``. ``history`` is ``[S, B, ...]`` (or a list of ``[B, ...]``). 0 for a constant trajectory."""
    h = _check_history(history)
    d = (h[1:] - h[:-1]).flatten(2).norm(dim=2)
    ref = h[:-1].flatten(2).norm(dim=2)
    return (d / ref.clamp_min(1e-30)).mean(1)


def adjacent_mse(history) -> Tensor:
    """Mean squared difference between a block's outputs at adjacent steps, ``[S-1]`` (Faster Diffusion, Fig. 3a)."""
    h = _check_history(history)
    return (h[1:] - h[:-1]).square().flatten(1).mean(1)


def fnorm_curve(history) -> Tensor:
    """Frobenius norm of the channel-averaged feature map at every step, averaged over the batch, ``[S]``
    (Faster Diffusion, Fig. 3b: "average along the channel dimension, then take the F-norm"). Token outputs
    ``[S, B, N, D]`` are averaged over their last (feature) dimension instead."""
    h = _check_history(history)
    if h.ndim == 5:        # [S, B, C, H, W]
        m = h.mean(2)
    elif h.ndim == 4:      # [S, B, N, D] tokens
        m = h.mean(3)
    else:
        m = h
    return m.flatten(2).norm(dim=2).mean(1)


@dataclass
class DriftReport:
    """Per-block drift along one sampling trajectory (see :func:`feature_drift`).

    ``relative[b] [S-1]``, ``mse[b] [S-1]``, ``fnorm[b] [S]``; ``groups`` maps "encoder"/"decoder" to block names;
    ``sigmas`` the schedule; ``x`` the final sample.
    """

    relative: dict[str, Tensor]
    mse: dict[str, Tensor]
    fnorm: dict[str, Tensor]
    groups: dict[str, list[str]]
    sigmas: Tensor
    x: Tensor
    calls: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> list[dict]:
        """One row per block: group, mean relative change, mean adjacent MSE, F-norm std and its coefficient of
        variation (std / mean) over the trajectory."""
        rows = []
        for g, names in self.groups.items():
            for b in names:
                fn = self.fnorm[b]
                rows.append({"block": b, "group": g, "rel_change": float(self.relative[b].mean()),
                             "mse": float(self.mse[b].mean()), "fnorm_std": float(fn.std()),
                             "fnorm_cv": float(fn.std() / fn.mean().clamp_min(1e-30))})
        return rows

    def group_mean(self, key: str = "rel_change") -> dict[str, float]:
        """Mean of a :meth:`summary` column over the blocks of each group."""
        out = {}
        for g in self.groups:
            vals = [r[key] for r in self.summary() if r["group"] == g]
            out[g] = sum(vals) / len(vals)
        return out


@torch.no_grad()
def trajectory_features(denoiser: Callable, net, x: Tensor, sigmas: Tensor, layers: Sequence[str], *,
                        sampler: Callable | None = None, cond: dict | None = None,
                        generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``sampler(denoiser, x, sigmas, cond=...)`` (default Euler, i.e. DDIM for an eps-network) with forward
    hooks on ``net``'s ``layers``; return the final sample and ``{layer: [calls, B, ...]}``, one entry per network
    call (one per step for Euler; Heun makes two). The hooks are removed afterwards and change nothing."""
    from ..samplers import sample_euler
    from ..hooks import capture

    sampler = sample_euler if sampler is None else sampler
    with capture(net, list(layers), keep_all=True) as cap:
        out = sampler(denoiser, x, sigmas, cond=cond, generator=generator)
    hist = {}
    for n in cap.layers:
        if not cap.history[n]:
            raise RuntimeError(f"layer {n!r} never ran during sampling; is it part of the network the denoiser calls?")
        hist[n] = torch.stack(cap.history[n])
    return out, hist


def feature_drift(denoiser: Callable, net, x: Tensor, sigmas: Tensor, *, layers: dict[str, list[str]] | None = None,
                  sampler: Callable | None = None, cond: dict | None = None,
                  generator: torch.Generator | None = None) -> DriftReport:
    """Faster Diffusion's feature analysis (Li et al. 2024, paper 35) along one sampling trajectory.

    ``layers`` groups block names (default :func:`unet_blocks`: encoder = down blocks + mid block, decoder = up
    blocks). Returns a :class:`DriftReport` with :func:`relative_change`, :func:`adjacent_mse` and
    :func:`fnorm_curve` per block.
    """
    groups = unet_blocks(net) if layers is None else {g: list(v) for g, v in layers.items()}
    if not groups or not all(groups.values()):
        raise ValueError("layers must map group names to non-empty lists of block names")
    names = [n for v in groups.values() for n in v]
    out, hist = trajectory_features(denoiser, net, x, sigmas, names, sampler=sampler, cond=cond,
                                    generator=generator)
    return DriftReport(relative={n: relative_change(h) for n, h in hist.items()},
                       mse={n: adjacent_mse(h) for n, h in hist.items()},
                       fnorm={n: fnorm_curve(h) for n, h in hist.items()},
                       groups=groups, sigmas=torch.as_tensor(sigmas), x=out,
                       calls=len(next(iter(hist.values()))))
