"""Solvers side by side: dmlab against diffusers' schedulers on exact denoisers, and their per-step overhead.

Used by ``benchmarks/samplers.py`` and chapters 03 and 05.

* :func:`state_at_end` - the state a solver reaches at its last positive sigma (the input of the denoiser's last
  call), the quantity compared against :func:`dmlab.exact.reference_ode`; its NFE excludes that last call.
* :func:`diffusers_state_at_end` - the same for a diffusers scheduler driven by an exact denoiser, evaluated at the
  *scheduler's own* sigma of each step (its timesteps may be rounded; its solver math uses the unrounded sigma,
  so that is the fair reading), ending at ``sigma_min`` (``final_sigmas_type="sigma_min"``).
* :data:`DIFFUSERS_CONFIGS` - the diffusers configurations tried; :func:`overhead_table` - per-step time of each
  dmlab solver against the diffusers scheduler of the same algorithm (interleaved pairs, median, one thread).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from .. import schedules

__all__ = ["state_at_end", "diffusers_state_at_end", "DIFFUSERS_CONFIGS", "OVERHEAD_PAIRS", "overhead_table",
           "rmse", "References", "dmlab_candidates", "accuracy_table", "make_scheduler"]

def _diffusers_configs() -> list:
    from .registry import REGISTRY

    return [entry for r in REGISTRY.values() if r.diffusers_candidate for entry in r.diffusers]


# (label, diffusers class, config): candidates for "the best diffusers scheduler" at a given NFE (from the registry)
DIFFUSERS_CONFIGS = _diffusers_configs()


def rmse(a: Tensor, b: Tensor) -> float:
    """Root-mean-square difference over all elements."""
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def state_at_end(sampler: Callable, denoiser: Callable, x: Tensor, sigmas: Tensor, **kw) -> Tensor:
    """Run ``sampler(denoiser, x, sigmas, **kw)`` and return the input of the denoiser's last call (see module doc)."""
    last = {}

    def rec(xx, sigma, **cond):
        last["x"] = xx
        return denoiser(xx, sigma, **cond)

    sampler(rec, x, sigmas, **kw)
    return last["x"]


def make_scheduler(cls_name: str, **cfg):
    """``diffusers.<cls_name>(**cfg)`` with its config warnings silenced."""
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls_name)(**cfg)


def diffusers_state_at_end(cls_name: str, config: dict, denoiser: Callable, noise: Tensor, nfe: int,
                           **base) -> tuple[Tensor, float, float]:
    """Drive a diffusers scheduler with an exact denoiser for ``nfe`` model calls from ``x_vp = noise``.

    Returns ``(VE state at the end, sigma at the start, sigma at the end)``; the start is ``x_vp = noise`` (for the
    VE-state Euler/Heun schedulers ``x = noise * init_noise_sigma``: the same VE point). ``base`` holds the beta schedule
    (diffusers' DDPM defaults otherwise); ``final_sigmas_type="sigma_min"`` is set where the class has it.
    """
    sch = make_scheduler(cls_name, **base, **config)
    if "final_sigmas_type" in sch.config:
        sch = make_scheduler(cls_name, **base, **config, final_sigmas_type="sigma_min")
    sch.set_timesteps(nfe)
    ac = sch.alphas_cumprod.double()
    train = ((1 - ac) / ac).sqrt()

    def sigma_now(t) -> float:
        if getattr(sch, "sigmas", None) is not None and getattr(sch, "step_index", None) is not None:
            return float(sch.sigmas[sch.step_index])
        if getattr(sch, "sigmas", None) is not None:
            return float(sch.sigmas[0])
        return float(train[int(t)])  # DDIM: the training sigma of its integer timestep

    ve = cls_name.startswith(("Euler", "Heun"))  # these keep the VE state and scale the model input
    x = noise.to(torch.float32) * sch.init_noise_sigma
    for t in sch.timesteps:
        s = sigma_now(t)
        x_ve = x.double() * (1.0 if ve else math.sqrt(1 + s ** 2))
        eps = (x_ve - denoiser(x_ve, torch.full((x.shape[0],), s, dtype=torch.float64))) / s
        x = sch.step(eps.float(), t, x).prev_sample
    if cls_name == "DDIMScheduler":
        t_last = int(sch.timesteps[-1]) - sch.config.num_train_timesteps // nfe
        s_end = float(train[t_last]) if t_last >= 0 else (0.0 if sch.config.set_alpha_to_one else float(train[0]))
    else:
        s_end = float(sch.sigmas[-1])
    s_start = float(sch.sigmas[0]) if getattr(sch, "sigmas", None) is not None else float(train[int(sch.timesteps[0])])
    return x.double() * (1.0 if ve else math.sqrt(1 + s_end ** 2)), s_start, s_end


