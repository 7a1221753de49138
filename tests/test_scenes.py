"""Exact ground truth of the procedural scene renderer (dmlab.scenes)."""
import math

import pytest
import torch

from dmlab import scenes
from dmlab.scenes import _intersect, _render_view, _texture_bank


def _empty_geo(n=1):
    f = torch.float64
    return {"planes": torch.zeros(n, 0, 4, dtype=f), "spheres": torch.zeros(n, 0, 4, dtype=f),
            "boxes": torch.zeros(n, 0, 6, dtype=f), "light": torch.tensor([[0.0, 0.0, -1.0]] * n, dtype=f),
            "tex_id": torch.zeros(n, 4, dtype=torch.long), "tex_scale": torch.ones(n, 4, dtype=f),
            "tex_shift": torch.zeros(n, 4, 2, dtype=f), "flat": torch.ones(n, 4, dtype=torch.bool),
            "albedo": torch.ones(n, 4, 3, dtype=f)}


def _view(geo, K, R=None, o=None, size=16):
    R = torch.eye(3, dtype=torch.float64)[None] if R is None else R
    o = torch.zeros(1, 3, dtype=torch.float64) if o is None else o
    x, t, n, col, _ = _render_view(geo, K, R, o, size, _texture_bank(16))
    _, z = scenes.project(x, K, R, o)
    return x, z.reshape(size, size), n.reshape(size, size, 3)


def test_fronto_parallel_plane_depth_and_normal():
    geo = _empty_geo()
    geo["planes"] = torch.tensor([[[0.0, 0.0, 1.0, 5.0]]], dtype=torch.float64)  # z = 5
    K = scenes.intrinsics(20.0, 8.0, 8.0)
    _, z, n = _view(geo, K)
    torch.testing.assert_close(z, torch.full((16, 16), 5.0, dtype=torch.float64))
    torch.testing.assert_close(n, torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64).expand(16, 16, 3))


def test_tilted_plane_depth_is_exact():
    # plane y = 1 (floor, 1 below the camera): depth of pixel row v is f / (v + 0.5 - cy) for rows below cy
    geo = _empty_geo()
    geo["planes"] = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]], dtype=torch.float64)
    f, cy = 12.0, 6.0
    K = scenes.intrinsics(f, 8.0, cy)
    _, z, n = _view(geo, K)
    v = torch.arange(16, dtype=torch.float64) + 0.5
    below = v > cy
    torch.testing.assert_close(z[below, 3], f / (v[below] - cy))
    up = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(n[below][:, 3], up.expand(int(below.sum()), 3))


def test_sphere_depth_and_normal_are_exact():
    geo = _empty_geo()
    geo["planes"] = torch.tensor([[[0.0, 0.0, 1.0, 50.0]]], dtype=torch.float64)
    geo["spheres"] = torch.tensor([[[0.0, 0.0, 5.0, 1.0]]], dtype=torch.float64)
    K = scenes.intrinsics(16.0, 8.0, 8.0)
    x, z, n = _view(geo, K)
    on = z < 10
    c = torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64)
    pts = x.reshape(16, 16, 3)[on]
    torch.testing.assert_close((pts - c).norm(dim=-1), torch.ones(len(pts), dtype=torch.float64))
    torch.testing.assert_close(n[on], pts - c)  # outward unit normal, camera frame = world frame here
    # the silhouette: pixel centre rays within the tangent cone, |ray angle| < asin(1/5)
    rays = scenes.pixel_rays(K, 16)[0]
    cone = (rays[:, :2].norm(dim=-1) / rays[:, 2] < math.tan(math.asin(0.2))).reshape(16, 16)
    assert torch.equal(on, cone)
    # the ray nearest the centre hits the sphere close to its front point (depth 4)
    assert abs(float(z[8, 8]) - 4.0) < 0.05


