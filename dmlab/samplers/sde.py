"""Stochastic samplers of the reverse SDE, in the one noise convention ``x = x0 + sigma * eps``.

* :func:`sample_ddpm` - ancestral sampling (Ho et al. 2020, DDPM) and, with ``eta``, DDIM's family of ancestral
  samplers (Song, Meng & Ermon 2021): ``eta = 1`` is DDPM's posterior ``q(x_next | x, x0_hat)``, ``eta = 0`` is
  deterministic DDIM.
* :func:`sample_euler_maruyama` - Euler-Maruyama on the reverse VE SDE in the variable ``sigma``
  (Song et al. 2021, "Score-based generative modeling through SDEs", eq. 6 with ``g^2 = d sigma^2 / d sigma``).
* :func:`sample_dpmpp_2m_sde` - SDE-DPM-Solver++ 1 and 2M (Lu et al. 2022), the exponential integrator of the
  reverse SDE in data prediction.
* :func:`sample_pc` - predictor-corrector sampling (Song et al. 2021, Alg. 2): a reverse-diffusion predictor and
  Langevin corrector steps whose size is set by a target signal-to-noise ratio ``snr``.
* :func:`output_moments` - the exact mean and covariance of a sampler's output when it is affine in its start and
  its noise (every sampler here driven by an exact :class:`~dmlab.exact.GaussianDenoiser`): the yardstick of the
  weak-error tests. :func:`gaussian_w2` measures the 2-Wasserstein distance between two Gaussians.

Every random draw goes through ``generator`` (:func:`dmlab.samplers._common.randn_like`), or through
``noise_sampler(x) -> Tensor`` when one is given (k-diffusion's design): it is called once per draw, in order,
and must return a tensor shaped like ``x`` (:func:`output_moments` uses it to feed probe directions).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..denoisers import bcast
from ._common import call, half_safe, prepare, randn_like, report

__all__ = ["sample_ddpm", "sample_euler_maruyama", "sample_pc", "sample_dpmpp_2m_sde", "output_moments", "gaussian_w2",
           "ancestral_step"]

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")


def _noise(x: Tensor, generator, noise_sampler) -> Tensor:
    if noise_sampler is None:
        return randn_like(x, generator)
    z = noise_sampler(x)
    if not isinstance(z, Tensor) or z.shape != x.shape:
        raise ValueError(f"noise_sampler(x) must return a tensor shaped like x {tuple(x.shape)}")
    return z.to(device=x.device, dtype=x.dtype)


def _check_noise_sampler(noise_sampler) -> None:
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError("noise_sampler must be callable: noise_sampler(x) -> unit Gaussian noise shaped like x")


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(sigma_down, sigma_up)`` of one DDIM(``eta``) step from ``sigma`` to ``sigma_next`` (Song et al. 2021, DDIM eq. 16).

    In the VE convention DDIM's posterior noise ``sigma_eta`` becomes
    ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)`` (capped at ``sigma_next``) and
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``: the step is
    ``x_next = x0_hat + sigma_down * eps_hat + sigma_up * z``. ``eta = 1`` is DDPM's posterior variance
    ``beta_tilde`` (k-diffusion's ``get_ancestral_step`` is the same formula).
    """
    up = (eta * sigma_next * (1 - sigma_next ** 2 / sigma ** 2).clamp_min(0).sqrt()).clamp(max=sigma_next)
    return (sigma_next ** 2 - up ** 2).clamp_min(0).sqrt(), up


