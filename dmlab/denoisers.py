"""The Denoiser protocol, adapters that turn networks into denoisers, and Denoiser -> Denoiser transformers.

A denoiser is any callable ``D(x, sigma, **cond) -> x0_hat`` with ``x`` of shape ``[B, ...]`` in the VE convention
``x = x0 + sigma * eps`` and ``sigma`` of shape ``[B]``. Everything a network's own time variable means (a discrete
DDPM index, a VP time, a flow time) stays inside an adapter:

* :class:`EDMPrecond` - Karras et al. 2022 (EDM) preconditioning of a raw network ``F``.
* :class:`DiscreteVPDenoiser` - an eps-, v- or x0-prediction network trained on a discrete VP (DDPM) schedule,
  e.g. a diffusers ``UNet2DModel``/``UNet2DConditionModel``/``DiTTransformer2DModel`` with its scheduler's config.
* :class:`FlowDenoiser` - a flow-velocity network ``v(x_t, t)`` with ``x_t = (1 - t) x0 + t eps`` (rectified flow).
* Transformers: :func:`cfg` (classifier-free guidance, Ho & Salimans 2022), :func:`clamp` (thresholding),
  :func:`switch_at_sigma` (one denoiser above a sigma, another below), :class:`RecordingDenoiser` (logs every call).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from . import schedules
from .hooks import output_tensor

__all__ = ["Denoiser", "as_sigma", "bcast", "net_output", "EDMPrecond", "DiscreteVPDenoiser", "FlowDenoiser", "CFG",
           "cfg", "clamp", "switch_at_sigma", "RecordingDenoiser", "PREDICTION_TYPES"]


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, **cond) -> x0_hat``: the posterior-mean estimate of clean data from ``x = x0 + sigma * eps``."""

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor: ...


_HALF = (torch.float16, torch.bfloat16)


def _work_dtype(x: Tensor) -> torch.dtype:
    """The dtype adapters compute their coefficients in: float32 for half-precision ``x`` (``sigma ** 2``
    overflows float16 above sigma = 256), ``x``'s own dtype otherwise."""
    return torch.float32 if x.dtype in _HALF else x.dtype


def as_sigma(sigma, x: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Broadcast ``sigma`` (a float, a 0-d tensor or a ``[B]`` tensor) to shape ``[B]`` on ``x``'s device, in
    ``x``'s dtype (or ``dtype``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, ...], got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension: shape [B, ...]")
    dtype = x.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}; "
                        "use x.float()")
    s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or have shape [B] = [{x.shape[0]}], got {tuple(s.shape)}")
    if (s < 0).any() or not torch.isfinite(s).all():
        raw = torch.as_tensor(sigma)
        if raw.dtype.is_floating_point and raw.dtype != dtype and torch.isfinite(raw).all() and (raw >= 0).all():
            raise ValueError(f"sigma = {raw.max().item():.4g} does not fit in {dtype} (largest finite value "
                             f"{torch.finfo(dtype).max:.4g}): noise that large needs x in float32 (x.float()), "
                             "or a schedule with a smaller sigma_max")
        if raw.dtype in _HALF and (raw == math.inf).any() and not raw.isnan().any():
            raise ValueError(f"sigma is inf in {raw.dtype}, whose largest finite value is "
                             f"{torch.finfo(raw.dtype).max:.4g}: a larger sigma (e.g. a schedule's sigma_max) "
                             f"overflowed when cast to {raw.dtype}. Sample in float32 (x.float()), or keep "
                             f"sigma_max below {torch.finfo(raw.dtype).max:.4g}")
        raise ValueError("sigma must be finite and non-negative (it is the std of the added noise)")
    return s


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``[B]`` tensor to broadcast against ``x`` of shape ``[B, ...]``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


#: The tensor in a network's return value (``.sample`` of a diffusers output, the first element of a tuple): the one
#: reader is :func:`dmlab.hooks.output_tensor`; ``net_output`` is its name here.
net_output = output_tensor


