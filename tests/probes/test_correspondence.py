"""Correspondence (paper 10): co-PCA, fusion, nearest-neighbour transfer, PCK under exact warps, SPair loader."""
import json

import pytest
import torch

from dmlab.data import warp_pair
from dmlab.probes.correspondence import (co_pca, fuse, grid_keypoints, l2_normalize, layer_descriptor, load_spair,
                                         match_points, warp_pck)


def _coords(H, W):
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return torch.stack([yy, xx], -1)


def test_co_pca_is_a_joint_rotation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    pa, pb = co_pca(a, b, 6)  # all components: distances between every pair of locations are preserved
    X = torch.cat([a.reshape(6, -1), b.reshape(6, -1)], 1).T
    Z = torch.cat([pa.reshape(6, -1), pb.reshape(6, -1)], 1).T
    torch.testing.assert_close(torch.cdist(Z, Z), torch.cdist(X, X))
    assert pa.shape == (6, 4, 5) and pb.shape == (6, 3, 3)
    qa, qb = co_pca(a, b, 2)  # fewer components: variance in decreasing order, centred jointly
    Zq = torch.cat([qa.reshape(2, -1), qb.reshape(2, -1)], 1)
    torch.testing.assert_close(Zq.mean(1), torch.zeros(2, dtype=torch.float64))
    assert Zq[0].var() >= Zq[1].var()
    with pytest.raises(ValueError, match="dim must be"):
        co_pca(a, b, 7)
    with pytest.raises(ValueError, match="same channels"):
        co_pca(a, b[:3], 2)


def test_fusion_normalises_each_extractor():
    g = torch.Generator().manual_seed(1)
    d1, d2 = 5 * torch.randn(4, 6, 6, generator=g), torch.randn(7, 3, 3, generator=g)
    f = fuse([d1, d2], [1.0, 0.5])
    assert f.shape == (11, 6, 6)
    torch.testing.assert_close(f[:4].norm(dim=0), torch.ones(6, 6))
    torch.testing.assert_close(f[4:].norm(dim=0), torch.full((6, 6), 0.5))
    torch.testing.assert_close(l2_normalize(d1[None])[0], l2_normalize(d1))
    la, lb = layer_descriptor([d1, d1], [d1, d1], (3, 3), pca_dims=[2, 0], weights=[2.0, 1.0])
    assert la.shape == (6, 3, 3) and torch.equal(la, lb)
    with pytest.raises(ValueError, match="empty"):
        fuse([])
    with pytest.raises(ValueError, match="non-negative"):
        fuse([d1], [-1.0])
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        fuse([d1[None]])


def test_pck_of_exact_features_under_a_known_warp_is_one():
    """Descriptors = the source coordinate each pixel shows: nearest neighbours are exact to < 1 pixel."""
    g = torch.Generator().manual_seed(2)
    img = torch.randn(1, 24, 24, generator=g)
    pairs = [warp_pair(img, generator=g) for _ in range(4)]

    def exact(warp):
        def describe(a, b):
            ca = _coords(*a.shape[-2:])
            return ca.permute(2, 0, 1), warp.inverse(ca).permute(2, 0, 1)
        return describe

    for a, b, w in pairs:
        r = warp_pck(exact(w), [(a, b, w)], alphas=(0.05, 0.1), n_points=6)
        assert r[0.05] == 1.0 and r[0.1] == 1.0  # 0.05 * 24 = 1.2 px > the worst rounding error 0.71 px
    # the same pairs with descriptors that ignore the image content fail
    r = warp_pck(lambda a, b: (torch.zeros(1, 24, 24), torch.zeros(1, 24, 24)), pairs, alphas=(0.05,), n_points=6)
    assert r[0.05] < 0.2


def test_match_points_identity_and_resolution():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(8, 10, 12, generator=g)
    pts = _coords(10, 12).reshape(-1, 2)[::7]
    torch.testing.assert_close(match_points(f, f, pts, image_size_a=(10, 12), image_size_b=(10, 12)), pts)
    # a descriptor grid at half the image resolution: predictions are cell centres in image pixels
    fc = torch.randn(8, 5, 6, generator=g)
    p = match_points(fc, fc, torch.tensor([[0.5, 0.5], [8.5, 10.5]]), image_size_a=(10, 12), image_size_b=(10, 12))
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.5], [8.5, 10.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(y, x\)"):
        match_points(f, f, torch.zeros(3), image_size_a=(10, 12), image_size_b=(10, 12))
    with pytest.raises(ValueError, match="same channels"):
        match_points(f, f[:4], pts, image_size_a=(10, 12), image_size_b=(10, 12))


def test_grid_keypoints_are_inside_and_exact():
    _, _, w = warp_pair(torch.zeros(1, 16, 16), generator=torch.Generator().manual_seed(4))
    src, tgt = grid_keypoints(w, 8, margin=1.0)
    assert 0 < len(src) <= 64
    torch.testing.assert_close(tgt, w(src))
    assert w.inside(tgt, margin=1.0).all()
    with pytest.raises(ValueError, match="positive int"):
        grid_keypoints(w, 0)


def test_load_spair_reads_the_official_layout(tmp_path):
    ann = tmp_path / "PairAnnotation" / "test"
    ann.mkdir(parents=True)
    for i in range(3):
        (ann / f"{i:06d}-a-b:cat.json").write_text(json.dumps({
            "src_imname": "a.jpg", "trg_imname": "b.jpg", "category": "cat",
            "src_kps": [[10, 20], [30, 40]], "trg_kps": [[11, 21], [31, 41]], "trg_bndbox": [5, 6, 105, 56]}))
    pairs = load_spair(tmp_path, "cat", n_pairs=2)
    assert len(pairs) == 2
    assert torch.equal(pairs[0]["src_kps"], torch.tensor([[20.0, 10.0], [40.0, 30.0]], dtype=torch.float64))
    assert pairs[0]["threshold"] == 100.0 and pairs[0]["trg"] == tmp_path / "JPEGImages" / "cat" / "b.jpg"
    assert len(load_spair(tmp_path, "cat", n_pairs=2, generator=torch.Generator().manual_seed(0))) == 2
    with pytest.raises(ValueError, match="categories: cat"):
        load_spair(tmp_path, "dog")
    with pytest.raises(FileNotFoundError, match="SPair-71k"):
        load_spair(tmp_path / "missing", "cat")