@half_safe
@torch.no_grad()
def sample_ddpm(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                generator: torch.Generator | None = None, callback: Callable | None = None, eta: float = 1.0,
                variance: str = "small", noise_sampler: Callable | None = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) and DDIM(``eta``) (Song, Meng & Ermon 2021).

    Each step draws ``x_next`` from the Gaussian posterior ``q(x_next | x, x0 = D(x, sigma))`` of the forward
    process. In the VE convention, with ``eps_hat = (x - x0_hat) / sigma`` and :func:`ancestral_step`:

    * ``variance="small"`` (DDPM's ``beta_tilde``, diffusers' ``fixed_small``):
      ``x_next = x0_hat + sigma_down * eps_hat + sigma_up * z``; ``eta`` scales the noise (``eta = 1``: DDPM,
      ``eta = 0``: deterministic DDIM, in between: DDIM's family).
    * ``variance="large"`` (DDPM's ``beta_t``, diffusers' ``fixed_large``, needs ``eta = 1``): the posterior mean
      ``x0_hat + (sigma_next^2 / sigma) eps_hat`` plus noise of std ``sqrt(beta_t) / alpha_next``.

    One NFE per step; the last step (``sigma_next = 0``) returns ``x0_hat`` without noise. A discrete schedule
    (:func:`dmlab.schedules.discrete`) with a :class:`~dmlab.denoisers.DiscreteVPDenoiser` reproduces diffusers'
    ``DDPMScheduler`` loop step for step, and with the same generator, draw for draw. First order in the weak sense.
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    _check_noise_sampler(noise_sampler)
    if not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0 (0: DDIM, 1: DDPM), got {eta!r}")
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; use 'small' (beta_tilde, DDPM's default) or 'large' (beta_t)")
    if variance == "large" and eta != 1:
        raise ValueError("variance='large' is DDPM's beta_t and has no eta; use eta=1 (or variance='small')")
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoiser, x, s, cond)
        report(callback, i, x, s, s_next, denoised)
        eps_hat = (x - denoised) / s
        if variance == "small":
            down, up = ancestral_step(s, s_next, eta)
            x = denoised + down * eps_hat
        else:
            # beta_t = 1 - abar_t / abar_next in VE terms, over alpha_next^2 = 1 / (1 + s_next^2)
            up = ((s ** 2 - s_next ** 2) * (1 + s_next ** 2) / (1 + s ** 2)).sqrt() * (s_next > 0)
            x = denoised + (s_next ** 2 / s) * eps_hat
        if up > 0:
            x = x + up * _noise(x, generator, noise_sampler)
    return x


@half_safe
@torch.no_grad()
def sample_euler_maruyama(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                          generator: torch.Generator | None = None, callback: Callable | None = None,
                          noise_sampler: Callable | None = None) -> Tensor:
    """Euler-Maruyama on the reverse VE SDE, with ``sigma`` as the time variable (Song et al. 2021, eq. 6).

    The forward process ``x = x0 + sigma eps`` is ``dx = sqrt(2 sigma) dW`` in the time ``sigma`` (``g^2 = 2 sigma``);
    its reverse is ``dx = -2 sigma grad log p_sigma(x) dsigma + sqrt(2 sigma) dW_bar``. With Tweedie's score
    ``(D - x) / sigma^2`` one step from ``sigma`` to ``sigma_next < sigma`` is
    ``x_next = x + 2 (sigma - sigma_next) (D(x, sigma) - x) / sigma + sqrt(2 sigma (sigma - sigma_next)) z``.
    This is the plain scheme of the paper (not EDM's stochastic churn); weak order 1, strong order 1/2; one NFE per
    step; the last step to ``sigma = 0`` is a full Euler-Maruyama step too (never a model call at 0).
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    _check_noise_sampler(noise_sampler)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoiser, x, s, cond)
        report(callback, i, x, s, s_next, denoised)
        ds = s - s_next
        x = x + 2 * ds * (denoised - x) / s + (2 * s * ds).sqrt() * _noise(x, generator, noise_sampler)
    return x


@half_safe
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                        generator: torch.Generator | None = None, callback: Callable | None = None, order: int = 2,
                        eta: float = 1.0, noise_sampler: Callable | None = None) -> Tensor:
    """SDE-DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Sec. 5 / App. B): first order or 2M (midpoint).

    In the VE convention with ``h = log(sigma / sigma_next)``:
    ``x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1 + eta) h}) (D_i + (D_i - D_{i-1}) / (2 r))
    + sigma_next sqrt(1 - e^{-2 eta h}) z`` with ``r = h_{i-1} / h_i`` (the ``D_{i-1}`` term only for ``order=2``
    after the first step). ``eta = 1`` is the reverse SDE (diffusers' ``algorithm_type="sde-dpmsolver++"``,
    k-diffusion's ``sample_dpmpp_2m_sde``); ``eta = 0`` is the deterministic DPM-Solver++(2M). The last step to
    ``sigma = 0`` returns ``D(x, sigma_last)`` (lower order final). One NFE per step.
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator, min_steps=1)
    _check_noise_sampler(noise_sampler)
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 or 2 (SDE-DPM-Solver++ 1 or 2M), got {order!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0 (1: the reverse SDE, 0: the ODE), got {eta!r}")
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoiser, x, s, cond)
        report(callback, i, x, s, s_next, denoised)
        if s_next == 0:
            x = denoised
            continue
        h = (s / s_next).log()
        coef = -torch.expm1(-(1 + eta) * h)
        x = (s_next / s) * torch.exp(-eta * h) * x + coef * denoised
        if order == 2 and old is not None:
            x = x + 0.5 * coef * (h / h_last) * (denoised - old)
        if eta > 0:
            x = x + s_next * (-torch.expm1(-2 * eta * h)).sqrt() * _noise(x, generator, noise_sampler)
        old, h_last = denoised, h
    return x


