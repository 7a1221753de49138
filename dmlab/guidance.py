"""Guidance and steering of a frozen diffusion model: weak-to-strong reflection, classifier guidance on the denoised
estimate with a calibrated classifier, and a learned initial-noise distribution.

* :func:`reflect` and :func:`sample_w2sd` -- Weak-to-Strong Diffusion with reflection (W2SD,
  :cite:`bai2025weaktostrong`): before a step, denoise with the strong model from ``sigma_i`` to ``sigma_{i+1}``
  and invert back to ``sigma_i`` with the weak one. To first order the latent moves by
  ``(sigma_i - sigma_{i+1}) sigma_i (grad log p_strong - grad log p_weak)``: the estimable weak-to-strong gap stands in
  for the unknown strong-to-ideal gap.
* :class:`ClassifierGuidance` -- classifier guidance with an off-the-shelf classifier applied to the denoised
  estimate ``x0_hat = D(x, sigma)`` (EluCD, :cite:`ma2024elucidating`): the gradient of a temperature-calibrated
  log-likelihood is taken with respect to ``x0_hat`` (no back-propagation through the denoiser) and added to the
  score, ``D_g = D + scale * alpha sigma^2 * grad_{x0_hat} l(x0_hat)``. :func:`fit_temperature` and
  :func:`expected_calibration_error` are the calibration step (temperature scaling, Guo et al. 2017).
* :class:`NoisePolicy` and :func:`find_loss` -- FIND (:cite:`chen2024find`): the sampler and model stay frozen; the
  initial noise is drawn from a learned Gaussian ``N(mu, diag(s^2))`` whose parameters maximise a reward of the
  final sample by policy gradient with PPO-style ratio clipping; trained with :func:`dmlab.train.fit`.
* :class:`StepVariationRegularizer` -- Smooth Diffusion's step-wise variation regularisation
  (:cite:`guo2024smooth`): during training, the change of the one-step estimate ``x0_hat`` per unit change of the
  input noise, measured along a random direction (a vector-Jacobian product), is pulled towards a constant (an EMA
  of its own mean), a path-length penalty in the style of StyleGAN2's. Pass it to
  :func:`dmlab.finetuning.finetune` as ``regularizer=``; :func:`slerp` and :func:`path_variation` measure the
  smoothness of interpolations, :func:`ddim_invert` is the deterministic inversion whose error it should lower.

Every function takes denoisers ``D(x, sigma, **cond)`` in the VE convention of :mod:`dmlab.denoisers`; the samplers
are Euler (DDIM with eta = 0) steps of the probability-flow ODE, as :func:`dmlab.samplers.sample_euler`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .denoisers import as_sigma, bcast
from .schedules import schedule_floats

__all__ = ["reflect", "sample_w2sd", "w2sd_calls", "ClassifierGuidance", "classifier_guidance",
           "calibrated_log_likelihood", "fit_temperature", "expected_calibration_error", "NoisePolicy",
           "find_loss", "StepVariationRegularizer", "step_variation", "slerp", "path_variation", "ddim_invert"]


def _check_denoiser(d, name: str) -> None:
    if not callable(d):
        raise TypeError(f"{name} must be a denoiser: a callable D(x, sigma, **cond) -> x0_hat")


# ----------------------------------------------------------------------------------------------- W2SD
@torch.no_grad()
def reflect(strong: Callable, weak: Callable, x: Tensor, sigma: float, sigma_lo: float, *,
            cond: dict | None = None) -> Tensor:
    """One W2SD reflection (:cite:`bai2025weaktostrong`, Alg. 1): an Euler (DDIM) step of ``strong`` from ``sigma``
    down to ``sigma_lo``, then an Euler (DDIM-inversion) step of ``weak`` from ``sigma_lo`` back up to ``sigma``.

    ``x~ - x = (sigma - sigma_lo) sigma (grad log p_strong - grad log p_weak) + O((sigma - sigma_lo)^2)`` (both
    scores at ``x``, ``sigma``). Costs one call of each model.
    """
    _check_denoiser(strong, "strong")
    _check_denoiser(weak, "weak")
    if not (0 < sigma_lo < sigma):
        raise ValueError(f"need 0 < sigma_lo < sigma (the reflection goes down then back up), got "
                         f"sigma={sigma}, sigma_lo={sigma_lo}")
    cond = cond or {}
    s, s1 = float(sigma), float(sigma_lo)
    x1 = x + (s1 - s) * (x - strong(x, as_sigma(s, x), **cond)) / s
    return x1 + (s - s1) * (x1 - weak(x1, as_sigma(s1, x1), **cond)) / s1


def w2sd_calls(n_steps: int, n_reflect: int) -> tuple[int, int]:
    """``(strong calls, weak calls)`` of :func:`sample_w2sd`: ``n_steps + n_reflect`` and ``n_reflect``."""
    if not (isinstance(n_steps, int) and n_steps >= 1):
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    if not (isinstance(n_reflect, int) and 0 <= n_reflect < n_steps):
        raise ValueError(f"n_reflect must be an int in [0, n_steps - 1] = [0, {n_steps - 1}] (the last step goes to "
                         f"sigma = 0 and cannot be inverted), got {n_reflect!r}")
    return n_steps + n_reflect, n_reflect


@torch.no_grad()
def sample_w2sd(strong: Callable, weak: Callable, x: Tensor, sigmas: Tensor, *, n_reflect: int,
                cond: dict | None = None, callback: Callable | None = None) -> Tensor:
    """Euler (DDIM) sampling of ``strong`` with a W2SD reflection (:func:`reflect`) before each of the first
    ``n_reflect`` steps (the paper reflects in the early, high-noise steps). ``sigmas`` ends at 0; the reflection of
    step ``i`` spans ``[sigma_{i+1}, sigma_i]``. ``n_reflect = 0`` is plain Euler. Calls: :func:`w2sd_calls`.
    ``callback({"i", "x", "sigma"})`` after each step."""
    sig = schedule_floats(sigmas, min_steps=1)
    w2sd_calls(len(sig) - 1, n_reflect)
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError("x must be a floating-point tensor: the initial noise times sigmas[0]")
    cond = cond or {}
    xw = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        if i < n_reflect:
            xw = reflect(strong, weak, xw, s, s1, cond=cond)
        den = strong(xw, as_sigma(s, xw), **cond)
        xw = xw + (s1 - s) * (xw - den) / s
        if callback is not None:
            callback({"i": i, "x": xw, "sigma": s1})
    return xw.to(x.dtype)


# ----------------------------------------------------------------------------------------------- EluCD
def calibrated_log_likelihood(logits: Tensor, y: Tensor, temperature: float = 1.0,
                              marginal_discount: float = 1.0) -> Tensor:
    """``l = f_y / T - logsumexp(m f / T)`` per sample ``[B]``: the temperature-scaled log-likelihood of class ``y``.
    ``m = marginal_discount = 1`` is the calibrated ``log softmax``; EluCD's joint/marginal temperatures use
    ``m = 0.5`` (:cite:`ma2024elucidating`)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (divide the logits by it), got {temperature!r}")
    if not 0 < marginal_discount <= 1:
        raise ValueError(f"marginal_discount must lie in (0, 1], got {marginal_discount!r}")
    z = logits / temperature
    return z.gather(1, y.long().view(-1, 1)).squeeze(1) - torch.logsumexp(marginal_discount * z, 1)