# ----------------------------------------------------------------------------------------------- overhead
def _overhead_pairs() -> list:
    from .registry import REGISTRY

    return [(r.label, r.name, *r.diffusers[0][1:]) for r in REGISTRY.values() if r.benchmark]


# (algorithm, registry name, diffusers class, config): the registry's samplers with a diffusers twin
OVERHEAD_PAIRS = _overhead_pairs()


def overhead_table(n_steps: int = 20, shape: tuple = (16, 1, 8, 8), pairs: int = 7, pairs_list=None):
    """Per-step solver overhead, dmlab vs diffusers, with a model that costs nothing (a fixed output tensor).

    Both sides include their schedule construction (diffusers' ``set_timesteps``, dmlab's sigma grid and plan)
    divided over the steps; Heun's time is per model call. Returns a :class:`dmlab.bench.Table` with columns
    ``diffusers_ms``, ``dmlab_ms`` (per step, medians) and ``ratio`` (median of the interleaved per-pair ratios
    dmlab / diffusers, with its range). One intra-op thread and the CPU time of this process
    (``clock="process"``): on a shared machine, wall time also counts the time spent waiting for a core.
    """
    from ..bench import Table, time_pair

    from .registry import get
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen)
    out = 0.1 * torch.randn(shape, generator=gen)
    table = Table(f"Per-step overhead, {'x'.join(map(str, shape))} tensor, {n_steps} steps, model cost 0",
                  ["diffusers_ms", "dmlab_ms", "ratio", "ratio_lo", "ratio_hi"])
    for label, key, cls_name, cfg in (pairs_list or OVERHEAD_PAIRS):
        sch = make_scheduler(cls_name, **cfg)
        info = get(key)

        def run_diffusers():
            sch.set_timesteps(n_steps)
            x = x0 * sch.init_noise_sigma
            for t in sch.timesteps:
                x = sch.step(out, t, sch.scale_model_input(x, t)).prev_sample
            return x

        def run_dmlab():
            s = schedules.karras(n_steps, 0.01, 80.0, dtype=torch.float32)
            return info(lambda x, sigma: out, x0, s)

        calls = 2 * n_steps - 1 if key == "heun" else n_steps
        t = time_pair(run_diffusers, run_dmlab, pairs=pairs, warmup=1, threads=1, clock="process")
        table.add(label, diffusers_ms=1e3 * t.baseline_s / calls, dmlab_ms=1e3 * t.method_s / calls,
                  ratio=1 / t.speedup, ratio_lo=1 / t.hi, ratio_hi=1 / t.lo)
    return table


# ----------------------------------------------------------------------------------------------- accuracy
class References:
    """Exact ODE states (:func:`dmlab.exact.reference_ode`) from ``x = noise * sqrt(1 + s0^2)`` at ``s0`` to ``s1``,
    cached by ``(s0, s1)``: the VP start ``x_vp = noise`` of a diffusers pipeline, seen in the VE convention."""

    def __init__(self, denoiser: Callable, noise: Tensor, *, rtol: float = 1e-10):
        self.denoiser, self.noise, self.cache, self.rtol = denoiser, noise.double(), {}, rtol

    def start(self, s0: float) -> Tensor:
        return self.noise * math.sqrt(1 + s0 ** 2)

    def __call__(self, s0: float, s1: float) -> Tensor:
        key = (round(s0, 10), round(s1, 10))
        if key not in self.cache:
            from ..exact import reference_ode

            self.cache[key] = reference_ode(self.denoiser, self.start(s0), torch.tensor([s0, s1], dtype=torch.float64),
                                            rtol=self.rtol, atol=self.rtol)
        return self.cache[key]


