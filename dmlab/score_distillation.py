"""Score distillation: optimise what a renderer draws so that a frozen diffusion model finds it likely.

Score distillation sampling (SDS; Poole et al. 2023) updates the parameters ``theta`` of a differentiable renderer
``x = g(theta)`` (an image, a set of particles, a generator, a 3-D scene seen from a camera) with the gradient

``grad_theta = w(t) (eps_hat(x_t, t) - eps) dx/dtheta``,   ``x_t = x + sigma_t eps``,

where ``eps_hat = (x_t - D(x_t, sigma_t)) / sigma_t`` is the frozen model's noise prediction, written here with the
book's VE denoiser ``D(x, sigma)`` (a VP model sees ``alpha_t x_t`` and predicts the same ``eps``). Time ``t`` in
``[0, 1]`` indexes the model's training noise levels (``sigma_of_t``) and ``w(t) = 1 - alpha_bar_t =
sigma^2 / (1 + sigma^2)`` (DreamFusion's weighting, also ScaleDreamer's).

Four gradients share this module:

* :func:`sds_grad` -- SDS. StableDreamer (Guo et al. 2023, ``guo2023stabledreamer``) rewrites it as a *reconstruction* loss with a
  noisy target: ``eps_hat - eps = (x - D(x_t)) / sigma``, so SDS is the gradient of
  ``w / (2 sigma) ||x - sg(D(x_t, sigma))||^2`` (:func:`sds_reconstruction_loss`): it pulls ``x`` towards a one-step
  denoised guess whose variance grows with ``sigma``. The paper therefore *anneals* the noise level over training
  (:func:`timesteps` ``"annealed"``, ``"annealed-random"``).
* :func:`vsd_grad` -- VSD-style: the baseline ``eps`` is replaced by the noise prediction of a model of the current
  renders, ``eps_hat_q`` (ProlificDreamer fine-tunes a LoRA for it; :func:`particle_denoiser` gives the exact
  denoiser of a kernel density of the particles, the ideal such model when the particles are few and low-dimensional).
* :func:`asd_grad` -- asynchronous score distillation (ASD, ScaleDreamer, Ma et al. 2024, ``ma2024scaledreamer``): the baseline is
  the *frozen* model's own prediction at a later time ``t + dt`` with the same noise,
  ``w(t) (eps_hat_cfg(x_t, t) - eps_hat(x_{t+dt}, t + dt))``, ``dt = ratio (t - t_min)``: no fine-tuning.

:func:`distill` runs the optimisation for any renderer (particles, an image, a generator amortised over classes) with
a time schedule, counts the calls of the frozen model (a CFG wrapper batched over both branches is one call),
and keeps snapshots. :func:`projection_matrix`, :func:`view_prior` and :func:`condition_on_views` are a linear camera in flatland and the
exact view priors of a Gaussian-mixture scene prior (unconditioned, or conditioned on input views as in Sparse3D,
Zou et al. 2023, ``zou2023sparse3d``). :func:`transport_costs` / :func:`wasserstein2` give the exact W2 between equal-size particle sets (the 2-D
yardstick).

Two pipelines replace or reshape the per-scene optimisation:

* Direct2.5 (Lu et al. 2024, ``lu2024direct25``): a multi-view 2.5-D diffusion model samples the *normal maps* of
  all cameras jointly, and an explicit fusion turns them into geometry in one solve, with no SDS loop.
  :func:`normal_camera` is the flatland normal map (the slope of a view, which must be integrated to give the view
  back), :func:`fusion_operator` the least-squares fusion (integration and tomography in one matrix),
  :func:`direct25` the pipeline (joint sampling, or each view on its own as the ablation without cross-view
  attention), :func:`shape_error` the distance of a scene to the nearest class's shape space.
* Isotropic3D (Liu et al. 2024, ``liu2024isotropic3d``): image-to-3D with a prior conditioned only on a global
  embedding of the reference image (:func:`embedding_camera`) and SDS from *all* cameras, without the pixel-aligned
  reference-view loss (:func:`reconstruct_from_views` with ``sds_views="all"``, ``data_weight=0``);
  :func:`view_errors` gives the per-view errors whose spread measures isotropy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import schedules
from .denoisers import as_sigma, bcast
from .exact import GMMDenoiser

__all__ = ["SCHEDULES", "METHODS", "WEIGHTINGS", "default_sigmas", "sigma_of_t", "weight", "timesteps", "eps_hat", "sds_grad",
           "sds_reconstruction_loss", "vsd_grad", "asd_grad", "asd_shift", "particle_denoiser", "DistillResult",
           "distill", "projection_matrix", "view_prior", "condition_on_views", "reconstruct_from_views",
           "transport_costs", "wasserstein2", "normal_camera", "fusion_operator", "Direct25Result", "direct25",
           "shape_error", "embedding_camera", "view_errors"]

SCHEDULES = ("random", "annealed", "annealed-random")
METHODS = ("sds", "vsd", "asd")


# ----------------------------------------------------------------------------------------------- time and noise
def default_sigmas() -> Tensor:
    """The noise levels of Stable Diffusion's and the zoo's training schedule (DDPM linear betas, 1000 steps)."""
    return schedules.train_sigmas(1000)


def _check_t(t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    if not t.dtype.is_floating_point:
        raise TypeError(f"t must be a floating-point tensor of times in [0, 1], got {t.dtype}")
    if ((t < 0) | (t > 1)).any() or not torch.isfinite(t).all():
        raise ValueError("t must lie in [0, 1] (0: the least noise the model was trained on, 1: the most)")
    return t


def sigma_of_t(t, sigmas: Tensor | None = None) -> Tensor:
    """The VE noise level at time ``t`` in ``[0, 1]``: the model's training index ``t (T - 1)`` mapped through
    ``sigmas`` (its training noise levels, default :func:`default_sigmas`), log-linearly interpolated."""
    t = _check_t(t)
    st = default_sigmas() if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    return schedules.index_to_sigma(t.to(torch.float64) * (len(st) - 1), st).to(t.dtype)


WEIGHTINGS = ("sds", "uniform")


def weight(sigma: Tensor, weighting: str = "sds") -> Tensor:
    """``w(t)``: ``"sds"`` is ``1 - alpha_bar_t = sigma^2 / (1 + sigma^2)`` (DreamFusion; ScaleDreamer's
    ``1 - alphas[t]``), ``"uniform"`` is 1 (ScaleDreamer's setting for its multi-view prior)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; use one of {WEIGHTINGS}")
    return sigma ** 2 / (1 + sigma ** 2) if weighting == "sds" else torch.ones_like(sigma)


def timesteps(kind: str, n_steps: int, batch: int, *, t_min: float = 0.02, t_max: float = 0.98,
              generator: torch.Generator | None = None) -> Tensor:
    """Times ``[n_steps, batch]`` in ``[t_min, t_max]`` for each optimisation step and render.

    * ``"random"`` -- DreamFusion: ``t ~ U(t_min, t_max)`` at every step, independently per render.
    * ``"annealed"`` -- StableDreamer's time annealing: ``t`` decreases linearly from ``t_max`` to ``t_min`` over
      the run, the same for every render (coarse structure first, then detail at low noise).
    * ``"annealed-random"`` -- a random ``t ~ U(t_min, t_hi(k))`` under an upper bound that decreases linearly from
      ``t_max`` to ``t_min``: annealed, with some randomness kept.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; use one of {SCHEDULES}")
    if not (isinstance(n_steps, int) and n_steps >= 1 and isinstance(batch, int) and batch >= 1):
        raise ValueError(f"n_steps and batch must be positive ints, got {n_steps!r}, {batch!r}")
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    frac = torch.linspace(0, 1, n_steps, dtype=torch.float64)[:, None] if n_steps > 1 else torch.zeros(1, 1,
                                                                                                    dtype=torch.float64)
    if kind == "annealed":
        return (t_max - (t_max - t_min) * frac).expand(n_steps, batch).clone()
    if generator is None:
        raise ValueError(f"schedule {kind!r} draws random times: pass generator=torch.Generator().manual_seed(...)")
    u = torch.rand(n_steps, batch, generator=generator, dtype=torch.float64)
    hi = torch.full_like(frac, t_max) if kind == "random" else t_max - (t_max - t_min) * frac
    return t_min + (hi - t_min) * u


# ----------------------------------------------------------------------------------------------- gradients
def eps_hat(denoiser: Callable, x_t: Tensor, sigma: Tensor, **cond) -> Tensor:
    """The noise prediction of a VE denoiser, ``(x_t - D(x_t, sigma)) / sigma``."""
    sigma = as_sigma(sigma, x_t)
    return (x_t - denoiser(x_t, sigma, **cond)) / bcast(sigma, x_t)


def _check_x_eps(x: Tensor, eps: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(eps, Tensor):
        raise TypeError("x and eps must be tensors")
    if x.shape != eps.shape:
        raise ValueError(f"eps must have x's shape {tuple(x.shape)} (one noise per render), got {tuple(eps.shape)}")


@torch.no_grad()
def sds_grad(denoiser: Callable, x: Tensor, sigma, eps: Tensor, *, weighting: str = "sds", **cond) -> Tensor:
    """SDS: ``w(sigma) (eps_hat(x + sigma eps, sigma) - eps)`` (Poole et al. 2023), shape of ``x``."""
    _check_x_eps(x, eps)
    sigma = as_sigma(sigma, x)
    w = bcast(weight(sigma, weighting), x)
    return w * (eps_hat(denoiser, x + bcast(sigma, x) * eps, sigma, **cond) - eps)


def sds_reconstruction_loss(denoiser: Callable, x: Tensor, sigma, eps: Tensor, *, weighting: str = "sds",
                            **cond) -> Tensor:
    """StableDreamer's reading of SDS: ``sum w / (2 sigma) ||x - sg(D(x + sigma eps, sigma))||^2``.

    Its gradient with respect to ``x`` equals :func:`sds_grad` exactly (``eps_hat - eps = (x - D(x_t)) / sigma``):
    SDS regresses ``x`` onto a one-step denoised target that is noisy at large ``sigma`` (Guo et al. 2023, sec. 3).
    """
    _check_x_eps(x, eps)
    sigma = as_sigma(sigma, x)
    with torch.no_grad():
        target = denoiser(x.detach() + bcast(sigma, x) * eps, sigma, **cond)
    return (bcast(weight(sigma, weighting) / (2 * sigma), x) * (x - target) ** 2).sum()


@torch.no_grad()
def vsd_grad(denoiser: Callable, particle_model: Callable, x: Tensor, sigma, eps: Tensor, *,
             weighting: str = "sds", **cond) -> Tensor:
    """VSD-style: ``w (eps_hat(x_t) - eps_hat_q(x_t))`` with ``eps_hat_q`` the noise prediction of a model of the
    renders' own distribution (ProlificDreamer's LoRA; here any denoiser, e.g. :func:`particle_denoiser`)."""
    _check_x_eps(x, eps)
    sigma = as_sigma(sigma, x)
    x_t = x + bcast(sigma, x) * eps
    w = bcast(weight(sigma, weighting), x)
    return w * (eps_hat(denoiser, x_t, sigma, **cond) - eps_hat(particle_model, x_t, sigma))


def asd_shift(t: Tensor, *, ratio: float = 0.1, t_min: float = 0.02) -> Tensor:
    """ScaleDreamer's later time ``t + dt`` with ``dt = ratio (t - t_min)`` (its ``plus_ratio``), capped at 1."""
    if not (isinstance(ratio, (int, float)) and ratio > 0):
        raise ValueError(f"ratio must be a positive number (ScaleDreamer uses 0.1), got {ratio!r}")
    t = _check_t(t)
    return (t + ratio * (t - t_min).clamp_min(0)).clamp_max(1.0)


