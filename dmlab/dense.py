"""Dense prediction (depth and surface normals) with image-conditioned diffusion models, on exact rendered scenes.

The data are :func:`dmlab.scenes.render_scenes` images with their exact depth and normals. A target is 4 channels
per pixel: the depth normalised to ``[-1, 1]`` per image (affine-invariant, as Marigold and Lotus) and the unit
normal (3 channels). One small conditional network (:class:`DenseNet`) is trained in three ways at the same budget
(steps, batch, parameters):

* ``"eps"`` -- Marigold-style (Ke et al. 2024): noise-prediction (epsilon) DDPM fine-tuning over all timesteps,
  conditioned on the image; inference is a multi-step DDIM from pure noise (:func:`sample_eps`).
* ``"x0"`` -- Lotus's first two changes (He et al. 2025, "Lotus: Diffusion-based Visual Foundation Model for
  High-quality Dense Prediction", paper 39): predict the annotation ``x0`` directly, at the single timestep
  ``t = T`` only; inference is one network call (:func:`predict_x0`).
* ``"lotus"`` -- the same plus Lotus's *detail preserver*: a task switcher input selects annotation or image
  reconstruction, and a share ``p_recon`` of every batch trains the network to reconstruct its input image.

StableNormal (Ye et al. 2024, paper 28) reduces the seed variance of diffusion normals by starting a short
stochastic refinement from a one-step estimate (:func:`refine_from`); PrimeDepth (Zavadski et al. 2024, paper 79)
reads a frozen diffusion model's features once (the "preimage", :func:`preimage`) and trains a refiner on them.
DM-Calib (Deng et al. 2025, paper 43) predicts the intrinsics as a "camera image" (:func:`train_calib`).
DiffMatch (Nam et al. 2024, "Diffusion Model for Dense Matching", paper 78) treats the flow field between two
views as the variable of a conditional diffusion model, conditioned on a correlation cost volume and the
correlation-argmax flow (:func:`match_condition`, :func:`train_matcher`, :func:`sample_flow`).
Official code read for the recipes: EnVision-Research/Lotus (Apache-2.0), Stable-X/StableNormal (Apache-2.0),
vislearn/PrimeDepth; nothing is copied.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "DenseNet",
    "dense_targets",
    "split_targets",
    "train_dense",
    "predict_x0",
    "sample_eps",
    "refine_from",
    "depth_absrel",
    "normal_angle",
    "preimage",
    "Refiner",
    "train_refiner",
    "fit_intrinsics",
    "CALIB_METHODS",
    "train_calib",
    "predict_camera_image",
    "predict_intrinsics",
    "train_calib_suite",
    "load_calib_suite",
    "train_dense_suite",
    "load_dense_suite",
    "FLOW_SCALE",
    "MATCH_METHODS",
    "patch_features",
    "displacements",
    "cost_volume",
    "argmax_flow",
    "match_condition",
    "condition_channels",
    "train_matcher",
    "regress_flow",
    "sample_flow",
    "endpoint_error",
    "match_data",
    "train_match_suite",
    "match_predictions",
    "load_match_suite",
]

METHODS = ("eps", "x0", "lotus")
T_TRAIN = 1000


def _alphas_cumprod() -> Tensor:
    from .schedules import vp_alphas_cumprod

    return vp_alphas_cumprod(T_TRAIN, 0.00085, 0.012, "scaled_linear").float()  # Stable Diffusion's schedule


def dense_targets(batch) -> Tensor:
    """``[B, 4, H, W]`` targets of a :class:`dmlab.scenes.SceneBatch`: depth min-max normalised to ``[-1, 1]`` per
    image, then the unit normal."""
    d = batch.depth.flatten(1)
    lo, hi = d.min(1).values[:, None, None, None], d.max(1).values[:, None, None, None]
    dn = 2 * (batch.depth - lo) / (hi - lo).clamp_min(1e-6) - 1
    return torch.cat([dn, batch.normal], 1).float()


def split_targets(y: Tensor) -> tuple[Tensor, Tensor]:
    """``(depth [B, 1, H, W], unit normal [B, 3, H, W])`` from a 4-channel prediction."""
    if y.ndim != 4 or y.shape[1] != 4:
        raise ValueError(f"expected a [B, 4, H, W] prediction (depth + normal), got {tuple(y.shape)}")
    return y[:, :1], F.normalize(y[:, 1:], dim=1)


class _Block(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.film = nn.Linear(temb, 2 * cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = F.silu(self.c1(x))
        s, b = self.film(e)[..., None, None].chunk(2, 1)
        return self.skip(x) + self.c2(F.silu(h * (1 + s) + b))


class DenseNet(nn.Module):
    """A small image-conditioned U-Net: input ``[image (c_img), noisy target (c_tgt), task switch (1)]`` at full
    resolution, one down/up level, FiLM timestep embedding; output ``c_out`` channels.

    ``forward(image, x_t, t, task)``: ``t`` integer timesteps ``[B]`` in ``[0, 1000)``, ``task`` ``[B]`` (0:
    annotation, 1: reconstruct the image, Lotus's switcher; ignored when all zeros)."""

    def __init__(self, c_img: int = 3, c_tgt: int = 4, c_out: int = 4, width: int = 32, temb: int = 32):
        super().__init__()
        self.temb = temb
        self.t_mlp = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(c_img + c_tgt + 1, width, 3, padding=1)
        self.b1 = _Block(width, width, temb)
        self.b2 = _Block(width, 2 * width, temb)
        self.b3 = _Block(2 * width, 2 * width, temb)
        self.b4 = _Block(3 * width, width, temb)
        self.out = nn.Conv2d(width, c_out, 3, padding=1)

    def forward(self, image: Tensor, x_t: Tensor, t: Tensor, task: Tensor | None = None) -> Tensor:
        half = self.temb // 2
        freq = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = t.float()[:, None] * freq[None]
        e = self.t_mlp(torch.cat([a.sin(), a.cos()], 1))
        task = torch.zeros(len(image)) if task is None else task.float()
        x = self.inp(torch.cat([image, x_t, task[:, None, None, None].expand(-1, 1, *image.shape[-2:])], 1))
        h1 = self.b1(x, e)
        h = self.b2(F.avg_pool2d(h1, 2), e)
        h = self.b3(h, e)
        h = self.b4(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), e)
        return self.out(F.silu(h))


