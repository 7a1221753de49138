"""The sampler registry: one record per sampler, read by every list of solvers in the library.

``REGISTRY[name]`` is a :class:`SamplerInfo`: the function and its fixed options, the convergence order of its
global error (deterministic samplers; measured by ``tests/samplers/test_registry.py`` on the exact GMM), the number
of denoiser evaluations as a function of the number of steps, whether it draws noise, the paper (a key of
``book/references.bib``), the plan builder that backs the diffusers adapter (:mod:`.diffusers_compat`) and the
diffusers scheduler that runs the same algorithm, with its config. ``samplers.__all__``, the adapter's
``SOLVERS``, :data:`.compare.DIFFUSERS_CONFIGS`, :func:`.compare.dmlab_candidates`, the frontier's samplers and the
tests read it; a chapter reads it as::

    from dmlab.samplers import REGISTRY, deterministic
    for name, info in deterministic().items():
        x = info(denoiser, noise * sigmas[0], sigmas)       # info.fn(..., **info.options)
        print(name, info.order, info.nfe(len(sigmas) - 1), info.paper)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from . import deis, exponential, unipc
from .exponential import (sample_ddim, sample_dpm_solver, sample_dpm_solver_multistep, sample_dpmpp_2m,
                          sample_dpmpp_3m, sample_dpmpp_3m_diffusers, sample_dpmpp_3m_taylor)
from .flows import sample_interpolant
from .mcmc import sample_dmcmc
from .momentum import sample_ghvb, sample_hb
from .mrs import sample_mrs
from .ode import sample_euler, sample_heun
from .sde import sample_ddpm, sample_dpmpp_2m_sde, sample_euler_maruyama, sample_pc
from .search import sample_spec
from .unipc import sample_unipc
from .v3 import sample_dpm_solver_v3
from .deis import sample_deis

__all__ = ["SamplerInfo", "REGISTRY", "get", "deterministic", "one_nfe_per_step", "two_nfe_but_last"]


def one_nfe_per_step(n: int) -> int:
    """``nfe = n``: one denoiser evaluation per step."""
    return n


def two_nfe_but_last(n: int) -> int:
    """``nfe = 2 n - 1``: two evaluations per step, one on the last (Heun's step to 0 is an Euler step)."""
    return 2 * n - 1


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler: see the module docstring.

    ``order`` is the order of the global error at the last positive sigma (None where it is not one number:
    stochastic samplers, the searched solver). ``min_steps`` is the shortest schedule it accepts. ``shared_signature``
    is False for samplers whose arguments differ from ``(denoiser, x, sigmas, **kw)`` (``sample_mrs`` takes a
    mean-reverting process, ``sample_spec`` its own schedule, ``sample_dpm_solver_v3`` statistics,
    ``sample_dmcmc`` returns chains): they are listed, not run by generic loops. ``plan = (builder, fixed options)``
    where the diffusers adapter runs the same algorithm (:func:`.diffusers_compat.build_plan`).
    ``diffusers = ((label, class name, config), ...)``: diffusers schedulers of the same algorithm, the first one
    exactly it (the overhead benchmark's partner). ``candidate``: tried for "the best dmlab solver"
    (:func:`.compare.dmlab_candidates`); ``diffusers_candidate``: its diffusers entries are tried for "the best
    diffusers scheduler" (:data:`.compare.DIFFUSERS_CONFIGS`); ``benchmark``: in the overhead table.
    """

    name: str
    fn: Callable
    order: int | None
    nfe: Callable[[int], int]
    stochastic: bool
    paper: str
    label: str
    options: dict = field(default_factory=dict)
    min_steps: int = 1
    shared_signature: bool = True
    plan: tuple | None = None
    diffusers: tuple = ()
    candidate: bool = False
    diffusers_candidate: bool = False
    benchmark: bool = False

    def __call__(self, denoiser, x, sigmas, **kw):
        """``fn(denoiser, x, sigmas, **options, **kw)``."""
        return self.fn(denoiser, x, sigmas, **{**self.options, **kw})

    def takes(self, option: str) -> bool:
        """Whether ``fn`` accepts the keyword ``option`` (e.g. ``"lower_order_final"``)."""
        return option in inspect.signature(self.fn).parameters


def _r(name, fn, order, paper, label, *, nfe=one_nfe_per_step, stochastic=False, **kw) -> SamplerInfo:
    return SamplerInfo(name, fn, order, nfe, stochastic, paper, label, **kw)


_KARRAS = {"use_karras_sigmas": True}
_MS = exponential.plan_dpm_solver_multistep
_RECORDS = [
    # ------------------------------------------------------------------ deterministic ODE solvers
    _r("euler", sample_euler, 1, "karras2022elucidating", "Euler", plan=(exponential.plan_ddim, {}),
       diffusers=(("Euler", "EulerDiscreteScheduler", {}),), benchmark=True),
    _r("heun", sample_heun, 2, "karras2022elucidating", "Heun", nfe=two_nfe_but_last,
       diffusers=(("Heun", "HeunDiscreteScheduler", {}),), benchmark=True),
    _r("ddim", sample_ddim, 1, "song2021denoising", "DDIM", plan=(exponential.plan_ddim, {}),
       diffusers=(("DDIM", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),),
       diffusers_candidate=True, benchmark=True),
    _r("dpmpp_2m", sample_dpmpp_2m, 2, "lu2022dpmsolverpp", "DPM++2M", plan=(_MS, {"order": 2, "prediction": "data"}),
       diffusers=(("DPM++2M", "DPMSolverMultistepScheduler", {}),
                  ("DPM++2M karras", "DPMSolverMultistepScheduler", _KARRAS)),
       candidate=True, diffusers_candidate=True, benchmark=True),
    _r("dpmpp_3m", sample_dpmpp_3m, 3, "lu2022dpmsolverpp", "DPM++3M taylor", min_steps=3,
       plan=(_MS, {"order": 3, "prediction": "data"}), candidate=True),
    _r("dpmpp_3m_diffusers", sample_dpmpp_3m_diffusers, 2, "lu2022dpmsolverpp", "DPM++3M diffusers", min_steps=3,
       diffusers=(("DPM++3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
                  ("DPM++3M karras", "DPMSolverMultistepScheduler", {"solver_order": 3, **_KARRAS})),
       candidate=True, diffusers_candidate=True, benchmark=True),
    _r("dpmpp_3m_taylor", sample_dpmpp_3m_taylor, 3, "lu2022dpmsolverpp", "DPM++3M taylor", min_steps=3),
    _r("dpm_solver_multistep", sample_dpm_solver_multistep, 2, "lu2022dpmsolverpp", "DPM-Solver(++) multistep",
       plan=(_MS, {})),
    _r("dpm_solver", sample_dpm_solver, 3, "lu2022dpmsolver", "DPM-Solver-3 singlestep", min_steps=3,
       plan=(exponential.plan_dpm_solver, {}),
       diffusers=(("DPM-Solver-3 singlestep (noise)", "DPMSolverSinglestepScheduler",
                   {"solver_order": 3, "algorithm_type": "dpmsolver"}),), candidate=True),
    _r("dpm_solver_pp_3s", sample_dpm_solver, 3, "lu2022dpmsolverpp", "DPM-Solver++-3 singlestep", min_steps=3,
       options={"order": 3, "prediction": "data"},
       diffusers=(("DPM-Solver-3 singlestep", "DPMSolverSinglestepScheduler", {"solver_order": 3}),),
       diffusers_candidate=True, benchmark=True),
    _r("unipc", sample_unipc, 3, "zhao2023unipc", "UniPC-2 bh2", min_steps=2, plan=(unipc.plan_unipc, {}),
       diffusers=(("UniPC-2 bh2", "UniPCMultistepScheduler", {}),
                  ("UniPC-2 bh2 karras", "UniPCMultistepScheduler", _KARRAS)),
       candidate=True, diffusers_candidate=True, benchmark=True),
    _r("unipc_3", sample_unipc, 4, "zhao2023unipc", "UniPC-3 bh2", min_steps=3, options={"order": 3},
       diffusers=(("UniPC-3 bh2 karras", "UniPCMultistepScheduler", {"solver_order": 3, **_KARRAS}),),
       candidate=True, diffusers_candidate=True),
    _r("unipc_3_bh1", sample_unipc, 4, "zhao2023unipc", "UniPC-3 bh1", min_steps=3,
       options={"order": 3, "solver_type": "bh1"},
       diffusers=(("UniPC-3 bh1", "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}),),
       candidate=True, diffusers_candidate=True),
    _r("deis_tab", sample_deis, 3, "zhang2023fast", "DEIS-3 tAB", min_steps=3, options={"variant": "tab"},
       candidate=True),
    _r("deis_rhoab", sample_deis, 3, "zhang2023fast", "DEIS-3 rhoAB", min_steps=3, options={"variant": "rhoab"},
       candidate=True),
    _r("deis", sample_deis, 3, "zhang2023fast", "DEIS-3 logrho", min_steps=3, plan=(deis.plan_deis, {}),
       diffusers=(("DEIS-3", "DEISMultistepScheduler", {"solver_order": 3}),
                  ("DEIS-3 karras", "DEISMultistepScheduler", {"solver_order": 3, **_KARRAS})),
       candidate=True, diffusers_candidate=True, benchmark=True),
    _r("hb", sample_hb, 1, "wizadwongsa2024diffusion", "PLMS-2 + heavy ball (beta 0.8)"),
    _r("ghvb", sample_ghvb, None, "wizadwongsa2024diffusion", "GHVB 1.8"),
    _r("interpolant", sample_interpolant, 1, "albergo2023stochastic", "interpolant, Euler in t (eps = 0)"),
    _r("dpm_solver_v3", sample_dpm_solver_v3, 3, "zheng2023dpmsolverv3", "DPM-Solver-v3 (3, corrector)",
       min_steps=3, shared_signature=False),
    _r("spec", sample_spec, None, "liu2024unified", "searched (USF)", shared_signature=False),
    _r("mrs", sample_mrs, None, "li2025mrs", "MRS (mean-reverting)", shared_signature=False),
    # ------------------------------------------------------------------ stochastic samplers
    _r("ddpm", sample_ddpm, None, "ho2020denoising", "DDPM (ancestral)", stochastic=True,
       diffusers=(("DDPM", "DDPMScheduler", {"clip_sample": False}),)),
    _r("euler_maruyama", sample_euler_maruyama, None, "song2021scorebased", "Euler-Maruyama", stochastic=True),
    _r("pc", sample_pc, None, "song2021scorebased", "predictor-corrector", stochastic=True, nfe=lambda n: 2 * n),
    _r("dpmpp_2m_sde", sample_dpmpp_2m_sde, None, "lu2022dpmsolverpp", "SDE-DPM-Solver++(2M)", stochastic=True,
       diffusers=(("SDE-DPM++2M", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),)),
    _r("dmcmc", sample_dmcmc, None, "kim2022denoising", "denoising MCMC", stochastic=True, shared_signature=False),
]

REGISTRY: dict[str, SamplerInfo] = {r.name: r for r in _RECORDS}


def get(name: str) -> SamplerInfo:
    """``REGISTRY[name]``, with an error that lists the names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; use one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def deterministic(*, runnable: bool = True) -> dict[str, SamplerInfo]:
    """The deterministic samplers with a declared order (``runnable``: only those with the shared signature)."""
    return {k: r for k, r in REGISTRY.items()
            if not r.stochastic and r.order is not None and (r.shared_signature or not runnable)}
