"""T-Stitch: a small denoiser for the noisy start of the trajectory, a large one for the rest.

Pan et al., "T-Stitch: Accelerating Sampling in Pre-trained Diffusion Models with Trajectory Stitching"
(arXiv 2402.14167, ICLR 2025; paper 1). Two models trained on the same data learn similar encodings, and the early,
noisy steps only fix global structure, which a small model does well; so the first ``fraction`` of the steps run the
small model and the rest the large one. The official code switches inside a pipeline loop by step index; here the
switch is a Denoiser -> Denoiser transformer built on :func:`dmlab.denoisers.switch_at_sigma`,
so any sampler can use it, and the switch point is a noise level between two steps of the schedule.
"""
from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

from ..denoisers import switch_at_sigma
from ..schedules import check_schedule

__all__ = ["TStitch", "tstitch", "switch_sigma", "denoising_error"]


def switch_sigma(sigmas: Tensor, n_first: int) -> float:
    """The noise level that puts the first ``n_first`` steps of ``sigmas`` above it and the rest below: the midpoint
    of ``sigmas[n_first - 1]`` and ``sigmas[n_first]`` (``inf`` for 0 steps). A Heun corrector evaluated at
    ``sigmas[n_first]`` is on the lower side."""
    n = len(sigmas) - 1
    if not 0 <= n_first <= n:
        raise ValueError(f"n_first must be in 0..{n} (the schedule has {n} steps), got {n_first}")
    if n_first == 0:
        return math.inf
    return float((sigmas[n_first - 1] + sigmas[n_first]) / 2)


class TStitch:
    """Trajectory stitching as a Denoiser: ``small`` for the first ``round(fraction * n_steps)`` steps of
    ``sigmas``, ``large`` after (T-Stitch, Pan et al. 2025).

    ``first="large"`` is the reversed control at equal cost: ``large`` first, ``small`` for the *last*
    ``round(fraction * n_steps)`` steps. ``stats`` counts the calls of each model (``calls_small``, ``calls_large``);
    with a sampler that makes one call per step they are the steps on each model.
    """

    def __init__(self, small: Callable, large: Callable, sigmas: Tensor, fraction: float, *, first: str = "small"):
        if not (callable(small) and callable(large)):
            raise TypeError("small and large must be denoisers: D(x, sigma, **cond) -> x0_hat")
        check_schedule(sigmas)
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction (of the steps run on the small model) must be in [0, 1], got {fraction}")
        if first not in ("small", "large"):
            raise ValueError(f"first must be 'small' (T-Stitch) or 'large' (the reversed control), got {first!r}")
        n = len(sigmas) - 1
        self.fraction, self.first = float(fraction), first
        self.n_small_steps = math.floor(self.fraction * n + 0.5)
        n_first = self.n_small_steps if first == "small" else n - self.n_small_steps
        self.sigma_switch = switch_sigma(sigmas, n_first)
        self.stats = {"calls_small": 0, "calls_large": 0}

        def counted(d, key):
            def f(x, sigma, **cond):
                self.stats[key] += 1
                return d(x, sigma, **cond)
            return f

        s, l_ = counted(small, "calls_small"), counted(large, "calls_large")
        self._d = switch_at_sigma(s, l_, self.sigma_switch) if first == "small" else switch_at_sigma(l_, s, self.sigma_switch)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        return self._d(x, sigma, **cond)

    def __repr__(self) -> str:
        return (f"TStitch(fraction={self.fraction}, first={self.first!r}, n_small_steps={self.n_small_steps}, "
                f"sigma_switch={self.sigma_switch:.4g})")


def tstitch(small: Callable, large: Callable, sigmas: Tensor, fraction: float = 0.4, *, first: str = "small") -> TStitch:
    """T-Stitch (Pan et al. 2025): see :class:`TStitch`. ``fraction=0.4`` is the paper's DiT-S -> DiT-XL headline."""
    return TStitch(small, large, sigmas, fraction, first=first)


def denoising_error(denoiser: Callable, x0: Tensor, sigmas: Tensor, *, generator, cond: dict | None = None) -> Tensor:
    """Mean squared error of ``denoiser(x0 + sigma * eps, sigma)`` against ``x0`` at each sigma (``[len(sigmas)]``,
    float64), with one ``eps`` per sigma drawn from ``generator``.

    T-Stitch's premise (Pan et al. 2025, Sec. 3): at high noise a small model's estimate is about as good as a
    large one's, so where the two curves meet the small model can take over.
    """
    import torch

    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    out = []
    with torch.no_grad():
        for s in torch.as_tensor(sigmas, dtype=torch.float64).tolist():
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            d = denoiser(x0 + s * eps, torch.full((x0.shape[0],), s, dtype=x0.dtype), **(cond or {}))
            out.append(float((d.double() - x0.double()).pow(2).mean()))
    return torch.tensor(out, dtype=torch.float64)