def test_flow_matches_plane_homography_and_reprojection():
    g = torch.Generator().manual_seed(3)
    b = scenes.render_scenes(8, generator=g, size=24, pair=True)
    assert b.flow.shape == (8, 2, 24, 24) and b.valid.dtype == torch.bool
    # 1) reprojection: back-project with depth and K, move to camera 2, project
    rays = scenes.pixel_rays(b.K, 24)
    X = (b.depth.flatten(2).transpose(1, 2).double() * rays) @ b.R[:, 0]  # world, camera 1 at the origin
    uv2, z2 = scenes.project(X, b.K, b.R[:, 1], b.origin[:, 1])
    uv1 = (rays @ b.K.transpose(1, 2))[..., :2]
    flow = (uv2 - uv1).transpose(1, 2).reshape(8, 2, 24, 24)
    torch.testing.assert_close(b.flow.double(), flow, atol=1e-4, rtol=1e-5)
    # 2) where a valid pixel lands near a pixel centre of view 2, view 2 sees the same depth there
    tgt = (uv2 - 0.5).round().long().clamp(0, 23)
    d2 = b.depth2.flatten(2)[:, 0].double()
    seen = torch.gather(d2, 1, tgt[..., 1] * 24 + tgt[..., 0])
    near = ((uv2 - 0.5 - tgt).abs().max(-1).values < 0.1) & b.valid.flatten(1)
    rel = ((seen - z2).abs() / z2)[near]
    assert near.sum() > 50 and float(rel.median()) < 1e-3
    # 3) on the back wall (a plane), flow equals the plane-induced homography
    R1, R2, o2 = b.R[:, 0], b.R[:, 1], b.origin[:, 1]
    Rrel, t = R2 @ R1.transpose(1, 2), -(R2 @ o2[..., None])  # X2 = Rrel X1c + t
    nw = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    wall = b.depth.flatten(1).double() > 7.9
    for i in range(8):
        n1 = R1[i] @ nw  # wall normal in camera 1; wall: n1 . X1c = d
        d = float((X[i][wall[i]] @ nw).mean())  # the wall's z in world = its distance along nw
        H = b.K[i] @ (Rrel[i] + t[i] @ n1[None] / d) @ torch.linalg.inv(b.K[i])
        p = torch.cat([uv1[i], torch.ones(576, 1, dtype=torch.float64)], 1) @ H.T
        fl = p[:, :2] / p[:, 2:] - uv1[i]
        on = wall[i] & ((X[i] @ nw - d).abs() < 1e-9)
        torch.testing.assert_close(b.flow[i].flatten(1).T.double()[on], fl[on], atol=1e-4, rtol=1e-5)


def test_batch_is_seeded_and_sane():
    b1 = scenes.render_scenes(16, generator=torch.Generator().manual_seed(0))
    b2 = scenes.render_scenes(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b1.image, b2.image) and torch.equal(b1.depth, b2.depth)
    assert b1.image.shape == (16, 3, 32, 32) and b1.image.min() >= -1 and b1.image.max() <= 1
    torch.testing.assert_close(b1.normal.norm(dim=1), torch.ones(16, 32, 32))
    assert (b1.depth > 0).all() and b1.flat.any() and not b1.flat.all()


def test_incidence_map_and_align_depth():
    K = scenes.intrinsics(torch.tensor([20.0, 30.0]), torch.tensor([7.0, 9.0]), torch.tensor([8.0, 6.5]))
    m = scenes.incidence_map(K, 16)
    u = torch.arange(16, dtype=torch.float64) + 0.5
    torch.testing.assert_close(torch.tan(m[1, 0, 3]), (u - 9.0) / 30.0)
    torch.testing.assert_close(torch.tan(m[0, 1, :, 5]), (u - 8.0) / 20.0)
    t = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) + 1
    torch.testing.assert_close(scenes.align_depth(3 * t - 2, t), t)


def test_errors():
    with pytest.raises(TypeError, match="torch.Generator"):
        scenes.render_scenes(2, generator=0)
    with pytest.raises(ValueError, match="n must be"):
        scenes.render_scenes(0, generator=torch.Generator())
    with pytest.raises(ValueError, match="p_flat"):
        scenes.render_scenes(2, generator=torch.Generator(), p_flat=2.0)
    with pytest.raises(ValueError, match="intrinsics"):
        scenes.pixel_rays(torch.eye(3), 8)
