"""Small offline datasets: digits, 2-D toys, image patches from packaged photos, synthetic warps.

Everything here works offline and on a CPU in well under a second:

* :func:`load_digits` -- scikit-learn's 1797 handwritten 8x8 digits in ``[-1, 1]`` with a fixed,
  machine-independent stratified train/test split (:func:`digits_indices`).
* :func:`toy_2d` -- 2-D toy distributions (``gmm8``, ``two_moons``, ``checkerboard``, ``swiss_roll``,
  ``circle``, ``spiral``); :func:`toy_gmm8_params` gives the exact mixture behind ``gmm8``.
* :func:`load_image`, :func:`image_patches` -- scikit-image's sample photos that ship *inside* the
  scikit-image wheel (no pooch download), as tensors in ``[-1, 1]``.
* :func:`degrade`, :func:`sr_pairs`, :func:`jpeg_quantise` -- super-resolution pairs with ground truth: patches of
  the photos, degraded by blur, downsampling, noise and JPEG quantisation (held-out photos for evaluation).
* :func:`warp_pair` -- a random affine warp with exact ground-truth correspondences
  (:class:`AffineWarp`), for correspondence / feature-matching experiments.

Randomness always comes from an explicit ``torch.Generator``; the same seed gives the same bits on CPU.
numpy, scikit-learn and scikit-image are imported inside the functions that need them
(``import dmlab.data`` imports torch only).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "load_digits",
    "digits_indices",
    "toy_2d",
    "toy_gmm8_params",
    "TOY_2D_NAMES",
    "IMAGE_NAMES",
    "load_image",
    "image_patches",
    "SR_SPLITS",
    "degrade",
    "jpeg_quantise",
    "sr_pairs",
    "AffineWarp",
    "warp_pair",
]

# --------------------------------------------------------------------------------------------------
# argument checks shared by the functions below
# --------------------------------------------------------------------------------------------------


def _check_generator(generator, fn: str) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator, got {type(generator).__name__}; "
            "pass e.g. generator=torch.Generator().manual_seed(0)"
        )
    return generator


def _check_float_dtype(dtype, fn: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    return dtype


def _check_count(n, name: str, fn: str, minimum: int = 0) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {n}")
    return n


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2  # per class: round-half-up(n_class / 5) images go to the test split
_SPLIT_SEED = 20240601
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a fixed integer hash (pure Python, identical on every machine)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=None)
def _digits_raw() -> tuple[Tensor, Tensor]:
    """The 1797 digits as float64 [N, 1, 8, 8] in [-1, 1] and int64 labels [N] (cached; never returned)."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits needs scikit-learn; install it with `pip install scikit-learn` "
            "(or `pip install dmlab[data]`)"
        ) from err
    bunch = _sk_load_digits()
    x = torch.tensor(bunch.data.tolist(), dtype=torch.float64).reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target.tolist(), dtype=torch.int64)
    return x / 8.0 - 1.0, y  # pixel values are integers 0..16


@functools.lru_cache(maxsize=None)
def _digits_images(size: int) -> Tensor:
    x = _digits_raw()[0]
    if size == 8:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(-1.0, 1.0)


@functools.lru_cache(maxsize=None)
def _digits_split() -> dict[str, Tensor]:
    labels = _digits_raw()[1].tolist()
    test: list[int] = []
    for c in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        idx.sort(key=lambda i: _splitmix64(_SPLIT_SEED * 4096 + i))
        n_test = (len(idx) + 2) // 5  # round-half-up of 20 %
        test.extend(idx[:n_test])
    test_set = set(test)
    train = [i for i in range(len(labels)) if i not in test_set]
    return {
        "train": torch.tensor(train, dtype=torch.int64),
        "test": torch.tensor(sorted(test), dtype=torch.int64),
        "all": torch.arange(len(labels), dtype=torch.int64),
    }


def _check_split(split, fn: str) -> str:
    if split not in ("train", "test", "all"):
        raise ValueError(f"{fn}: split must be 'train', 'test' or 'all', got {split!r}")
    return split


