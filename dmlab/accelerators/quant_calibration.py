"""Calibration sets for post-training quantization of diffusion models: *which timesteps* the activation ranges see.

A network's activations drift with the noise level, so the calibration inputs decide what a quantizer's range fits.
Calibration inputs are the network's own inputs along a full-precision sampling trajectory (no training data), as
in the papers; :func:`calibration_set` records one trajectory and picks ``n`` rows from its steps by ``scheme``:

* ``"first"`` - every row from the first step (``t`` near ``T``): the naive single-timestep calibration that PTQ4DM
  shows fails;
* ``"uniform"`` - rows spread evenly over all steps: Q-Diffusion's time-step-aware calibration (Li et al., ICCV
  2023, arXiv 2302.04304, Sec. 3.2);
* ``"normal"`` - steps drawn so that the model time ``t / T`` follows ``N(mean, std)`` (default 0.4, 0.4, clamped
  to ``[0, 1)``): PTQ4DM's *normally distributed time-step calibration* (NDTC; Shang et al., CVPR 2023,
  arXiv 2211.15736; defaults from the official scripts ``quant_sample_ddim_in_backward_DNTC.sh``), each draw snapped
  to the nearest sampler step.

The set also keeps the *finite set* of timesteps the sampler visits (``timesteps``) and the whole recorded
trajectory (``trajectory``): TFMQ-DM's finite-set calibration of the temporal layers uses every one of them
(Huang et al., CVPR 2024, arXiv 2311.16503).

A "step" here is one root call of the network (a Heun step is two calls).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..anatomy import resolve_model
from ..hooks import record_calls, timestep_of

__all__ = ["CalibrationSet", "calibration_set", "record_calls", "SCHEMES", "select_rows", "run_calls"]

SCHEMES = ("first", "uniform", "normal")


def _batch_size(args: tuple, kwargs: dict) -> int:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Tensor) and v.ndim >= 1:
            return v.shape[0]
    raise ValueError("could not find a batched tensor among the network's inputs")


def _index(v, idx: Tensor, b: int):
    if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == b:
        return v[idx]
    return v


def select_rows(call: tuple[tuple, dict], idx: Tensor) -> tuple[tuple, dict]:
    """The rows ``idx`` of one recorded call: every tensor argument with the call's batch size is indexed."""
    args, kwargs = call
    b = _batch_size(args, kwargs)
    return tuple(_index(a, idx, b) for a in args), {k: _index(v, idx, b) for k, v in kwargs.items()}


@torch.no_grad()
def run_calls(model: nn.Module, calls) -> list:
    """``[model(*args, **kwargs) for (args, kwargs) in calls]`` without gradients."""
    return [model(*a, **k) for a, k in calls]


@dataclass
class CalibrationSet:
    """Network inputs for calibration: ``calls`` (one batch per selected step, ``(args, kwargs)`` for the root
    network), ``steps`` (the step index of each batch), ``timesteps`` (the model timestep of every step of the
    recorded trajectory: the finite set a sampler visits), ``trajectory`` (all recorded calls), ``scheme`` and
    ``rows`` (how many rows in all) and ``draws`` (the step picked for each of the ``n`` requested rows, before
    duplicates are dropped)."""

    calls: list
    steps: tuple
    timesteps: tuple
    trajectory: list = field(repr=False)
    scheme: str = "uniform"
    rows: int = 0
    draws: tuple = ()

    def __len__(self) -> int:
        return len(self.calls)

    def histogram(self) -> dict:
        """``{step: rows}``: how many calibration rows each sampler step contributes."""
        return {s: _batch_size(*c) for s, c in zip(self.steps, self.calls)}


def _steps_for(scheme: str, n: int, t_values: list, T: float, generator, mean: float, std: float) -> list[int]:
    S = len(t_values)
    if scheme == "first":
        return [0] * n
    if scheme == "uniform":
        return [min(S - 1, (r * S) // n) for r in range(n)]
    u = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
    target = (u * T).clamp(0, T - 1)
    tv = torch.tensor([float("nan") if t is None else t for t in t_values], dtype=torch.float64)
    if torch.isnan(tv).any():
        raise ValueError("scheme='normal' needs the network's timestep argument in every call")
    return [int(i) for i in (tv[None, :] - target[:, None]).abs().argmin(1)]


@torch.no_grad()
def calibration_set(denoiser: Callable, x: Tensor, sigmas: Tensor, *, n: int = 64, scheme: str = "uniform",
                    cond: dict | None = None, sampler: Callable | None = None, generator: torch.Generator | None = None,
                    mean: float = 0.4, std: float = 0.4, num_train_timesteps: int | None = None,
                    model: nn.Module | None = None) -> CalibrationSet:
    """Record one full-precision sampling run from ``x`` and pick ``n`` calibration rows from its steps by ``scheme``
    (``"first"``, ``"uniform"`` = Q-Diffusion, ``"normal"`` = PTQ4DM's NDTC; see the module docstring).

    ``denoiser`` wraps the network (``denoiser.model``, e.g. :class:`dmlab.denoisers.DiscreteVPDenoiser`, or pass
    ``model``); ``sampler`` defaults to :func:`dmlab.samplers.sample_euler` (DDIM with eta = 0). A step picked
    ``k`` times contributes the first ``min(k, B)`` samples of the batch ``B`` (no duplicates), so ``rows <= n``. ``T`` for the normal
    scheme is ``len(denoiser.sigmas_train)`` (or ``num_train_timesteps``; default 1000).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES} ('uniform' is Q-Diffusion, 'normal' is PTQ4DM), got {scheme!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1 (calibration rows; 64-256 is typical), got {n!r}")
    if scheme == "normal":
        if not isinstance(generator, torch.Generator):
            raise TypeError("scheme='normal' draws timesteps: pass generator=torch.Generator (e.g. from dmlab.setup)")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
    net = model if model is not None else resolve_model(denoiser, method="calibration_set")
    if sampler is None:
        from ..samplers import sample_euler as sampler
    trajectory = record_calls(net, lambda: sampler(denoiser, x, sigmas, cond=cond))
    if not trajectory:
        raise ValueError("the sampler never called the network; check that denoiser wraps model")
    t_values = [timestep_of(a, k) for a, k in trajectory]
    T = num_train_timesteps or len(getattr(denoiser, "sigmas_train", ())) or 1000
    steps = _steps_for(scheme, n, t_values, T, generator, mean, std)
    B = _batch_size(*trajectory[0])
    calls, chosen = [], []
    for s in sorted(set(steps)):
        idx = torch.arange(min(steps.count(s), B))
        calls.append(select_rows(trajectory[s], idx))
        chosen.append(s)
    distinct = tuple(dict.fromkeys(t for t in t_values if t is not None))
    return CalibrationSet(calls, tuple(chosen), distinct, trajectory, scheme, sum(_batch_size(*c) for c in calls),
                          tuple(steps))


def t_key(t: float | None) -> float | None:
    """The key under which per-timestep tables store a timestep value (rounded to 1e-4)."""
    return None if t is None or math.isnan(t) else round(float(t), 4)