@torch.no_grad()
def asd_grad(denoiser: Callable, x: Tensor, sigma, sigma_shift, eps: Tensor, *, baseline: Callable | None = None,
             weighting: str = "sds", **cond) -> Tensor:
    """ASD: ``w(sigma) (eps_hat(x + sigma eps, sigma) - eps_hat_b(x + sigma' eps, sigma'))`` with the *same* noise
    ``eps`` at the later noise level ``sigma' >= sigma`` (Ma et al. 2024, eq. 8). ``baseline`` is the denoiser of the
    second term (ScaleDreamer: the conditional model without CFG; default ``denoiser``)."""
    _check_x_eps(x, eps)
    sigma, sigma_shift = as_sigma(sigma, x), as_sigma(sigma_shift, x)
    if (sigma_shift < sigma).any():
        raise ValueError("sigma_shift must be >= sigma (ASD's baseline is at a later, noisier time t + dt)")
    b = denoiser if baseline is None else baseline
    e1 = eps_hat(denoiser, x + bcast(sigma, x) * eps, sigma, **cond)
    e2 = eps_hat(b, x + bcast(sigma_shift, x) * eps, sigma_shift, **cond)
    return bcast(weight(sigma, weighting), x) * (e1 - e2)


def particle_denoiser(particles: Tensor, bandwidth: float) -> GMMDenoiser:
    """The exact denoiser of a Gaussian kernel density of the particles (``N(p_i, bandwidth^2 I)``, equal weights):
    the VSD baseline a perfectly fitted model of the current renders would give."""
    if not (isinstance(particles, Tensor) and particles.ndim >= 2 and particles.shape[0] >= 1):
        raise ValueError("particles must be a tensor [n, ...] with n >= 1")
    if not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")
    p = particles.detach().reshape(particles.shape[0], -1).to(torch.float64)
    return GMMDenoiser.isotropic(torch.ones(len(p)), p, float(bandwidth) ** 2, shape=tuple(particles.shape[1:]))


