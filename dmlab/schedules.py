"""Sigma grids and conversions.

One convention (book/notation.md): ``x = x0 + sigma * eps``. A *schedule* is a 1-D tensor of sigmas, strictly
decreasing, ending in exactly 0 (``[n_steps + 1]``). A variance-preserving (VP) model sees
``x_vp = alpha * x0 + sigma_t * eps`` with ``alpha = 1 / sqrt(1 + sigma^2)`` and ``sigma_t = sigma * alpha``,
so ``x_vp = alpha * x``. ``lam = -log(sigma)`` is half the log-SNR, the variable of exponential integrators.

Grids: :func:`karras` (Karras et al. 2022, eq. 5), :func:`log_uniform`, :func:`vp_linear` and :func:`vp_cosine`
(continuous VP schedules of Song et al. 2021 and Nichol & Dhariwal 2021, evaluated at uniform time), and
:func:`discrete` (a grid taken from a discrete DDPM training schedule with diffusers' ``timestep_spacing``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["append_zero", "schedule_floats", "check_schedule", "karras", "log_uniform", "vp_linear", "vp_cosine",
           "betas_for", "vp_alphas_cumprod", "vp_config", "clamp_zero_snr", "VP_CONFIG_KEYS", "sigmas_from_alphas_cumprod", "train_sigmas", "ddpm_timesteps", "discrete",
           "sigma_to_index", "index_to_sigma", "alpha_sigma_t", "sigma_from_alpha_sigma_t", "lam", "sigma_from_lam",
           "snr"]


# ----------------------------------------------------------------------------------------------- validation
def append_zero(sigmas: Tensor) -> Tensor:
    """Append the final 0 to a decreasing tensor of positive sigmas."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def schedule_floats(sigmas: Tensor, *, min_steps: int = 1, name: str = "sigmas") -> list[float]:
    """Validate a schedule (see :func:`check_schedule`) and return it as a list of Python floats.

    The checks run on the list, in plain Python: one tensor op instead of a dozen, which is most of a fast
    sampler's fixed cost per call.
    """
    if not isinstance(sigmas, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (e.g. dmlab.schedules.karras(10)), got {type(sigmas).__name__}")
    if sigmas.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor [n_steps + 1], got shape {tuple(sigmas.shape)}")
    lst = sigmas.detach().to("cpu", torch.float64).tolist()
    if len(lst) < min_steps + 1:
        raise ValueError(f"{name} has {len(lst) - 1} step(s); this sampler needs at least {min_steps} "
                         f"(pass a longer schedule, e.g. dmlab.schedules.karras({max(min_steps, 2)}))")
    if not all(math.isfinite(v) for v in lst):
        raise ValueError(f"{name} must be finite (found NaN or inf{_dtype_hint(sigmas)})")
    if lst[0] <= lst[-1] and len(set(lst)) > 1:
        raise ValueError(f"{name} must go from sigma_max down to 0, but it increases ({lst[0]:.4g} first, "
                         f"{lst[-1]:.4g} last); reverse it with {name}.flip(0)")
    if lst[-1] != 0:
        raise ValueError(f"{name} must end in 0; use dmlab.schedules.append_zero({name})")
    if min(lst) < 0:
        raise ValueError(f"{name} must be non-negative (sigma is a noise standard deviation)")
    if any(b >= a for a, b in zip(lst, lst[1:])):
        raise ValueError(f"{name} must be strictly decreasing (from sigma_max down to 0); reverse it with .flip(0)")
    return lst


def _dtype_hint(sigmas: Tensor) -> str:
    if sigmas.dtype in (torch.float16, torch.bfloat16):
        return (f"; {sigmas.dtype} holds sigmas up to {torch.finfo(sigmas.dtype).max:.4g} only: build the schedule "
                "in float64 (the default) and let the sampler cast")
    return ""


def _cast(sig: Tensor, dtype, fn: str) -> Tensor:
    """Cast a float64 grid to ``dtype``; refuse a dtype that turns its sigmas into inf or 0 or merges two of them."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}")
    out = sig.to(dtype)
    if dtype != torch.float64:
        lst = out[:-1].tolist()
        if not all(math.isfinite(v) and v > 0 for v in lst) or any(b >= a for a, b in zip(lst, lst[1:])):
            fi = torch.finfo(dtype)
            raise ValueError(f"{fn}: sigmas from {sig[-2].item():.3g} to {sig[0].item():.3g} do not fit in {dtype} "
                             f"(finite values {fi.tiny:.3g}..{fi.max:.4g}, {fi.eps:.2g} relative spacing): "
                             "the grid would hold inf, 0 or repeated sigmas. Use dtype=torch.float32 or float64, "
                             "or a narrower range")
    return out


def check_schedule(sigmas: Tensor, *, min_steps: int = 1, name: str = "sigmas") -> Tensor:
    """Validate a schedule and return it; raise ``ValueError`` saying how to fix it.

    A schedule is 1-D, finite, strictly decreasing, has at least ``min_steps`` steps and ends in exactly 0.
    """
    schedule_floats(sigmas, min_steps=min_steps, name=name)
    return sigmas


def _check_n(n_steps: int) -> None:
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if isinstance(v, (bool, str)) or not hasattr(v, "__float__"):
            raise TypeError(f"{k} must be a number, got {type(v).__name__}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


# ----------------------------------------------------------------------------------------------- grids
def karras(n_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           *, dtype: torch.dtype = torch.float64) -> Tensor:
    """EDM grid (Karras et al. 2022, eq. 5): ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``.

    Returns ``n_steps + 1`` sigmas from ``sigma_max`` to ``sigma_min``, then 0.
    """
    _check_n(n_steps)
    _check_range(sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be positive (EDM uses 7), got {rho}")
    if n_steps == 1:
        return _cast(append_zero(torch.tensor([sigma_max], dtype=torch.float64)), dtype, "karras")
    ramp = torch.linspace(0, 1, n_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _cast(append_zero((hi + ramp * (lo - hi)) ** rho), dtype, "karras")


def log_uniform(n_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Sigmas uniform in log-sigma (uniform in ``lam``: the grid of DPM-Solver's ``logSNR`` spacing), then 0."""
    _check_n(n_steps)
    _check_range(sigma_min, sigma_max)
    if n_steps == 1:
        return _cast(append_zero(torch.tensor([sigma_max], dtype=torch.float64)), dtype, "log_uniform")
    return _cast(append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n_steps,
                                            dtype=torch.float64).exp()), dtype, "log_uniform")