class ClassifierGuidance:
    """Classifier guidance on the denoised estimate (EluCD, :cite:`ma2024elucidating`) as a denoiser transformer.

    ``D_g(x, sigma) = D(x, sigma) + scale * alpha sigma^2 * grad_{x0_hat} l(x0_hat)`` with ``x0_hat = D(x, sigma)``
    clipped to ``clip``, ``alpha = 1 / sqrt(1 + sigma^2)`` and ``l`` :func:`calibrated_log_likelihood` of
    ``classifier(x0_hat)`` for the target ``class_labels``. The paper adds ``scale * grad l`` to the score of the
    VP (DDPM) latent ``x_vp = alpha x``, with the gradient taken on ``x0_hat`` in place of ``x_vp`` (an
    off-the-shelf classifier sees clean images only; no back-propagation through the denoiser); in the VE
    convention ``D = x + sigma^2 grad_x log p`` and ``grad_x = alpha grad_{x_vp}``, hence the weight
    ``alpha sigma^2``. The denoiser is called with ``uncond`` (e.g. the null class); the
    guidance target is the ``class_labels`` the sampler passes. One denoiser call and one classifier
    forward/backward per evaluation. ``sigma_max`` switches guidance off above that noise level.
    """

    def __init__(self, denoiser: Callable, classifier: Callable, scale: float, *, uncond: dict | None = None,
                 temperature: float = 1.0, marginal_discount: float = 1.0, clip: tuple | None = (-1.0, 1.0),
                 sigma_max: float = math.inf):
        _check_denoiser(denoiser, "denoiser")
        if not callable(classifier):
            raise TypeError("classifier must be callable: classifier(images) -> logits [B, n_classes]")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0 (0 = no guidance), got {scale!r}")
        calibrated_log_likelihood(torch.zeros(1, 2), torch.zeros(1), temperature, marginal_discount)  # validates
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)
        self.uncond = dict(uncond or {})
        self.temperature, self.marginal_discount, self.clip = float(temperature), float(marginal_discount), clip
        self.sigma_max = float(sigma_max)

    def gradient(self, x0: Tensor, y: Tensor) -> Tensor:
        """``grad_{x0} l(x0)`` for target classes ``y``, in float32 (float64 for float64 input)."""
        with torch.enable_grad():
            z = x0.detach().float() if x0.dtype in (torch.float16, torch.bfloat16) else x0.detach()
            z = z.clone().requires_grad_(True)
            inp = z.clamp(*self.clip) if self.clip is not None else z
            p = next(iter(self.classifier.parameters()), None) if hasattr(self.classifier, "parameters") else None
            logits = self.classifier(inp.to(p.dtype) if p is not None else inp).to(z.dtype)
            ll = calibrated_log_likelihood(logits, y, self.temperature, self.marginal_discount)
            (g,) = torch.autograd.grad(ll.sum(), z)
        return g

    def __call__(self, x: Tensor, sigma, class_labels: Tensor | None = None, **cond) -> Tensor:
        if class_labels is None:
            raise ValueError("classifier guidance needs the target classes: pass class_labels=[B] integer labels")
        sigma = as_sigma(sigma, x, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
        d = self.denoiser(x, sigma, **{**cond, **self.uncond})
        if self.scale == 0:
            return d
        on = (sigma <= self.sigma_max).to(sigma.dtype)
        g = self.gradient(d, torch.as_tensor(class_labels, device=x.device))
        sg = sigma.to(g.dtype)
        return (d.to(g.dtype) + bcast(self.scale * on * sg ** 2 / (1 + sg ** 2).sqrt(), g) * g).to(x.dtype)


def classifier_guidance(denoiser: Callable, classifier: Callable, scale: float, **kw) -> ClassifierGuidance:
    """Classifier guidance on the denoised estimate: see :class:`ClassifierGuidance`."""
    return ClassifierGuidance(denoiser, classifier, scale, **kw)


def fit_temperature(logits: Tensor, labels: Tensor, *, grid: Tensor | None = None) -> float:
    """Temperature scaling (Guo et al. 2017): the ``T`` minimising the mean NLL of ``softmax(logits / T)`` on held-out
    ``(logits, labels)``. A log-spaced grid (default 0.05..20, 400 points) then a golden-section refinement:
    deterministic, no optimiser state."""
    logits, labels = _check_logits(logits, labels)
    nll = lambda t: float(F.cross_entropy(logits / t, labels))  # noqa: E731
    grid = torch.logspace(math.log10(0.05), math.log10(20), 400, dtype=torch.float64) if grid is None else grid
    vals = [nll(float(t)) for t in grid]
    k = min(range(len(vals)), key=vals.__getitem__)
    lo, hi = math.log(float(grid[max(k - 1, 0)])), math.log(float(grid[min(k + 1, len(grid) - 1)]))
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(math.exp(a)) < nll(math.exp(b)):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def _check_logits(logits, labels) -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must be a tensor [N, n_classes], got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be integer classes of shape [{logits.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return logits.detach().double(), labels.long()


def expected_calibration_error(logits: Tensor, labels: Tensor, *, temperature: float = 1.0,
                               n_bins: int = 15) -> Tensor:
    """Per-sample terms ``[N]`` of the expected calibration error (Naeini et al. 2015; Guo et al. 2017): sample
    ``i`` in confidence bin ``b`` contributes ``|acc_b - conf_b|``, so the mean of the terms is the ECE (equal-width
    bins of the top-class probability of ``softmax(logits / temperature)``)."""
    logits, labels = _check_logits(logits, labels)
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    p = torch.softmax(logits / temperature, 1)
    conf, pred = p.max(1)
    correct = (pred == labels).double()
    b = (conf * n_bins).long().clamp(0, n_bins - 1)
    out = torch.zeros_like(conf)
    for k in b.unique():
        m = b == k
        out[m] = (correct[m].mean() - conf[m].mean()).abs()
    return out


# ----------------------------------------------------------------------------------------------- FIND
class NoisePolicy(nn.Module):
    """The learned initial-noise distribution of FIND (:cite:`chen2024find`): ``z ~ N(mu, diag(exp(2 rho)))`` over
    the standard-normal noise of a sampler (the sampler starts from ``sigma_max * z``). Starts at ``N(0, I)``."""

    def __init__(self, shape: tuple):
        super().__init__()
        shape = tuple(shape)
        if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"shape must be the shape of one noise sample, e.g. (1, 8, 8), got {shape!r}")
        self.mu = nn.Parameter(torch.zeros(shape))
        self.rho = nn.Parameter(torch.zeros(shape))

    def sample(self, n: int, *, generator: torch.Generator) -> Tensor:
        """``n`` noise samples ``[n, *shape]`` (detached: the reward is not differentiated)."""
        eps = torch.randn((n, *self.mu.shape), generator=generator, dtype=self.mu.dtype)
        return (self.mu + self.rho.exp() * eps).detach()

    def log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; mu, diag(exp(2 rho)))`` per sample ``[n]``."""
        if z.shape[1:] != self.mu.shape:
            raise ValueError(f"z must have shape [n, {', '.join(map(str, self.mu.shape))}], got {tuple(z.shape)}")
        e = (z - self.mu) / self.rho.exp()
        lp = -0.5 * e ** 2 - self.rho - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).sum(1)

    def kl_to_standard(self) -> Tensor:
        """``KL(p_phi || N(0, I))``: how far the policy moved from the sampler's own noise."""
        v = (2 * self.rho).exp()
        return 0.5 * (v + self.mu ** 2 - 1 - 2 * self.rho).sum()


def find_loss(policy: NoisePolicy, z: Tensor, reward: Tensor, old_log_prob: Tensor, *, clip: float = 0.2) -> Tensor:
    """The PPO-clipped policy-gradient loss of FIND (:cite:`chen2024find`) for noises ``z`` drawn from the policy
    when its log-probability was ``old_log_prob``, with rewards ``reward [n]``: advantages ``A = (r - mean r) /
    std r`` (the batch mean is the baseline), ratio ``rho = exp(log p_phi(z) - old)`` and loss
    ``-mean(min(rho A, clip(rho, 1 - clip, 1 + clip) A))``. Minimise it (e.g. with :func:`dmlab.train.fit`)."""
    if not 0 < clip < 1:
        raise ValueError(f"clip must lie in (0, 1), e.g. 0.2, got {clip!r}")
    reward = reward.detach().to(z.dtype)
    if reward.shape != (z.shape[0],) or old_log_prob.shape != (z.shape[0],):
        raise ValueError(f"reward and old_log_prob must have shape [{z.shape[0]}] (one per noise), got "
                         f"{tuple(reward.shape)} and {tuple(old_log_prob.shape)}")
    adv = (reward - reward.mean()) / (reward.std() + 1e-8)
    ratio = (policy.log_prob(z) - old_log_prob.detach()).exp()
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


# ----------------------------------------------------------------------------------------------- Smooth Diffusion
def step_variation(model: nn.Module, batch: dict, n: Tensor) -> Tensor:
    """Per-sample ``||d <x0_hat, n> / d x||`` for a DDPM eps-model on a :func:`dmlab.train.ddpm_batch` (keys
    ``x0, eps, ac, t`` and ``y`` for class labels): the gradient of the one-step estimate ``x0_hat = (x_t -
    sqrt(1 - ac) eps_theta(x_t)) / sqrt(ac)`` along direction ``n`` with respect to the input noise, divided by the
    noise level ``sigma = sqrt((1 - ac) / ac)`` so that it is the output change per unit change of the (VE) input
    ``x = x0 + sigma eps`` (Smooth Diffusion, :cite:`guo2024smooth`). Differentiable (``create_graph=True``)."""
    for k in ("x0", "eps", "ac", "t"):
        if k not in batch:
            raise ValueError(f"batch needs key {k!r}: build it with dmlab.train.ddpm_batch")
    if n.shape != batch["x0"].shape:
        raise ValueError(f"direction n must have the batch's shape {tuple(batch['x0'].shape)}, got {tuple(n.shape)}")
    ac = batch["ac"]
    eps = batch["eps"].detach().clone().requires_grad_(True)
    xt = ac.sqrt() * batch["x0"] + (1 - ac).sqrt() * eps
    cond = {"class_labels": batch["y"]} if "y" in batch else {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
        out = model(xt, batch["t"], **cond)
    out = out.sample if hasattr(out, "sample") else out
    x0_hat = (xt - (1 - ac).sqrt() * out[:, : xt.shape[1]]) / ac.sqrt()
    (g,) = torch.autograd.grad((x0_hat * n).sum(), eps, create_graph=True)
    sigma = ((1 - ac) / ac).sqrt().flatten()
    return g.flatten(1).norm(dim=1) / sigma


class StepVariationRegularizer:
    """Smooth Diffusion's step-wise variation regularisation (:cite:`guo2024smooth`): ``L_reg = mean (||g|| - a)^2``
    with ``g`` from :func:`step_variation` along a random direction ``n ~ N(0, I) / sqrt(dim)`` (StyleGAN2's
    path-length normalisation) and ``a <- a + decay (mean ||g|| - a)`` an EMA target (so the ratio of output to input
    variation is pushed to a constant, not to zero). ``weight`` multiplies the penalty; ``n_reg`` rows of each batch
    are used (the double backward is the cost); directions come from its own seeded generator.

    Call as ``reg(model, batch) -> Tensor``, e.g. ``dmlab.finetuning.finetune(..., regularizer=reg)``."""

    def __init__(self, weight: float = 1.0, *, decay: float = 0.01, n_reg: int = 8, seed: int = 0):
        if not weight > 0:
            raise ValueError(f"weight must be > 0 (the paper uses 1.0), got {weight!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], e.g. 0.01, got {decay!r}")
        if not (isinstance(n_reg, int) and n_reg >= 1):
            raise ValueError(f"n_reg must be an int >= 1, got {n_reg!r}")
        self.weight, self.decay, self.n_reg = float(weight), float(decay), n_reg
        self.generator = torch.Generator().manual_seed(seed)
        self.a: float | None = None
        self.history: list[float] = []

    def __call__(self, model: nn.Module, batch: dict) -> Tensor:
        sub = {k: (v[: self.n_reg] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch["x0"].shape[0] else v)
               for k, v in batch.items()}
        n = torch.randn(sub["x0"].shape, generator=self.generator, dtype=sub["x0"].dtype)
        n = n / math.sqrt(n[0].numel())
        g = step_variation(model, sub, n)
        m = float(g.detach().mean())
        self.a = m if self.a is None else self.a + self.decay * (m - self.a)
        self.history.append(m)
        return self.weight * ((g - self.a) ** 2).mean()


def slerp(z0: Tensor, z1: Tensor, k: int) -> Tensor:
    """``k`` spherical interpolations between noises ``z0`` and ``z1`` (same shape ``[n, ...]``): ``[k, n, ...]``,
    the endpoints included (the interpolation used to walk a diffusion model's latent space)."""
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if not (isinstance(k, int) and k >= 2):
        raise ValueError(f"k must be an int >= 2 (the endpoints), got {k!r}")
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    th = cos.clamp(-1 + 1e-7, 1 - 1e-7).acos()[None, :, None]
    w = torch.linspace(0, 1, k, dtype=a.dtype)[:, None, None]
    out = (((1 - w) * th).sin() * a + (w * th).sin() * b) / th.sin()
    return out.view(k, *z0.shape)


def path_variation(feats: Tensor) -> tuple[Tensor, Tensor]:
    """For feature paths ``[k, n, d]`` (one per interpolation): the mean step length ``[n]`` and the
    interpolation-smoothness score ``[n]`` = standard deviation of the ``k - 1`` step lengths over their mean (an
    ISTD-like score of :cite:`guo2024smooth`, scale-free: 0 when the path moves at constant speed)."""
    if feats.ndim != 3 or feats.shape[0] < 3:
        raise ValueError(f"feats must be [k >= 3, n, d] (paths of features), got {tuple(feats.shape)}")
    step = (feats[1:] - feats[:-1]).norm(dim=2)
    return step.mean(0), step.std(0) / step.mean(0).clamp_min(1e-12)


@torch.no_grad()
def ddim_invert(denoiser: Callable, x0: Tensor, sigmas: Tensor, *, cond: dict | None = None) -> Tensor:
    """Deterministic DDIM inversion (Euler steps of the probability-flow ODE run upwards, VE convention) of clean
    ``x0`` through the increasing reverse of ``sigmas`` (a decreasing sampler schedule ending at 0): returns the
    latent at ``sigmas[0]``; :func:`dmlab.samplers.sample_euler` on the same schedule maps it back."""
    _check_denoiser(denoiser, "denoiser")
    s = schedule_floats(sigmas)
    if s[-1] != 0 or any(a <= b for a, b in zip(s[:-1], s[1:])):
        raise ValueError("sigmas must decrease strictly to a final 0 (a sampler schedule)")
    cond, x = cond or {}, x0.clone()
    up = s[::-1]
    for lo, hi in zip(up[:-1], up[1:]):
        ref = max(lo, up[1])  # at sigma 0 the ODE's direction is read at the first positive level
        d = (x - denoiser(x, as_sigma(ref, x), **cond)) / ref
        x = x + (hi - lo) * d
    return x