def digits_indices(split: str = "train") -> Tensor:
    """Row indices (into scikit-learn's digits array, ascending) of a :func:`load_digits` split.

    The split is stratified: within each class, images are ordered by a fixed integer hash of their row
    index (SplitMix64, pure Python -- it depends on no numpy or torch version) and the first
    ``round_half_up(n_class / 5)`` go to ``"test"``. Result: 1438 train / 359 test images, the same on
    every machine. ``"all"`` is ``arange(1797)``.
    """
    _check_split(split, "digits_indices")
    return _digits_split()[split].clone()


def load_digits(split: str = "train", *, size: int = 8, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits as images in ``[-1, 1]`` and their labels.

    The dataset ships inside scikit-learn (1797 grayscale 8x8 images, UCI "optdigits" test set, pixel
    values 0..16); pixel ``v`` becomes ``v / 8 - 1``.

    Args:
        split: ``"train"`` (1438 images), ``"test"`` (359) or ``"all"`` (1797). The split is fixed and
            identical on every machine; see :func:`digits_indices`. Images keep the file's order.
        size: 8 (native) or 16 (bilinear upsampling, ``align_corners=False``, then clamped to ``[-1, 1]``).
        dtype: floating dtype of the images (computed in float64, then cast).

    Returns:
        ``(x, y)``: images ``[N, 1, size, size]`` and int64 labels ``[N]`` in 0..9. Fresh tensors each
        call (the in-process cache cannot be modified through them).
    """
    _check_split(split, "load_digits")
    if size not in (8, 16) or isinstance(size, bool):
        raise ValueError(f"load_digits: size must be 8 or 16, got {size!r}")
    _check_float_dtype(dtype, "load_digits")
    idx = _digits_split()[split]
    x = _digits_images(int(size))[idx].to(dtype).clone()
    y = _digits_raw()[1][idx].clone()
    return x, y


# --------------------------------------------------------------------------------------------------
# 2-D toys
# --------------------------------------------------------------------------------------------------

TOY_2D_NAMES = ("gmm8", "two_moons", "checkerboard", "swiss_roll", "circle", "spiral")


def toy_gmm8_params(*, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """The exact mixture behind ``toy_2d("gmm8", ...)``: 8 equal-weight isotropic Gaussians on a ring.

    Component ``k`` has mean ``2 * (cos(2 pi k / 8), sin(2 pi k / 8))`` and covariance ``0.2**2 * I``.

    Returns:
        ``(weights [8], means [8, 2], covs [8, 2, 2])`` -- pass them to the exact Gaussian-mixture
        denoiser to get the true ``E[x0 | x]`` of the same distribution.
    """
    _check_float_dtype(dtype, "toy_gmm8_params")
    k = torch.arange(8, dtype=torch.float64)
    angle = 2 * math.pi * k / 8
    means = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    covs = (0.2**2) * torch.eye(2, dtype=torch.float64).expand(8, 2, 2).clone()
    weights = torch.full((8,), 1 / 8, dtype=torch.float64)
    return weights.to(dtype), means.to(dtype), covs.to(dtype)


def toy_2d(name: str, n: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` samples ``[n, 2]`` from a named 2-D toy distribution.

    ================  ================================================================================
    name              distribution
    ================  ================================================================================
    ``gmm8``          8 Gaussians on a ring of radius 2, std 0.2 (exact parameters: :func:`toy_gmm8_params`)
    ``two_moons``     scikit-learn-style moons, noise std 0.1, centred (shifted by (-0.5, -0.25)), x1.5
    ``checkerboard``  uniform on the 8 "black" unit squares of a 4x4 board covering ``[-2, 2]^2``
    ``swiss_roll``    ``t (cos t, sin t) / 5`` with ``t ~ U[1.5 pi, 4.5 pi]``, plus noise std 0.1
    ``circle``        uniform on the unit circle (no noise: a 1-D manifold)
    ``spiral``        two interleaved arms ``+-(0.8 t / pi)(cos t, sin t)``, ``t = 3 pi sqrt(u)``
                      (uniform along the arc), noise std 0.05
    ================  ================================================================================

    All draws use ``generator`` (in float64 on its device, then cast to ``dtype``): the same seed gives
    the same bits, and float32/float64 samples agree to float32 rounding.
    """
    if not isinstance(name, str) or name not in TOY_2D_NAMES:
        raise ValueError(f"toy_2d: unknown name {name!r}; valid names: {', '.join(TOY_2D_NAMES)}")
    _check_count(n, "n", "toy_2d")
    g = _check_generator(generator, "toy_2d")
    _check_float_dtype(dtype, "toy_2d")
    kw = dict(generator=g, device=g.device, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, **kw)

    def randn(*shape):
        return torch.randn(*shape, **kw)

    if name == "gmm8":
        _, means, _ = toy_gmm8_params(dtype=torch.float64)
        c = torch.randint(0, 8, (n,), generator=g, device=g.device)
        x = means.to(g.device)[c] + 0.2 * randn(n, 2)
    elif name == "two_moons":
        t = math.pi * rand(n)
        upper = torch.randint(0, 2, (n,), generator=g, device=g.device).bool()
        outer = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
        inner = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
        x = torch.where(upper[:, None], outer, inner) + 0.1 * randn(n, 2)
        x = 1.5 * (x - torch.tensor([0.5, 0.25], dtype=torch.float64, device=g.device))
    elif name == "checkerboard":
        x1 = 4 * rand(n) - 2
        x2 = rand(n) - 2 * torch.randint(0, 2, (n,), generator=g, device=g.device).to(torch.float64)
        x2 = x2 + torch.remainder(torch.floor(x1), 2)
        x = torch.stack([x1, x2], dim=1)
    elif name == "swiss_roll":
        t = 1.5 * math.pi * (1 + 2 * rand(n))
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 5 + 0.1 * randn(n, 2)
    elif name == "circle":
        t = 2 * math.pi * rand(n)
        x = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    else:  # spiral
        t = 3 * math.pi * torch.sqrt(rand(n))
        sign = 2 * torch.randint(0, 2, (n,), generator=g, device=g.device).to(torch.float64) - 1
        r = 0.8 * t / math.pi
        x = (sign * r)[:, None] * torch.stack([torch.cos(t), torch.sin(t)], dim=1) + 0.05 * randn(n, 2)
    return x.to(dtype)


# --------------------------------------------------------------------------------------------------
# packaged sample photos (scikit-image)
# --------------------------------------------------------------------------------------------------

# Only images stored *inside* the scikit-image distribution as lossless PNG: they load offline without
# pooch (skimage checks the packaged file's hash and never downloads it) and decode to the same bits
# everywhere. JPEG samples (rocket, retina, hubble_deep_field) are left out on purpose: their decoded
# pixels may differ by a level across Pillow/libjpeg versions. "cat" is an alias of "chelsea".
IMAGE_NAMES = (
    "camera",
    "astronaut",
    "coffee",
    "chelsea",
    "cat",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "immunohistochemistry",
)

_RGB_TO_GRAY = (0.2125, 0.7154, 0.0721)  # ITU-R BT.709, as skimage.color.rgb2gray


def _check_image_name(name, fn: str) -> str:
    if not isinstance(name, str) or name not in IMAGE_NAMES:
        raise ValueError(
            f"{fn}: image {name!r} is not available offline; choose one of {', '.join(IMAGE_NAMES)} "
            "(scikit-image sample photos packaged in its wheel, lossless PNG)"
        )
    return name


@functools.lru_cache(maxsize=None)
def _image_uint8(name: str) -> Tensor:
    """uint8 [C, H, W] (C = 1 or 3) for a name in IMAGE_NAMES (cached; never returned)."""
    try:
        import skimage.data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_image needs scikit-image; install it with `pip install scikit-image` "
            "(or `pip install dmlab[data]`)"
        ) from err
    import numpy as np

    arr = np.ascontiguousarray(getattr(skimage.data, name)())
    if arr.dtype != np.uint8:  # pragma: no cover - all names in IMAGE_NAMES are uint8
        raise RuntimeError(f"skimage.data.{name}() returned {arr.dtype}, expected uint8")
    t = torch.from_numpy(arr.copy())
    if t.ndim == 2:
        t = t[None]
    else:
        t = t[..., :3].permute(2, 0, 1).contiguous()
    return t