def _langevin_size(score: Tensor, z: Tensor, snr: float, norm: str) -> Tensor:
    """Song et al. 2021 (Alg. 4): ``eps = 2 (snr ||z|| / ||score||)^2``, per sample or batch-averaged norms."""
    gn = score.reshape(score.shape[0], -1).norm(dim=1)
    zn = z.reshape(z.shape[0], -1).norm(dim=1)
    if norm == "batch":
        gn, zn = gn.mean().expand_as(gn), zn.mean().expand_as(zn)
    return 2 * (snr * zn / gn.clamp_min(torch.finfo(score.dtype).tiny)) ** 2


@half_safe
@torch.no_grad()
def sample_pc(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
              generator: torch.Generator | None = None, callback: Callable | None = None,
              predictor: str = "reverse_diffusion", corrector_steps: int = 1, snr: float = 0.16,
              norm: str = "batch", noise_sampler: Callable | None = None) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2 (VE) with the Langevin corrector of Alg. 4).

    At every noise level ``sigma_i`` first ``corrector_steps`` Langevin steps at ``sigma_i``
    (``x <- x + e s + sqrt(2 e) z`` with score ``s = (D - x) / sigma^2`` and ``e = 2 (snr ||z|| / ||s||)^2``),
    then one predictor step to ``sigma_{i+1}``:

    * ``"reverse_diffusion"`` (the paper's VE predictor, diffusers' ``ScoreSdeVeScheduler.step_pred``):
      ``x <- x + (sigma^2 - sigma_next^2) s + sqrt(sigma^2 - sigma_next^2) z`` (Euler-Maruyama in ``sigma^2``);
    * ``"euler_maruyama"``: :func:`sample_euler_maruyama`'s step; ``"ancestral"``: :func:`sample_ddpm`'s step;
    * ``"none"``: corrector only (annealed Langevin dynamics, as NCSN), then ``x <- D(x, sigma_last)`` at the end.

    The last predictor step into ``sigma = 0`` adds no noise (the paper's final "denoise" returns the mean: for
    ``reverse_diffusion`` it is exactly Tweedie's ``D(x, sigma_last)``). ``norm="batch"`` (default) averages the
    norms over the batch as the paper's code and diffusers do; ``norm="sample"`` uses each sample's own norms (the
    result then does not depend on the batch, but in low dimension ``||z|| / ||s||`` is heavy-tailed and the
    corrector does harm: chapter 04 measures it). NFE ``= n_steps * (1 + corrector_steps)``. Not affine in the noise (the step size depends
    on ``||z||``), so its weak error is measured by Monte Carlo.
    """
    sigmas, cond = prepare(denoiser, x, sigmas, cond, generator)
    _check_noise_sampler(noise_sampler)
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; use one of {PREDICTORS}")
    if not isinstance(corrector_steps, int) or isinstance(corrector_steps, bool) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an int >= 0, got {corrector_steps!r}")
    if not isinstance(snr, (int, float)) or not snr > 0:
        raise ValueError(f"snr must be a positive number (the paper uses 0.16 for VE models), got {snr!r}")
    if norm not in ("sample", "batch"):
        raise ValueError(f"unknown norm {norm!r}; use 'sample' (per-sample norms) or 'batch' (Song et al.'s code)")
    if predictor == "none" and corrector_steps == 0:
        raise ValueError("predictor='none' with corrector_steps=0 does nothing; give corrector_steps >= 1")
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        for _ in range(corrector_steps):
            score = (call(denoiser, x, s, cond) - x) / s ** 2
            z = _noise(x, generator, noise_sampler)
            e = bcast(_langevin_size(score, z, snr, norm), x)
            x = x + e * score + (2 * e).sqrt() * z
        denoised = call(denoiser, x, s, cond)
        report(callback, i, x, s, s_next, denoised)
        last = bool(s_next == 0)
        if predictor == "reverse_diffusion":
            x = x + (s ** 2 - s_next ** 2) * (denoised - x) / s ** 2
            if not last:
                x = x + (s ** 2 - s_next ** 2).sqrt() * _noise(x, generator, noise_sampler)
        elif predictor == "euler_maruyama":
            ds = s - s_next
            x = x + 2 * ds * (denoised - x) / s
            if not last:
                x = x + (2 * s * ds).sqrt() * _noise(x, generator, noise_sampler)
        elif predictor == "ancestral":
            down, up = ancestral_step(s, s_next, 1.0)
            x = denoised + down * (x - denoised) / s
            if up > 0:
                x = x + up * _noise(x, generator, noise_sampler)
        elif last:
            x = denoised
    return x


# ----------------------------------------------------------------------------------------------- exact moments
def output_moments(sampler: Callable, denoiser: Callable, mean: Tensor, cov: Tensor, sigmas: Tensor,
                   *, shape: tuple | None = None, check: bool = True, **options) -> tuple[Tensor, Tensor]:
    """Exact mean ``[d]`` and covariance ``[d, d]`` of ``sampler``'s output for a Gaussian start ``N(mean, cov)``.

    Valid when the sampler's output is affine in its start ``x`` and in every noise draw, which holds for the
    samplers here driven by an exact Gaussian denoiser (its ``D`` is affine in ``x``). The output is
    ``F(x, z_1..z_K) = m + J_x (x - mean) + sum_k J_k z_k``, so one batched run with probe inputs gives every
    column: row 0 starts at ``mean`` with zero noise, rows ``1..d`` at ``mean + L e_j`` (``cov = L L^T``), and the
    rows of draw ``k`` get ``e_j`` as their ``k``-th noise (fed through ``noise_sampler``; a sampler without that
    argument is taken as deterministic). ``cov`` must be positive definite. Then
    ``Cov = J_x cov J_x^T + sum_k J_k J_k^T``. With ``check`` an extra probe at twice the displacement verifies
    affinity and raises ``ValueError`` otherwise (e.g. :func:`sample_pc`, whose step size depends on ``||z||``).
    The weak-error yardstick of Song et al. 2021 / Kloeden & Platen, computed without Monte Carlo noise.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    d = mean.numel()
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.ndim == 0:
        cov = cov * torch.eye(d, dtype=torch.float64)
    if cov.shape != (d, d):
        raise ValueError(f"cov must be [d, d] = [{d}, {d}] (or a scalar variance), got {tuple(cov.shape)}")
    shape = tuple(shape) if shape is not None else (d,)
    if "noise_sampler" in options or "generator" in options:
        raise TypeError("output_moments feeds its own probe noise; do not pass noise_sampler or generator")
    L = torch.linalg.cholesky(cov)
    import inspect

    stochastic = "noise_sampler" in inspect.signature(sampler).parameters

    # 1) count the draws with zero noise (a deterministic sampler, without noise_sampler, draws none)
    count = [0]

    def zeros(x):
        count[0] += 1
        return torch.zeros_like(x)

    if stochastic:
        sampler(denoiser, mean.reshape(1, *shape), sigmas, noise_sampler=zeros, **options)
    K = count[0]
    # 2) one batched run with probes: [base | x-directions | (draw k, dir j) | two affinity checks]
    n = 1 + d + K * d + (2 if check else 0)
    x0 = mean.expand(n, d).clone()
    x0[1:1 + d] += L.T
    if check:  # row n-2: twice the first x-direction; row n-1: half of it plus half of every draw's dir k mod d
        x0[n - 2] += 2 * L[:, 0]
        x0[n - 1] += 0.5 * L[:, 0]
    calls = [0]

    def probe(x):
        k = calls[0]
        calls[0] += 1
        z = torch.zeros(n, d, dtype=x.dtype)
        if k < K:
            z[1 + d + k * d: 1 + d + (k + 1) * d] = torch.eye(d, dtype=x.dtype)
            if check:
                z[n - 1, k % d] = 0.5
        return z.reshape(x.shape)

    extra = {"noise_sampler": probe} if stochastic else {}
    out = sampler(denoiser, x0.reshape(n, *shape), sigmas, **extra, **options)
    out = out.reshape(n, d).to(torch.float64)
    if calls[0] != K:
        raise ValueError(f"the sampler drew noise {calls[0]} times in the probe run and {K} times before; "
                         "it must draw the same number of times for every batch")
    cols = out[1:1 + d + K * d] - out[0]
    if check:
        want = torch.stack([2 * cols[0], 0.5 * (cols[0] + sum(cols[d + k * d + k % d] for k in range(K)))])
        got = out[n - 2:] - out[0]
        tol = 1e-7 * (1 + cols.abs().max().item() + out[0].abs().max().item())
        if not torch.isfinite(out).all() or not (got - want).abs().max().item() <= tol:
            raise ValueError("the sampler is not affine in its start and noise (e.g. sample_pc, or a non-Gaussian "
                             "denoiser); estimate its moments by Monte Carlo instead")
    return out[0], cols.T @ cols


def gaussian_w2(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """2-Wasserstein distance between ``N(mean1, cov1)`` and ``N(mean2, cov2)`` (closed form, Dowson & Landau 1982).

    ``W2^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2)``; symmetric PSD square roots by ``eigh``.
    """
    m1, m2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mean1, mean2))
    c1, c2 = (torch.as_tensor(c, dtype=torch.float64) for c in (cov1, cov2))
    if m1.shape != m2.shape or c1.shape != (m1.numel(), m1.numel()) or c2.shape != c1.shape:
        raise ValueError("means must be [d] and covariances [d, d] of the same d")

    def sqrtm(c):
        w, v = torch.linalg.eigh((c + c.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r2 = sqrtm(c2)
    cross = sqrtm(r2 @ c1 @ r2)
    w2 = (m1 - m2).pow(2).sum() + torch.trace(c1 + c2 - 2 * cross)
    return float(w2.clamp_min(0).sqrt())
