"""Tests for dmlab.data: digits split, 2-D toys, packaged images, warps with exact ground truth."""
import math
import subprocess
import sys

import pytest
import torch

from dmlab import data


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- imports


def test_import_is_cheap():
    code = (
        "import sys, dmlab.data, dmlab.viz\n"
        "heavy = [m for m in ('sklearn', 'skimage', 'matplotlib', 'scipy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import dmlab.data/viz pulled in {out.stdout.strip()}"


# ----------------------------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_split_sizes():
    x, y = data.load_digits("train")
    xt, yt = data.load_digits("test")
    xa, ya = data.load_digits("all")
    assert x.shape == (1438, 1, 8, 8) and y.shape == (1438,)
    assert xt.shape == (359, 1, 8, 8) and xa.shape == (1797, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert set(ya.tolist()) == set(range(10))
    # values are v/8 - 1 for integers v in 0..16
    v = (xa + 1) * 8
    assert torch.equal(v, v.round())


def test_digits_split_fixed_disjoint_stratified():
    tr, te, al = (data.digits_indices(s) for s in ("train", "test", "all"))
    assert len(set(tr.tolist()) & set(te.tolist())) == 0
    assert sorted(tr.tolist() + te.tolist()) == al.tolist() == list(range(1797))
    # pinned: the split depends on no numpy/torch version (pure-Python hash)
    assert te.sum().item() == 334710
    assert te[:10].tolist() == [0, 2, 4, 13, 14, 16, 18, 26, 37, 39]
    _, ya = data.load_digits("all")
    _, yt = data.load_digits("test")
    counts_all, counts_test = torch.bincount(ya, minlength=10), torch.bincount(yt, minlength=10)
    assert torch.equal(counts_test, (counts_all + 2) // 5)
    # rows of the split are the rows of "all"
    xa, _ = data.load_digits("all")
    xt, _ = data.load_digits("test")
    assert torch.equal(xa[te], xt)


def test_digits_same_twice_and_cache_not_corrupted():
    x1, y1 = data.load_digits("test")
    x1.fill_(5.0)
    y1.fill_(-1)
    x2, y2 = data.load_digits("test")
    x3, y3 = data.load_digits("test")
    assert torch.equal(x2, x3) and torch.equal(y2, y3)
    assert x2.max() <= 1 and y2.min() >= 0
    xa64, _ = data.load_digits("all", dtype=torch.float64)
    xa64.zero_()
    assert data.load_digits("all", dtype=torch.float64)[0].abs().sum() > 0


def test_digits_size16_and_dtype():
    x, y = data.load_digits("test", size=16, dtype=torch.float64)
    assert x.shape == (359, 1, 16, 16) and x.dtype == torch.float64
    assert x.min() >= -1 and x.max() <= 1
    x8, _ = data.load_digits("test", dtype=torch.float64)
    down = torch.nn.functional.avg_pool2d(x, 2)
    assert (down - x8).abs().mean() < 0.2  # the upsampled image is the same digit


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(split="val"), ValueError, "split"),
        (dict(size=28), ValueError, "size must be 8 or 16"),
        (dict(dtype=torch.int64), TypeError, "floating"),
    ],
)
def test_digits_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        data.load_digits(**kwargs)


# ----------------------------------------------------------------------------------------------- toys


@pytest.mark.parametrize("name", data.TOY_2D_NAMES)
def test_toy_shapes_determinism(name):
    a = data.toy_2d(name, 500, generator=gen(1))
    b = data.toy_2d(name, 500, generator=gen(1))
    c = data.toy_2d(name, 500, generator=gen(2))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    a64 = data.toy_2d(name, 500, generator=gen(1), dtype=torch.float64)
    assert a64.dtype == torch.float64
    torch.testing.assert_close(a64.float(), a, rtol=0, atol=0)  # drawn in float64, then cast
    assert a.abs().max() < 4


