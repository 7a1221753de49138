"""Any size from a fixed-size model: tiled denoising with explicit or implicit (randomly shifted) overlap.

Zheng et al., "Any-Size-Diffusion: Toward Efficient Text-Driven Synthesis for Any-Size HD Images" (arXiv 2308.16582,
AAAI 2024; paper 14). Its second stage, **Fast Seamless Tiled Diffusion (FSTD)**, denoises a large image as tiles
the model was trained on. Non-overlapping tiles leave seams; explicit overlap (MultiDiffusion, Bar-Tal et al. 2023:
tiles at stride < tile, predictions averaged) removes them at up to ~2x the tiles per row; FSTD's *implicit
overlap* keeps non-overlapping tiles but **shifts the tile grid randomly at every step**, so no border stays in
one place and seams average out over the trajectory at (almost) the non-overlapping cost. The paper's first stage
(ARAD, aspect-ratio fine-tuning) is training and is not included. No official code was found; this is a
re-implementation from the paper text.

:class:`TiledDenoiser` is a Denoiser -> Denoiser transformer, so any sampler runs it. Conditioning
tensors with a batch dimension (``class_labels``) are repeated for every tile. ``stats``: ``calls`` and ``tiles``
(tile evaluations; the cost in model calls at the tile size). :func:`seam_score` measures seams.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..denoisers import as_sigma

__all__ = ["TiledDenoiser", "tiled", "seam_score", "tile_starts"]

MODES = ("fixed", "shift", "overlap")


def tile_starts(length: int, tile: int, stride: int, offset: int = 0) -> list[tuple[int, bool]]:
    """``(start, on_grid)`` of the tiles of size ``tile`` covering ``[0, length)``: a grid of step ``stride`` shifted
    by ``offset`` (``0 <= offset < stride``; ``on_grid=True``), plus partial tiles at either end moved inside the
    image (clamped to the border; ``on_grid=False``)."""
    if length < tile:
        raise ValueError(f"the image ({length} px) is smaller than a tile ({tile} px)")
    grid = list(range(offset, length - tile + 1, stride))
    out = [(s, True) for s in grid]
    if offset > 0:
        out.insert(0, (0, False))
    if not grid or grid[-1] + tile < length:
        out.append((length - tile, False))
    return out


class TiledDenoiser:
    """Tiled denoising of images larger than ``tile`` (Any-Size-Diffusion's FSTD, Zheng et al. 2024).

    ``mode``: ``"fixed"`` (non-overlapping tiles: seams), ``"overlap"`` (explicit overlap at ``stride``, default
    ``tile // 2``, predictions averaged: MultiDiffusion) or ``"shift"`` (FSTD implicit overlap: non-overlapping
    tiles on a grid shifted by a random offset drawn from ``generator`` at every call; border tiles are clamped
    inside the image, so a shifted grid costs one extra tile per row and column). Height and width must be
    multiples of ``tile`` for ``fixed`` and ``shift``.
    """

    def __init__(self, denoiser: Callable, tile: int, *, mode: str = "shift", stride: int | None = None,
                 generator: torch.Generator | None = None):
        if not callable(denoiser):
            raise TypeError("denoiser must be callable: D(x, sigma, **cond) -> x0_hat")
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be an int >= 1 (the model's training size, e.g. 8), got {tile!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "overlap":
            stride = tile // 2 if stride is None else stride
            if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= tile:
                raise ValueError(f"stride must be an int in 1..tile={tile}, got {stride!r}")
        elif stride is not None:
            raise ValueError("stride is only used with mode='overlap'")
        if mode == "shift" and not isinstance(generator, torch.Generator):
            raise TypeError("mode='shift' draws a random grid offset per call: pass generator=torch.Generator()")
        self.denoiser, self.tile, self.mode, self.generator = denoiser, tile, mode, generator
        self.stride = stride if mode == "overlap" else tile
        self.stats = {"calls": 0, "tiles": 0}

    def _grid(self, h: int, w: int) -> tuple[list[int], list[int]]:
        if self.mode != "overlap" and (h % self.tile or w % self.tile):
            raise ValueError(f"height and width ({h}x{w}) must be multiples of tile={self.tile} for mode "
                             f"{self.mode!r}; use mode='overlap' for other sizes")
        oy = ox = 0
        if self.mode == "shift":
            oy, ox = (int(v) for v in torch.randint(0, self.tile, (2,), generator=self.generator))
            oy, ox = (oy if h > self.tile else 0), (ox if w > self.tile else 0)
        return tile_starts(h, self.tile, self.stride, oy), tile_starts(w, self.tile, self.stride, ox)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x)
        b, t = x.shape[0], self.tile
        ys, xs = self._grid(x.shape[-2], x.shape[-1])
        # clamped border tiles first, grid tiles last: where they overlap, the grid tile owns the pixels
        cells = [((i, j), gi + gj) for i, gi in ys for j, gj in xs]
        pos = [ij for ij, _ in sorted(cells, key=lambda c: c[1])]  # a stable sort
        tiles = torch.cat([x[..., i:i + t, j:j + t] for i, j in pos])
        rep = lambda v: v.repeat(len(pos), *([1] * (v.ndim - 1))) if isinstance(v, Tensor) and v.ndim and \
            v.shape[0] == b else v  # noqa: E731
        out = self.denoiser(tiles, sigma.repeat(len(pos)), **{k: rep(v) for k, v in cond.items()})
        self.stats["calls"] += 1
        self.stats["tiles"] += len(pos) * b
        acc = torch.zeros_like(x)
        if self.mode == "overlap":
            cnt = torch.zeros_like(x[:1, :1])
            for n, (i, j) in enumerate(pos):
                acc[..., i:i + t, j:j + t] += out[n * b:(n + 1) * b]
                cnt[..., i:i + t, j:j + t] += 1
            return acc / cnt
        for n, (i, j) in enumerate(pos):
            acc[..., i:i + t, j:j + t] = out[n * b:(n + 1) * b]
        return acc


def tiled(denoiser: Callable, tile: int, *, mode: str = "shift", stride: int | None = None,
          generator: torch.Generator | None = None) -> TiledDenoiser:
    """Tiled denoising (Any-Size-Diffusion FSTD / MultiDiffusion overlap): see :class:`TiledDenoiser`."""
    return TiledDenoiser(denoiser, tile, mode=mode, stride=stride, generator=generator)


def seam_score(x: Tensor, tile: int) -> float:
    """Mean absolute pixel jump across the borders of a ``tile`` grid divided by the mean jump between all other
    neighbouring pixels in the same direction (averaged over the directions that cross a border): about 1 without
    seams, larger with them (Any-Size-Diffusion's seam problem, Zheng et al. 2024). ``x``: ``[B, C, H, W]``."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError("x must be images [B, C, H, W]")
    if x.shape[-1] <= tile and x.shape[-2] <= tile:
        raise ValueError(f"images of {tuple(x.shape[-2:])} px have no {tile}-px tile borders")
    ratios = []
    for dim in (-1, -2):  # columns, then rows; only directions that cross a tile border
        n = x.shape[dim]
        if n <= tile:
            continue
        d = x.diff(dim=dim).abs().double().movedim(dim, -1)  # [..., n - 1] jumps between neighbours
        border = torch.zeros(n - 1, dtype=torch.bool)
        border[tile - 1::tile] = True
        ratios.append(d[..., border].mean() / d[..., ~border].mean())
    return float(sum(ratios) / len(ratios))
