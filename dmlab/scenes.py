"""Procedural 3-D scenes with exact ground truth: depth, surface normals, intrinsics and optical flow.

A tiny batched ray caster (torch, CPU) for dense-prediction experiments (Lotus, PrimeDepth, StableNormal,
DM-Calib, DiffMatch). Every scene is a floor plane, a back wall, spheres and axis-aligned boxes, textured with
scikit-image's packaged photos (:func:`dmlab.data.load_image`) or flat colours, shaded by one directional light
(Lambert), and seen by a pinhole camera with random intrinsics and a small random pitch/roll. Because the
geometry is analytic, the per-pixel **depth** (z in the camera frame), **normal** (unit, camera frame, towards
the camera), the **intrinsics** ``K`` and, for a pair of views of the same static scene, the **optical flow**
(the reprojection of each pixel's 3-D point into the second camera) are exact, not estimated.

Conventions (OpenCV): camera x right, y down, z forward; pixel ``(u, v)`` has its centre at ``(u + 0.5, v + 0.5)``
in the coordinates of ``K``; a world point ``X`` projects to ``K R (X - o)`` for a camera with rotation ``R``
(world to camera) and centre ``o``. Images are ``[B, 3, H, W]`` in ``[-1, 1]``, depth ``[B, 1, H, W]``,
normals ``[B, 3, H, W]``, flow ``[B, 2, H, W]`` as ``(du, dv)`` in pixels.

Everything is seeded by an explicit ``torch.Generator``; a batch of hundreds of 32x32 scenes renders in well
under a second on one CPU core.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SceneBatch",
    "TEXTURE_NAMES",
    "render_scenes",
    "intrinsics",
    "pixel_rays",
    "incidence_map",
    "project",
    "align_depth",
]

TEXTURE_NAMES = ("brick", "grass", "gravel", "camera", "coins", "astronaut", "coffee", "chelsea",
                 "immunohistochemistry")
_EPS = 1e-6
_FAR = 1e6


@dataclass
class SceneBatch:
    """A rendered batch. ``image``/``depth``/``normal`` are views of camera 1; with ``pair=True`` the ``*2``
    fields are camera 2 and ``flow``/``valid`` map camera 1's pixels into camera 2 (``valid``: the point lands
    inside view 2 and is not occluded there). ``K`` is shared by both views; ``R``/``origin`` are per view
    (``[B, 2, 3, 3]`` and ``[B, 2, 3]``). ``flat`` marks pixels whose surface has no texture."""

    image: Tensor
    depth: Tensor
    normal: Tensor
    K: Tensor
    R: Tensor
    origin: Tensor
    flat: Tensor
    image2: Tensor | None = None
    depth2: Tensor | None = None
    normal2: Tensor | None = None
    flow: Tensor | None = None
    valid: Tensor | None = None

    def __len__(self) -> int:
        return self.image.shape[0]


@functools.lru_cache(maxsize=4)
def _texture_bank(res: int) -> Tensor:
    """[T, 3, res, res] in [0, 1] from the packaged photos (gray ones repeated to 3 channels)."""
    from .data import load_image

    out = []
    for name in TEXTURE_NAMES:
        x = load_image(name, size=res, dtype=torch.float32)
        out.append(((x.expand(3, -1, -1) if x.shape[0] == 1 else x) + 1) / 2)
    return torch.stack(out)


def _rot(axis: int, a: Tensor) -> Tensor:
    """Rotation matrices [B, 3, 3] about a coordinate axis by angles ``a`` [B] (float64)."""
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    i, j = [k for k in range(3) if k != axis]
    m = torch.zeros(a.shape[0], 3, 3, dtype=a.dtype)
    m[:, axis, axis] = o
    m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
    return m + z[:, None, None]


def intrinsics(focal, cx, cy, fy=None) -> Tensor:
    """Pinhole intrinsics ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` for batched (or scalar) values ``[B]``."""
    fx = torch.as_tensor(focal, dtype=torch.float64).reshape(-1)
    fy = fx if fy is None else torch.as_tensor(fy, dtype=torch.float64).reshape(-1)
    cx = torch.as_tensor(cx, dtype=torch.float64).reshape(-1).expand_as(fx)
    cy = torch.as_tensor(cy, dtype=torch.float64).reshape(-1).expand_as(fx)
    K = torch.zeros(fx.shape[0], 3, 3, dtype=torch.float64)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = fx, fy, cx, cy, 1.0
    return K


def pixel_rays(K: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Camera-frame rays ``K^-1 (u + 0.5, v + 0.5, 1)`` with unit z, ``[B, H*W, 3]`` (row-major pixels), so a
    point at depth ``z`` along pixel ``p``'s ray is ``z * rays[:, p]``."""
    if not isinstance(K, Tensor) or K.ndim != 3 or K.shape[1:] != (3, 3):
        raise ValueError("pixel_rays: K must be a [B, 3, 3] tensor (dmlab.scenes.intrinsics), got "
                         f"{getattr(K, 'shape', K)}")
    h, w = (size, size) if isinstance(size, int) else size
    v, u = torch.meshgrid(torch.arange(h, dtype=K.dtype) + 0.5, torch.arange(w, dtype=K.dtype) + 0.5, indexing="ij")
    pix = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(h * w, dtype=K.dtype)], -1)
    return pix @ torch.linalg.inv(K).transpose(1, 2)


def incidence_map(K: Tensor, size: int | tuple[int, int]) -> Tensor:
    """DM-Calib's "camera image" (Deng et al. 2025): per pixel the incidence angles of its ray,
    ``(atan((u + 0.5 - cx) / fx), atan((v + 0.5 - cy) / fy))`` in radians, ``[B, 2, H, W]``. It encodes the
    intrinsics losslessly: ``tan`` of each channel is affine in the pixel coordinate, slope ``1/f``."""
    h, w = (size, size) if isinstance(size, int) else size
    r = pixel_rays(K, (h, w))
    return torch.atan(r[..., :2]).transpose(1, 2).reshape(-1, 2, h, w)


def project(points: Tensor, K: Tensor, R: Tensor, origin: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel coordinates ``[B, N, 2]`` (in ``K``'s convention, pixel centres at ``+0.5``) and camera depth
    ``[B, N]`` of world points ``[B, N, 3]`` seen by cameras ``(K, R, origin)``."""
    cam = (points - origin[:, None]) @ R.transpose(1, 2)
    z = cam[..., 2]
    uv = (cam @ K.transpose(1, 2))[..., :2] / z[..., None]
    return uv, z


def _intersect(o: Tensor, d: Tensor, geo: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest hit along rays ``o + t d`` ([B, N, 3] each): ``t`` [B, N], primitive id [B, N] (planes, then
    spheres, then boxes) and the world normal [B, N, 3] (facing the ray)."""
    ts, ns = [], []
    pn, pd = geo["planes"][..., :3], geo["planes"][..., 3]  # [B, P, 3], [B, P]: n . X = pd
    den = torch.einsum("bnk,bpk->bnp", d, pn)
    t = (pd[:, None] - torch.einsum("bnk,bpk->bnp", o, pn)) / torch.where(den.abs() < _EPS, _EPS, den)
    ts.append(torch.where((t > _EPS) & (den.abs() >= _EPS), t, _FAR))
    ns.append(pn[:, None].expand(-1, d.shape[1], -1, -1))
    c, r = geo["spheres"][..., :3], geo["spheres"][..., 3]  # [B, S, 3], [B, S]
    oc = o[:, :, None] - c[:, None]  # [B, N, S, 3]
    a = (d * d).sum(-1, keepdim=True)
    b = (oc * d[:, :, None]).sum(-1)
    disc = b * b - a * ((oc * oc).sum(-1) - r[:, None] ** 2)
    t = (-b - disc.clamp_min(0).sqrt()) / a
    ts.append(torch.where((disc > 0) & (t > _EPS) & (r[:, None] > 0), t, _FAR))
    hit = o[:, :, None] + ts[-1][..., None] * d[:, :, None]
    ns.append((hit - c[:, None]) / r[:, None, :, None].clamp_min(_EPS))
    lo, hi = geo["boxes"][..., :3], geo["boxes"][..., 3:]  # [B, M, 3]
    inv = 1.0 / torch.where(d.abs() < _EPS, _EPS, d)[:, :, None]  # [B, N, 1, 3]
    t0 = (lo[:, None] - o[:, :, None]) * inv
    t1 = (hi[:, None] - o[:, :, None]) * inv
    tmin, tmax = torch.minimum(t0, t1), torch.maximum(t0, t1)
    tin, axis = tmin.max(-1)
    tout = tmax.min(-1).values
    ok = (tin <= tout) & (tin > _EPS) & ((hi - lo).min(-1).values[:, None] > 0)
    ts.append(torch.where(ok, tin, _FAR))
    nb = torch.nn.functional.one_hot(axis, 3).to(d.dtype) * -torch.sign(d[:, :, None])
    ns.append(nb)
    t_all, n_all = torch.cat(ts, -1), torch.cat(ns, -2)
    t_hit, idx = t_all.min(-1)
    n = torch.gather(n_all, 2, idx[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    n = n * torch.where((n * d).sum(-1, keepdim=True) > 0, -1.0, 1.0)  # face the ray
    return t_hit, idx, n


def _texture_coords(x: Tensor, n: Tensor, idx: Tensor, geo: dict) -> Tensor:
    """Texture (s, t) [B, N, 2] per hit: planar on the two axes across the normal's dominant axis (planes,
    boxes), spherical angles on spheres."""
    dom = n.abs().argmax(-1)
    ax = torch.tensor([[1, 2], [0, 2], [0, 1]])[dom]  # [B, N, 2]
    st = torch.gather(x, 2, ax)
    n_pl = geo["planes"].shape[1]
    n_sp = geo["spheres"].shape[1]
    is_sp = (idx >= n_pl) & (idx < n_pl + n_sp)
    if n_sp == 0:
        return st
    c = torch.gather(geo["spheres"][..., :3], 1, (idx - n_pl).clamp(0, n_sp - 1)[..., None].expand(-1, -1, 3))
    q = torch.nn.functional.normalize(x - c, dim=-1)
    sph = torch.stack([torch.atan2(q[..., 0], q[..., 2]) / math.pi, torch.acos(q[..., 1].clamp(-1, 1)) / math.pi], -1)
    return torch.where(is_sp[..., None], 2.0 * sph, st)


def _shade(x, n, idx, geo, textures) -> tuple[Tensor, Tensor]:
    """Lambert-shaded colour [B, N, 3] in [0, 1] and the flat-surface mask [B, N]."""
    b = torch.arange(x.shape[0])[:, None]
    tid, scale, shift, flat, albedo = (geo[k][b, idx] for k in ("tex_id", "tex_scale", "tex_shift", "flat", "albedo"))
    st = _texture_coords(x, n, idx, geo) * scale[..., None] + shift
    st = st - torch.floor(st)
    bank = textures
    res = bank.shape[-1]
    f = st * res - 0.5
    i0 = torch.floor(f)
    w = f - i0
    i0 = i0.long() % res
    i1 = (i0 + 1) % res
    tex = 0
    for iu, wu in ((i0[..., 0], 1 - w[..., 0]), (i1[..., 0], w[..., 0])):
        for iv, wv in ((i0[..., 1], 1 - w[..., 1]), (i1[..., 1], w[..., 1])):
            tex = tex + bank[tid, :, iv, iu] * (wu * wv)[..., None].to(bank.dtype)
    col = torch.where(flat[..., None], albedo, tex.to(x.dtype) * albedo)
    lam = (n * geo["light"][:, None]).sum(-1).clamp_min(0)
    return col * (0.35 + 0.65 * lam[..., None]), flat


def _render_view(geo, K, R, origin, size, textures):
    rays = pixel_rays(K, size)  # [B, N, 3], camera frame, unit z
    d = rays @ R  # world frame (R^T applied to each row vector)
    o = origin[:, None].expand_as(d)
    t, idx, n = _intersect(o, d, geo)
    x = o + t[..., None] * d
    col, flat = _shade(x, n, idx, geo, textures)
    n_cam = n @ R.transpose(1, 2)
    return x, t, n_cam, col, flat


def _grid(v: Tensor, h: int, w: int) -> Tensor:
    return v.transpose(1, 2).reshape(v.shape[0], -1, h, w)


def _random_geometry(n: int, g: torch.Generator, p_flat: float, n_tex: int) -> dict:
    f64 = torch.float64

    def U(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=f64)

    floor_y = U(n, lo=0.8, hi=1.6)  # camera height above the floor (y points down)
    wall_z = U(n, lo=8.0, hi=12.0)
    planes = torch.zeros(n, 2, 4, dtype=f64)
    planes[:, 0, 1], planes[:, 0, 3] = 1.0, floor_y  # y = floor_y
    planes[:, 1, 2], planes[:, 1, 3] = 1.0, wall_z  # z = wall_z
    S, M = 3, 2
    r = U(n, S, lo=0.35, hi=0.9) * (U(n, S) < 0.8)
    sx, sz = U(n, S, lo=-2.2, hi=2.2), U(n, S, lo=3.0, hi=7.5)
    spheres = torch.stack([sx, floor_y[:, None] - r, sz, r], -1)
    half = U(n, M, 3, lo=0.25, hi=0.8) * (U(n, M, 1) < 0.7)
    bx, bz = U(n, M, lo=-2.2, hi=2.2), U(n, M, lo=3.0, hi=7.5)
    top = floor_y[:, None] - 2 * half[..., 1]
    lo_ = torch.stack([bx - half[..., 0], top, bz - half[..., 2]], -1)
    hi_ = torch.stack([bx + half[..., 0], floor_y[:, None].expand(-1, M), bz + half[..., 2]], -1)
    boxes = torch.cat([lo_, hi_], -1)
    P = 2 + S + M
    light = torch.nn.functional.normalize(torch.stack([U(n, lo=-0.8, hi=0.8), U(n, lo=-1.0, hi=-0.3),
                                                       U(n, lo=-1.0, hi=-0.2)], -1), dim=-1)
    return {
        "planes": planes, "spheres": spheres, "boxes": boxes, "light": light,
        "tex_id": torch.randint(n_tex, (n, P), generator=g),
        "tex_scale": U(n, P, lo=0.3, hi=0.8),
        "tex_shift": U(n, P, 2),
        "flat": U(n, P) < p_flat,
        "albedo": U(n, P, 3, lo=0.35, hi=1.0),
    }


def render_scenes(n: int, *, generator: torch.Generator, size: int = 32, pair: bool = False,
                  p_flat: float = 0.2, focal_range: tuple[float, float] = (0.8, 1.6), max_offset: float = 0.1,
                  texture_res: int = 64, dtype: torch.dtype = torch.float32) -> SceneBatch:
    """Render ``n`` random scenes with their exact depth, normals and intrinsics (and, with ``pair=True``, a second
    view and the exact optical flow between them).

    Args:
        n: number of scenes (all rendered as one batch).
        generator: the ``torch.Generator`` every random choice goes through (same seed, same bits).
        size: image side in pixels.
        pair: also render a second camera (a random step of up to 0.3 units and 4 degrees) and the flow.
        p_flat: probability that a surface is a flat colour instead of a photo texture (textureless regions).
        focal_range: focal length ``f = fx = fy`` drawn uniformly in ``focal_range * size`` pixels.
        max_offset: principal point offset from the image centre, uniform in ``+-max_offset * size``.
        texture_res: resolution of the photo textures.
        dtype: floating dtype of the returned images and maps (geometry is computed in float64).
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError("render_scenes: generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0))")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"render_scenes: n must be an int >= 1, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise ValueError(f"render_scenes: size must be an int >= 4, got {size!r}")
    if not 0.0 <= p_flat <= 1.0:
        raise ValueError(f"render_scenes: p_flat must lie in [0, 1], got {p_flat!r}")
    lo, hi = focal_range
    if not 0 < lo <= hi:
        raise ValueError(f"render_scenes: focal_range must be (low, high) with 0 < low <= high, got {focal_range!r}")
    g = generator
    textures = _texture_bank(texture_res)
    geo = _random_geometry(n, g, p_flat, textures.shape[0])
    u = torch.rand(n, 7, generator=g, dtype=torch.float64)
    f = (lo + (hi - lo) * u[:, 0]) * size
    off = (2 * u[:, 1:3] - 1) * max_offset * size
    K = intrinsics(f, size / 2 + off[:, 0], size / 2 + off[:, 1])
    R1 = _rot(2, (2 * u[:, 4] - 1) * math.radians(5)) @ _rot(0, -(u[:, 3] * math.radians(15)))
    o1 = torch.zeros(n, 3, dtype=torch.float64)
    x1, _, n1, c1, flat1 = _render_view(geo, K, R1, o1, size, textures)
    _, z1 = project(x1, K, R1, o1)
    out = SceneBatch(image=_grid(c1 * 2 - 1, size, size).to(dtype), depth=_grid(z1[..., None], size, size).to(dtype),
                     normal=_grid(n1, size, size).to(dtype), K=K, R=R1[:, None], origin=o1[:, None],
                     flat=_grid(flat1[..., None], size, size))
    if pair:
        v = torch.rand(n, 6, generator=g, dtype=torch.float64) * 2 - 1
        o2 = o1 + 0.3 * v[:, :3] / math.sqrt(3)
        dR = (_rot(0, v[:, 3] * math.radians(4)) @ _rot(1, v[:, 4] * math.radians(4))
              @ _rot(2, v[:, 5] * math.radians(2)))
        R2 = dR @ R1
        x2, _, n2, c2, _ = _render_view(geo, K, R2, o2, size, textures)
        _, z2 = project(x2, K, R2, o2)
        uv1 = (pixel_rays(K, size) @ K.transpose(1, 2))[..., :2]  # pixel centres
        uv2, zz = project(x1, K, R2, o2)
        inside = (uv2 >= 0).all(-1) & (uv2[..., 0] < size) & (uv2[..., 1] < size) & (zz > 0)
        # visible in view 2: nothing is hit before x1 on the ray from o2
        d2 = x1 - o2[:, None]
        t2, _, _ = _intersect(o2[:, None].expand_as(d2), d2, geo)
        visible = t2 > 1 - 1e-6
        out.image2 = _grid(c2 * 2 - 1, size, size).to(dtype)
        out.depth2 = _grid(z2[..., None], size, size).to(dtype)
        out.normal2 = _grid(n2, size, size).to(dtype)
        out.flow = _grid(uv2 - uv1, size, size).to(dtype)
        out.valid = _grid((inside & visible)[..., None], size, size)
        out.R = torch.stack([R1, R2], 1)
        out.origin = torch.stack([o1, o2], 1)
    return out


def align_depth(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Least-squares scale and shift of ``pred`` onto ``target`` per image (the affine-invariant depth protocol of
    Marigold/Lotus): returns ``a * pred + b`` with ``(a, b)`` minimising the squared error over ``mask``.
    Shapes ``[B, 1, H, W]``."""
    if pred.shape != target.shape:
        raise ValueError(f"align_depth: pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    p, t = pred.flatten(1).double(), target.flatten(1).double()
    m = torch.ones_like(p) if mask is None else mask.flatten(1).double()
    s = m.sum(1)
    mp, mt = (m * p).sum(1) / s, (m * t).sum(1) / s
    a = (m * (p - mp[:, None]) * (t - mt[:, None])).sum(1) / (m * (p - mp[:, None]) ** 2).sum(1).clamp_min(1e-12)
    b = mt - a * mp
    return (a[:, None] * p + b[:, None]).reshape(pred.shape).to(pred.dtype)
