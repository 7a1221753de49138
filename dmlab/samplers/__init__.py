"""Stateless samplers with one signature: ``sample_<name>(denoiser, x, sigmas, *, cond, generator, callback)``.

``x`` is the starting point at ``sigmas[0]`` (e.g. ``sigmas[0] * torch.randn(...)``); ``sigmas`` is a strictly
decreasing schedule ending in 0 (:mod:`dmlab.schedules`). Samplers keep ``x``'s dtype and device.
"""
from .ode import sample_euler, sample_heun
from .sde import sample_ddpm, sample_dpmpp_2m_sde, sample_euler_maruyama, sample_pc
from .momentum import sample_ghvb, sample_hb
from .mcmc import sample_dmcmc
from .flows import sample_interpolant
from .mrs import sample_mrs
from .exponential import (sample_ddim, sample_dpm_solver, sample_dpm_solver_multistep, sample_dpmpp_2m, sample_dpmpp_3m,
                          sample_dpmpp_3m_diffusers, sample_dpmpp_3m_taylor)
from .unipc import sample_unipc
from .deis import sample_deis
from .v3 import sample_dpm_solver_v3
from .search import sample_spec

from .registry import REGISTRY, SamplerInfo, deterministic
from .convergence import fit_order

# every sampler function in the registry, and the registry itself (one list: dmlab.samplers.registry)
__all__ = list(dict.fromkeys(r.fn.__name__ for r in REGISTRY.values())) + [
    "REGISTRY", "SamplerInfo", "deterministic", "fit_order"]