# ----------------------------------------------------------------------------------------------- EDM
class EDMPrecond:
    """EDM preconditioning (Karras et al. 2022, Table 1): ``D = c_skip x + c_out F(c_in x, c_noise, **cond)``.

    ``c_skip = sd^2/(sigma^2+sd^2)``, ``c_out = sigma sd / sqrt(sigma^2+sd^2)``, ``c_in = 1/sqrt(sigma^2+sd^2)``,
    ``c_noise = log(sigma)/4``; ``sd`` is the data standard deviation ``sigma_data``.
    """

    def __init__(self, net: Callable, sigma_data: float = 0.5):
        if not callable(net):
            raise TypeError("net must be callable: F(x_in, c_noise, **cond) -> tensor")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.net, self.sigma_data = net, float(sigma_data)

    def coefficients(self, sigma: Tensor):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.clamp_min(1e-20).log() / 4
        return c_skip, c_out, c_in, c_noise

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        if x.dtype in _HALF:  # sigma^2 overflows float16 above 256: coefficients in float32, result in x's dtype
            sigma = as_sigma(sigma, x, dtype=torch.float32)
            c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
            xf = x.float()
            F = net_output(self.net((bcast(c_in, x) * xf).to(x.dtype), c_noise.to(x.dtype), **cond))
            return (bcast(c_skip, x) * xf + bcast(c_out, x) * F.float()).to(x.dtype)
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F = net_output(self.net(bcast(c_in, x) * x, c_noise, **cond))
        return bcast(c_skip, x) * x + bcast(c_out, x) * F.to(x.dtype)