def _init(build, generator: torch.Generator) -> nn.Module:
    """Build a module with its initial weights drawn from a seed taken from ``generator`` (global RNG untouched)."""
    seed = int(torch.randint(2**31, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} ('eps': Marigold-style noise prediction, 'x0': one-step "
                         f"x0 at t=T, 'lotus': x0 at t=T plus the detail preserver), got {method!r}")
    return method


def _loss_fn(net: DenseNet, method: str, p_recon: float, ac: Tensor):
    T = len(ac)

    def loss(batch):
        img, y, g_noise, task = batch["image"], batch["y"], batch["eps"], batch["task"]
        if method == "eps":
            t = batch["t"]
            a = ac[t][:, None, None, None]
            xt = a.sqrt() * y + (1 - a).sqrt() * g_noise
            return F.mse_loss(net(img, xt, t), g_noise)
        t = torch.full((len(img),), T - 1)
        tgt = torch.where(task[:, None, None, None] > 0, F.pad(img, (0, 0, 0, 0, 0, 1)), y)
        return F.mse_loss(net(img, torch.zeros_like(tgt), t, task), tgt)  # Lotus-D: no noise input

    return loss


def train_dense(method: str, images: Tensor, targets: Tensor, *, steps: int, batch: int, lr: float,
                generator: torch.Generator, width: int = 32, p_recon: float = 0.25, progress: bool = False):
    """Train one :class:`DenseNet` by ``method`` (:data:`METHODS`) on ``images [N, 3, H, W]`` and ``targets
    [N, 4, H, W]`` with :func:`dmlab.train.fit` (Adam, cosine decay). Every method sees the same number of steps
    and images per step; ``"lotus"`` spends a share ``p_recon`` of its batch on reconstructing the image (the
    detail preserver; the fourth target channel of a reconstruction is 0). Returns ``(net, fit_result)``."""
    from .train import FitConfig, fit

    _check_method(method)
    if not isinstance(generator, torch.Generator):
        raise TypeError("train_dense: generator must be a torch.Generator")
    if images.shape[0] != targets.shape[0] or targets.shape[1] != 4:
        raise ValueError(f"images [N, 3, H, W] and targets [N, 4, H, W] must pair up, got {tuple(images.shape)} and "
                         f"{tuple(targets.shape)}")
    net = _init(lambda: DenseNet(width=width), generator)
    ac = _alphas_cumprod()

    def data(g):
        idx = torch.randint(len(images), (batch,), generator=g)
        t = torch.randint(len(ac), (batch,), generator=g)
        eps = torch.randn(targets[idx].shape, generator=g)
        task = (torch.rand(batch, generator=g) < (p_recon if method == "lotus" else 0.0)).float()
        return {"image": images[idx], "y": targets[idx], "t": t, "eps": eps, "task": task}

    cfg = FitConfig(steps=steps, lr=lr, schedule="cosine", warmup=min(50, steps // 10), progress=progress,
                    desc=f"dense {method}")
    res = fit(_loss_fn(net, method, p_recon, ac), net, cfg, generator=generator, data=data)
    return net.eval(), res


@torch.no_grad()
def predict_x0(net: DenseNet, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Lotus-D's single-step inference: one call at ``t = T`` with a zero (noise-free) target input, annotation
    task; ``generator`` draws a Gaussian input instead (Lotus-G style, for models trained with one). ``[B, 4, H, W]``.
    """
    shape = (images.shape[0], 4, *images.shape[-2:])
    z = torch.zeros(shape) if generator is None else torch.randn(shape, generator=generator)
    return net(images, z, torch.full((len(images),), T_TRAIN - 1))


@torch.no_grad()
def _ddim(net: DenseNet, images: Tensor, x: Tensor, ts: list[int]) -> Tensor:
    ac = _alphas_cumprod()
    for i, t in enumerate(ts):
        a = ac[t]
        eps = net(images, x, torch.full((len(images),), t))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)  # targets lie in [-1, 1] (clip_sample)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def sample_eps(net: DenseNet, images: Tensor, steps: int, *, generator: torch.Generator) -> Tensor:
    """Marigold-style inference: deterministic DDIM with ``steps`` evenly spaced timesteps from pure noise (drawn
    from ``generator``) conditioned on ``images``; ``steps`` network calls. ``[B, 4, H, W]``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample_eps: steps must be an int >= 1, got {steps!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("sample_eps: generator must be a torch.Generator (the initial noise is drawn from it)")
    ts = torch.linspace(T_TRAIN - 1, 0, steps).round().long().tolist()
    x = torch.randn(images.shape[0], 4, *images.shape[-2:], generator=generator)
    return _ddim(net, images, x, ts)


def refine_from(net: DenseNet, images: Tensor, coarse: Tensor, t_start: int, steps: int, *,
                generator: torch.Generator) -> Tensor:
    """StableNormal's coarse-to-fine idea (paper 28): noise a one-step estimate ``coarse`` to timestep ``t_start``
    (``x = sqrt(a) coarse + sqrt(1-a) eps``) and run ``steps`` DDIM steps of the noise-prediction model ``net`` from
    there, instead of from pure noise. Fewer seeds-dependent decisions are left to the sampler."""
    if not 0 <= t_start < T_TRAIN:
        raise ValueError(f"refine_from: t_start must lie in [0, {T_TRAIN}), got {t_start!r}")
    if coarse.shape != (images.shape[0], 4, *images.shape[-2:]):
        raise ValueError(f"refine_from: coarse must be [B, 4, H, W] matching images, got {tuple(coarse.shape)}")
    a = _alphas_cumprod()[t_start]
    x = a.sqrt() * coarse + (1 - a).sqrt() * torch.randn(coarse.shape, generator=generator)
    ts = torch.linspace(t_start, 0, steps).round().long().tolist()
    return _ddim(net, images, x, ts)


def depth_absrel(pred: Tensor, depth: Tensor) -> Tensor:
    """Per-image AbsRel ``mean |d_hat - d| / d`` after the least-squares scale-and-shift alignment of the predicted
    (normalised) depth channel onto the true depth (:func:`dmlab.scenes.align_depth`). ``[B]``."""
    from .scenes import align_depth

    d_hat = align_depth(pred[:, :1].double(), depth.double())
    return ((d_hat - depth.double()).abs() / depth.double()).flatten(1).mean(1)


def normal_angle(pred: Tensor, normal: Tensor) -> Tensor:
    """Per-image mean angular error in degrees between predicted normals (channels 1-3, normalised) and the
    true unit normals. ``[B]``."""
    n = F.normalize(pred[:, 1:].double(), dim=1)
    cos = (n * normal.double()).sum(1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos)).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------- PrimeDepth (79)
def preimage(denoiser, unet: nn.Module, images: Tensor, layers, *, sigma: float, cond: dict | None = None,
             generator: torch.Generator | None = None, size: int | None = None) -> Tensor:
    """PrimeDepth's "preimage" (paper 79): one call of a *frozen* diffusion model on the (grey) image noised to a
    small ``sigma``, its multi-scale block outputs read with :func:`dmlab.probes.extract_features`, upsampled to
    ``size`` (default: half the image side, to keep the stored preimage small) and concatenated,
    ``[B, sum(channels), size, size]``."""
    from .probes import extract_features

    gray = images.mean(1, keepdim=True) if images.shape[1] == 3 else images
    feats = extract_features(denoiser, unet, gray, sigma, layers, generator=generator, cond=cond)
    size = size or images.shape[-1] // 2
    return torch.cat([F.interpolate(feats[n].float(), size=size, mode="bilinear", align_corners=False)
                      for n in layers], 1)


class Refiner(nn.Module):
    """PrimeDepth's trainable refiner, scaled down: a :class:`DenseNet` whose "image" input is the preimage
    (``c_in`` channels, reduced by a 1x1 convolution to ``c_red`` and upsampled to the image) next to the RGB image;
    one call, no noise."""

    def __init__(self, c_in: int, c_red: int = 16, width: int = 32):
        super().__init__()
        self.reduce = nn.Conv2d(c_in, c_red, 1)
        self.net = DenseNet(c_img=3 + c_red, c_tgt=0, c_out=4, width=width)

    def forward(self, image: Tensor, feats: Tensor) -> Tensor:
        f = F.interpolate(self.reduce(feats), size=image.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([image, f], 1)
        z = image.new_zeros(image.shape[0], 0, *image.shape[-2:])
        return self.net(x, z, torch.zeros(len(image), dtype=torch.long))


def train_refiner(images: Tensor, feats: Tensor, targets: Tensor, *, steps: int, batch: int, lr: float,
                  generator: torch.Generator, width: int = 32):
    """Train a :class:`Refiner` on precomputed preimages ``feats [N, C, H, W]`` (the frozen model is never
    differentiated) to regress ``targets`` with the same loop and budget as :func:`train_dense`."""
    from .train import FitConfig, fit

    if not isinstance(generator, torch.Generator):
        raise TypeError("train_refiner: generator must be a torch.Generator")
    net = _init(lambda: Refiner(feats.shape[1], width=width), generator)

    def data(g):
        idx = torch.randint(len(images), (batch,), generator=g)
        return images[idx], feats[idx], targets[idx]

    cfg = FitConfig(steps=steps, lr=lr, schedule="cosine", warmup=min(50, steps // 10), desc="refiner")
    res = fit(lambda b: F.mse_loss(net(b[0], b[1]), b[2]), net, cfg, generator=generator, data=data)
    return net.eval(), res


# ----------------------------------------------------------------------------------------------- DM-Calib (43)
def fit_intrinsics(camera_image: Tensor, *, iters: int = 200, tol: float = 0.01,
                   generator: torch.Generator | None = None) -> Tensor:
    """DM-Calib's read-out (Deng et al. 2025, paper 43): recover ``(fx, fy, cx, cy)`` per image ``[B, 4]`` from a
    (predicted) camera image ``[B, 2, H, W]`` of incidence angles (:func:`dmlab.scenes.incidence_map`). Along x,
    ``tan(theta_x) = (u + 0.5 - cx) / fx`` is a line in the pixel coordinate (likewise y); each line is fitted by
    RANSAC (``iters`` random pixel pairs, inliers within ``tol`` in tan) then least squares on its inliers.
    With ``generator=None`` a plain least-squares fit over all pixels is returned."""
    if camera_image.ndim != 4 or camera_image.shape[1] != 2:
        raise ValueError(f"camera_image must be [B, 2, H, W] incidence angles, got {tuple(camera_image.shape)}")
    B, _, H, W = camera_image.shape
    tan = torch.tan(camera_image.double())
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    out = torch.zeros(B, 4, dtype=torch.float64)
    for c, coord in ((0, u.reshape(-1)), (1, v.reshape(-1))):
        y = tan[:, c].reshape(B, -1)
        w = torch.ones_like(y)
        if generator is not None:
            i = torch.randint(len(coord), (iters, 2), generator=generator)
            x1, x2 = coord[i[:, 0]], coord[i[:, 1]]
            s = (y[:, i[:, 1]] - y[:, i[:, 0]]) / (x2 - x1).where(x2 != x1, torch.tensor(1e-9, dtype=torch.float64))
            b = y[:, i[:, 0]] - s * x1
            res = (y[:, None] - (s[..., None] * coord + b[..., None])).abs() < tol  # [B, iters, N]
            best = res.sum(-1).argmax(1)
            w = res[torch.arange(B), best].double()
        n = w.sum(1)
        mx, my = (w * coord).sum(1) / n, (w * y).sum(1) / n
        slope = (w * (coord - mx[:, None]) * (y - my[:, None])).sum(1) / (w * (coord - mx[:, None]) ** 2).sum(1)
        f = 1.0 / slope
        out[:, c], out[:, 2 + c] = f, mx - my * f  # tan = (x - cx) / f  ->  cx = x - tan * f at the mean
    return out


CALIB_METHODS = ("camera", "regress")


def _k_code(K: Tensor, size: int) -> Tensor:
    """``(f, cx, cy)`` in pixels -> a ``[B, 3]`` code in about ``[-1, 1]`` for the scenes' default ranges."""
    f = (K[:, 0, 0] + K[:, 1, 1]) / 2
    return torch.stack([(f / size - 1.2) / 0.4, (K[:, 0, 2] / size - 0.5) / 0.1,
                        (K[:, 1, 2] / size - 0.5) / 0.1], 1).float()


def _k_decode(code: Tensor, size: int) -> Tensor:
    c = code.double()
    return torch.stack([(c[:, 0] * 0.4 + 1.2) * size, (c[:, 1] * 0.1 + 0.5) * size,
                        (c[:, 2] * 0.1 + 0.5) * size], 1)


def _calib_net(method: str, width: int) -> DenseNet:
    if method not in CALIB_METHODS:
        raise ValueError(f"method must be one of {CALIB_METHODS} ('camera': predict the incidence map and fit K "
                         f"to it, 'regress': regress (f, cx, cy) directly), got {method!r}")
    return DenseNet(c_tgt=0, c_out=2 if method == "camera" else 3, width=width)


def _calib_forward(net: DenseNet, method: str, images: Tensor) -> Tensor:
    z = images.new_zeros(images.shape[0], 0, *images.shape[-2:])
    out = net(images, z, torch.zeros(len(images), dtype=torch.long))
    return out if method == "camera" else out.mean((2, 3))  # regression: global average of a 3-channel map


def train_calib(method: str, images: Tensor, K: Tensor, *, steps: int, batch: int, lr: float,
                generator: torch.Generator, width: int = 16):
    """DM-Calib's representation against direct regression at one budget (paper 43, scaled down and one-step):
    ``"camera"`` trains a :class:`DenseNet` (no noise input, one call, as Lotus-D) to map the image to its camera
    image (:func:`dmlab.scenes.incidence_map`, 2 channels); ``"regress"`` trains the same network with 3 output
    channels, averaged over pixels, to regress a normalised ``(f, cx, cy)``. Same data, steps, batch, width and
    loop (:func:`dmlab.train.fit`). Returns ``(net, fit_result)``."""
    from .scenes import incidence_map
    from .train import FitConfig, fit

    if not isinstance(generator, torch.Generator):
        raise TypeError("train_calib: generator must be a torch.Generator")
    if K.ndim != 3 or K.shape != (images.shape[0], 3, 3):
        raise ValueError(f"train_calib: K must be [N, 3, 3] matching images [N, 3, H, W], got {tuple(K.shape)}")
    net = _init(lambda: _calib_net(method, width), generator)
    size = images.shape[-1]
    y = incidence_map(K, size).float() if method == "camera" else _k_code(K, size)

    def data(g):
        idx = torch.randint(len(images), (batch,), generator=g)
        return images[idx], y[idx]

    cfg = FitConfig(steps=steps, lr=lr, schedule="cosine", warmup=min(50, steps // 10), desc=f"calib {method}")
    res = fit(lambda b: F.mse_loss(_calib_forward(net, method, b[0]), b[1]), net, cfg, generator=generator,
              data=data)
    return net.eval(), res


@torch.no_grad()
def predict_camera_image(net: DenseNet, images: Tensor) -> Tensor:
    """The camera image ``[B, 2, H, W]`` (incidence angles, radians) a ``"camera"`` :func:`train_calib` network
    predicts for ``images``, in one call."""
    if net.out.out_channels != 2:
        raise ValueError("predict_camera_image: net must be a 'camera' calibration net (2 output channels)")
    return _calib_forward(net, "camera", images)


@torch.no_grad()
def predict_intrinsics(net: DenseNet, method: str, images: Tensor, *,
                       generator: torch.Generator | None = None, iters: int = 200) -> Tensor:
    """``(f, cx, cy)`` in pixels, ``[B, 3]`` float64, from a :func:`train_calib` network: for ``"camera"`` the
    predicted camera image is fitted by :func:`fit_intrinsics` (RANSAC when ``generator`` is given; ``f`` is the
    mean of ``fx`` and ``fy``; ``iters`` RANSAC hypotheses); for ``"regress"`` the code is decoded."""
    _calib_net(method, 1)  # checks the method name
    out = _calib_forward(net, method, images)
    if method == "regress":
        return _k_decode(out, images.shape[-1])
    k = fit_intrinsics(out, generator=generator, iters=iters)
    return torch.stack([(k[:, 0] + k[:, 1]) / 2, k[:, 2], k[:, 3]], 1)


def train_calib_suite(cfg: dict, progress: bool = False) -> tuple[dict, dict]:
    """Chapter 29's DM-Calib entry for one training seed ``cfg["seed"]``: both :data:`CALIB_METHODS` on the same
    rendered scenes (random focal length and principal point), same budget. ``(state_dict, log)``."""
    from .scenes import render_scenes

    b = render_scenes(cfg["n_train"], generator=torch.Generator().manual_seed(cfg["data_seed"]), size=cfg["size"])
    state, log = {}, {}
    for k, m in enumerate(CALIB_METHODS):
        g = torch.Generator().manual_seed(1000 * cfg["seed"] + 50 + k)
        net, res = train_calib(m, b.image, b.K, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                               width=cfg["width"], generator=g)
        state.update({f"{m}.{n}": p.detach().clone() for n, p in net.state_dict().items()})
        log[m] = round(sum(res.losses[-50:]) / len(res.losses[-50:]), 5)
    return state, log


def load_calib_suite(state: dict, cfg: dict) -> nn.ModuleDict:
    """``{"camera": DenseNet, "regress": DenseNet}`` (eval mode) from a :func:`train_calib_suite` state dict."""
    out = nn.ModuleDict()
    for m in CALIB_METHODS:
        net = _calib_net(m, cfg["width"])
        net.load_state_dict({k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".")})
        out[m] = net
    return out.eval()


# ----------------------------------------------------------------------------------------------- the zoo entry
PREIMAGE_LAYERS = ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1", "up_blocks.2")


def _train_data(cfg: dict):
    from .scenes import render_scenes

    b = render_scenes(cfg["n_train"], generator=torch.Generator().manual_seed(cfg["data_seed"]), size=cfg["size"])
    return b.image, dense_targets(b)


def preimage_of(images: Tensor, frozen: tuple, *, sigma: float) -> Tensor:
    """:func:`preimage` of ``images`` through a zoo ``unet`` entry, ``frozen = dmlab.zoo.load_denoiser(name)``
    (denoiser, network), read with the null class (the "empty prompt") at the blocks :data:`PREIMAGE_LAYERS`."""
    cond = {"class_labels": torch.full((len(images),), 10)}
    with torch.no_grad():
        return preimage(frozen[0], frozen[1], images, list(PREIMAGE_LAYERS), sigma=sigma, cond=cond,
                        generator=torch.Generator().manual_seed(0))


def train_dense_suite(cfg: dict, frozen=None, progress: bool = False) -> tuple[dict, dict]:
    """Everything chapter 29 loads for one training seed ``cfg["seed"]``: the three :data:`METHODS` (same data,
    steps, batch, width) and, when ``frozen`` (``dmlab.zoo.load_denoiser`` of a ``unet`` entry) is given, a
    PrimeDepth :class:`Refiner`
    on its preimage with the same budget. Returns ``(state_dict, log)`` with keys ``"<method>.<param>"``."""
    images, targets = _train_data(cfg)
    state, log = {}, {}
    for k, m in enumerate(METHODS):
        g = torch.Generator().manual_seed(1000 * cfg["seed"] + k)
        net, res = train_dense(m, images, targets, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                               width=cfg["width"], generator=g, progress=progress)
        state.update({f"{m}.{n}": p.detach().clone() for n, p in net.state_dict().items()})
        log[m] = round(sum(res.losses[-50:]) / len(res.losses[-50:]), 5)
    if frozen is not None:
        feats = preimage_of(images, frozen, sigma=cfg["preimage_sigma"])
        g = torch.Generator().manual_seed(1000 * cfg["seed"] + 9)
        net, res = train_refiner(images, feats, targets, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                                 width=cfg["width"], generator=g)
        state.update({f"prime.{n}": p.detach().clone() for n, p in net.state_dict().items()})
        log["prime"] = round(sum(res.losses[-50:]) / len(res.losses[-50:]), 5)
    return state, log


def load_dense_suite(state: dict, cfg: dict) -> nn.ModuleDict:
    """``{method: DenseNet, "prime": Refiner}`` (an ``nn.ModuleDict``, eval mode) from a :func:`train_dense_suite`
    state dict."""
    out = nn.ModuleDict()
    for m in (*METHODS, "prime"):
        sd = {k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".")}
        if not sd:
            continue
        net = DenseNet(width=cfg["width"]) if m != "prime" else Refiner(sd["reduce.weight"].shape[1],
                                                                          width=cfg["width"])
        net.load_state_dict(sd)
        out[m] = net
    return out.eval()


# ----------------------------------------------------------------------------------------------- DiffMatch (78)
FLOW_SCALE = 4.0  # flows (pixels) are divided by this before they enter or leave a matching network
MATCH_METHODS = ("diffusion", "regress")


def _check_image_pair(a: Tensor, b: Tensor, name: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{name}: expected two tensors [B, C, H, W]")
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two [B, C, H, W] tensors of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def patch_features(images: Tensor, k: int = 3) -> Tensor:
    """Normalised cross-correlation descriptors: per pixel the ``k x k`` patch of all channels (zero padding),
    minus its mean, divided by its norm (``+1e-3``, so a constant patch gives an almost-zero descriptor: a
    textureless surface matches nothing better than anything else). ``[B, C*k*k, H, W]``."""
    if images.ndim != 4:
        raise ValueError(f"patch_features: images must be [B, C, H, W], got {tuple(images.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"patch_features: k must be an odd int >= 1, got {k!r}")
    B, C, H, W = images.shape
    p = F.unfold(images, k, padding=k // 2).reshape(B, C * k * k, H, W)
    p = p - p.mean(1, keepdim=True)
    return p / (p.norm(dim=1, keepdim=True) + 1e-3)


def displacements(radius: int) -> Tensor:
    """The ``(2r+1)^2`` integer displacements ``(du, dv)`` of a local cost volume, ``[(2r+1)^2, 2]``, in the
    channel order of :func:`cost_volume` (``dv`` outer, ``du`` inner)."""
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0 (search window half-width in pixels), got {radius!r}")
    r = torch.arange(-radius, radius + 1)
    dv, du = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([du.reshape(-1), dv.reshape(-1)], 1)


def cost_volume(f1: Tensor, f2: Tensor, radius: int) -> Tensor:
    """Local correlation ``C[b, j, v, u] = <f1[b, :, v, u], f2[b, :, v + dv_j, u + du_j]> / sqrt(channels)`` for
    the displacements :func:`displacements` (``radius``); positions outside view 2 correlate 0.
    ``[B, (2r+1)^2, H, W]``. The data term of DiffMatch (Nam et al. 2024, paper 78)."""
    _check_image_pair(f1, f2, "cost_volume")
    d = displacements(radius)
    H, W = f1.shape[-2:]
    f2p = F.pad(f2, (radius, radius, radius, radius))
    out = [(f1 * f2p[..., radius + dv: radius + dv + H, radius + du: radius + du + W]).sum(1)
           for du, dv in d.tolist()]
    return torch.stack(out, 1) / math.sqrt(f1.shape[1])


def argmax_flow(cost: Tensor, radius: int) -> Tensor:
    """The correlation-argmax matcher: per pixel the displacement of the highest cost, ``[B, 2, H, W]`` as
    ``(du, dv)`` in pixels; ties go to the smallest displacement (so a pixel that matches nothing stays put)."""
    d = displacements(radius)
    if cost.ndim != 4 or cost.shape[1] != len(d):
        raise ValueError(f"argmax_flow: cost must be [B, {len(d)}, H, W] for radius {radius}, got "
                         f"{tuple(cost.shape)}")
    order = torch.sort((d * d).sum(1), stable=True).indices  # nearest displacements first
    idx = cost[:, order].argmax(1)
    return d[order][idx].permute(0, 3, 1, 2).to(cost.dtype)


def match_condition(image1: Tensor, feats1: Tensor, feats2: Tensor, radius: int) -> Tensor:
    """What a DiffMatch-style network is conditioned on, per pixel of view 1: the image, the local cost volume
    of the two views' features (the data term) and the correlation-argmax flow (the initial correspondence),
    divided by :data:`FLOW_SCALE`. ``[B, 3 + (2r+1)^2 + 2, H, W]``."""
    c = cost_volume(feats1, feats2, radius)
    if image1.shape[0] != c.shape[0] or image1.shape[-2:] != c.shape[-2:]:
        raise ValueError(f"match_condition: image1 {tuple(image1.shape)} and features {tuple(feats1.shape)} must "
                         "share batch and size")
    return torch.cat([image1, c, argmax_flow(c, radius) / FLOW_SCALE], 1).float()


def condition_channels(radius: int) -> int:
    """Channels of :func:`match_condition` at ``radius``."""
    return 3 + len(displacements(radius)) + 2


def _match_net(method: str, c_cond: int, width: int) -> DenseNet:
    if method not in MATCH_METHODS:
        raise ValueError(f"method must be one of {MATCH_METHODS} ('diffusion': conditional diffusion over the flow, "
                         f"x0-prediction; 'regress': the same net regressing the flow in one call), got {method!r}")
    return DenseNet(c_img=c_cond, c_tgt=2, c_out=2, width=width)


def train_matcher(method: str, cond: Tensor, flow: Tensor, *, steps: int, batch: int, lr: float,
                  generator: torch.Generator, width: int = 16, progress: bool = False):
    """Train a flow network on conditions ``cond`` (:func:`match_condition`) and exact flows ``flow [N, 2, H, W]``
    (pixels) with :func:`dmlab.train.fit`. ``"diffusion"`` (DiffMatch, paper 78): the flow scaled by
    :data:`FLOW_SCALE` is noised to a random timestep of Stable Diffusion's schedule and the net predicts the clean
    flow from ``[cond, x_t, t]`` (x0-prediction); ``"regress"``: the same net, a zero ``x_t`` and ``t = T``, one
    call (Lotus-D's form). Same data, steps, batch, width and loss. Returns ``(net, fit_result)``."""
    from .train import FitConfig, fit

    if not isinstance(generator, torch.Generator):
        raise TypeError("train_matcher: generator must be a torch.Generator")
    if flow.ndim != 4 or flow.shape[1] != 2 or cond.shape[0] != flow.shape[0] or cond.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"train_matcher: cond [N, C, H, W] and flow [N, 2, H, W] must pair up, got "
                         f"{tuple(cond.shape)} and {tuple(flow.shape)}")
    net = _init(lambda: _match_net(method, cond.shape[1], width), generator)
    ac = _alphas_cumprod()
    y_all = flow.float() / FLOW_SCALE

    def data(g):
        idx = torch.randint(len(cond), (batch,), generator=g)
        t = torch.randint(len(ac), (batch,), generator=g)
        return cond[idx], y_all[idx], t, torch.randn(y_all[idx].shape, generator=g)

    def loss(b):
        c, y, t, eps = b
        if method == "regress":
            return F.mse_loss(net(c, torch.zeros_like(y), torch.full((len(c),), T_TRAIN - 1)), y)
        a = ac[t][:, None, None, None]
        return F.mse_loss(net(c, a.sqrt() * y + (1 - a).sqrt() * eps, t), y)

    cfg = FitConfig(steps=steps, lr=lr, schedule="cosine", warmup=min(50, steps // 10), progress=progress,
                    desc=f"match {method}")
    res = fit(loss, net, cfg, generator=generator, data=data)
    return net.eval(), res


@torch.no_grad()
def regress_flow(net: DenseNet, cond: Tensor) -> Tensor:
    """The one-call flow of a ``"regress"`` :func:`train_matcher` net, ``[B, 2, H, W]`` in pixels."""
    z = cond.new_zeros(cond.shape[0], 2, *cond.shape[-2:])
    return net(cond, z, torch.full((len(cond),), T_TRAIN - 1)) * FLOW_SCALE


@torch.no_grad()
def sample_flow(net: DenseNet, cond: Tensor, steps: int, *, generator: torch.Generator,
                samples: int = 1) -> Tensor:
    """DiffMatch's inference (paper 78): deterministic DDIM over the flow field from pure noise with ``steps``
    evenly spaced timesteps of an x0-predicting ``"diffusion"`` net, conditioned on ``cond``; the mean of
    ``samples`` draws (``steps * samples`` calls). ``[B, 2, H, W]`` in pixels."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample_flow: steps must be an int >= 1, got {steps!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"sample_flow: samples must be an int >= 1, got {samples!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("sample_flow: generator must be a torch.Generator (the initial noise is drawn from it)")
    ac = _alphas_cumprod()
    ts = torch.linspace(T_TRAIN - 1, 0, steps).round().long().tolist()
    out = 0
    for _ in range(samples):
        x = torch.randn(cond.shape[0], 2, *cond.shape[-2:], generator=generator)
        for i, t in enumerate(ts):
            a = ac[t]
            x0 = net(cond, x, torch.full((len(cond),), t))
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            a_next = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        out = out + x
    return out / samples * FLOW_SCALE


def endpoint_error(pred: Tensor, flow: Tensor, mask: Tensor) -> Tensor:
    """Per-pair average end-point error ``mean_p |pred(p) - flow(p)|`` over the pixels of ``mask`` (bool
    ``[B, 1, H, W]``), ``[B]`` float64; every pair must have at least one pixel in its mask."""
    if pred.shape != flow.shape or pred.ndim != 4 or pred.shape[1] != 2:
        raise ValueError(f"endpoint_error: pred and flow must both be [B, 2, H, W], got {tuple(pred.shape)} and "
                         f"{tuple(flow.shape)}")
    if mask.shape != (pred.shape[0], 1, *pred.shape[-2:]) or mask.dtype != torch.bool:
        raise ValueError(f"endpoint_error: mask must be bool [B, 1, H, W], got {mask.dtype} {tuple(mask.shape)}")
    n = mask.flatten(1).sum(1)
    if (n == 0).any():
        raise ValueError("endpoint_error: some pairs have an empty mask; select pairs with mask.any() first")
    e = (pred.double() - flow.double()).norm(dim=1, keepdim=True)
    return (e * mask).flatten(1).sum(1) / n


def match_data(n: int, cfg: dict, generator: torch.Generator):
    """``(SceneBatch, cond)``: ``n`` rendered view pairs (``cfg``: ``size``, ``p_flat``) and their
    :func:`match_condition` from :func:`patch_features` (``cfg["patch"]``) at ``cfg["radius"]``."""
    from .scenes import render_scenes

    b = render_scenes(n, generator=generator, size=cfg["size"], pair=True, p_flat=cfg["p_flat"])
    k = cfg["patch"]
    return b, match_condition(b.image, patch_features(b.image, k), patch_features(b.image2, k), cfg["radius"])


def train_match_suite(cfg: dict, cond: Tensor | None = None, flow: Tensor | None = None,
                      progress: bool = False) -> tuple[dict, dict]:
    """Chapter 29's DiffMatch entry for one training seed ``cfg["seed"]``: both :data:`MATCH_METHODS` on the
    same pairs, same steps, batch, width and loss. The pairs are ``cfg["n_train"]`` rendered scenes with
    :func:`patch_features` (:func:`match_data`) unless ``cond``/``flow`` are given (the full-scale path passes
    conditions built from a frozen diffusion model's features). ``(state_dict, log)``."""
    if (cond is None) != (flow is None):
        raise ValueError("train_match_suite: pass both cond and flow, or neither (then the pairs are rendered)")
    if cond is None:
        b, cond = match_data(cfg["n_train"], cfg, torch.Generator().manual_seed(cfg["data_seed"]))
        flow = b.flow
    state, log = {}, {}
    for k, m in enumerate(MATCH_METHODS):
        g = torch.Generator().manual_seed(1000 * cfg["seed"] + 780 + k)
        net, res = train_matcher(m, cond, flow, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                                 width=cfg["width"], generator=g, progress=progress)
        state.update({f"{m}.{n}": p.detach().clone() for n, p in net.state_dict().items()})
        log[m] = round(sum(res.losses[-50:]) / len(res.losses[-50:]), 5)
    return state, log


def match_predictions(nets, cond: Tensor, radius: int, steps: int, *, generator: torch.Generator,
                      samples: int = 1) -> dict:
    """The three matchers of one condition batch, flows ``[B, 2, H, W]`` in pixels: ``"argmax"`` (the
    correlation argmax stored in ``cond``), ``"regress"`` (one call) and ``"diffusion"`` (:func:`sample_flow`,
    ``steps`` x ``samples`` calls) from a :func:`load_match_suite` pair of nets."""
    if cond.ndim != 4 or cond.shape[1] != condition_channels(radius):
        raise ValueError(f"match_predictions: cond must be [B, {condition_channels(radius)}, H, W] "
                         f"(match_condition at radius {radius}), got {tuple(cond.shape)}")
    return {"argmax": cond[:, -2:] * FLOW_SCALE, "regress": regress_flow(nets["regress"], cond),
            "diffusion": sample_flow(nets["diffusion"], cond, steps, generator=generator, samples=samples)}


def load_match_suite(state: dict, cfg: dict) -> nn.ModuleDict:
    """``{"diffusion": DenseNet, "regress": DenseNet}`` (eval mode) from a :func:`train_match_suite` state dict."""
    out = nn.ModuleDict()
    for m in MATCH_METHODS:
        net = _match_net(m, condition_channels(cfg["radius"]), cfg["width"])
        net.load_state_dict({k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".")})
        out[m] = net
    return out.eval()