def vp_linear(n_steps: int, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0,
              *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Continuous VP-linear schedule (Song et al. 2021): ``log alpha_bar(t) = -beta_min t - (beta_max - beta_min) t^2 / 2``.

    ``t`` uniform from ``t_max`` to ``t_min``; ``sigma = sqrt(1/alpha_bar - 1)``; then 0.
    """
    _check_n(n_steps)
    if not (0 < t_min < t_max <= 1) or beta_min < 0 or beta_max <= beta_min:
        raise ValueError("need 0 < t_min < t_max <= 1 and 0 <= beta_min < beta_max")
    t = torch.linspace(t_max, t_min, n_steps, dtype=torch.float64)
    log_abar = -beta_min * t - 0.5 * (beta_max - beta_min) * t ** 2
    return _cast(append_zero(torch.expm1(-log_abar).sqrt()), dtype, "vp_linear")


def vp_cosine(n_steps: int, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.99,
              *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Continuous cosine schedule (Nichol & Dhariwal 2021): ``alpha_bar(t) = cos^2((t+s)/(1+s) pi/2) / cos^2(s/(1+s) pi/2)``.

    ``t`` uniform from ``t_max`` (< 1: at ``t = 1`` sigma is infinite) to ``t_min``; then 0.
    """
    _check_n(n_steps)
    if not (0 < t_min < t_max < 1) or s < 0:
        raise ValueError("need 0 < t_min < t_max < 1 (sigma is infinite at t = 1) and s >= 0")
    t = torch.linspace(t_max, t_min, n_steps, dtype=torch.float64)
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = f(t) / f(torch.zeros((), dtype=torch.float64))
    return _cast(append_zero((1 / abar - 1).sqrt()), dtype, "vp_cosine")


# ----------------------------------------------------------------------------------------------- discrete DDPM
def betas_for(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
              beta_schedule: str = "linear") -> Tensor:
    """A discrete DDPM beta schedule as diffusers builds it (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``)."""
    if num_train_timesteps < 2:
        raise ValueError("num_train_timesteps must be >= 2")
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")


VP_CONFIG_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")
ZERO_SNR_ALPHA_BAR = 2.0 ** -24  # the last alpha_bar of a zero-terminal-SNR schedule, as diffusers sets it


def vp_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                      beta_schedule: str = "linear", trained_betas=None,
                      rescale_betas_zero_snr: bool = False) -> Tensor:
    """``alphas_cumprod`` (float32) of a discrete DDPM schedule from a diffusers scheduler's config options.

    ``trained_betas`` overrides the ``beta_*`` options; ``rescale_betas_zero_snr`` rescales the betas to zero
    terminal SNR (Lin et al. 2024, :func:`dmlab.schedule_flaws.rescale_zero_terminal_snr`) and, as diffusers' Euler,
    DPM-Solver and UniPC schedulers do, sets the last ``alpha_bar`` (0) to ``2**-24`` (:func:`clamp_zero_snr`) so
    that ``sigma_max`` is finite (about 4096).
    """
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float32)
        if betas.ndim != 1 or len(betas) < 2 or not torch.isfinite(betas).all() or ((betas <= 0) | (betas >= 1)).any():
            raise ValueError("trained_betas must be a 1-D list of at least 2 betas in (0, 1)")
    else:
        betas = betas_for(num_train_timesteps, beta_start, beta_end, beta_schedule)
    if not isinstance(rescale_betas_zero_snr, bool):
        raise TypeError(f"rescale_betas_zero_snr must be True or False, got {rescale_betas_zero_snr!r}")
    if rescale_betas_zero_snr:
        from .schedule_flaws import rescale_zero_terminal_snr

        betas = rescale_zero_terminal_snr(betas).float()
    ac = torch.cumprod(1 - betas, 0)
    return clamp_zero_snr(ac) if rescale_betas_zero_snr else ac


