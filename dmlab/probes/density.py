"""Log-densities along reverse-SDE paths for free, and the superposition of diffusion models (SuperDiff).

Skreta, Atanackovic, Bose, Tong, Neklyudov, "The Superposition of Diffusion Models Using the Itô Density Estimator",
ICLR 2025 (paper 31). In dmlab's VE convention the forward process is ``dx = dW_v`` in the variance ``v = sigma^2``
(no drift), so along *any* reverse path ``dx = u |dv| + dW`` with that noise scale Itô's lemma and the heat
(Fokker-Planck) equation ``d_v log q = (Laplacian log q + |grad log q|^2) / 2`` give::

    d log q_v(x) = <dx, s(x)> - |s(x)|^2 |dv| / 2,         s = grad log q_v,

(the paper's estimator with ``f = 0``, ``g^2 dt = |dv|``): the Laplacians cancel, so tracking the log-density of
*every* model along one path costs no extra network call and no divergence. :func:`ito_log_density` does that with
Euler-Maruyama steps; :func:`superpose` mixes several models' scores with weights chosen from the tracked
densities: ``"or"`` (a mixture: ``kappa = softmax(T log q_i + log w_i)``, which is exactly the mixture's score when
the tracked values are exact) and ``"and"`` (weights that keep ``log q_1 = log q_2`` along the path, solved per step
from the formula above).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["sample_reverse_sde", "ito_log_density", "superpose", "ItoResult", "gaussian_log_prior"]


def _check_path(x: Tensor, sigmas: Tensor, generator) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.dtype.is_floating_point:
        raise TypeError("x must be a floating tensor [B, ...] (the start, sigmas[0] * unit noise)")
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor with at least 2 entries (e.g. dmlab.schedules.karras(...))")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any() or not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError("sigmas must be finite, non-negative and strictly decreasing (it may end at 0 or at a "
                         "small positive sigma where a density is still defined)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    return sigmas.to(device=x.device, dtype=x.dtype)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)


def _randn(x: Tensor, generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)


def gaussian_log_prior(x: Tensor, sigma: float, data_var: float = 0.0) -> Tensor:
    """``log N(x; 0, (sigma^2 + data_var) I)`` ``[B]``: the usual stand-in for ``log q`` at ``sigma_max`` when no
    exact density exists (its error is the same for every model and shrinks as ``sigma_max`` grows)."""
    v = float(sigma) ** 2 + float(data_var)
    xf = x.flatten(1).to(torch.float64)
    return -0.5 * ((xf ** 2).sum(1) / v + xf.shape[1] * math.log(2 * math.pi * v))


@torch.no_grad()
def sample_reverse_sde(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                       generator: torch.Generator | None = None, callback: Callable | None = None) -> Tensor:
    """Euler-Maruyama on the reverse VE SDE in the variance ``v = sigma^2`` (Song et al. 2021, eq. 6):
    ``x <- x + (sigma^2 - sigma_next^2) s(x, sigma) + sqrt(sigma^2 - sigma_next^2) z`` with ``s`` the denoiser's score
    (Tweedie). One NFE per step; the model is never evaluated at ``sigma = 0``. Strong order 1/2, weak order 1.
    This is the path the Itô density estimator of paper 31 rides on."""
    from .fields import score_of

    sig = _check_path(x, sigmas, generator)
    score = score_of(denoiser, **(cond or {}))
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        dv = s ** 2 - sn ** 2
        sc = score(x, s.expand(x.shape[0]))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": sn, "denoised": x + s ** 2 * sc})
        x = x + dv * sc + dv.sqrt() * _randn(x, generator)
    return x


@dataclass
class ItoResult:
    """End points ``x``, tracked ``log_q`` ``[M, B]`` of each model at ``sigmas[-1]`` (float64) and the mixing
    weights ``kappa`` of every step (a list of ``[M, B]``; all ones for a single-model path)."""

    x: Tensor
    log_q: Tensor
    kappa: list = field(default_factory=list)


def _as_log_q0(log_q0, M: int, B: int) -> Tensor:
    lq = torch.as_tensor(log_q0, dtype=torch.float64)
    if lq.ndim == 1 and lq.shape[0] == B:
        lq = lq[None].expand(M, B)
    if lq.shape != (M, B):
        raise ValueError(f"log_q0 must be [B] = [{B}] or [M, B] = [{M}, {B}] (log q_i(x) at sigmas[0] per model)")
    return lq.clone()


def _run(scores: Sequence[Callable], x: Tensor, sigmas: Tensor, generator, log_q0, choose: Callable,
         keep_kappa: bool) -> ItoResult:
    if not scores or not all(callable(s) for s in scores):
        raise TypeError("scores must be a non-empty list of callables s(x, sigma) (see dmlab.probes.fields.score_of)")
    sig = _check_path(x, sigmas, generator)
    M, B = len(scores), x.shape[0]
    lq = _as_log_q0(log_q0, M, B).to(x.device)
    kappas = []
    with torch.no_grad():
        for i in range(len(sig) - 1):
            s, sn = sig[i], sig[i + 1]
            dv = s ** 2 - sn ** 2
            S = torch.stack([f(x, s.expand(B)) for f in scores])  # [M, B, ...]
            z = _randn(x, generator)
            kappa = choose(S, lq, z, dv)  # [M, B]
            if keep_kappa:
                kappas.append(kappa.detach().to(torch.float64).cpu())
            u = (kappa.to(x.dtype).reshape(M, B, *([1] * (x.ndim - 1))) * S).sum(0)
            dx = dv * u + dv.sqrt() * z
            lq = lq + torch.stack([_dot(dx, S[m]) - 0.5 * dv * _dot(S[m], S[m]) for m in range(M)]).to(torch.float64)
            x = x + dx
    return ItoResult(x, lq, kappas)


def ito_log_density(scores, x: Tensor, sigmas: Tensor, *, log_q0, generator: torch.Generator | None = None,
                    follow: int | Callable = 0) -> ItoResult:
    """Track ``log q_i`` of each model along one Euler-Maruyama reverse-SDE path (SuperDiff's Itô density estimator,
    paper 31; the formula is in the module docstring).

    Args:
        scores: a score callable ``s(x, sigma)`` or a list of them (one per model; :func:`score_of` turns a denoiser
            into one).
        x: the start ``[B, ...]`` at ``sigmas[0]``.
        sigmas: decreasing noise levels; the path stops at ``sigmas[-1]`` (which may be > 0).
        log_q0: ``log q_i(x)`` at ``sigmas[0]``, ``[B]`` or ``[M, B]`` (exact, or :func:`gaussian_log_prior`).
        follow: the index of the model whose score drives the path, or a score callable of its own (the estimator
            holds along any path with this noise scale).

    Returns an :class:`ItoResult`; its error against the exact ``log q`` falls like ``n_steps^(-1/2)`` (strong order
    of Euler-Maruyama).
    """
    scores = [scores] if callable(scores) else list(scores)
    if callable(follow):
        run_scores = scores + [follow]
        k = len(scores)
        lq0 = _as_log_q0(log_q0, len(scores), x.shape[0])
        lq0 = torch.cat([lq0, torch.zeros(1, x.shape[0], dtype=torch.float64)])
    else:
        if isinstance(follow, bool) or not isinstance(follow, int) or not 0 <= follow < len(scores):
            raise ValueError(f"follow must be a model index in [0, {len(scores)}) or a score callable")
        run_scores, k, lq0 = scores, follow, log_q0

    def choose(S, lq, z, dv):
        kap = torch.zeros(S.shape[0], S.shape[1], dtype=torch.float64, device=S.device)
        kap[k] = 1
        return kap

    res = _run(run_scores, x, sigmas, generator, lq0, choose, keep_kappa=False)
    if callable(follow):
        res.log_q = res.log_q[:-1]
    return res


def superpose(scores: Sequence[Callable], x: Tensor, sigmas: Tensor, *, mode: str, log_q0,
              generator: torch.Generator | None = None, log_weights=None, temperature: float = 1.0,
              correct: float = 1.0) -> ItoResult:
    """Sample a superposition of diffusion models with weights from their Itô-tracked densities (SuperDiff, paper 31).

    ``mode="or"``: ``kappa_i = softmax_i(temperature * log q_i + log_weights_i)`` and the path follows
    ``sum_i kappa_i s_i``; at ``temperature = 1`` this *is* the score of the mixture ``sum_i w_i q_i``.
    ``mode="and"`` (two models): ``kappa = (k, 1 - k)`` solved each step so that the tracked ``log q_1 - log q_2``
    is driven to ``(1 - correct)`` times its current value (``correct = 1``: equal densities after every step):
    ``k = 1/2 - (correct (l_1 - l_2) + sqrt(dv) <z, a>) / (dv |a|^2)``, ``a = s_1 - s_2`` (our derivation of the
    paper's equal-density condition in the VE form; the weights are not clipped to [0, 1]).
    """
    scores = list(scores)
    if mode not in ("or", "and"):
        raise ValueError(f"mode must be 'or' or 'and', got {mode!r}")
    M = len(scores)
    if mode == "and" and M != 2:
        raise ValueError("mode='and' superposes exactly two models")
    lw = torch.zeros(M, dtype=torch.float64) if log_weights is None else torch.as_tensor(log_weights, dtype=torch.float64)
    if lw.shape != (M,):
        raise ValueError(f"log_weights must have one entry per model ({M})")

    def choose(S, lq, z, dv):
        if mode == "or":
            return torch.softmax(temperature * lq + lw.to(lq.device)[:, None], dim=0)
        a = S[0] - S[1]
        aa = _dot(a, a).to(torch.float64).clamp_min(1e-30)
        k = 0.5 - (correct * (lq[0] - lq[1]) + dv.sqrt().to(torch.float64) * _dot(z, a).to(torch.float64)) / (dv * aa)
        return torch.stack([k, 1 - k])

    return _run(scores, x, sigmas, generator, log_q0, choose, keep_kappa=True)