def _image_float(name: str, gray: bool) -> Tensor:
    """float64 [C, H, W] in [-1, 1] (a fresh tensor)."""
    x = _image_uint8(name).to(torch.float64) / 255.0
    if gray and x.shape[0] == 3:
        w = torch.tensor(_RGB_TO_GRAY, dtype=torch.float64)
        x = (x * w[:, None, None]).sum(0, keepdim=True)
    return x * 2.0 - 1.0


def load_image(
    name: str, *, size: int | tuple[int, int] | None = None, gray: bool = False, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A scikit-image sample photo as ``[C, H, W]`` in ``[-1, 1]``.

    Args:
        name: one of :data:`IMAGE_NAMES` (photos packaged in scikit-image as PNG; they load offline).
            Another name raises ``ValueError`` listing the valid ones.
        size: ``None`` keeps the full resolution (e.g. camera 512x512, chelsea 300x451). An int ``s``
            takes the largest centred square and resizes it to ``s x s``; a pair ``(h, w)`` resizes the
            whole image to ``h x w``. Resizing is bilinear with antialiasing (``align_corners=False``),
            computed in float64 and clamped to ``[-1, 1]``.
        gray: convert RGB to one channel with skimage's weights (0.2125, 0.7154, 0.0721). Grayscale
            sources (camera, coins, moon, brick, grass, gravel) always have ``C = 1``.
        dtype: floating dtype of the result.
    """
    _check_image_name(name, "load_image")
    _check_float_dtype(dtype, "load_image")
    x = _image_float(name, bool(gray))
    if size is not None:
        def _is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not (_is_int(size) or (isinstance(size, (tuple, list)) and len(size) == 2 and all(map(_is_int, size)))):
            raise TypeError(f"load_image: size must be None, an int or a pair of ints (h, w), got {size!r}")
        if isinstance(size, int):
            h, w = x.shape[-2:]
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            x = x[:, top : top + s, left : left + s]
            out = (size, size)
        else:
            out = (int(size[0]), int(size[1]))
        if min(out) < 1:
            raise ValueError(f"load_image: size must be positive, got {size!r}")
        x = F.interpolate(x[None], size=out, mode="bilinear", align_corners=False, antialias=True)[0].clamp_(-1, 1)
    return x.to(dtype).contiguous()


def image_patches(
    n: int,
    *,
    size: int = 16,
    image: str = "camera",
    generator: torch.Generator,
    gray: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` random ``size x size`` crops ``[n, C, size, size]`` in ``[-1, 1]`` from a packaged photo.

    Top-left corners are uniform over all valid positions of the full-resolution image (drawn with
    ``generator``: the same seed gives the same patches). ``C = 1`` if ``gray`` or the source is
    grayscale, else 3. ``image`` is one of :data:`IMAGE_NAMES`; see :func:`load_image`.
    """
    _check_count(n, "n", "image_patches")
    _check_count(size, "size", "image_patches", minimum=1)
    _check_image_name(image, "image_patches")
    g = _check_generator(generator, "image_patches")
    _check_float_dtype(dtype, "image_patches")
    img = _image_float(image, bool(gray))
    c, h, w = img.shape
    if size > min(h, w):
        raise ValueError(f"image_patches: size {size} exceeds the image {image!r} ({h}x{w}); use size <= {min(h, w)}")
    top = torch.randint(0, h - size + 1, (n,), generator=g, device=g.device).cpu()
    left = torch.randint(0, w - size + 1, (n,), generator=g, device=g.device).cpu()
    ar = torch.arange(size)
    rows = (top[:, None] + ar)[:, :, None]  # [n, size, 1]
    cols = (left[:, None] + ar)[:, None, :]  # [n, 1, size]
    patches = img[:, rows, cols]  # [C, n, size, size]
    return patches.permute(1, 0, 2, 3).to(dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# super-resolution pairs: a realistic degradation pipeline with ground truth
# --------------------------------------------------------------------------------------------------

# Photos for training and held-out photos for evaluation (no photo is in both splits).
SR_SPLITS = {"train": ("camera", "astronaut", "coffee", "chelsea", "brick", "grass"),
             "test": ("coins", "moon", "gravel", "immunohistochemistry")}

# The JPEG luminance quantisation table (ITU-T T.81, Annex K, Table K.1).
_JPEG_Q = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
           14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
           49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)


def _dct_matrix(n: int = 8) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (``D @ x`` transforms the columns of ``x``), float64."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def jpeg_quantise(x: Tensor, quality: Tensor | float) -> Tensor:
    """JPEG's lossy step on ``[N, C, H, W]`` images in ``[-1, 1]``: 8x8 block DCT, rounding by the standard
    luminance table scaled for ``quality`` (1..100, the libjpeg/IJG scaling; a float or one value per image),
    inverse DCT. Pure torch and float64 inside, so the result is the same on every machine (a real JPEG codec
    also subsamples chroma and entropy-codes, which loses nothing more). ``H`` and ``W`` are padded by edge
    replication to multiples of 8 and cropped back."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise TypeError("jpeg_quantise: x must be a tensor [N, C, H, W] in [-1, 1]")
    n, c, h, w = x.shape
    q = torch.as_tensor(quality, dtype=torch.float64).reshape(-1)
    if q.numel() not in (1, n) or not bool(((q >= 1) & (q <= 100)).all()):
        raise ValueError(f"jpeg_quantise: quality must lie in [1, 100], one value or one per image (N={n})")
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    table = torch.tensor(_JPEG_Q, dtype=torch.float64).reshape(8, 8)
    table = ((table[None] * scale[:, None, None] + 50.0) / 100.0).floor().clamp(1.0, 255.0)  # [N or 1, 8, 8]
    ph, pw = (-h) % 8, (-w) % 8
    y = F.pad(x.double(), (0, pw, 0, ph), mode="replicate") * 127.5  # JPEG works on levels centred at 0
    blocks = y.unflatten(2, (-1, 8)).unflatten(4, (-1, 8)).transpose(3, 4)  # [N, C, h/8, w/8, 8, 8]
    d = _dct_matrix(8)
    coef = d @ blocks @ d.T
    t = table[:, None, None, None]
    blocks = d.T @ (torch.round(coef / t) * t) @ d
    y = blocks.transpose(3, 4).reshape(y.shape)
    return (y[..., :h, :w] / 127.5).clamp(-1.0, 1.0).to(x.dtype)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one ``sigma`` (pixels) per image, reflect padding, float64 inside."""
    r = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    ker = torch.exp(-0.5 * (k[None] / sigma.double().clamp_min(1e-3)[:, None]) ** 2)
    ker = ker / ker.sum(1, keepdim=True)  # [N, 2r+1]
    n, c, h, w = x.shape
    y = F.pad(x.double().reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    kc = ker.repeat_interleave(c, 0)
    y = F.conv2d(y, kc[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kc[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w).to(x.dtype)


def _uniform(lo_hi, n: int, g: torch.Generator, name: str) -> Tensor:
    lo, hi = (float(lo_hi), float(lo_hi)) if isinstance(lo_hi, (int, float)) else map(float, lo_hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise ValueError(f"degrade: {name} must be a number >= 0 or a range (low, high) with 0 <= low <= high, "
                         f"got {lo_hi!r}")
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64, device=g.device).cpu()


def degrade(hr: Tensor, scale: int, *, generator: torch.Generator, blur=(0.2, 1.0), noise=(0.0, 0.04),
            jpeg=(50.0, 95.0)) -> Tensor:
    """A realistic low-resolution observation of each high-resolution image ``hr`` ``[N, C, H, W]`` in ``[-1, 1]``
    (the classical "blur, downsample, noise, JPEG" chain of real-world SR training, in the spirit of BSRGAN and
    Real-ESRGAN; Zhang et al. 2021, Wang et al. 2021):

    1. Gaussian blur with ``sigma`` drawn uniformly from ``blur`` (pixels of the HR image);
    2. downsampling by ``scale`` (box average over ``scale x scale`` blocks);
    3. additive Gaussian noise with standard deviation drawn from ``noise`` (in units of the ``[-1, 1]`` range);
    4. JPEG quantisation (:func:`jpeg_quantise`) at a quality drawn from ``jpeg`` (``None``: no JPEG step).

    Every draw (per-image sigma, noise level, noise, quality, in that order) comes from ``generator``. Each range
    may be a number (fixed) or a pair ``(low, high)``. Returns ``[N, C, H/scale, W/scale]`` clamped to ``[-1, 1]``.
    """
    if not isinstance(hr, Tensor) or hr.ndim != 4 or not hr.is_floating_point():
        raise TypeError("degrade: hr must be a float tensor [N, C, H, W] in [-1, 1]")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"degrade: scale must be an int >= 1, got {scale!r}")
    n, c, h, w = hr.shape
    if h % scale or w % scale:
        raise ValueError(f"degrade: the image size {h}x{w} must be divisible by scale {scale}; crop it first")
    g = _check_generator(generator, "degrade")
    sig = _uniform(blur, n, g, "blur")
    std = _uniform(noise, n, g, "noise")
    x = _gaussian_blur(hr, sig) if float(sig.max()) > 0 else hr
    x = F.avg_pool2d(x.double(), scale) if scale > 1 else x.double()
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64, device=g.device).cpu()
    x = (x + std[:, None, None, None] * eps).clamp(-1.0, 1.0)
    if jpeg is not None:
        x = jpeg_quantise(x, _uniform(jpeg, n, g, "jpeg").clamp(1, 100))
    return x.clamp(-1.0, 1.0).to(hr.dtype)


def sr_pairs(split: str, n: int, *, size: int = 32, scale: int = 4, generator: torch.Generator, gray: bool = True,
             dtype: torch.dtype = torch.float32, **degradation) -> tuple[Tensor, Tensor]:
    """``n`` super-resolution pairs ``(hr [n, C, size, size], lr [n, C, size/scale, size/scale])``.

    HR patches are crops (:func:`image_patches`) of the photos of ``SR_SPLITS[split]`` (``"train"`` or ``"test"``:
    held-out photos), as evenly as ``n`` allows over the photos; LR is :func:`degrade` of each patch
    (``degradation`` goes to it: ``blur``, ``noise``, ``jpeg``). Everything is drawn from ``generator``."""
    if split not in SR_SPLITS:
        raise ValueError(f"sr_pairs: split must be one of {', '.join(SR_SPLITS)}, got {split!r}")
    _check_count(n, "n", "sr_pairs", minimum=1)
    _check_count(size, "size", "sr_pairs", minimum=1)
    g = _check_generator(generator, "sr_pairs")
    names = SR_SPLITS[split]
    counts = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
    hr = torch.cat([image_patches(k, size=size, image=nm, generator=g, gray=gray, dtype=torch.float64)
                    for nm, k in zip(names, counts) if k > 0])
    lr = degrade(hr, scale, generator=g, **degradation)
    return hr.to(dtype), lr.to(dtype)


# --------------------------------------------------------------------------------------------------
# synthetic warps with exact ground truth
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineWarp:
    """An affine map between pixel coordinates of a source image and its warped copy.

    Coordinate convention: points are ``(y, x)`` = (row, column) in pixels of an ``H x W`` image; the
    *centre* of pixel ``[i, j]`` is at ``(i, j)``, so the image covers ``[-0.5, H - 0.5] x [-0.5, W - 0.5]``
    (this is ``align_corners=False`` in ``affine_grid``/``grid_sample``). Sub-pixel points are allowed.

    The map is ``q = A (p - c) + c + t`` with ``c = ((H - 1) / 2, (W - 1) / 2)`` the image centre,
    ``A = scale * R(angle)`` and ``t = translation`` (all in ``(y, x)`` pixel order), and
    ``warped[q] = image[p]``. ``angle`` is in degrees, counter-clockwise as displayed (y points down).

    Calling the warp (``warp(points)``, same as :meth:`forward`) maps source points ``[..., 2]`` to
    their exact positions in the warped image; :meth:`inverse` maps back.
    """

    height: int
    width: int
    angle: float
    scale: float
    translation: tuple[float, float]

    @property
    def matrix(self) -> Tensor:
        """3x3 float64 homogeneous matrix on ``(y, x, 1)`` column vectors: source -> warped."""
        a = math.radians(self.angle)
        cos, sin = math.cos(a), math.sin(a)
        # counter-clockwise on screen with y down: (y, x) -> (cos*y - sin*x, sin*y + cos*x)
        lin = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64) * self.scale
        c = torch.tensor([(self.height - 1) / 2, (self.width - 1) / 2], dtype=torch.float64)
        t = torch.tensor(self.translation, dtype=torch.float64)
        m = torch.eye(3, dtype=torch.float64)
        m[:2, :2] = lin
        m[:2, 2] = c + t - lin @ c
        return m

    def _apply(self, m: Tensor, points) -> Tensor:
        p = torch.as_tensor(points)
        if p.shape[-1:] != (2,):
            raise ValueError(f"AffineWarp: points must have shape [..., 2] as (y, x) pixels, got {tuple(p.shape)}")
        dt = p.dtype if p.is_floating_point() else torch.float64
        m = m.to(device=p.device, dtype=torch.float64)
        q = p.to(torch.float64) @ m[:2, :2].T + m[:2, 2]
        return q.to(dt)

    def forward(self, points) -> Tensor:
        """Source ``(y, x)`` points ``[..., 2]`` -> their positions in the warped image (exact, float64 math)."""
        return self._apply(self.matrix, points)

    __call__ = forward

    def inverse(self, points) -> Tensor:
        """Warped-image ``(y, x)`` points ``[..., 2]`` -> the source points they came from."""
        return self._apply(torch.linalg.inv(self.matrix), points)

    def inside(self, points, *, margin: float = 0.0) -> Tensor:
        """Bool mask: which *warped* ``(y, x)`` points lie at least ``margin`` pixels inside the image."""
        p = torch.as_tensor(points)
        lo = -0.5 + margin
        return (
            (p[..., 0] >= lo)
            & (p[..., 0] <= self.height - 0.5 - margin)
            & (p[..., 1] >= lo)
            & (p[..., 1] <= self.width - 0.5 - margin)
        )

    def flow(self) -> Tensor:
        """Dense forward flow ``[2, H, W]`` (float64): ``(dy, dx)`` from each source pixel centre to its image."""
        yy, xx = torch.meshgrid(
            torch.arange(self.height, dtype=torch.float64), torch.arange(self.width, dtype=torch.float64), indexing="ij"
        )
        p = torch.stack([yy, xx], dim=-1)
        return (self.forward(p) - p).permute(2, 0, 1)

    def theta(self) -> Tensor:
        """The ``[2, 3]`` float64 matrix for ``F.affine_grid(..., align_corners=False)`` (warped -> source,
        normalised ``(x, y)`` coordinates) that renders this warp."""
        h, w = self.height, self.width
        minv = torch.linalg.inv(self.matrix)  # warped -> source on (y, x, 1)
        # normalised (u, v) = ((2 x + 1) / W - 1, (2 y + 1) / H - 1) ; as a matrix on (x, y, 1):
        to_norm = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], dtype=torch.float64)
        swap = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)  # (x, y) <-> (y, x)
        th = to_norm @ swap @ minv @ swap @ torch.linalg.inv(to_norm)
        return th[:2]