# ----------------------------------------------------------------------------------------------- discrete VP
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiscreteVPDenoiser:
    """A network trained on a discrete VP (DDPM) schedule, seen as a VE denoiser.

    For ``x = x0 + sigma eps`` the network gets ``x_vp = alpha x`` (``alpha = 1/sqrt(1+sigma^2)``) and the
    fractional training index ``t`` whose sigma is ``sigma`` (log-linear interpolation of the training sigmas,
    exact at the training sigmas). Its output is turned into ``x0_hat`` by ``prediction_type``:
    ``epsilon``: ``x0 = x - sigma eps``; ``v_prediction`` (Salimans & Ho 2022): ``x0 = alpha x_vp - sigma_t v``;
    ``sample``: ``x0 = out``. A network that also predicts its variance (``out_channels = 2 C``, as DiT) has its
    first ``C`` channels used.

    The network is called as ``model(x_vp, timestep=t, **cond)``: the keyword works for diffusers ``UNet2DModel``,
    ``UNet2DConditionModel`` and ``DiTTransformer2DModel`` alike. Inputs are cast to the model's dtype and outputs
    back to ``x``'s, so float64 samplers can drive a float32 network.
    """

    def __init__(self, model: Callable, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                 *, quantize: bool = False, n_classes: int | None = None):
        if n_classes is not None and not (isinstance(n_classes, int) and n_classes >= 1):
            raise ValueError(f"n_classes must be None or the number of class labels the model takes, got {n_classes!r}")
        self.n_classes = n_classes  # when set, class_labels must lie in [0, n_classes - 1]
        if not callable(model):
            raise TypeError("model must be callable as model(x, timestep=t, **cond)")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")
        self.model = model
        self.prediction_type = prediction_type
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of >= 2 training steps (e.g. scheduler."
                             f"alphas_cumprod), got shape {tuple(ac.shape)}")
        if not torch.isfinite(ac).all():
            raise ValueError("alphas_cumprod must be finite (found NaN or inf)")
        if (ac[1:] > ac[:-1]).any() or ac[0] == ac[-1]:
            hint = " (it increases: reverse it with .flip(0))" if (ac[1:] >= ac[:-1]).all() else ""
            raise ValueError("alphas_cumprod must decrease with the training index, from about 1 at t = 0 "
                             f"(little noise) to about 0 at t = T-1{hint}; pass scheduler.alphas_cumprod or "
                             "torch.cumprod(1 - betas, 0)")
        self.sigmas_train = schedules.sigmas_from_alphas_cumprod(ac)
        self.quantize = bool(quantize)

    @classmethod
    def from_scheduler(cls, model: Callable, scheduler, **kwargs) -> "DiscreteVPDenoiser":
        """Build from a diffusers scheduler (or its config dict): betas (``trained_betas``,
        ``rescale_betas_zero_snr``: :func:`dmlab.schedules.vp_alphas_cumprod`) and ``prediction_type`` are read from
        it; flow-matching and EDM schedulers are refused (:func:`dmlab.schedules.vp_config`)."""
        cfg = getattr(scheduler, "config", scheduler)
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        vp = schedules.vp_config(scheduler)  # refuses flow-matching / EDM schedulers
        if getattr(scheduler, "alphas_cumprod", None) is not None:
            ac = scheduler.alphas_cumprod
            if vp.get("rescale_betas_zero_snr") and ac[-1] == 0:  # DDIM/DDPM keep the 0: clamp as diffusers' Euler
                ac = schedules.clamp_zero_snr(ac)
        else:
            ac = schedules.vp_alphas_cumprod(**vp)
        kwargs.setdefault("prediction_type", get("prediction_type", "epsilon"))
        return cls(model, ac, **kwargs)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas_train[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas_train[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        t = schedules.sigma_to_index(sigma, self.sigmas_train)
        return t.round() if self.quantize else t

    def _dtype(self, x: Tensor) -> torch.dtype:
        p = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        return p.dtype if p is not None else x.dtype

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        half = x.dtype in _HALF  # alpha = (1 + sigma^2)^-1/2 is 0 in float16 above sigma = 256: compute in float32
        xw = x.float() if half else x
        sigma = as_sigma(sigma, x, dtype=_work_dtype(x))
        alpha, sigma_t = schedules.alpha_sigma_t(sigma)
        x_vp = bcast(alpha, xw) * xw
        dt = self._dtype(x)
        # timesteps stay float32 (or float64) even for half-precision models: fp16 cannot hold 999.5
        t = self.sigma_to_t(sigma).to(device=x.device, dtype=torch.float64 if dt == torch.float64 else torch.float32)
        y = cond.get("class_labels")
        if self.n_classes is not None and isinstance(y, Tensor):
            if y.is_floating_point() or not bool(((y >= 0) & (y < self.n_classes)).all()):
                raise ValueError(f"class_labels must be integers in [0, {self.n_classes - 1}] for this model (the "
                                 f"last, {self.n_classes - 1}, is the null class for guidance); got "
                                 f"{sorted(set(y.flatten().tolist()))[:10]}")
        out = net_output(self.model(x_vp.to(dt), timestep=t, **cond))
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        out = out.to(xw.dtype)
        if self.prediction_type == "epsilon":
            res = xw - bcast(sigma, xw) * out
        elif self.prediction_type == "v_prediction":
            res = bcast(alpha, xw) * x_vp - bcast(sigma_t, xw) * out
        else:
            res = out
        return res.to(x.dtype) if half else res


# ----------------------------------------------------------------------------------------------- flows
class FlowDenoiser:
    """A flow-velocity network ``v(x_t, t)`` for the straight path ``x_t = (1 - t) x0 + t eps`` (rectified flow,
    Liu et al. 2023; the linear stochastic interpolant of Albergo et al. 2023), seen as a VE denoiser.

    ``t = sigma / (1 + sigma)``, ``x_t = (1 - t) x`` and ``x0 = x_t - t v``. ``time_scale`` multiplies ``t`` before
    the network sees it (1000 for networks trained on ``t * 1000``). Called as ``model(x_t, timestep=t, **cond)``.
    """

    def __init__(self, model: Callable, *, time_scale: float = 1.0):
        if not callable(model):
            raise TypeError("model must be callable as model(x_t, timestep=t, **cond)")
        self.model, self.time_scale = model, float(time_scale)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        if x.dtype in _HALF:  # t = sigma / (1 + sigma) rounds to 1 in float16 above sigma ~ 2000: float32 inside
            sigma = as_sigma(sigma, x, dtype=torch.float32)
            t = sigma / (1 + sigma)
            x_t = bcast(1 - t, x) * x.float()
            v = net_output(self.model(x_t.to(x.dtype), timestep=(t * self.time_scale).to(x.dtype), **cond))
            return (x_t - bcast(t, x) * v.float()).to(x.dtype)
        sigma = as_sigma(sigma, x)
        t = sigma / (1 + sigma)
        x_t = bcast(1 - t, x) * x
        v = net_output(self.model(x_t, timestep=t * self.time_scale, **cond)).to(x.dtype)
        return x_t - bcast(t, x) * v


# ----------------------------------------------------------------------------------------------- transformers
class CFG:
    """Classifier-free guidance (Ho & Salimans 2022) as a Denoiser -> Denoiser transformer.

    ``D_w(x) = D(x, **uncond) + scale (D(x, **cond) - D(x, **uncond))``; ``scale = 1`` is the conditional
    denoiser, ``scale = 0`` the unconditional one. With ``batched=True`` both calls run as one batch of ``2B``
    (every tensor in ``cond``/``uncond`` must then have a batch dimension).
    """

    def __init__(self, denoiser: Callable, scale: float, uncond: dict, *, batched: bool = False):
        if not callable(denoiser):
            raise TypeError("denoiser must be callable: D(x, sigma, **cond)")
        if not isinstance(uncond, dict):
            raise TypeError("uncond must be a dict of the keyword arguments of the unconditional call, "
                            "e.g. {'class_labels': torch.full((B,), n_classes)}")
        try:
            scale_f = float(scale)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"scale must be a number (1 = conditional, 0 = unconditional), got {scale!r}") from None
        if not math.isfinite(scale_f):
            raise ValueError(f"scale must be finite (1 = conditional, 0 = unconditional), got {scale!r}")
        if batched:
            for k, v in uncond.items():
                if not isinstance(v, Tensor) or v.ndim == 0:
                    raise ValueError(f"batched=True concatenates uncond and cond along the batch: uncond[{k!r}] "
                                     "must be a tensor with a batch dimension [B, ...], e.g. "
                                     f"torch.full((B,), {v.item() if isinstance(v, Tensor) else v!r}); "
                                     "or use batched=False")
        self.denoiser, self.scale, self.uncond, self.batched = denoiser, float(scale), uncond, batched

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x, dtype=_work_dtype(x))
        if set(cond) != set(self.uncond):
            raise ValueError(f"cond keys {sorted(cond)} must match uncond keys {sorted(self.uncond)}")
        if self.batched:
            for k in cond:
                c, u = cond[k], self.uncond[k]
                if not isinstance(c, Tensor) or c.ndim == 0 or c.shape[0] != x.shape[0] or u.shape[0] != x.shape[0]:
                    raise ValueError(f"batched=True needs cond[{k!r}] and uncond[{k!r}] with batch size B = "
                                     f"{x.shape[0]}, got {tuple(getattr(c, 'shape', ()))} and {tuple(u.shape)}; "
                                     "or use batched=False")
            both = {k: torch.cat([self.uncond[k], cond[k]]) for k in cond}
            d_u, d_c = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        else:
            d_u = self.denoiser(x, sigma, **self.uncond)
            d_c = self.denoiser(x, sigma, **cond)
        return d_u + self.scale * (d_c - d_u)


