"""Zero-shot correspondence from frozen features, and the SD + DINO fusion of Zhang et al. 2023 ("A Tale of Two
Features: Stable Diffusion Complements DINO for Zero-Shot Semantic Correspondence", paper 10).

The recipe of the official ``pck_spair_pascal.py``:

1. per extractor, dense descriptors of both images (SD: decoder blocks at ``t = 100``; DINOv2: layer-11 tokens);
   several layers of one extractor are each **co-PCA'd** jointly over the image pair (:func:`co_pca`), resized to
   one grid and concatenated (:func:`layer_descriptor`);
2. every extractor's descriptor is **L2-normalised per location**, multiplied by its weight and the extractors are
   concatenated (:func:`fuse`):

   .. math:: f = \\big[\\, w_{sd}\\, f_{sd}/\\lVert f_{sd}\\rVert \\;;\\; w_{dino}\\, f_{dino}/\\lVert f_{dino}\\rVert
             \\,\\big];

3. each source keypoint goes to its **nearest neighbour** (L2) among the target's descriptors
   (:func:`match_points`), scored by **PCK@alpha** (:func:`dmlab.metrics.pck`): the fraction of predictions within
   ``alpha * size`` of the truth (SPair-71k: ``size`` = the target's bounding-box side).

:func:`grid_keypoints` gives keypoints whose true match under a known :class:`dmlab.data.AffineWarp` is exact;
:func:`warp_pck` scores an extractor on warped pairs; :func:`load_spair` reads a SPair-71k subset for the full-scale
run (download instructions in its docstring).
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["co_pca", "layer_descriptor", "l2_normalize", "fuse", "match_points", "grid_keypoints", "warp_pck",
           "load_spair", "SPAIR_URL"]

SPAIR_URL = "https://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz"


def _check_map(f, name: str) -> Tensor:
    if not isinstance(f, Tensor) or f.ndim != 3:
        raise ValueError(f"{name} must be one image's feature map [C, H, W], got "
                         f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
    return f


def co_pca(fa: Tensor, fb: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Project two feature maps ``[C, Ha, Wa]``, ``[C, Hb, Wb]`` onto the top ``dim`` principal components of all
    their locations pooled (SD-DINO's ``co_pca``, paper 10). Exact SVD (deterministic, float64); component signs are
    fixed so the largest loading is positive."""
    fa, fb = _check_map(fa, "fa"), _check_map(fb, "fb")
    if fa.shape[0] != fb.shape[0]:
        raise ValueError(f"the two maps must have the same channels, got {fa.shape[0]} and {fb.shape[0]}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= fa.shape[0]:
        raise ValueError(f"dim must be an int in [1, {fa.shape[0]}] (the channel count), got {dim!r}")
    C = fa.shape[0]
    X = torch.cat([fa.reshape(C, -1), fb.reshape(C, -1)], 1).T.double()  # [N, C]
    Xc = X - X.mean(0, keepdim=True)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    V = Vh[:dim].T                                                       # [C, dim]
    V = V * torch.sign(V.gather(0, V.abs().argmax(0, keepdim=True)))
    Z = (Xc @ V).T.to(fa.dtype)
    na = fa.shape[1] * fa.shape[2]
    return Z[:, :na].reshape(dim, *fa.shape[1:]), Z[:, na:].reshape(dim, *fb.shape[1:])


def _resize(f: Tensor, size) -> Tensor:
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    return F.interpolate(f[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0].to(f.dtype)


def layer_descriptor(layers_a: Sequence[Tensor], layers_b: Sequence[Tensor], size, *,
                     pca_dims: Sequence[int] | None = None, weights: Sequence[float] | None = None
                     ) -> tuple[Tensor, Tensor]:
    """One extractor's descriptor from several of its layers (SD-DINO's s5/s4/s3): each layer optionally co-PCA'd
    to ``pca_dims[i]``, multiplied by ``weights[i]``, resized (bilinear) to ``size = (H, W)``, concatenated."""
    if len(layers_a) != len(layers_b) or not layers_a:
        raise ValueError("layers_a and layers_b must be equally long, non-empty lists of maps [C, H, W]")
    k = len(layers_a)
    if pca_dims is not None and len(pca_dims) != k:
        raise ValueError(f"pca_dims needs one entry per layer ({k})")
    if weights is not None and len(weights) != k:
        raise ValueError(f"weights needs one entry per layer ({k})")
    outs_a, outs_b = [], []
    for i, (a, b) in enumerate(zip(layers_a, layers_b)):
        a, b = _check_map(a, "a layer"), _check_map(b, "a layer")
        if pca_dims is not None and pca_dims[i]:
            a, b = co_pca(a, b, min(int(pca_dims[i]), a.shape[0]))
        w = 1.0 if weights is None else float(weights[i])
        outs_a.append(w * _resize(a, size))
        outs_b.append(w * _resize(b, size))
    return torch.cat(outs_a), torch.cat(outs_b)


def l2_normalize(f: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit L2 norm over the channel dimension at every location of ``[C, H, W]`` (or ``[B, C, H, W]``)."""
    dim = 0 if f.ndim == 3 else 1
    return f / f.norm(dim=dim, keepdim=True).clamp_min(eps)


def fuse(descriptors: Sequence[Tensor], weights: Sequence[float] | None = None, *, size=None) -> Tensor:
    """SD-DINO fusion (paper 10): resize each extractor's descriptor ``[C_i, H_i, W_i]`` to ``size`` (default the
    first one's), L2-normalise it per location, multiply by ``weights[i]`` (default 1) and concatenate.
    With equal weights every extractor contributes a unit vector, so neither dominates by scale."""
    descriptors = list(descriptors)
    if not descriptors:
        raise ValueError("descriptors is empty")
    if weights is not None and len(weights) != len(descriptors):
        raise ValueError(f"weights needs one entry per descriptor ({len(descriptors)}), got {len(weights)}")
    if any(float(w) < 0 for w in (weights or [])):
        raise ValueError("weights must be non-negative")
    size = tuple(descriptors[0].shape[-2:]) if size is None else tuple(size)
    parts = []
    for i, d in enumerate(descriptors):
        d = _check_map(d, f"descriptors[{i}]")
        w = 1.0 if weights is None else float(weights[i])
        parts.append(w * l2_normalize(_resize(d, size)))
    return torch.cat(parts)


def match_points(fa: Tensor, fb: Tensor, points: Tensor, *, image_size_a, image_size_b) -> Tensor:
    """Nearest-neighbour transfer of keypoints from image a to image b (paper 10's evaluation).

    ``fa [C, ha, wa]``, ``fb [C, hb, wb]`` are descriptor maps covering the whole images of sizes
    ``image_size_a``/``image_size_b`` ``(H, W)``; ``points [K, 2]`` are ``(y, x)`` pixel coordinates in image a
    (pixel centres at integers, :class:`dmlab.data.AffineWarp`'s convention). The source descriptor is read
    bilinearly at each point; the prediction is the centre, in image-b pixels, of the target cell at the smallest
    L2 distance. Returns ``[K, 2]`` float64 ``(y, x)``.
    """
    fa, fb = _check_map(fa, "fa"), _check_map(fb, "fb")
    if fa.shape[0] != fb.shape[0]:
        raise ValueError(f"descriptors must have the same channels, got {fa.shape[0]} and {fb.shape[0]}")
    p = torch.as_tensor(points, dtype=torch.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must be [K, 2] (y, x) pixels, got {tuple(p.shape)}")
    Ha, Wa = image_size_a
    Hb, Wb = image_size_b
    # pixel (y, x) -> normalised grid coordinates (align_corners=False)
    gx = (2 * p[:, 1] + 1) / Wa - 1
    gy = (2 * p[:, 0] + 1) / Ha - 1
    grid = torch.stack([gx, gy], -1).to(fa.dtype)[None, :, None, :]     # [1, K, 1, 2]
    src = F.grid_sample(fa[None], grid, mode="bilinear", align_corners=False)[0, :, :, 0].T  # [K, C]
    tgt = fb.reshape(fb.shape[0], -1).T                                 # [hb*wb, C]
    idx = torch.cdist(src.double(), tgt.double()).argmin(1)
    hb, wb = fb.shape[1:]
    iy, ix = idx // wb, idx % wb
    y = (iy.double() + 0.5) * Hb / hb - 0.5
    x = (ix.double() + 0.5) * Wb / wb - 0.5
    return torch.stack([y, x], 1)


def grid_keypoints(warp, n: int = 8, *, margin: float = 1.0) -> tuple[Tensor, Tensor]:
    """Source keypoints on an ``n x n`` grid over the image (cell centres) whose warped position lies at least
    ``margin`` pixels inside the target, and those exact target positions: ``(src [K, 2], tgt [K, 2])``, ``(y, x)``
    pixels, float64 (ground truth of a :class:`dmlab.data.AffineWarp`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    H, W = warp.height, warp.width
    ys = (torch.arange(n, dtype=torch.float64) + 0.5) * H / n - 0.5
    xs = (torch.arange(n, dtype=torch.float64) + 0.5) * W / n - 0.5
    src = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    tgt = warp(src)
    keep = warp.inside(tgt, margin=margin)
    return src[keep], tgt[keep]


def warp_pck(describe: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], pairs, *, alphas=(0.1,),
             n_points: int = 8, margin: float = 1.0) -> dict[float, float]:
    """PCK@alpha (``alpha * max(H, W)``) of nearest-neighbour matching on warped pairs with exact ground truth.

    ``pairs`` is a list of ``(image [C, H, W], warped [C, H, W], warp)`` (from :func:`dmlab.data.warp_pair`);
    ``describe(image, warped)`` returns the two descriptor maps (it may co-PCA or fuse them jointly).
    Returns ``{alpha: PCK}`` pooled over all keypoints of all pairs (as the official script pools per category).
    """
    from ..metrics import pck

    preds, tgts, sizes = [], [], []
    for img, warped, warp in pairs:
        src, tgt = grid_keypoints(warp, n_points, margin=margin)
        if len(src) == 0:
            continue
        fa, fb = describe(img, warped)
        preds.append(match_points(fa, fb, src, image_size_a=img.shape[-2:], image_size_b=warped.shape[-2:]))
        tgts.append(tgt)
        sizes.append(torch.full((len(src),), float(max(warped.shape[-2:])), dtype=torch.float64))
    if not preds:
        raise ValueError("no keypoint of any pair lands inside its target; use milder warps or a smaller margin")
    P, T, S = torch.cat(preds), torch.cat(tgts), torch.cat(sizes)
    return {float(a): pck(P, T, alpha=float(a), size=S) for a in alphas}


# ----------------------------------------------------------------------------------------------- SPair-71k
def load_spair(root, category: str, *, split: str = "test", n_pairs: int | None = 20,
               generator: torch.Generator | None = None) -> list[dict]:
    """Pairs of a SPair-71k category for the full-scale run of paper 10.

    Get the data once (about 200 MB): ``wget {SPAIR_URL}; tar xzf SPair-71k.tar.gz`` and pass the extracted
    ``SPair-71k`` folder as ``root`` (it holds ``PairAnnotation/<split>/*.json`` and ``JPEGImages/<category>/``).
    ``n_pairs`` pairs are drawn without replacement with ``generator`` (``None``: all, sorted by name; the official
    script samples 20 per category). Each pair is a dict with ``src``, ``trg`` (image paths), ``src_kps``,
    ``trg_kps`` (``[K, 2]`` float64 ``(y, x)`` pixels of the keypoints visible in both) and ``threshold`` (the target
    bounding box's longer side: PCK@alpha counts a prediction correct within ``alpha * threshold``).
    """
    root = pathlib.Path(root)
    ann = root / "PairAnnotation" / split
    if not ann.is_dir():
        raise FileNotFoundError(f"{ann} not found; download SPair-71k ({SPAIR_URL}), extract it and pass the "
                                f"'SPair-71k' folder as root")
    files = sorted(ann.glob(f"*:{category}.json"))
    if not files:
        cats = sorted({p.stem.split(":")[-1] for p in ann.glob("*.json")})
        raise ValueError(f"no {split} pairs for category {category!r}; categories: {', '.join(cats)}")
    if n_pairs is not None and n_pairs < len(files):
        if generator is None:
            files = files[:n_pairs]
        else:
            files = [files[i] for i in torch.randperm(len(files), generator=generator)[:n_pairs].tolist()]
    pairs = []
    for f in files:
        d = json.loads(f.read_text())
        sk = torch.tensor(d["src_kps"], dtype=torch.float64).reshape(-1, 2)[:, [1, 0]]
        tk = torch.tensor(d["trg_kps"], dtype=torch.float64).reshape(-1, 2)[:, [1, 0]]
        x0, y0, x1, y1 = d["trg_bndbox"]
        pairs.append({"src": root / "JPEGImages" / d["category"] / d["src_imname"],
                      "trg": root / "JPEGImages" / d["category"] / d["trg_imname"],
                      "src_kps": sk, "trg_kps": tk, "threshold": float(max(y1 - y0, x1 - x0)),
                      "category": d["category"]})
    return pairs