def dmlab_candidates(stats=None, spec=None) -> dict:
    """``{label: (sampler, options)}``: the dmlab solvers tried for "the best dmlab solver" (v3 needs ``stats``;
    a searched :class:`~dmlab.samplers.search.SolverSpec` of the right NFE may be given as ``spec``). They run with
    ``lower_order_final="sigma_min"``: the states are compared at the last positive sigma, as diffusers'
    ``final_sigmas_type="sigma_min"`` schedulers are."""
    from .registry import REGISTRY

    c = {}
    for r in REGISTRY.values():
        if r.candidate:  # diffusers' rule for a schedule that ends at sigma_min, where the sampler has the option
            c[r.label] = (r.fn, {**r.options, **({"lower_order_final": "sigma_min"} if r.takes("lower_order_final")
                                                 else {})})
    lof = {"lower_order_final": "sigma_min"}
    sample_dpm_solver_v3, sample_spec = REGISTRY["dpm_solver_v3"].fn, REGISTRY["spec"].fn
    if stats is not None:
        c["DPM-Solver-v3 (3, corrector)"] = (sample_dpm_solver_v3, {"statistics": stats, "order": 3, **lof})
        c["DPM-Solver-v3 (2, corrector)"] = (sample_dpm_solver_v3, {"statistics": stats, "order": 2, **lof})
    if spec is not None:
        c["searched (USF)"] = (lambda d, x, s, **kw: sample_spec(d, x, spec=spec), {})
    return c


def accuracy_table(denoiser: Callable, noise: Tensor, nfe: int, *, sigma_min: float, sigma_max: float,
                   schedules_: dict | None = None, stats=None, spec=None, diffusers: bool = True,
                   refs: References | None = None, flip: float = 0.1):
    """Error of the state at ``sigma_min`` after ``nfe`` evaluations, every candidate from the same noise.

    Columns: ``error`` the geometric mean of the per-path RMS errors (the typical path), ``median``, ``rms`` (over
    all paths: dominated by paths that end on another training image of a memorising denoiser) and ``flips`` (paths
    whose error exceeds ``flip``).

    dmlab solvers run on each grid of ``schedules_`` (``{label: fn(n) -> sigmas}``; default uniform in DDPM time
    (diffusers' default grid), Karras rho = 7 and log-uniform) from ``sigma_max``; a searched ``spec`` runs on its own grid. diffusers schedulers run on their own
    grids (from their configs, on the DDPM-default betas, whose training sigmas span ``[0.01, 157.4]``), each against
    the exact ODE from its own start to its own end. Returns a :class:`dmlab.bench.Table`.
    """
    from ..bench import Table
    from .search import path_errors, reduce_errors, time_uniform

    refs = refs or References(denoiser, noise)
    grids = schedules_ or {"time-uniform": lambda n: time_uniform(n, sigma_min, sigma_max),
                           "karras": lambda n: schedules.karras(n, sigma_min, sigma_max),
                           "log-uniform": lambda n: schedules.log_uniform(n, sigma_min, sigma_max)}
    table = Table(f"Error of the state at sigma_min after NFE = {nfe}",
                  ["library", "grid", "error", "median", "rms", "flips"])

    def row(label, lib, grid, x_end, ref):
        e = path_errors(x_end, ref)
        table.add(label, library=lib, grid=grid, error=reduce_errors(e, "gmean"), median=float(e.median()),
                  rms=reduce_errors(e, "rms"), flips=int((e > flip).sum()))

    for label, (fn, kw) in dmlab_candidates(stats, spec).items():
        for gname, grid in ({"own": None} if label.startswith("searched") else grids).items():
            s = torch.tensor(spec.sigmas) if grid is None else grid(nfe + 1)
            row(f"{label} [{gname}]", "dmlab", gname, state_at_end(fn, denoiser, refs.start(float(s[0])), s, **kw),
                refs(float(s[0]), float(s[-2])))
    if diffusers:
        for label, cls_name, cfg in DIFFUSERS_CONFIGS:
            x_end, s0, s1 = diffusers_state_at_end(cls_name, cfg, denoiser, refs.noise, nfe)
            row(label, "diffusers", "own", x_end, refs(s0, s1))
    return table