def cfg(denoiser: Callable, scale: float, uncond: dict, *, batched: bool = False) -> CFG:
    """Classifier-free guidance: see :class:`CFG`."""
    return CFG(denoiser, scale, uncond, batched=batched)


def clamp(denoiser: Callable, lo: float = -1.0, hi: float = 1.0) -> Callable:
    """Clip ``x0_hat`` to ``[lo, hi]`` (static thresholding, Ho et al. 2020)."""
    if not callable(denoiser):
        raise TypeError("denoiser must be callable: D(x, sigma, **cond)")
    if not lo < hi:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")

    def clamped(x, sigma, **cond):
        return denoiser(x, sigma, **cond).clamp(lo, hi)

    return clamped


def switch_at_sigma(d_high: Callable, d_low: Callable, sigma_switch: float) -> Callable:
    """Use ``d_high`` where ``sigma > sigma_switch`` and ``d_low`` elsewhere (per sample).

    The building block of trajectory stitching (T-Stitch, Pan et al. 2024): a small model for the noisy start, a
    large one for the rest.
    """
    if not (callable(d_high) and callable(d_low)):
        raise TypeError("d_high and d_low must be denoisers: callables D(x, sigma, **cond)")
    if not sigma_switch >= 0:
        raise ValueError(f"sigma_switch must be >= 0, got {sigma_switch}")

    def switched(x, sigma, **cond):
        sigma = as_sigma(sigma, x, dtype=_work_dtype(x))
        high = sigma > sigma_switch
        if high.all():
            return d_high(x, sigma, **cond)
        if not high.any():
            return d_low(x, sigma, **cond)
        out = torch.empty_like(x)
        sub = lambda m: {k: (v[m] if isinstance(v, Tensor) and v.ndim and v.shape[0] == x.shape[0] else v)  # noqa: E731
                         for k, v in cond.items()}
        out[high] = d_high(x[high], sigma[high], **sub(high))
        out[~high] = d_low(x[~high], sigma[~high], **sub(~high))
        return out

    return switched


class RecordingDenoiser:
    """Wraps a denoiser and records the sigmas of every call (``.sigmas``, a list of ``[B]`` tensors); ``.nfe``."""

    def __init__(self, denoiser: Callable):
        self.denoiser = denoiser
        self.sigmas: list[Tensor] = []

    @property
    def nfe(self) -> int:
        return len(self.sigmas)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = as_sigma(sigma, x, dtype=_work_dtype(x))
        self.sigmas.append(sigma.detach().clone())
        return self.denoiser(x, sigma, **cond)
