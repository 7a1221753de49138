"""Diffusion beyond images: time series, PDE operators, anomaly detection and tileable textures (chapter 32).

* **TSDiff** (Kollovieh, Ansari et al., "Predict, Refine, Synthesize: Self-Guiding Diffusion Models for
  Probabilistic Time Series Forecasting", NeurIPS 2023; paper 49): one *unconditional* diffusion model of whole
  series, conditioned at inference by **observation self-guidance**: the gradient of the squared error between the
  model's own one-step estimate ``x0_hat(x_t)`` and the observed context is added to the noise prediction,
  ``eps~ = eps + s sqrt(1 - abar_t) grad_x_t 1/2 ||m (x0_hat - y)||^2`` (their ``DDIMGuidance``, MSE energy), and
  **refinement**: gradient descent on a forecast under the model's denoising loss (an implicit energy).
  :class:`SeriesDenoiser`, :func:`train_series_model`, :func:`forecast`, :func:`refine`, :func:`crps`,
  :func:`seasonal_naive`. Re-implemented from the paper and its description of ``observation_guidance.py``
  (amazon-science/unconditional-time-series-diffusion, Apache-2.0); the backbone here is a small dilated 1-D
  convolution network, not the paper's S4 layers.
* **Poseidon** (Herde et al., "Poseidon: Efficient Foundation Models for PDEs", NeurIPS 2024; paper 80): an operator
  ``u(t_i) -> u(t_j)`` with **time-conditioned layer norms** (scale and shift functions of the lead time) trained on
  **all2all** pairs ``i < j`` of each trajectory (the semigroup property multiplies the training pairs), pretrained
  on several PDE families and fine-tuned to an unseen one. :func:`pde_trajectories`, :class:`TimeConditionedOperator`,
  :func:`all2all_pairs`, :func:`train_operator`, :func:`operator_error`. Not a diffusion model: a 1-D convolutional
  stand-in for the paper's multiscale operator transformer (camlab-ethz/poseidon, ``scOT``).
* **Reconstruction-based anomaly detection** (the anomaly-detection branch of Kazerouni et al., "Diffusion Models
  for Medical Image Analysis: A Comprehensive Survey", MedIA 2023; paper 21, AnoDDPM-style partial noising):
  :func:`inject_anomalies`, :func:`reconstruction_scores`, :func:`nearest_neighbour_scores`, :func:`auroc`.
* **Tileable sampling by rolling** (Vecchio, "StableMaterials", 2024; paper 72): the state is rolled by a random
  circular offset before every denoiser call and rolled back after (:class:`RolledDenoiser`), so the wrap-around
  border of the image is denoised as an interior region and the output tiles without seams.
* **Stable neural SDEs** (Oh, Lim & Kim, ICLR 2024; paper 8): neural SDE classifiers of irregularly sampled series
  in the paper's stable classes (Langevin-type, linear-noise, geometric), solved by Euler-Maruyama, with the neural
  ODE of the same drift and a GRU as competitors: :func:`irregular_series`, :func:`interpolate_path`,
  :class:`NeuralSDEClassifier`, :class:`GRUClassifier`, :func:`train_series_classifier`, :func:`classify_correct`,
  :func:`correct_by_missing_rate`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["series_alphas_cumprod", "SeriesDenoiser", "train_series_model", "forecast", "refine", "crps",
           "seasonal_naive", "PDE_FAMILIES", "pde_trajectories", "TimeConditionedOperator", "all2all_pairs",
           "train_operator", "operator_error", "inject_anomalies", "reconstruction_scores",
           "nearest_neighbour_scores", "auroc", "RolledDenoiser", "rolled", "tile_mosaic", "SDE_KINDS",
           "irregular_series", "missing_mask", "interpolate_path", "NeuralSDEClassifier", "GRUClassifier",
           "train_series_classifier", "classify_correct", "correct_by_missing_rate", "shift_digits",
           "standard_views", "diffusion_views", "cosine_filter", "class_prototypes", "prompt_logits",
           "prompt_tuning",
           "train_entry", "load_entry", "EntryModels"]


def _gen(generator, fn: str) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0))")
    return generator


def _int(v, name: str, fn: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {v!r}")
    return v


# =============================================================================================== TSDiff (49)
def series_alphas_cumprod(n_steps: int = 100, beta_start: float = 1e-4, beta_end: float = 0.1) -> Tensor:
    """TSDiff's discrete VP schedule: ``n_steps`` linear betas from ``beta_start`` to ``beta_end`` (their default
    100 steps, 1e-4 to 0.1); returns ``alpha_bar`` (float64, ``[n_steps]``)."""
    _int(n_steps, "n_steps", "series_alphas_cumprod", 2)
    betas = torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _time_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    f = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * f[None]
    return torch.cat([a.sin(), a.cos()], 1)


class SeriesDenoiser(nn.Module):
    """A small epsilon-prediction network for series ``[B, L]``: dilated residual 1-D convolutions with a sinusoidal
    step embedding. Three input channels: the noisy series, the observed values (0 where unobserved) and the
    observation mask. The unconditional model of TSDiff is called with the last two at zero; the conditional
    competitor sees the context there; both have exactly the same parameters.

    ``forward(x_t, t, observed=None, mask=None) -> eps_hat`` with ``t`` integer steps ``[B]``."""

    def __init__(self, hidden: int = 24, dilations: tuple = (1, 2, 4, 1), kernel: int = 5, emb: int = 16):
        super().__init__()
        _int(hidden, "hidden", "SeriesDenoiser")
        if kernel % 2 != 1:
            raise ValueError(f"SeriesDenoiser: kernel must be odd (same-length convolutions), got {kernel}")
        self.emb = emb
        self.inp = nn.Conv1d(3, hidden, 1)
        self.temb = nn.Linear(emb, hidden)
        self.norms = nn.ModuleList(nn.GroupNorm(4, hidden) for _ in dilations)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, padding=d * (kernel // 2), dilation=d)
                                   for d in dilations)
        self.out = nn.Conv1d(hidden, 1, 1)

    def forward(self, x: Tensor, t: Tensor, observed: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"SeriesDenoiser: x must be series [B, L], got shape {tuple(x.shape)}")
        obs = torch.zeros_like(x) if observed is None else observed * mask
        m = torch.zeros_like(x) if mask is None else mask.to(x.dtype)
        h = self.inp(torch.stack([x, obs, m], 1))
        e = self.temb(_time_embedding(t, self.emb))[:, :, None]
        for norm, conv in zip(self.norms, self.convs):
            h = h + conv(torch.nn.functional.silu(norm(h + e)))
        return self.out(h)[:, 0]


def _context_mask(b: int, length: int, horizon: int, device=None) -> Tensor:
    m = torch.ones(b, length, device=device)
    m[:, length - horizon:] = 0
    return m


def train_series_model(series: Tensor, *, conditional: bool, horizon: int, steps: int, batch_size: int = 64,
                       lr: float = 2e-3, seed: int = 0, hidden: int = 24, progress: bool = False):
    """Train a :class:`SeriesDenoiser` with :func:`dmlab.train.fit` (DDPM loss, Adam, cosine schedule, EMA 0.99).

    ``conditional=False``: TSDiff's unconditional model, epsilon loss on the whole series. ``conditional=True``: the
    task-specific competitor at the same budget (same network, steps, batch and data draws): it sees the first
    ``L - horizon`` values as context and is trained on the epsilon of the last ``horizon`` values only.
    Returns ``(model, FitResult)``."""
    from .train import FitConfig, ddpm_batch, fit

    if not (isinstance(series, Tensor) and series.ndim == 2):
        raise ValueError("train_series_model: series must be a tensor [n, L]")
    _int(horizon, "horizon", "train_series_model")
    torch.manual_seed(seed)
    model = SeriesDenoiser(hidden=hidden)
    ac = series_alphas_cumprod().float()
    L = series.shape[1]

    def loss(b):
        if not conditional:
            return (model(b["xt"], b["t"]) - b["eps"]).pow(2).mean()
        m = _context_mask(b["xt"].shape[0], L, horizon)
        xt = b["xt"] * (1 - m)  # the network sees the noisy future and the clean context
        err = (model(xt, b["t"], b["x0"], m) - b["eps"]) * (1 - m)
        return err.pow(2).sum() / (1 - m).sum()

    cfg = FitConfig(steps=steps, lr=lr, schedule="cosine", warmup=50, ema=0.99, grad_clip=1.0, progress=progress,
                    desc="conditional" if conditional else "unconditional")
    res = fit(loss, model, cfg, generator=torch.Generator().manual_seed(seed),
              data=lambda g: ddpm_batch(series, ac, batch_size, g))
    return model.eval(), res


def forecast(model: SeriesDenoiser, context: Tensor, horizon: int, *, n_samples: int, generator: torch.Generator,
             mode: str = "self_guided", scale: float = 3.0, steps: int = 20, eta: float = 1.0) -> Tensor:
    """Probabilistic forecasts ``[B, n_samples, horizon]`` of the series whose first values are ``context [B, C]``.

    ``mode="self_guided"``: TSDiff observation self-guidance on the unconditional ``model``: strided DDIM over the
    whole window (``steps`` of the 100 training steps, stochasticity ``eta``), each step's noise prediction
    corrected by ``scale * sqrt(1 - abar_t) * grad_x_t E`` with the Gaussian energy
    ``E = ||x0_hat(x_t)[:C] - context||^2 / (2 r_t^2)``, ``r_t^2 = (1 - abar_t) / abar_t`` (the error scale of the
    one-step estimate). TSDiff uses the plain squared error and tunes the scale per dataset; dividing by ``r_t^2``
    (as in Song et al.'s pseudoinverse guidance, 2023) makes ``scale`` the fraction of the context gap that one
    step closes, so one value works at every noise level.
    ``mode="unguided"``: the same sampler without guidance (a sanity check: it ignores the context).
    ``mode="conditional"``: the conditional model (context as input channels), same sampler, no gradients.
    All noise comes from ``generator``."""
    if mode not in ("self_guided", "unguided", "conditional"):
        raise ValueError(f"forecast: mode must be 'self_guided', 'unguided' or 'conditional', got {mode!r}")
    g = _gen(generator, "forecast")
    _int(n_samples, "n_samples", "forecast")
    if not (isinstance(context, Tensor) and context.ndim == 2):
        raise ValueError("forecast: context must be a tensor [B, C]")
    B, C = context.shape
    L = C + _int(horizon, "horizon", "forecast")
    ac = series_alphas_cumprod().float()
    ts = torch.linspace(len(ac) - 1, 0, steps).round().long()
    y = context.repeat_interleave(n_samples, 0)
    m = _context_mask(y.shape[0], L, horizon)
    obs = torch.cat([y, torch.zeros(y.shape[0], horizon)], 1)
    x = torch.randn(y.shape[0], L, generator=g)
    for k, t in enumerate(ts):
        a = ac[t]
        a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0)
        tt = torch.full((x.shape[0],), int(t))
        if mode == "self_guided":
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                eps = model(xg, tt)
                x0 = (xg - (1 - a).sqrt() * eps) / a.sqrt()
                energy = 0.5 * ((x0 - obs) * m).pow(2).sum() * a / (1 - a)
                grad, = torch.autograd.grad(energy, xg)
            eps = eps.detach() + scale * (1 - a).sqrt() * grad
        else:
            with torch.no_grad():
                eps = model(x * (1 - m), tt, obs, m) if mode == "conditional" else model(x, tt)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        sig = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sig ** 2).clamp(min=0).sqrt() * eps
        if k + 1 < len(ts):
            x = x + sig * torch.randn(x.shape, generator=g)
        x = x.detach()
    return x[:, C:].reshape(B, n_samples, horizon)


def refine(model: SeriesDenoiser, context: Tensor, initial: Tensor, *, generator: torch.Generator,
           steps: int = 20, lr: float = 0.05) -> Tensor:
    """TSDiff's refinement: improve point forecasts ``initial [B, H]`` of series with ``context [B, C]`` by ``steps``
    of gradient descent on the implicit energy ``E(x) = ||eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t) -
    eps||^2`` over the whole window (one random ``t`` and ``eps`` per series and step, from ``generator``; Adam with
    step ``lr``). Only the forecast part is optimised; the context stays the observation. Returns ``[B, H]``."""
    g = _gen(generator, "refine")
    if initial.ndim != 2 or context.ndim != 2 or initial.shape[0] != context.shape[0]:
        raise ValueError("refine: context [B, C] and initial [B, H] must be 2-D with the same B")
    ac = series_alphas_cumprod().float()
    fut = initial.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([fut], lr=lr)
    for _ in range(_int(steps, "steps", "refine", 0)):
        x = torch.cat([context, fut], 1)
        t = torch.randint(0, len(ac), (x.shape[0],), generator=g)
        eps = torch.randn(x.shape, generator=g)
        a = ac[t][:, None]
        e = (model(a.sqrt() * x + (1 - a).sqrt() * eps, t) - eps).pow(2).sum()
        opt.zero_grad()
        e.backward()
        opt.step()
    return fut.detach()


def crps(samples: Tensor, target: Tensor) -> Tensor:
    """Continuous ranked probability score of sample forecasts ``[B, S, H]`` against ``target [B, H]``, averaged
    over the horizon: ``E|X - y| - 1/2 E|X - X'|`` (the energy form, exact for the empirical distribution of the S
    samples; a point forecast ``S = 1`` gives the absolute error). Returns ``[B]``; lower is better."""
    if samples.ndim != 3 or target.ndim != 2 or samples.shape[::2] != target.shape:
        raise ValueError(f"crps: samples must be [B, S, H] and target [B, H], got {tuple(samples.shape)} and "
                         f"{tuple(target.shape)}")
    s = samples.double()
    a = (s - target.double()[:, None]).abs().mean(1)
    b = (s[:, :, None] - s[:, None]).abs().mean((1, 2))
    return (a - 0.5 * b).mean(1)


def seasonal_naive(context: Tensor, horizon: int, period: int = 12) -> Tensor:
    """Repeat the last ``period`` values of ``context [B, C]`` over the ``horizon``: ``[B, horizon]``."""
    if context.ndim != 2 or context.shape[1] < period:
        raise ValueError(f"seasonal_naive: context must be [B, C] with C >= period = {period}")
    last = context[:, -period:]
    reps = -(-horizon // period)
    return last.repeat(1, reps)[:, :horizon]


# =============================================================================================== Poseidon (80)
PDE_FAMILIES = ("heat", "advection", "wave", "burgers", "allen_cahn")


def _rhs(family: str, uh: Tensor, k: Tensor, p: Tensor) -> Tensor:
    """Fourier-space right-hand side of the nonlinear families (pseudo-spectral, 2/3 dealiasing)."""
    n = uh.shape[-1] * 2 - 2
    u = torch.fft.irfft(uh, n=n)
    cut = (k.abs() <= n // 3).to(uh.dtype)
    if family == "burgers":
        return cut * (-0.5j * k * torch.fft.rfft(u * u)) - p * k ** 2 * uh
    return cut * torch.fft.rfft(u - u ** 3) - p * k ** 2 * uh  # allen_cahn


def pde_trajectories(family: str, n: int, *, generator: torch.Generator, grid: int = 32, frames: int = 9,
                     dt: float = 0.1) -> Tensor:
    """``n`` solutions ``[n, frames, grid]`` of a 1-D periodic PDE on ``[0, 2 pi)`` sampled every ``dt``.

    Initial states: 4 random Fourier modes (amplitudes ``U(0, 1) / k``, random phases) plus a random offset.
    ``heat`` ``u_t = nu u_xx`` (``nu ~ U(0.02, 0.1)``), ``advection`` ``u_t + c u_x = 0`` (``c ~ U(-1, 1)``) and
    ``wave`` ``u_tt = c^2 u_xx``, ``u_t(0) = 0`` (``c ~ U(0.5, 1.5)``) are solved exactly in Fourier space;
    ``burgers`` ``u_t + u u_x = nu u_xx`` (``nu ~ U(0.05, 0.1)``) and the unseen ``allen_cahn``
    ``u_t = nu u_xx + u - u^3`` (``nu ~ U(0.02, 0.05)``) by pseudo-spectral RK4 with step ``dt / 20``."""
    if family not in PDE_FAMILIES:
        raise ValueError(f"pde_trajectories: family must be one of {PDE_FAMILIES}, got {family!r}")
    g = _gen(generator, "pde_trajectories")
    _int(n, "n", "pde_trajectories")
    _int(grid, "grid", "pde_trajectories", 8)
    f64 = torch.float64
    k = torch.arange(grid // 2 + 1, dtype=f64)
    amp = torch.rand(n, 4, generator=g, dtype=f64) / torch.arange(1, 5, dtype=f64)
    ph = 2 * math.pi * torch.rand(n, 4, generator=g, dtype=f64)
    off = 0.3 * (2 * torch.rand(n, 1, generator=g, dtype=f64) - 1)
    u = torch.rand(n, 1, generator=g, dtype=f64)
    lo, hi = {"heat": (0.02, 0.1), "advection": (-1.0, 1.0), "wave": (0.5, 1.5), "burgers": (0.05, 0.1),
              "allen_cahn": (0.02, 0.05)}[family]
    p = lo + (hi - lo) * u
    uh = torch.zeros(n, grid // 2 + 1, dtype=torch.complex128)
    uh[:, 0] = off[:, 0] * grid
    uh[:, 1:5] = amp * torch.exp(1j * ph) * grid / 2
    times = dt * torch.arange(frames, dtype=f64)
    if family in ("heat", "advection", "wave"):
        tt = times[None, :, None]
        pp = p[:, :, None]
        if family == "heat":
            fac = torch.exp(-pp * k ** 2 * tt).to(torch.complex128)
        elif family == "advection":
            fac = torch.exp(-1j * pp * k * tt)
        else:
            fac = torch.cos(pp * k * tt).to(torch.complex128)
        return torch.fft.irfft(uh[:, None] * fac, n=grid).float()
    out, sub, h = [torch.fft.irfft(uh, n=grid)], 20, dt / 20
    for _ in range(frames - 1):
        for _ in range(sub):
            k1 = _rhs(family, uh, k, p)
            k2 = _rhs(family, uh + 0.5 * h * k1, k, p)
            k3 = _rhs(family, uh + 0.5 * h * k2, k, p)
            k4 = _rhs(family, uh + h * k3, k, p)
            uh = uh + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(torch.fft.irfft(uh, n=grid))
    return torch.stack(out, 1).float()


class TimeConditionedOperator(nn.Module):
    """A 1-D operator ``(u(t_i - dt), u(t_i), tau) -> u(t_i + tau)``: residual circular convolutions whose layer
    norms take their scale and shift from the lead time ``tau`` (Poseidon's time-conditioned layer norm). The two
    input frames let the operator identify the dynamics; the output is ``u(t_i)`` plus a learned increment."""

    def __init__(self, hidden: int = 16, dilations: tuple = (1, 2, 4, 8, 1), kernel: int = 5):
        super().__init__()
        _int(hidden, "hidden", "TimeConditionedOperator")
        self.inp = nn.Conv1d(2, hidden, 1)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, padding=d * (kernel // 2), dilation=d,
                                             padding_mode="circular") for d in dilations)
        self.film = nn.ModuleList(nn.Linear(1, 2 * hidden) for _ in dilations)
        self.out = nn.Conv1d(hidden, 1, 1)

    def forward(self, prev: Tensor, cur: Tensor, tau: Tensor) -> Tensor:
        if cur.ndim != 2 or prev.shape != cur.shape:
            raise ValueError("TimeConditionedOperator: prev and cur must be [B, grid] of the same shape")
        h = self.inp(torch.stack([prev, cur], 1))
        for conv, film in zip(self.convs, self.film):
            gam, bet = film(tau.reshape(-1, 1).to(h.dtype)).chunk(2, 1)
            z = torch.nn.functional.layer_norm(h, h.shape[1:])
            h = h + conv(torch.nn.functional.silu(z * (1 + gam[:, :, None]) + bet[:, :, None]))
        return cur + self.out(h)[:, 0]


def all2all_pairs(frames: int, *, consecutive: bool = False) -> Tensor:
    """Index pairs ``[(i, j)]`` with ``1 <= i < j < frames`` (all2all), or only ``j = i + 1`` (consecutive). Frame
    ``i - 1`` is the operator's second input, so pairs start at ``i = 1``."""
    _int(frames, "frames", "all2all_pairs", 3)
    pairs = [(i, j) for i in range(1, frames) for j in range(i + 1, frames) if not consecutive or j == i + 1]
    return torch.tensor(pairs)


def _pair_batch(traj: Tensor, pairs: Tensor, batch_size: int, g: torch.Generator, dt: float) -> dict:
    n = torch.randint(0, traj.shape[0], (batch_size,), generator=g)
    p = pairs[torch.randint(0, len(pairs), (batch_size,), generator=g)]
    i, j = p[:, 0], p[:, 1]
    return {"prev": traj[n, i - 1], "cur": traj[n, i], "tau": (j - i).float() * dt, "target": traj[n, j]}


def train_operator(traj: Tensor, *, steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                   init: dict | None = None, dt: float = 0.1, hidden: int = 16, consecutive: bool = False,
                   progress: bool = False):
    """Train a :class:`TimeConditionedOperator` on trajectories ``[n, frames, grid]`` (all2all pairs unless
    ``consecutive``) with :func:`dmlab.train.fit` (relative L2 loss, Adam, cosine). ``init``: a state dict to start
    from (fine-tuning a pretrained operator); ``None`` trains from scratch (initialisation from ``seed``).
    Returns ``(model, FitResult)``."""
    from .train import FitConfig, fit

    if not (isinstance(traj, Tensor) and traj.ndim == 3):
        raise ValueError("train_operator: traj must be a tensor [n, frames, grid]")
    torch.manual_seed(seed)
    model = TimeConditionedOperator(hidden=hidden)
    if init is not None:
        model.load_state_dict(init)
    pairs = all2all_pairs(traj.shape[1], consecutive=consecutive)

    def loss(b):
        err = (model(b["prev"], b["cur"], b["tau"]) - b["target"]).norm(dim=1)
        return (err / b["target"].norm(dim=1).clamp(min=1e-3)).mean()

    cfg = FitConfig(steps=steps, lr=lr, schedule="cosine", warmup=min(50, steps // 10), grad_clip=1.0,
                    progress=progress, desc="operator")
    res = fit(loss, model, cfg, generator=torch.Generator().manual_seed(1000 + seed),
              data=lambda g: _pair_batch(traj, pairs, batch_size, g, dt))
    return model.eval(), res


@torch.no_grad()
def operator_error(model: TimeConditionedOperator, traj: Tensor, *, dt: float = 0.1) -> Tensor:
    """Relative L2 error of ``model`` on every all2all pair of each trajectory, averaged per trajectory: ``[n]``."""
    pairs = all2all_pairs(traj.shape[1])
    i, j = pairs[:, 0], pairs[:, 1]
    n, P = traj.shape[0], len(pairs)
    prev, cur, tgt = (traj[:, idx].reshape(n * P, -1) for idx in (i - 1, i, j))
    tau = ((j - i).float() * dt).repeat(n)
    pred = model(prev, cur, tau)
    err = (pred - tgt).norm(dim=1) / tgt.norm(dim=1).clamp(min=1e-3)
    return err.reshape(n, P).mean(1)


# =============================================================================================== anomalies (21)
def inject_anomalies(x: Tensor, kind: str, *, generator: torch.Generator, strength: float = 1.5) -> Tensor:
    """Copies of images ``x [B, 1, H, W]`` in ``[-1, 1]`` with one synthetic lesion each, clipped to ``[-1, 1]``:
    ``"blob"`` adds a Gaussian bump (width 1 px, height ``strength``) at a uniform position; ``"line"`` draws a full
    row or column of ink (+1). Positions come from ``generator``."""
    g = _gen(generator, "inject_anomalies")
    if kind not in ("blob", "line"):
        raise ValueError(f"inject_anomalies: kind must be 'blob' or 'line', got {kind!r}")
    if x.ndim != 4:
        raise ValueError("inject_anomalies: x must be images [B, C, H, W]")
    B, _, H, W = x.shape
    out = x.clone()
    if kind == "blob":
        cy = torch.rand(B, generator=g) * (H - 1)
        cx = torch.rand(B, generator=g) * (W - 1)
        yy = torch.arange(H, dtype=x.dtype)[None, :, None]
        xx = torch.arange(W, dtype=x.dtype)[None, None, :]
        bump = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 2)
        return (out + strength * bump[:, None]).clamp(-1, 1)
    rows = torch.rand(B, generator=g) < 0.5
    pos = torch.randint(0, min(H, W), (B,), generator=g)
    for b in range(B):
        if rows[b]:
            out[b, :, pos[b], :] = 1.0
        else:
            out[b, :, :, pos[b]] = 1.0
    return out


@torch.no_grad()
def reconstruction_scores(denoiser: Callable, x: Tensor, sigma: float, *, generator: torch.Generator,
                          n_steps: int = 4, repeats: int = 3, cond: dict | None = None) -> Tensor:
    """Anomaly scores ``[B]``: noise ``x`` to level ``sigma`` (``x + sigma eps``), denoise back to 0 with deterministic
    DDIM on a Karras grid of ``n_steps``, average the reconstructions of ``repeats`` noise draws, and take the
    squared error of that average. The model only knows normal data, so it repairs a lesion into something normal
    and the error grows (partial-noising reconstruction, AnoDDPM-style; survey paper 21)."""
    from . import schedules
    from .samplers import sample_ddim

    g = _gen(generator, "reconstruction_scores")
    if not sigma > 0:
        raise ValueError(f"reconstruction_scores: sigma must be > 0, got {sigma!r}")
    sigmas = schedules.karras(n_steps, getattr(denoiser, "sigma_min", 0.002), float(sigma), dtype=x.dtype)
    rec = torch.zeros_like(x)
    for _ in range(_int(repeats, "repeats", "reconstruction_scores")):
        xs = x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
        rec += sample_ddim(denoiser, xs, sigmas, cond=cond)
    return (rec / repeats - x).pow(2).flatten(1).sum(1).double()


def nearest_neighbour_scores(x: Tensor, reference: Tensor) -> Tensor:
    """The trivial competitor: squared pixel distance of each image to its nearest image in ``reference`` ``[B]``."""
    return torch.cdist(x.flatten(1).double(), reference.flatten(1).double()).min(1).values ** 2


def auroc(normal: Tensor, anomalous: Tensor) -> float:
    """Area under the ROC curve of scores (higher = more anomalous): the Mann-Whitney probability that an anomalous
    score exceeds a normal one, ties counted one half."""
    a, n = anomalous.double().flatten(), normal.double().flatten()
    if a.numel() == 0 or n.numel() == 0:
        raise ValueError("auroc: both score sets must be non-empty")
    diff = a[:, None] - n[None]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


# =============================================================================================== tileable (72)
class RolledDenoiser:
    """StableMaterials' tileability by rolling: before every call the state is circularly shifted by a random
    ``(dy, dx)`` drawn from ``generator`` (one offset per call, shared by the batch), denoised, and shifted back.
    The wrap-around border of the image therefore sits at a different, interior place of the denoiser's input at
    every step, and the sample comes out periodic (tileable). The plain denoiser is ``denoiser`` itself.
    ``stats["calls"]`` counts calls."""

    def __init__(self, denoiser: Callable, *, generator: torch.Generator):
        if not callable(denoiser):
            raise TypeError("RolledDenoiser: denoiser must be callable D(x, sigma, **cond)")
        self.denoiser, self.generator = denoiser, _gen(generator, "RolledDenoiser")
        self.stats = {"calls": 0}

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        if x.ndim < 3:
            raise ValueError("RolledDenoiser: x must be images [..., H, W]")
        H, W = x.shape[-2:]
        dy = int(torch.randint(0, H, (1,), generator=self.generator))
        dx = int(torch.randint(0, W, (1,), generator=self.generator))
        self.stats["calls"] += 1
        out = self.denoiser(torch.roll(x, (dy, dx), (-2, -1)), sigma, **cond)
        return torch.roll(out, (-dy, -dx), (-2, -1))


def rolled(denoiser: Callable, *, generator: torch.Generator) -> RolledDenoiser:
    """Wrap ``denoiser`` with random circular rolling at every call (:class:`RolledDenoiser`)."""
    return RolledDenoiser(denoiser, generator=generator)


def tile_mosaic(x: Tensor, reps: int = 2) -> Tensor:
    """Tile images ``[B, C, H, W]`` ``reps x reps`` times: ``[B, C, reps H, reps W]`` (what a tiled texture shows;
    its seams are measured by :func:`dmlab.accelerators.tiling.seam_score` with ``tile = H``)."""
    if x.ndim != 4:
        raise ValueError("tile_mosaic: x must be images [B, C, H, W]")
    return x.repeat(1, 1, _int(reps, "reps", "tile_mosaic"), reps)


# =============================================================================================== stable neural SDEs (8)
SDE_KINDS = ("lsde", "lnsde", "gsde", "ode")


def irregular_series(n: int, *, missing, generator: torch.Generator, length: int = 48,
                     periods: tuple = (8, 12)) -> tuple[Tensor, Tensor, Tensor]:
    """A two-class task on :func:`dmlab.data.seasonal_series` with points missing at random.

    Each series draws a label ``k`` (uniform), then is a seasonal series of period ``periods[k]`` (level, trend,
    harmonics and noise drawn as in ``seasonal_series``); every point except the first is then dropped with
    probability ``missing`` (a number in ``[0, 1)`` or a tensor ``[n]`` of per-series rates). Returns
    ``(values [n, L], mask [n, L], labels [n])`` with ``values`` 0 where ``mask`` is 0."""
    from .data import seasonal_series

    g = _gen(generator, "irregular_series")
    _int(n, "n", "irregular_series")
    rate = torch.as_tensor(missing, dtype=torch.float32).expand(n)
    if not bool(((rate >= 0) & (rate < 1)).all()):
        raise ValueError(f"irregular_series: missing rates must lie in [0, 1), got {missing!r}")
    labels = torch.randint(0, len(periods), (n,), generator=g)
    x = torch.stack([seasonal_series(n, length=length, period=p, generator=g) for p in periods])
    x = x[labels, torch.arange(n)]
    mask = missing_mask(rate, length, generator=g)
    return x * mask, mask, labels


def missing_mask(rate: Tensor, length: int, *, generator: torch.Generator) -> Tensor:
    """Observation masks ``[n, length]`` (float 0/1): each point but the first is kept with probability
    ``1 - rate[i]`` (the first is always observed, so every series has a start value)."""
    g = _gen(generator, "missing_mask")
    keep = (torch.rand(len(rate), length, generator=g) >= rate[:, None]).float()
    keep[:, 0] = 1
    return keep


def interpolate_path(values: Tensor, mask: Tensor) -> Tensor:
    """The control path of an irregular series on its grid: linear interpolation between observed points, held
    constant after the last one (``[B, L]``; the paper uses cubic splines of the observations, as Neural CDEs).
    The first point must be observed."""
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError("interpolate_path: values and mask must both be [B, L]")
    if not bool((mask[:, 0] > 0).all()):
        raise ValueError("interpolate_path: the first point of every series must be observed (mask[:, 0] = 1)")
    B, L = values.shape
    idx = torch.arange(L).expand(B, L)
    obs = mask > 0
    prev = torch.where(obs, idx, -1).cummax(1).values
    nxt = torch.where(obs, idx, L).flip(1).cummin(1).values.flip(1)
    nxt = torch.where(nxt >= L, prev, nxt)
    vp, vn = values.gather(1, prev), values.gather(1, nxt)
    w = torch.where(nxt > prev, (idx - prev).float() / (nxt - prev).clamp(min=1).float(), torch.zeros(()))
    return vp + w * (vn - vp)


class NeuralSDEClassifier(nn.Module):
    """A neural SDE classifier of irregular series (Oh, Lim & Kim, "Stable Neural Stochastic Differential Equations
    in Analyzing Irregular Time Series Data", ICLR 2024; paper 8).

    The latent ``z [B, hidden]`` starts at ``z0 = W c(0)`` and follows, on the observation grid
    ``t_i = T i / (L - 1)`` (``T = horizon``), one of the paper's stable classes. The control
    ``c(t) = [X(t), dX(t), m(t)]`` (interpolated path, its increment over the last grid step and the mask) enters
    the drift network ``h(z, c) = MLP([z, c])``; ``sigma(t) = sigma_max * sigmoid(a t / T + b)`` (per channel) is
    bounded, and every diffusion term is bounded by a final ``tanh``, as in the official code:

    * ``"lsde"`` (Langevin-type): ``dz = tanh(h) dt + tanh(sigma(t)) dW`` (additive noise);
    * ``"lnsde"`` (linear noise): ``dz = tanh(h) dt + tanh(sigma(t) z) dW``;
    * ``"gsde"`` (geometric): ``dz = tanh(h * (1 - sigmoid(z))) dt + tanh(sigma(t) z) dW``. The paper writes the
      geometric drift as ``gamma(t, z) z``; its official code replaces the factor ``z`` by the logistic
      ``1 - sigmoid(z)`` (a drift that is bounded and Lipschitz in ``z``), and so does this class: with the bare
      factor ``z`` an unconstrained ``z0`` near 0 keeps the drift near 0 and the model does not train;
    * ``"ode"``: the neural ODE with the same drift as ``lsde``/``lnsde``, ``dz = tanh(h) dt`` (no diffusion
      network: two parameters per hidden channel fewer).

    Solved by Euler-Maruyama with ``dt = T / (L - 1)`` (one step per grid point, the official code's
    ``dt = min gap``) and Brownian increments ``sqrt(dt) eps``; the logits are a linear head on ``z(T)``.
    ``forward(values, mask, noise=None)``: ``noise [B, L-1, hidden]`` standard normals (``None``: zero noise, the
    drift-only path). Re-implemented from the paper's equations and the official code
    (yongkyung-oh/Stable-Neural-SDEs, ``benchmark_classification/models_sde/neuralsde.py``, which solves the same
    classes with ``torchsde`` on a cubic-spline control)."""

    def __init__(self, kind: str, hidden: int = 16, width: int = 32, n_classes: int = 2, sigma_max: float = 0.5,
                 horizon: float = 8.0):
        super().__init__()
        if kind not in SDE_KINDS:
            raise ValueError(f"NeuralSDEClassifier: kind must be one of {SDE_KINDS}, got {kind!r}")
        self.kind, self.hidden, self.sigma_max = kind, _int(hidden, "hidden", "NeuralSDEClassifier"), sigma_max
        self.horizon = float(horizon)
        self.init = nn.Linear(3, hidden)
        self.drift = nn.Sequential(nn.Linear(hidden + 3, _int(width, "width", "NeuralSDEClassifier")), nn.Tanh(),
                                   nn.Linear(width, hidden))
        self.sigma = None if kind == "ode" else nn.Linear(1, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, values: Tensor, mask: Tensor, noise: Tensor | None = None) -> Tensor:
        X = interpolate_path(values, mask)
        B, L = X.shape
        if noise is not None and noise.shape != (B, L - 1, self.hidden):
            raise ValueError(f"NeuralSDEClassifier: noise must be [B, L-1, hidden] = {(B, L - 1, self.hidden)}, "
                             f"got {tuple(noise.shape)}")
        c = torch.stack([X, torch.diff(X, dim=1, prepend=X[:, :1]), mask.to(X.dtype)], 2)
        z, dt = self.init(c[:, 0]), self.horizon / (L - 1)
        for i in range(L - 1):
            h = self.drift(torch.cat([z, c[:, i]], 1))
            dz = torch.tanh(h * (1 - torch.sigmoid(z)) if self.kind == "gsde" else h) * dt
            if self.sigma is not None and noise is not None:
                s = self.sigma_max * torch.sigmoid(self.sigma(torch.full((1, 1), i / (L - 1))))
                dz = dz + torch.tanh(s if self.kind == "lsde" else s * z) * math.sqrt(dt) * noise[:, i]
            z = z + dz
        return self.head(z)


class GRUClassifier(nn.Module):
    """The discrete-time baseline: a GRU over the grid with inputs ``[x * m, m]`` (the value where observed, 0
    otherwise, and the mask), a linear head on the last state. ``forward(values, mask, noise=None)`` (``noise``
    is ignored: same call as :class:`NeuralSDEClassifier`)."""

    def __init__(self, hidden: int = 18, n_classes: int = 2):
        super().__init__()
        self.hidden = _int(hidden, "hidden", "GRUClassifier")
        self.gru = nn.GRU(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, values: Tensor, mask: Tensor, noise: Tensor | None = None) -> Tensor:
        m = mask.to(values.dtype)
        return self.head(self.gru(torch.stack([values * m, m], 2))[0][:, -1])


def train_series_classifier(model: nn.Module, values: Tensor, labels: Tensor, *, steps: int, rates=(0.0, 0.3, 0.5, 0.7),
                            batch_size: int = 64, lr: float = 3e-3, seed: int = 0, progress: bool = False):
    """Train a series classifier with :func:`dmlab.train.fit` (cross-entropy, Adam, cosine) on complete series
    ``values [n, L]``; every batch draws a missing rate per series from ``rates``, fresh masks
    (:func:`missing_mask`) and, for SDE models, fresh Brownian increments, all from the run's generator.
    Returns ``(model, FitResult)``."""
    from .train import FitConfig, fit

    if not (isinstance(values, Tensor) and values.ndim == 2 and labels.shape == values.shape[:1]):
        raise ValueError("train_series_classifier: values must be [n, L] and labels [n]")
    r = torch.as_tensor(rates, dtype=torch.float32)
    n, L = values.shape
    width = getattr(model, "hidden")

    def data(g):
        i = torch.randint(0, n, (batch_size,), generator=g)
        m = missing_mask(r[torch.randint(0, len(r), (batch_size,), generator=g)], L, generator=g)
        return {"x": values[i] * m, "m": m, "y": labels[i], "eps": torch.randn(batch_size, L - 1, width, generator=g)}

    def loss(b):
        return nn.functional.cross_entropy(model(b["x"], b["m"], b["eps"]), b["y"])

    cfg = FitConfig(steps=steps, lr=lr, schedule="cosine", warmup=min(50, steps // 10), grad_clip=1.0,
                    progress=progress, desc=getattr(model, "kind", "gru"))
    res = fit(loss, model, cfg, generator=torch.Generator().manual_seed(2000 + seed), data=data)
    return model.eval(), res


@torch.no_grad()
def classify_correct(model: nn.Module, values: Tensor, mask: Tensor, labels: Tensor, *,
                     generator: torch.Generator) -> Tensor:
    """Per-series correctness ``[B]`` (float64 0/1) of one stochastic forward pass (one Brownian path drawn from
    ``generator``; deterministic models ignore it)."""
    g = _gen(generator, "classify_correct")
    noise = torch.randn(values.shape[0], values.shape[1] - 1, getattr(model, "hidden"), generator=g)
    return (model(values * mask, mask, noise).argmax(1) == labels).double()


def correct_by_missing_rate(models, values: Tensor, labels: Tensor, rates, *, seed: int) -> Tensor:
    """Per-series correctness ``[len(rates), len(models), n]`` (float64 0/1) of each model on complete series
    ``values [n, L]`` with points dropped at each rate. The masks of rate ``rates[i]`` come from
    ``torch.Generator().manual_seed(seed + i)`` and are the same for every model (paired by test set); each
    stochastic model draws its Brownian path from ``torch.Generator().manual_seed(seed + 1000)``."""
    if not (isinstance(values, Tensor) and values.ndim == 2 and labels.shape == values.shape[:1]):
        raise ValueError("correct_by_missing_rate: values must be [n, L] and labels [n]")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"correct_by_missing_rate: seed must be an int, got {seed!r}")
    n, L = values.shape
    out = []
    for i, r in enumerate(rates):
        m = missing_mask(torch.full((n,), float(r)), L, generator=torch.Generator().manual_seed(seed + i))
        out.append(torch.stack([classify_correct(mod, values, m, labels,
                                                 generator=torch.Generator().manual_seed(seed + 1000))
                                for mod in models]))
    return torch.stack(out)


# =============================================================================================== DiffTPT (7)
def _images(x, fn: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise TypeError(f"{fn}: images must be a float tensor [B, C, H, W] in [-1, 1]")
    return x


def _affine(x: Tensor, angle: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Rotate (degrees) and scale about the centre, then translate (pixels), one map per image; the uncovered
    border is background (-1)."""
    a = angle.double() * math.pi / 180
    cos, sin = torch.cos(a) / scale.double(), torch.sin(a) / scale.double()
    h, w = x.shape[-2:]
    th = torch.stack([torch.stack([cos, -sin, -2 * shift[:, 1].double() / w], 1),
                      torch.stack([sin, cos, -2 * shift[:, 0].double() / h], 1)], 1)
    grid = nn.functional.affine_grid(th.to(x.dtype), list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x + 1, grid, align_corners=False) - 1


def shift_digits(x: Tensor, *, generator: torch.Generator, angle: float = 30.0, blur: float = 0.7,
                 contrast: float = 0.6) -> Tensor:
    """A distribution shift of digit images ``[B, 1, H, W]`` in ``[-1, 1]``: rotation by ``+-angle`` degrees (a
    random sign per image, from ``generator``), Gaussian blur of ``blur`` pixels and contrast scaled by
    ``contrast`` about the background (``x -> (x + 1) contrast - 1``)."""
    from .data import _gaussian_blur

    g, x = _gen(generator, "shift_digits"), _images(x, "shift_digits")
    if not (0 < contrast <= 1) or blur < 0:
        raise ValueError("shift_digits: contrast must lie in (0, 1] and blur must be >= 0")
    sign = torch.randint(0, 2, (len(x),), generator=g) * 2 - 1
    y = _affine(x, sign * angle, torch.ones(len(x)), torch.zeros(len(x), 2))
    y = _gaussian_blur(y, torch.full((len(x),), float(blur))).to(x.dtype) if blur > 0 else y
    return ((y + 1) * contrast - 1).clamp(-1, 1)


def standard_views(x: Tensor, n: int, *, generator: torch.Generator, angle: float = 15.0,
                   scale: tuple = (0.9, 1.1), shift: float = 1.0) -> Tensor:
    """TPT's standard augmentations for digits: ``n`` random affine views of each image ``[B, n, C, H, W]``
    (rotation uniform in ``+-angle`` degrees, scale uniform in ``scale``, translation uniform in ``+-shift``
    pixels), drawn from ``generator``."""
    g, x = _gen(generator, "standard_views"), _images(x, "standard_views")
    B, m = len(x), len(x) * _int(n, "n", "standard_views")
    u = torch.rand(m, 4, generator=g, dtype=torch.float64)
    xr = x.repeat_interleave(n, 0)
    out = _affine(xr, (2 * u[:, 0] - 1) * angle, scale[0] + u[:, 1] * (scale[1] - scale[0]),
                  (2 * u[:, 2:] - 1) * shift)
    return out.reshape(B, n, *x.shape[1:])


def diffusion_views(denoiser: Callable, x: Tensor, n: int, *, sigma: float, steps: int,
                    generator: torch.Generator, cond: dict | None = None) -> Tensor:
    """DiffTPT's generated views, as img2img: ``n`` SDEdit variations of each image ``[B, n, C, H, W]``
    (:func:`dmlab.editing.sdedit`: noise to ``sigma``, then ``steps`` Euler steps down a Karras grid to 0 with
    ``denoiser``; ``cond`` for ``n * B`` images, e.g. the null class). Feng et al. generate Stable Diffusion
    image variations conditioned on the CLIP embedding of the test image instead."""
    from .editing import sdedit
    from .schedules import karras

    x = _images(x, "diffusion_views")
    sig = karras(_int(steps, "steps", "diffusion_views"), 0.002, float(sigma))
    xr = x.repeat_interleave(_int(n, "n", "diffusion_views"), 0)
    return sdedit(denoiser, xr, sig, cond=cond, generator=_gen(generator, "diffusion_views")).reshape(
        len(x), n, *x.shape[1:]).clamp(-1, 1)


def cosine_filter(feat_x: Tensor, feat_views: Tensor, keep: int) -> Tensor:
    """DiffTPT's filter: indices ``[B, keep]`` of the ``keep`` views whose features ``feat_views [B, V, D]`` have
    the highest cosine similarity to the test image's ``feat_x [B, D]`` (most similar first)."""
    if feat_views.ndim != 3 or feat_x.shape != (feat_views.shape[0], feat_views.shape[2]):
        raise ValueError("cosine_filter: feat_x must be [B, D] and feat_views [B, V, D]")
    if not 1 <= keep <= feat_views.shape[1]:
        raise ValueError(f"cosine_filter: keep must lie in 1..{feat_views.shape[1]}, got {keep!r}")
    cos = nn.functional.cosine_similarity(feat_views, feat_x[:, None], dim=-1)
    return cos.topk(keep, dim=1).indices


def class_prototypes(feats: Tensor, labels: Tensor, n_classes: int = 10) -> Tensor:
    """Unit-norm class-mean features ``[n_classes, D]``: the "text embeddings" of a CLIP-like classifier whose
    logits are cosine similarities to them."""
    e = torch.stack([feats[labels == k].mean(0) for k in range(n_classes)])
    return nn.functional.normalize(e, dim=1)


def prompt_logits(feats: Tensor, embeddings: Tensor, ctx: Tensor | None = None, scale: float = 10.0) -> Tensor:
    """CLIP-like logits ``scale * cos(f, e_k + ctx)``: ``feats [..., D]``, class embeddings ``[K, D]`` and a
    per-image prompt context ``ctx [B, D]`` shared by the classes (``None``: no prompt), with ``feats`` of shape
    ``[B, D]`` or ``[B, V, D]``."""
    e = embeddings if ctx is None else embeddings[None] + ctx[:, None]  # [K, D] or [B, K, D]
    e = nn.functional.normalize(e, dim=-1)
    f = nn.functional.normalize(feats, dim=-1)
    if ctx is None:
        return scale * f @ e.T
    return scale * (f @ e.transpose(1, 2) if f.ndim == 3 else (f[:, None] * e).sum(-1))


def prompt_tuning(feat_x: Tensor, feat_views: Tensor, embeddings: Tensor, *, steps: int = 1, lr: float = 0.01,
                  confident: float = 0.5, scale: float = 10.0) -> Tensor:
    """Test-time prompt tuning (Shu et al., TPT, 2022; with DiffTPT's views, Feng et al., ICCV 2023; paper 7) of a
    CLIP-like classifier (:func:`prompt_logits`), one independent prompt context per test image, on features:
    ``steps`` AdamW steps from ``ctx = 0`` on the entropy of the mean prediction over the ``confident`` fraction
    of each image's views ``feat_views [B, V, D]`` with the lowest entropy (re-selected every step). Returns the
    tuned logits of the test images ``[B, K]`` (``feat_x [B, D]``). The prompt starts at 0 for every image, as TPT
    resets it."""
    if feat_views.ndim != 3 or feat_x.shape != (feat_views.shape[0], feat_views.shape[2]):
        raise ValueError("prompt_tuning: feat_x must be [B, D] and feat_views [B, V, D]")
    if not 0 < confident <= 1:
        raise ValueError(f"prompt_tuning: confident must lie in (0, 1], got {confident!r}")
    B, V, D = feat_views.shape
    k = max(1, round(confident * V))
    ctx = torch.zeros(B, D, dtype=feat_views.dtype, requires_grad=True)
    opt = torch.optim.AdamW([ctx], lr=lr, weight_decay=0.0)
    for _ in range(_int(steps, "steps", "prompt_tuning", minimum=0)):
        with torch.enable_grad():
            logp = prompt_logits(feat_views, embeddings, ctx, scale).log_softmax(-1)  # [B, V, K]
            ent = -(logp.exp() * logp).sum(-1)
            idx = ent.detach().topk(k, dim=1, largest=False).indices
            sel = logp.gather(1, idx[..., None].expand(-1, -1, logp.shape[-1]))
            avg = sel.logsumexp(1) - math.log(k)  # log of the mean probability over the confident views
            loss = -(avg.exp() * avg).sum(-1).sum()  # per-image entropies (independent prompts)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return prompt_logits(feat_x, embeddings, ctx.detach(), scale)


# =============================================================================================== zoo entries
def _prefixed(state: dict, prefix: str) -> dict:
    return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in state.items()}


def _unprefixed(state: dict, prefix: str) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def train_entry(config: dict, *, progress: bool = False) -> tuple[dict, dict]:
    """Train every model of one chapter-32 zoo entry from its recipe ``config`` (``config["task"]``: ``"tsdiff"``,
    ``"poseidon"`` or ``"sde"``). Returns ``(state, log)``: one flat dict of tensors for safetensors and a JSON-able log."""
    from .data import seasonal_series

    task = config.get("task")
    state, log = {}, {"final_loss": {}}
    if task == "tsdiff":
        series = seasonal_series(config["n_train"], length=config["length"],
                                 generator=torch.Generator().manual_seed(config["data_seed"]))
        for s in config["seeds"]:
            for cond in (False, True):
                name = "conditional" if cond else "unconditional"
                m, res = train_series_model(series, conditional=cond, horizon=config["horizon"],
                                            steps=config["steps"], batch_size=config["batch"], lr=config["lr"],
                                            seed=s, hidden=config["hidden"], progress=progress)
                state.update(_prefixed(m.state_dict(), f"{name}.s{s}"))
                log["final_loss"][f"{name}.s{s}"] = round(res.curve[-1][1], 6)
        return state, log
    if task == "poseidon":
        pre = torch.cat([pde_trajectories(f, config["n_per_family"], generator=torch.Generator().manual_seed(
            config["data_seed"] + i)) for i, f in enumerate(config["pretrain_families"])])
        for s in config["seeds"]:
            m, res = train_operator(pre, steps=config["pretrain_steps"], batch_size=config["batch"],
                                    lr=config["lr"], seed=s, hidden=config["hidden"], progress=progress)
            base = m.state_dict()
            state.update(_prefixed(base, f"pretrained.s{s}"))
            log["final_loss"][f"pretrained.s{s}"] = round(res.curve[-1][1], 6)
            ft_all = pde_trajectories(config["finetune_family"], max(config["finetune_n"]),
                                      generator=torch.Generator().manual_seed(config["finetune_data_seed"] + s))
            for n in config["finetune_n"]:
                for init, name in ((base, "finetuned"), (None, "scratch")):
                    m2, r2 = train_operator(ft_all[:n], steps=config["finetune_steps"],
                                            batch_size=config["finetune_batch"], lr=config["finetune_lr"], seed=s,
                                            init=init, hidden=config["hidden"], progress=progress)
                    state.update(_prefixed(m2.state_dict(), f"{name}.n{n}.s{s}"))
                    log["final_loss"][f"{name}.n{n}.s{s}"] = round(r2.curve[-1][1], 6)
        return state, log
    if task == "sde":
        x, _, y = irregular_series(config["n_train"], missing=0.0, length=config.get("length", 48),
                                   generator=torch.Generator().manual_seed(config["data_seed"]))
        for s in config["seeds"]:
            for kind in config["models"]:
                torch.manual_seed(s)
                m = _series_classifier(kind, config)
                m, res = train_series_classifier(m, x, y, steps=config["steps"], rates=config["rates"],
                                                 batch_size=config["batch"], lr=config["lr"], seed=s,
                                                 progress=progress)
                state.update(_prefixed(m.state_dict(), f"{kind}.s{s}"))
                log["final_loss"][f"{kind}.s{s}"] = round(res.curve[-1][1], 6)
        return state, log
    raise ValueError(f"train_entry: config['task'] must be 'tsdiff', 'poseidon' or 'sde', got {task!r}")


def _series_classifier(kind: str, config: dict) -> nn.Module:
    if kind == "gru":
        return GRUClassifier(hidden=config["gru_hidden"])
    return NeuralSDEClassifier(kind, hidden=config["hidden"], width=config.get("width", 32),
                               horizon=config.get("horizon", 8.0))


class EntryModels(dict):
    """The models of a chapter-32 zoo entry by role (a dict); ``to(device)`` moves every model."""

    def _modules(self):
        for v in self.values():
            for x in (v if isinstance(v, list) else [m for ms in v.values() for m in ms]):
                yield x

    def to(self, device) -> "EntryModels":
        for m in self._modules():
            m.to(device)
        return self


def load_entry(state: dict, config: dict) -> EntryModels:
    """The models of a chapter-32 zoo entry (:func:`train_entry`), in eval mode. ``tsdiff``:
    ``{"unconditional": [per seed], "conditional": [...]}``; ``poseidon``: ``{"pretrained": [per seed],
    "finetuned": {n: [per seed]}, "scratch": {n: [per seed]}}``; ``sde``: ``{kind: [per seed]}`` for the neural
    SDE/ODE classifiers and the GRU."""
    def build(cls, prefix):
        m = cls(hidden=config["hidden"])
        m.load_state_dict(_unprefixed(state, prefix))
        return m.eval().requires_grad_(False)

    seeds = config["seeds"]
    if config.get("task") == "tsdiff":
        return EntryModels({k: [build(SeriesDenoiser, f"{k}.s{s}") for s in seeds]
                            for k in ("unconditional", "conditional")})
    if config.get("task") == "sde":
        def build_c(kind, s):
            m = _series_classifier(kind, config)
            m.load_state_dict(_unprefixed(state, f"{kind}.s{s}"))
            return m.eval().requires_grad_(False)

        return EntryModels({k: [build_c(k, s) for s in seeds] for k in config["models"]})
    if config.get("task") == "poseidon":
        op = TimeConditionedOperator
        return EntryModels({"pretrained": [build(op, f"pretrained.s{s}") for s in seeds],
                            **{k: {n: [build(op, f"{k}.n{n}.s{s}") for s in seeds] for n in config["finetune_n"]}
                               for k in ("finetuned", "scratch")}})
    raise ValueError(f"load_entry: config['task'] must be 'tsdiff' or 'poseidon', got {config.get('task')!r}")