def test_toy_geometry():
    g = gen(0)
    circ = data.toy_2d("circle", 1000, generator=g)
    torch.testing.assert_close(circ.norm(dim=1), torch.ones(1000))
    cb = data.toy_2d("checkerboard", 2000, generator=g)
    assert cb.abs().max() <= 2
    parity = (torch.floor(cb[:, 0]) + torch.floor(cb[:, 1])).remainder(2)
    assert parity.unique().numel() == 1  # only one colour of the board is occupied
    w, m, cov = data.toy_gmm8_params(dtype=torch.float64)
    assert w.shape == (8,) and m.shape == (8, 2) and cov.shape == (8, 2, 2)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(m.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    x = data.toy_2d("gmm8", 20000, generator=g, dtype=torch.float64)
    # empirical moments match the mixture's: mean 0, covariance = avg(cov) + avg(mm^T)
    true_cov = cov.mean(0) + (m[:, :, None] * m[:, None, :]).mean(0)
    emp_cov = torch.cov(x.T)
    assert x.mean(0).abs().max() < 0.05
    assert (emp_cov - true_cov).abs().max() < 0.08


def test_toy_bad_input():
    with pytest.raises(ValueError, match="gmm8, two_moons"):
        data.toy_2d("moons", 10, generator=gen())
    with pytest.raises(TypeError, match="torch.Generator"):
        data.toy_2d("gmm8", 10, generator=0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        data.toy_2d("gmm8", -1, generator=gen())
    with pytest.raises(TypeError, match="n must be an int"):
        data.toy_2d("gmm8", 2.5, generator=gen())


# ----------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("name", data.IMAGE_NAMES)
def test_images_load_offline(name):
    im = data.load_image(name)
    assert im.ndim == 3 and im.shape[0] in (1, 3)
    assert im.min() >= -1 and im.max() <= 1 and im.dtype == torch.float32
    gray = data.load_image(name, gray=True)
    assert gray.shape == (1,) + im.shape[1:]


def test_load_image_resize_and_fresh():
    im = data.load_image("chelsea", size=32)
    assert im.shape == (3, 32, 32) and im.min() >= -1 and im.max() <= 1
    assert data.load_image("chelsea", size=(20, 30), gray=True).shape == (1, 20, 30)
    a = data.load_image("camera")
    a.fill_(0)
    assert data.load_image("camera").abs().sum() > 0
    with pytest.raises(ValueError, match="camera"):
        data.load_image("retina")  # a JPEG: left out on purpose
    with pytest.raises(TypeError, match="size"):
        data.load_image("camera", size="big")


def test_image_patches():
    p = data.image_patches(64, size=16, image="camera", generator=gen(3))
    q = data.image_patches(64, size=16, image="camera", generator=gen(3))
    r = data.image_patches(64, size=16, image="camera", generator=gen(4))
    assert p.shape == (64, 1, 16, 16) and p.dtype == torch.float32
    assert p.min() >= -1 and p.max() <= 1
    assert torch.equal(p, q) and not torch.equal(p, r)
    rgb = data.image_patches(5, size=8, image="astronaut", generator=gen(), gray=False)
    assert rgb.shape == (5, 3, 8, 8)
    # each patch is a crop of the image: find it
    full = data.load_image("camera")
    one = data.image_patches(1, size=8, image="camera", generator=gen(7))[0]
    windows = full[0].unfold(0, 8, 1).unfold(1, 8, 1)  # [H-7, W-7, 8, 8]
    assert ((windows - one[0]).abs().amax(dim=(-1, -2)) == 0).any()
    with pytest.raises(ValueError, match="not available offline"):
        data.image_patches(4, image="lena", generator=gen())
    with pytest.raises(ValueError, match="exceeds"):
        data.image_patches(4, size=1000, generator=gen())
    with pytest.raises(TypeError, match="torch.Generator"):
        data.image_patches(4, generator=None)


# ----------------------------------------------------------------------------------------------- warps


def _blob(h, w, center, std=1.5):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * std**2))[None], yy, xx