def warp_pair(
    image: Tensor,
    *,
    generator: torch.Generator,
    kind: str = "affine",
    max_angle: float = 30.0,
    scale_range: tuple[float, float] = (0.8, 1.25),
    max_translation: float = 0.1,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor, AffineWarp]:
    """Warp an image by a random affine map and return the exact correspondence.

    Draws (with ``generator``) an angle uniform in ``[-max_angle, max_angle]`` degrees, a scale
    log-uniform in ``scale_range`` and a translation uniform in ``[-max_translation, max_translation]``
    times the image height/width; rotation and scaling are about the image centre. The warped image is
    rendered with ``F.affine_grid``/``F.grid_sample`` (bilinear, ``align_corners=False``); pixels that
    come from outside the source are filled by ``padding_mode`` (``"zeros"`` is mid-gray for images in
    ``[-1, 1]``; ``"border"``, ``"reflection"`` also work).

    Args:
        image: ``[C, H, W]`` or ``[B, C, H, W]`` floating tensor (one warp shared by the whole batch).
        kind: only ``"affine"`` for now.

    Returns:
        ``(image, warped, warp)``: the input (not copied), the warped image (same shape, dtype, device)
        and an :class:`AffineWarp`; ``warp(points)`` maps source ``(y, x)`` pixel points to the warped
        image exactly (see :class:`AffineWarp` for the coordinate convention).
    """
    if kind != "affine":
        raise ValueError(f"warp_pair: kind must be 'affine' (the only warp implemented), got {kind!r}")
    g = _check_generator(generator, "warp_pair")
    if not isinstance(image, Tensor):
        raise TypeError(f"warp_pair: image must be a Tensor [C, H, W] or [B, C, H, W], got {type(image).__name__}")
    if image.ndim not in (3, 4):
        raise ValueError(f"warp_pair: image must be [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"warp_pair: image must be floating point (e.g. image.float()), got {image.dtype}")
    lo, hi = (float(s) for s in scale_range)
    if not (0 < lo <= hi):
        raise ValueError(f"warp_pair: scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
    if max_angle < 0 or max_translation < 0:
        raise ValueError("warp_pair: max_angle and max_translation must be >= 0")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ValueError(f"warp_pair: padding_mode must be 'zeros', 'border' or 'reflection', got {padding_mode!r}")
    h, w = image.shape[-2:]
    u = torch.rand(4, generator=g, device=g.device, dtype=torch.float64).cpu().tolist()
    angle = (2 * u[0] - 1) * float(max_angle)
    scale = math.exp(math.log(lo) + u[1] * (math.log(hi) - math.log(lo)))
    translation = ((2 * u[2] - 1) * float(max_translation) * h, (2 * u[3] - 1) * float(max_translation) * w)
    warp = AffineWarp(height=int(h), width=int(w), angle=angle, scale=scale, translation=translation)
    x = image if image.ndim == 4 else image[None]
    theta = warp.theta().to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    if image.ndim == 3:
        warped = warped[0]
    return image, warped, warp


# --------------------------------------------------------------------------------------------------
# synthetic seasonal time series (chapter 32, TSDiff's toy benchmark)
# --------------------------------------------------------------------------------------------------


def seasonal_series(
    n: int,
    *,
    length: int = 48,
    period: int = 12,
    noise: float = 0.1,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` synthetic seasonal series ``[n, length]``: level + linear trend + two harmonics of ``period`` + noise.

    Each series draws (from ``generator``, in this order) a level ``~ N(0, 0.5^2)``, a trend slope
    ``~ U(-1, 1)`` over the whole window, amplitudes ``a1 ~ U(0.5, 1.5)``, ``a2 ~ U(0, 0.5)``, phases
    ``~ U(0, 2 pi)`` and i.i.d. Gaussian noise of standard deviation ``noise``:
    ``x_t = level + slope t / length + a1 sin(2 pi t / period + p1) + a2 sin(4 pi t / period + p2) + noise eps_t``.
    The seasonal-naive forecast (repeat the last period) is the natural trivial competitor on these series.
    """
    fn = "seasonal_series"
    g = _check_generator(generator, fn)
    _check_count(n, "n", fn, minimum=1)
    _check_count(length, "length", fn, minimum=2)
    _check_count(period, "period", fn, minimum=2)
    dt = _check_float_dtype(dtype, fn)
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"{fn}: noise must be a number >= 0, got {noise!r}")
    u = torch.rand(n, 6, generator=g, dtype=torch.float64)
    level = torch.randn(n, 1, generator=g, dtype=torch.float64) * 0.5
    slope, a1, a2 = (2 * u[:, :1] - 1), 0.5 + u[:, 1:2], 0.5 * u[:, 2:3]
    p1, p2 = 2 * math.pi * u[:, 3:4], 2 * math.pi * u[:, 4:5]
    t = torch.arange(length, dtype=torch.float64)[None]
    w = 2 * math.pi * t / period
    x = level + slope * t / length + a1 * torch.sin(w + p1) + a2 * torch.sin(2 * w + p2)
    x = x + noise * torch.randn(n, length, generator=g, dtype=torch.float64)
    return x.to(dt)


__all__.append("seasonal_series")


# --------------------------------------------------------------------------------------------------
# procedural 3-D scenes with exact depth, normals, intrinsics and flow (implemented in dmlab.scenes)
# --------------------------------------------------------------------------------------------------
from .scenes import SceneBatch, align_depth, incidence_map, intrinsics, render_scenes  # noqa: E402

__all__ += ["SceneBatch", "render_scenes", "intrinsics", "incidence_map", "align_depth"]