def clamp_zero_snr(alphas_cumprod: Tensor) -> Tensor:
    """A copy with the last ``alpha_bar`` of a zero-terminal-SNR schedule (0) set to ``2**-24`` as diffusers does, or
    to half the one before where that is smaller (a linear-beta schedule reaches 4e-9 there: ``alpha_bar`` must
    keep decreasing for :class:`~dmlab.denoisers.DiscreteVPDenoiser`)."""
    ac = torch.as_tensor(alphas_cumprod).clone()
    ac[-1] = min(ZERO_SNR_ALPHA_BAR, float(ac[-2]) / 2)
    return ac


def vp_config(scheduler) -> dict:
    """The noise-schedule options (:data:`VP_CONFIG_KEYS`) of a diffusers scheduler or its config, refusing the
    schedulers whose noise schedule is not a discrete DDPM one (flow matching, EDM, continuous timesteps), which
    would otherwise be read as diffusers' default betas."""
    cfg = getattr(scheduler, "config", scheduler)
    if cfg is None:
        return {}
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    cls = str(get("_class_name") or (type(scheduler).__name__ if hasattr(scheduler, "config") else ""))
    no_betas = get("beta_start") is None and get("trained_betas") is None
    if "FlowMatch" in cls or (get("shift") is not None and no_betas) or get("use_flow_sigmas") or get("use_dynamic_shifting") or \
            get("prediction_type") == "flow_prediction":
        raise ValueError(f"{cls or 'this scheduler'} is a flow-matching scheduler (x = (1 - t) x0 + t eps), not a "
                         "discrete DDPM schedule; use dmlab.denoisers.FlowDenoiser with a dmlab sampler instead")
    if cls.startswith("EDM") or get("sigma_data") is not None:
        raise ValueError(f"{cls or 'this scheduler'} is an EDM scheduler (continuous sigmas, no betas); wrap the "
                         "model in dmlab.denoisers.EDMPrecond and use a dmlab sampler instead")
    if get("timestep_type") == "continuous":
        raise ValueError("timestep_type='continuous' (the model takes 0.25 log sigma, not a training index) is not "
                         "a discrete DDPM schedule; use a scheduler config with timestep_type='discrete'")
    return {k: get(k) for k in VP_CONFIG_KEYS if get(k) is not None}


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """The training sigmas ``sqrt((1 - alpha_bar) / alpha_bar)`` of a discrete VP schedule (increasing with the index)."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if ac.ndim != 1 or not torch.isfinite(ac).all() or ((ac <= 0) | (ac > 1)).any():
        raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1] (a zero-terminal-SNR schedule "
                         "ends in 0: clamp it, e.g. .clamp_min(2 ** -24) as diffusers does)")
    return ((1 - ac) / ac).sqrt()


def train_sigmas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear") -> Tensor:
    """The sigma of every training index ``t = 0 .. T-1`` of a discrete DDPM schedule (float64)."""
    betas = betas_for(num_train_timesteps, beta_start, beta_end, beta_schedule)
    return sigmas_from_alphas_cumprod(torch.cumprod(1 - betas, 0))


def ddpm_timesteps(n_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """The integer training indices a diffusers scheduler visits, by ``timestep_spacing`` (decreasing)."""
    _check_n(n_steps)
    T = num_train_timesteps
    if n_steps > T:
        raise ValueError(f"n_steps={n_steps} exceeds num_train_timesteps={T}")
    if spacing == "leading":
        ratio = T // n_steps
        ts = (torch.arange(n_steps) * ratio).flip(0) + steps_offset
    elif spacing == "trailing":
        ratio = T / n_steps
        ts = (torch.arange(T, 0, -ratio, dtype=torch.float64).round() - 1).long()
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n_steps, dtype=torch.float64).round().flip(0).long()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; use 'leading', 'trailing' or 'linspace'")
    return ts.long()


def discrete(n_steps: int, sigmas_train: Tensor, spacing: str = "leading", steps_offset: int = 0,
             *, dtype: torch.dtype = torch.float64) -> Tensor:
    """A schedule made of the training sigmas at the indices :func:`ddpm_timesteps` picks, then 0."""
    st = torch.as_tensor(sigmas_train, dtype=torch.float64)
    if st.ndim != 1 or len(st) < 2 or not torch.isfinite(st).all() or (st[1:] < st[:-1]).any() or st[0] < 0:
        raise ValueError("sigmas_train must be the 1-D, finite sigmas of every training index, increasing with it "
                         "(dmlab.schedules.train_sigmas(...) or sigmas_from_alphas_cumprod(scheduler.alphas_cumprod))")
    ts = ddpm_timesteps(n_steps, len(sigmas_train), spacing, steps_offset)
    return _cast(append_zero(torch.as_tensor(sigmas_train, dtype=torch.float64)[ts]), dtype, "discrete")


def sigma_to_index(sigma: Tensor, sigmas_train: Tensor) -> Tensor:
    """Fractional training index of ``sigma``, by linear interpolation in log-sigma (k-diffusion's ``sigma_to_t``).

    Exact at the training sigmas; clamped to ``[0, T-1]`` outside their range.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    st = torch.as_tensor(sigmas_train, dtype=torch.float64).to(s.device)  # a CUDA sigma with CPU training sigmas
    log_s, log_st = s.clamp_min(1e-30).log(), st.log()
    idx = torch.searchsorted(log_st, log_s.reshape(-1).contiguous()).clamp(1, len(st) - 1)
    lo, hi = log_st[idx - 1], log_st[idx]
    w = ((log_s.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
    return ((idx - 1) + w).reshape(s.shape)


def index_to_sigma(t: Tensor, sigmas_train: Tensor) -> Tensor:
    """Inverse of :func:`sigma_to_index`: the sigma of a (fractional) training index, log-linear interpolation."""
    st = torch.as_tensor(sigmas_train, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(st) - 1)
    lo = t.floor().long().clamp(max=len(st) - 2)
    w = t - lo
    return ((1 - w) * st[lo].log() + w * st[lo + 1].log()).exp()


# ----------------------------------------------------------------------------------------------- conversions
def alpha_sigma_t(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """VP scales of a VE sigma: ``alpha = 1/sqrt(1 + sigma^2)``, ``sigma_t = sigma * alpha``."""
    sigma = torch.as_tensor(sigma)
    if sigma.dtype in (torch.float16, torch.bfloat16):  # sigma^2 overflows float16 above 256: compute in float32
        alpha = (1 + sigma.float() ** 2).rsqrt()
        return alpha.to(sigma.dtype), (sigma.float() * alpha).to(sigma.dtype)
    alpha = (1 + sigma ** 2).rsqrt()
    return alpha, sigma * alpha


def sigma_from_alpha_sigma_t(alpha: Tensor, sigma_t: Tensor) -> Tensor:
    """VE sigma of VP scales: ``sigma = sigma_t / alpha``."""
    return torch.as_tensor(sigma_t) / torch.as_tensor(alpha)


def lam(sigma: Tensor) -> Tensor:
    """``lam = -log(sigma)``: half the log signal-to-noise ratio."""
    return -torch.as_tensor(sigma).log()


def sigma_from_lam(lam_: Tensor) -> Tensor:
    """Inverse of :func:`lam`."""
    return (-torch.as_tensor(lam_)).exp()


def snr(sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio ``1 / sigma^2``."""
    return torch.as_tensor(sigma) ** -2