# ----------------------------------------------------------------------------------------------- the loop
class _Counter:
    """Counts calls of a denoiser (one per call, whatever its batch)."""

    def __init__(self, d: Callable):
        self.d, self.calls = d, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.d(x, sigma, **cond)


@dataclass
class DistillResult:
    """What :func:`distill` returns: the final renders ``x``, ``snapshots`` (renders at the steps in ``steps``),
    the times used ``[n_steps, batch]``, the frozen model's calls ``nfe`` and the mean squared gradient per step."""

    x: Tensor
    snapshots: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    t: Tensor | None = None
    nfe: int = 0
    grad_sq: list = field(default_factory=list)


def distill(render: Callable[[], Tensor], params: Sequence[Tensor], denoiser: Callable, *, method: str = "sds",
            schedule: str = "random", n_steps: int = 200, lr: float = 0.05, generator: torch.Generator,
            cond: dict | None = None, t_min: float = 0.02, t_max: float = 0.98, sigmas: Tensor | None = None,
            draws: int = 1, asd_ratio: float = 0.1, baseline: Callable | None = None,
            particle_model: Callable[[Tensor], Callable] | None = None, optimizer: str = "adam",
            weighting: str = "sds", snapshot_every: int = 0) -> DistillResult:
    """Optimise ``params`` so that ``render()`` (a tensor ``[B, ...]``) scores well under the frozen ``denoiser``.

    Each step draws times from :func:`timesteps` (``schedule``) and noise ``eps`` from ``generator``, computes the
    gradient of ``method`` (``"sds"``, ``"vsd"``, ``"asd"``) for every render, averages it over ``draws``
    independent noise draws (SDS with ``draws=2`` costs what ASD costs: the matched-NFE competitor), back-propagates
    it through ``render`` and takes one optimiser step (``"adam"`` or ``"sgd"``, learning rate ``lr``).
    ``cond`` is passed to the denoiser (e.g. ``class_labels``); ``vsd`` needs ``particle_model(x)`` returning the
    denoiser of the current renders; ``asd`` uses ``baseline`` (default ``denoiser``) at ``t + asd_ratio (t -
    t_min)``. ``sigmas`` are the model's training noise levels (:func:`sigma_of_t`); ``weighting`` is :func:`weight`'s.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if method == "vsd" and particle_model is None:
        raise ValueError("method='vsd' needs particle_model: x -> a denoiser of the renders' distribution "
                         "(e.g. lambda x: particle_denoiser(x, 0.1))")
    if not callable(render) or not callable(denoiser):
        raise TypeError("render must be a callable returning the renders [B, ...]; denoiser D(x, sigma, **cond)")
    params = list(params)
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError("params must be a non-empty list of tensors with requires_grad=True (what render reads)")
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    weight(torch.ones(1), weighting)  # validates the name
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    cond = dict(cond or {})
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params, lr=lr)
    D = _Counter(denoiser)
    B = _Counter(baseline) if baseline is not None else None
    with torch.no_grad():
        x0 = render()
    if not isinstance(x0, Tensor) or x0.ndim < 2:
        raise ValueError("render() must return a tensor [B, ...] of renders")
    ts = timesteps(schedule, n_steps, x0.shape[0], t_min=t_min, t_max=t_max, generator=generator)
    out = DistillResult(x=x0, t=ts)
    for k in range(n_steps):
        x = render()
        xd = x.detach()
        t = ts[k]
        sig = sigma_of_t(t, sigmas).to(device=xd.device, dtype=xd.dtype)
        g = torch.zeros_like(xd)
        for _ in range(draws):
            eps = torch.randn(xd.shape, generator=generator, dtype=xd.dtype).to(xd.device)
            if method == "sds":
                g += sds_grad(D, xd, sig, eps, weighting=weighting, **cond)
            elif method == "vsd":
                g += vsd_grad(D, particle_model(xd), xd, sig, eps, weighting=weighting, **cond)
            else:
                sig2 = sigma_of_t(asd_shift(t, ratio=asd_ratio, t_min=t_min), sigmas)
                sig2 = sig2.to(device=xd.device, dtype=xd.dtype)
                g += asd_grad(D, xd, sig, sig2, eps, baseline=B, weighting=weighting, **cond)
        g /= draws
        opt.zero_grad(set_to_none=True)
        x.backward(gradient=g)
        opt.step()
        out.grad_sq.append(float((g ** 2).mean()))
        if snapshot_every and (k % snapshot_every == 0):
            out.snapshots.append(xd.clone())
            out.steps.append(k)
    with torch.no_grad():
        out.x = render().detach()
    out.nfe = D.calls + (B.calls if B is not None else 0)
    return out


# ----------------------------------------------------------------------------------------------- scenes and views
def projection_matrix(size: int, angle: float, bins: int | None = None) -> Tensor:
    """A parallel-beam camera in flatland: the ``[bins, size * size]`` matrix that integrates a ``size x size`` scene
    (pixel centres on ``[-1, 1]^2``) along the direction at ``angle`` (radians), with linear binning onto ``bins``
    detector cells over ``[-sqrt 2, sqrt 2]``. A linear renderer, so a Gaussian-mixture scene prior gives an exact
    Gaussian-mixture prior for every view (:func:`view_prior`)."""
    if not (isinstance(size, int) and size >= 2):
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    bins = size if bins is None else bins
    if not (isinstance(bins, int) and bins >= 2):
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    c = torch.linspace(-1, 1, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    s = xx.flatten() * math.cos(angle) + yy.flatten() * math.sin(angle)
    cells = torch.linspace(-math.sqrt(2), math.sqrt(2), bins, dtype=torch.float64)
    h = cells[1] - cells[0]
    return (1 - (s[None] - cells[:, None]).abs() / h).clamp_min(0) * (2 / size)


def view_prior(prior: GMMDenoiser, P: Tensor, *, jitter: float = 1e-9) -> GMMDenoiser:
    """The exact prior of the renders ``P v`` of scenes ``v ~ prior`` (a mixture pushed through a linear camera):
    ``sum_k w_k N(P mu_k, P C_k P^T)``, the view-conditioned model a multi-view diffusion prior learns."""
    if not isinstance(prior, GMMDenoiser):
        raise TypeError("prior must be a GMMDenoiser over flattened scenes")
    P = torch.as_tensor(P, dtype=torch.float64)
    if P.ndim != 2 or P.shape[1] != prior.dim:
        raise ValueError(f"P must be [bins, {prior.dim}] (a camera of the prior's scenes), got {tuple(P.shape)}")
    C = P @ prior.covs @ P.T
    return GMMDenoiser(prior.weights, prior.means @ P.T, (C + C.mT) / 2 + jitter * torch.eye(len(P), dtype=torch.float64))


def condition_on_views(prior: GMMDenoiser, A: Tensor, y: Tensor, *, noise_var: float = 1e-4) -> GMMDenoiser:
    """The exact posterior of scenes given observed views ``y = A v + n``, ``n ~ N(0, noise_var I)``: per component
    Gaussian conditioning (Kalman update) and weights re-scored by each component's evidence. Pushed through a camera
    by :func:`view_prior`, it is the multi-view prior *conditioned on the input views* that Sparse3D distils."""
    if not isinstance(prior, GMMDenoiser):
        raise TypeError("prior must be a GMMDenoiser over flattened scenes")
    A, y = torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if A.ndim != 2 or A.shape[1] != prior.dim or y.shape != (A.shape[0],):
        raise ValueError(f"A must be [m, {prior.dim}] and y [m], got {tuple(A.shape)} and {tuple(y.shape)}")
    if not noise_var > 0:
        raise ValueError(f"noise_var must be > 0, got {noise_var!r}")
    S = A @ prior.covs @ A.T + noise_var * torch.eye(len(A), dtype=torch.float64)
    gain = prior.covs @ A.T @ torch.linalg.inv(S)
    mu = prior.means + (gain @ (y[None] - prior.means @ A.T)[..., None])[..., 0]
    C = prior.covs - gain @ A @ prior.covs
    lam, U = torch.linalg.eigh((C + C.mT) / 2)
    C = U @ torch.diag_embed(lam.clamp_min(0)) @ U.mT
    logw = prior.weights.log() + torch.distributions.MultivariateNormal(prior.means @ A.T, S).log_prob(y[None])
    return GMMDenoiser(torch.softmax(logw, 0), mu, (C + C.mT) / 2)


def reconstruct_from_views(prior: GMMDenoiser, cameras: Sequence[Tensor], observed: Sequence[int], y: Tensor, *,
                           distill_prior: str | GMMDenoiser | None = "conditioned", n_steps: int = 150,
                           lr: float = 0.05, prior_weight: float = 30.0, views_per_step: int = 3,
                           data_weight: float = 50.0, sds_views: str = "novel",
                           generator: torch.Generator) -> Tensor:
    """Reconstruct a flattened scene from the views ``y`` (stacked) of the cameras ``observed``.

    The loss is ``data_weight ||A v - y||^2`` (``A`` stacks the observed cameras; ``data_weight=0`` drops this
    pixel-aligned term) plus, unless ``distill_prior`` is None, SDS from ``views_per_step`` random cameras per step,
    weighted by ``prior_weight``: the prior of a view is :func:`view_prior` of ``prior`` (``"unconditioned"``,
    DreamFusion-style), of the posterior given the observed views (``"conditioned"``: the multi-view-consistent prior
    Sparse3D distils) or of a scene distribution passed as a :class:`GMMDenoiser` (e.g. ``prior`` conditioned on a
    global embedding of the views, :func:`embedding_camera`, as in Isotropic3D). ``sds_views="novel"`` draws the
    SDS cameras among the unobserved ones, ``"all"`` among every camera (Isotropic3D: no view is special). Noise
    levels are annealed (:func:`timesteps`); Adam from ``v = 0``. Returns ``v`` ``[dim]``.
    """
    if not (distill_prior in (None, "conditioned", "unconditioned") or isinstance(distill_prior, GMMDenoiser)):
        raise ValueError(f"distill_prior must be None, 'conditioned', 'unconditioned' or a GMMDenoiser over scenes, "
                         f"got {distill_prior!r}")
    if isinstance(distill_prior, GMMDenoiser) and distill_prior.dim != prior.dim:
        raise ValueError(f"distill_prior is a mixture over {distill_prior.dim} values; the scenes have {prior.dim}")
    if sds_views not in ("novel", "all"):
        raise ValueError(f"sds_views must be 'novel' (the unobserved cameras) or 'all', got {sds_views!r}")
    if not (isinstance(data_weight, (int, float)) and data_weight >= 0):
        raise ValueError(f"data_weight must be a number >= 0 (0: no pixel-aligned loss), got {data_weight!r}")
    observed = list(observed)
    if not observed or any(not 0 <= i < len(cameras) for i in observed):
        raise ValueError(f"observed must list camera indices in [0, {len(cameras) - 1}], got {observed}")
    A = torch.cat([torch.as_tensor(cameras[i], dtype=torch.float64) for i in observed])
    y = torch.as_tensor(y, dtype=torch.float64)
    if y.shape != (A.shape[0],):
        raise ValueError(f"y must stack the observed views, shape [{A.shape[0]}], got {tuple(y.shape)}")
    novel = [i for i in range(len(cameras)) if sds_views == "all" or i not in observed]
    if distill_prior is not None:
        if isinstance(distill_prior, GMMDenoiser):
            base = distill_prior
        else:
            base = condition_on_views(prior, A, y) if distill_prior == "conditioned" else prior
        views = {i: view_prior(base, cameras[i]) for i in novel}
    ts = timesteps("annealed", n_steps, 1)
    v = torch.zeros(prior.dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([v], lr=lr)
    for k in range(n_steps):
        opt.zero_grad(set_to_none=True)
        if data_weight > 0:
            (data_weight * ((A @ v - y) ** 2).sum()).backward()
        if distill_prior is not None and novel:
            sig = sigma_of_t(ts[k])
            for j in torch.randperm(len(novel), generator=generator)[:views_per_step].tolist():
                x = (cameras[novel[j]] @ v)[None]
                eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
                g = sds_grad(views[novel[j]], x.detach(), sig, eps)
                x.backward(gradient=prior_weight * g / min(views_per_step, len(novel)))
        opt.step()
    return v.detach()


# ----------------------------------------------------------------------------------------------- Direct2.5, Isotropic3D
def _check_camera(P, name: str = "P") -> Tensor:
    P = torch.as_tensor(P, dtype=torch.float64)
    if P.ndim != 2 or P.shape[0] < 1:
        raise ValueError(f"{name} must be a camera matrix [bins, dim] (e.g. projection_matrix(...)), got "
                         f"{tuple(P.shape)}")
    return P


def normal_camera(P: Tensor) -> Tensor:
    """The flatland *normal map* of a camera ``P`` ``[bins, dim]``: the slope of its view profile, ``n_i = p_i -
    p_{i-1}`` with ``p_{-1} = p_{bins} = 0`` (the object lies inside the field of view), a ``[bins + 1, dim]`` matrix.

    Like a normal map in 3-D it records how the surface turns, not where it is: a view is recovered from it only by
    integration (the cumulative sum, the 1-D Frankot-Chellappa / Poisson solve), which :func:`fusion_operator` does
    jointly with the tomographic fusion. Linear, so a mixture prior of scenes gives exact priors of normal maps
    (:func:`view_prior`)."""
    P = _check_camera(P)
    bins = P.shape[0]
    D = torch.zeros(bins + 1, bins, dtype=torch.float64)
    idx = torch.arange(bins)
    D[idx, idx] = 1.0
    D[idx + 1, idx] = -1.0
    return D @ P


def fusion_operator(cameras: Sequence[Tensor], *, ridge: float = 1e-3) -> Tensor:
    """The explicit fusion of Direct2.5's second stage in flatland: ``F`` ``[dim, sum bins]`` with
    ``v = F concat(maps)`` the ridge least-squares scene ``argmin_v sum_i ||M_i v - maps_i||^2 + ridge ||v||^2``
    for the cameras ``M_i`` (e.g. :func:`normal_camera` s). Computed once per camera rig; fusing an asset is then
    one matrix product instead of an optimisation."""
    if not isinstance(ridge, (int, float)) or not ridge > 0:
        raise ValueError(f"ridge must be a positive number (it regularises the cameras' null space), got {ridge!r}")
    if len(cameras) == 0:
        raise ValueError("cameras must list at least one camera matrix")
    M = torch.cat([_check_camera(P, "each camera") for P in cameras])
    return torch.linalg.solve(M.T @ M + ridge * torch.eye(M.shape[1], dtype=torch.float64), M.T)


@dataclass
class Direct25Result:
    """What :func:`direct25` returns: the fused ``scenes`` ``[n, dim]``, the generated ``maps`` ``[n, sum bins]``
    (all cameras concatenated), the model calls ``nfe`` and the per-asset ``residual``, the mean squared misfit of
    the maps to the re-rendered fused scene (0 for perfectly consistent views)."""

    scenes: Tensor
    maps: Tensor
    nfe: int
    residual: Tensor


def direct25(prior: GMMDenoiser, cameras: Sequence[Tensor], n: int, *, generator: torch.Generator, steps: int = 10,
             joint: bool = True, sigma_min: float = 0.002, sigma_max: float = 80.0, ridge: float = 1e-3,
             fusion: Tensor | None = None) -> Direct25Result:
    """Direct2.5 (Lu et al. 2024) in flatland: sample the maps of all ``cameras`` with a multi-view diffusion model
    of the scene distribution ``prior``, then fuse them explicitly (:func:`fusion_operator`). No SDS loop.

    The multi-view model is exact here: :func:`view_prior` of ``prior`` through the stacked cameras, the joint
    distribution of all views that a model with cross-view attention learns. It is sampled by DPM-Solver++(2M) on a
    Karras schedule (``steps`` model calls for the whole batch of ``n`` assets, each call denoising every view).
    ``joint=False`` is the ablation without cross-view attention: every view is sampled from its own single-view
    prior with independent noise (``steps * len(cameras)`` calls), so the views need not agree. ``fusion`` may pass
    a precomputed :func:`fusion_operator` (else it is built with ``ridge``)."""
    from .samplers.exponential import sample_dpmpp_2m

    if not isinstance(prior, GMMDenoiser):
        raise TypeError("prior must be a GMMDenoiser over flattened scenes (the distribution the model learnt)")
    if not (isinstance(n, int) and n >= 1 and isinstance(steps, int) and steps >= 2):
        raise ValueError(f"n must be an int >= 1 and steps an int >= 2, got n={n!r}, steps={steps!r}")
    cams = [_check_camera(P, "each camera") for P in cameras]
    if not cams or any(P.shape[1] != prior.dim for P in cams):
        raise ValueError(f"cameras must be a non-empty list of [bins, {prior.dim}] matrices")
    F = fusion_operator(cams, ridge=ridge) if fusion is None else torch.as_tensor(fusion, dtype=torch.float64)
    M = torch.cat(cams)
    if F.shape != (prior.dim, M.shape[0]):
        raise ValueError(f"fusion must be [{prior.dim}, {M.shape[0]}] (fusion_operator(cameras)), got {tuple(F.shape)}")
    sig = schedules.karras(steps, sigma_min, sigma_max).to(torch.float64)
    if joint:
        x = sig[0] * torch.randn(n, M.shape[0], generator=generator, dtype=torch.float64)
        maps, nfe = sample_dpmpp_2m(view_prior(prior, M), x, sig), steps
    else:
        parts = []
        for P in cams:
            x = sig[0] * torch.randn(n, P.shape[0], generator=generator, dtype=torch.float64)
            parts.append(sample_dpmpp_2m(view_prior(prior, P), x, sig))
        maps, nfe = torch.cat(parts, 1), steps * len(cams)
    scenes = maps @ F.T
    return Direct25Result(scenes, maps, nfe, ((scenes @ M.T - maps) ** 2).mean(1))


def shape_error(v: Tensor, means: Tensor, bases: Tensor) -> Tensor:
    """Geometry error of scenes ``v`` ``[n, dim]`` against known shape classes: per scene, the mean squared residual
    of ``v - means[k]`` after removing its part in the span of ``bases[k]`` (the class's smooth variations,
    ``[K, dim, r]``), minimised over the classes ``k``. Zero for any scene ``means[k] + bases[k] z``: the yardstick
    neither rewards the class mean (mode seeking) nor penalises variety within the class. Returns ``[n]``."""
    v, mu, Bk = (torch.as_tensor(a, dtype=torch.float64) for a in (v, means, bases))
    if v.ndim != 2 or mu.ndim != 2 or Bk.ndim != 3 or not (v.shape[1] == mu.shape[1] == Bk.shape[1]) \
            or mu.shape[0] != Bk.shape[0]:
        raise ValueError(f"need v [n, dim], means [K, dim], bases [K, dim, r]; got {tuple(v.shape)}, "
                         f"{tuple(mu.shape)}, {tuple(Bk.shape)}")
    Q = torch.linalg.qr(Bk).Q  # [K, dim, r] orthonormal
    r = v[:, None, :] - mu[None]  # [n, K, dim]
    r = r - torch.einsum("kdr,nkr->nkd", Q, torch.einsum("kdr,nkd->nkr", Q, r))
    return (r ** 2).mean(-1).min(1).values


def embedding_camera(P: Tensor, k: int = 3) -> Tensor:
    """A *global embedding* of the view of camera ``P`` ``[bins, dim]``: its first ``k`` moments over the detector
    (mass, centroid, spread, ...: ``sum_s s^j p(s)`` for ``j < k``, ``s`` on ``[-1, 1]``), a ``[k, dim]`` matrix.
    It summarises the image without being pixel-aligned, the flatland stand-in for Isotropic3D's CLIP image
    embedding: condition a prior on it with :func:`condition_on_views` (``A = embedding_camera(P)``, ``y = A v``)."""
    P = _check_camera(P)
    if not (isinstance(k, int) and 1 <= k <= P.shape[0]):
        raise ValueError(f"k must be an int in [1, {P.shape[0]}] (moments of a {P.shape[0]}-bin view), got {k!r}")
    s = torch.linspace(-1, 1, P.shape[0], dtype=torch.float64)
    return torch.stack([s ** j for j in range(k)]) @ P


def view_errors(v: Tensor, truth: Tensor, cameras: Sequence[Tensor]) -> Tensor:
    """Per-view mean squared error of a reconstruction ``v`` against the true scene ``truth`` (both ``[..., dim]``)
    through each camera: ``[..., len(cameras)]``. Its spread across views measures how isotropic the quality is."""
    v, truth = torch.as_tensor(v, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64)
    if v.shape != truth.shape:
        raise ValueError(f"v and truth must have the same shape, got {tuple(v.shape)} and {tuple(truth.shape)}")
    cams = [_check_camera(P, "each camera") for P in cameras]
    if not cams or any(P.shape[1] != v.shape[-1] for P in cams):
        raise ValueError(f"cameras must be a non-empty list of [bins, {v.shape[-1]}] matrices")
    return torch.stack([(((v - truth) @ P.T) ** 2).mean(-1) for P in cams], -1)


# ----------------------------------------------------------------------------------------------- yardstick
def transport_costs(a: Tensor, b: Tensor) -> Tensor:
    """Per-point costs ``||a_i - b_pi(i)||^2`` of the optimal assignment ``pi`` between two equal-size point sets
    ``[n, d]`` (scipy's Hungarian solver): their mean is the squared 2-Wasserstein distance of the two empirical
    distributions, and ``a``'s points keep their order, so two methods started from the same points can be compared
    point by point (``claims.paired_bootstrap``)."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be point sets [n, d] of the same shape, got {tuple(getattr(a, 'shape', ()))} "
                         f"and {tuple(getattr(b, 'shape', ()))}")
    from scipy.optimize import linear_sum_assignment

    C = torch.cdist(a.detach().double().cpu(), b.detach().double().cpu()) ** 2
    r, c = linear_sum_assignment(C.numpy())
    out = torch.empty(len(a), dtype=torch.float64)
    out[torch.as_tensor(r)] = C[r, c]
    return out


def wasserstein2(a: Tensor, b: Tensor) -> float:
    """The exact 2-Wasserstein distance between two equal-size point sets ``[n, d]`` (uniform weights),
    ``sqrt(mean(transport_costs(a, b)))``."""
    return float(transport_costs(a, b).mean().sqrt())