@pytest.mark.parametrize("seed", range(6))
def test_warp_ground_truth_is_exact(seed):
    h, w = 48, 64  # non-square on purpose
    p = torch.tensor([20.3, 27.6], dtype=torch.float64)
    img, yy, xx = _blob(h, w, p)
    src, warped, warp = data.warp_pair(img, generator=gen(seed))
    assert src is img and warped.shape == img.shape and warped.dtype == img.dtype
    q = warp(p)
    wt = warped[0]
    centroid = torch.stack([(wt * yy).sum() / wt.sum(), (wt * xx).sum() / wt.sum()])
    assert (centroid - q).norm() < 0.1  # within a tenth of a pixel
    peak = divmod(int(wt.argmax()), w)
    assert (torch.tensor(peak, dtype=torch.float64) - q).abs().max() <= 1.0
    torch.testing.assert_close(warp.inverse(q), p)


def test_warp_pure_translation_and_properties():
    img = torch.zeros(1, 1, 20, 30)
    img[0, 0, 5, 7] = 1.0
    _, warped, warp = data.warp_pair(img, generator=gen(0), max_angle=0, scale_range=(1, 1), max_translation=0.2)
    ty, tx = warp.translation
    assert warp.angle == 0 and warp.scale == 1
    torch.testing.assert_close(warp(torch.tensor([5.0, 7.0])), torch.tensor([5 + ty, 7 + tx]))
    flow = warp.flow()
    assert flow.shape == (2, 20, 30)
    torch.testing.assert_close(flow[:, 3, 4], torch.tensor([ty, tx], dtype=torch.float64))
    # bilinear splat of one pixel: all mass lands within one pixel of the mapped point
    q = warp(torch.tensor([5.0, 7.0]))
    ys, xs = torch.nonzero(warped[0, 0] > 1e-6, as_tuple=True)
    assert ((ys - q[0]).abs() < 1).all() and ((xs - q[1]).abs() < 1).all()
    assert warp.inside(q) and not warp.inside(torch.tensor([-1.0, 0.0]))


def test_warp_rotation_convention():
    # 90 degrees counter-clockwise on screen (y down): a point right of centre moves above it
    warp = data.AffineWarp(height=11, width=11, angle=90.0, scale=1.0, translation=(0.0, 0.0))
    torch.testing.assert_close(warp(torch.tensor([5.0, 8.0])), torch.tensor([2.0, 5.0]))
    img = torch.zeros(1, 11, 11)
    img[0, 5, 8] = 1.0
    grid = torch.nn.functional.affine_grid(warp.theta()[None].float(), [1, 1, 11, 11], align_corners=False)
    out = torch.nn.functional.grid_sample(img[None], grid, align_corners=False)[0, 0]
    assert out[2, 5] > 0.99


def test_warp_determinism_and_errors():
    img = data.load_image("camera", size=32)
    a = data.warp_pair(img, generator=gen(5))
    b = data.warp_pair(img, generator=gen(5))
    c = data.warp_pair(img, generator=gen(6))
    assert torch.equal(a[1], b[1]) and a[2] == b[2] and a[2] != c[2]
    batch = data.warp_pair(img[None].expand(2, -1, -1, -1), generator=gen(5))[1]
    torch.testing.assert_close(batch[0], a[1])
    with pytest.raises(ValueError, match="affine"):
        data.warp_pair(img, generator=gen(), kind="tps")
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        data.warp_pair(img[0, 0], generator=gen())
    with pytest.raises(TypeError, match="floating"):
        data.warp_pair(torch.zeros(1, 4, 4, dtype=torch.uint8), generator=gen())
    with pytest.raises(ValueError, match="scale_range"):
        data.warp_pair(img, generator=gen(), scale_range=(0, 1))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        a[2](torch.zeros(3))
    assert math.isfinite(a[2].angle)
