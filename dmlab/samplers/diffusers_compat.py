"""Use a dmlab solver as a diffusers scheduler: ``pipe.scheduler = as_diffusers_scheduler("dpmpp_3m", pipe.scheduler)``.

The scheduler returned by :func:`as_diffusers_scheduler` is a real ``SchedulerMixin``/``ConfigMixin`` (it saves and
loads with ``save_pretrained``/``from_config``) that runs the *same* :class:`~dmlab.samplers._plan.Plan` the
``sample_*`` function builds, one ``step`` at a time. A pipeline keeps its latents in the VP scaling
``x_vp = alpha x`` (``alpha = 1 / sqrt(1 + sigma^2)``), calls the network at the timestep the scheduler lists and
hands the raw output to ``step``; the adapter turns that output into ``D`` exactly as
:class:`~dmlab.denoisers.DiscreteVPDenoiser` does and advances the plan. Timesteps are the (possibly fractional)
training indices of the schedule's sigmas (``DiscreteVPDenoiser.sigma_to_t``), so::

    pipeline with as_diffusers_scheduler(name, scheduler, **opts)
      ==  sample_<name>(DiscreteVPDenoiser(unet, ...), noise * sqrt(1 + sigmas[0]^2),
                        sigmas, **opts)

to float rounding (``tests/samplers/test_cross_library.py``). ``init_noise_sigma`` is 1: the VP start ``x_vp = noise``.
Solver names: ``ddim``, ``euler`` (the same step), ``dpmpp_2m``, ``dpmpp_3m``, ``dpm_solver_multistep``,
``dpm_solver`` (singlestep), ``unipc``, ``deis``, and ``spec`` (a :class:`~dmlab.samplers.search.SolverSpec` as a
dict in ``options={"spec": ...}``; its own sigmas are then used and ``num_inference_steps`` must match).
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from .. import schedules
from ._plan import Stepper

__all__ = ["as_diffusers_scheduler", "SOLVERS", "SCHEDULES", "build_plan"]

SCHEDULES = ("karras", "log_uniform", "discrete")
SPACINGS = ("linspace", "leading", "trailing")


def _builders() -> dict:
    """``{name: (plan builder, fixed options)}`` of every registry sampler the adapter can run."""
    from .registry import REGISTRY

    return {k: r.plan for k, r in REGISTRY.items() if r.plan is not None}


def _solvers() -> tuple:
    from .registry import REGISTRY

    return tuple(k for k, r in REGISTRY.items() if r.plan is not None) + ("spec",)


SOLVERS = _solvers()


def build_plan(solver: str, sigmas: list, options: dict, start: int = 0):
    """The :class:`~dmlab.samplers._plan.Plan` of a named solver on ``sigmas`` (a list ending in 0), first taking step
    ``start`` (the order lowered after it as diffusers' schedulers do: ``exponential.restart_orders``)."""
    if solver == "spec":
        from .search import SolverSpec

        spec = options.get("spec")
        if spec is None:
            raise ValueError("solver='spec' needs options={'spec': SolverSpec(...).to_dict()}")
        return SolverSpec.from_dict(spec).plan()
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {SOLVERS}")
    builder, fixed = _builders()[solver]
    clash = set(fixed) & set(options)
    if clash:
        raise ValueError(f"solver {solver!r} fixes {sorted(clash)}; use 'dpm_solver_multistep' to choose them")
    try:
        return builder(sigmas, **fixed, **options, **({"start": start} if start else {}))
    except TypeError as e:
        raise ValueError(f"bad options {options} for solver {solver!r}: {e}") from None


@functools.lru_cache(maxsize=None)
def _scheduler_class():
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.utils import BaseOutput
    from dataclasses import dataclass

    @dataclass
    class DmlabSchedulerOutput(BaseOutput):
        prev_sample: Tensor
        pred_original_sample: Tensor | None = None

    class DmlabScheduler(SchedulerMixin, ConfigMixin):
        """A dmlab solver behind diffusers' scheduler API (see :mod:`dmlab.samplers.diffusers_compat`)."""

        order = 1

        @register_to_config
        def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                     beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                     solver: str = "dpmpp_2m", options: dict | None = None, schedule: str = "karras",
                     sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                     timestep_spacing: str = "linspace", steps_offset: int = 0,
                     rescale_betas_zero_snr: bool = False):
            from ..denoisers import PREDICTION_TYPES

            if prediction_type not in PREDICTION_TYPES:
                raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")
            if schedule not in SCHEDULES:
                raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
            if timestep_spacing not in SPACINGS:
                raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; use one of {SPACINGS}")
            self.alphas_cumprod = schedules.vp_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                              trained_betas, rescale_betas_zero_snr)
            self.sigmas_train = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
            build_plan(solver, schedules.karras(8, 0.1, 10.0).tolist(), dict(options or {}))  # validate now
            self.init_noise_sigma = 1.0
            self.num_inference_steps = None
            self.timesteps = None
            self.sigmas = None
            self._step_index = None
            self._begin_index = None
            self._stepper = None

        @classmethod
        def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
            """diffusers' ``from_config``, refusing configs whose noise schedule is not a discrete DDPM one
            (flow matching, EDM) instead of reading them as the default betas; the betas, ``trained_betas``,
            ``rescale_betas_zero_snr``, ``timestep_spacing`` and ``steps_offset`` of another scheduler's config are
            kept."""
            schedules.vp_config(config)
            schedules.vp_config(kwargs)
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

        # ---------------------------------------------------------------------------------- schedule
        def dmlab_sigmas(self, num_inference_steps: int) -> Tensor:
            """The dmlab schedule (VE sigmas, ending in 0) this scheduler samples on."""
            c = self.config
            lo = float(self.sigmas_train[0]) if c.sigma_min is None else c.sigma_min
            hi = float(self.sigmas_train[-1]) if c.sigma_max is None else c.sigma_max
            if c.schedule == "karras":
                return schedules.karras(num_inference_steps, lo, hi, c.rho)
            if c.schedule == "log_uniform":
                return schedules.log_uniform(num_inference_steps, lo, hi)
            return schedules.discrete(num_inference_steps, self.sigmas_train, c.timestep_spacing, c.steps_offset)

        def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, **kwargs):
            """Build the schedule and the plan; ``sigmas`` (VE, decreasing, with or without the final 0) overrides."""
            if self.config.solver == "spec":
                from .search import SolverSpec

                spec_sig = SolverSpec.from_dict(self.config.options["spec"]).sigmas
                if num_inference_steps is not None and num_inference_steps != len(spec_sig) - 1:
                    raise ValueError(f"this spec has {len(spec_sig) - 1} steps; call set_timesteps({len(spec_sig) - 1})")
                sig = torch.tensor(spec_sig, dtype=torch.float64)
            elif sigmas is not None:
                sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
                sig = sig if sig[-1] == 0 else schedules.append_zero(sig)
            elif num_inference_steps is None:
                raise ValueError("pass num_inference_steps (or sigmas=)")
            else:
                sig = self.dmlab_sigmas(int(num_inference_steps))
            schedules.check_schedule(sig)
            plan = build_plan(self.config.solver, sig.tolist(), dict(self.config.options or {}))
            self._plan = plan
            self.sigmas = sig
            t = schedules.sigma_to_index(sig[:-1], self.sigmas_train)
            self.timesteps = t.to(device=device, dtype=torch.float32)
            self.num_inference_steps = len(sig) - 1
            self._step_index, self._begin_index, self._stepper = None, None, None

        @property
        def step_index(self):
            return self._step_index

        @property
        def begin_index(self):
            return self._begin_index

        def set_begin_index(self, begin_index: int = 0):
            """Start at step ``begin_index`` (img2img): the solver's warm-up restarts there (see ``step``)."""
            n = self.num_inference_steps
            if isinstance(begin_index, bool) or not isinstance(begin_index, numbers.Integral) or begin_index < 0 or \
                    (n is not None and begin_index >= n):
                raise ValueError(f"begin index {begin_index!r} is outside the {n} steps; call set_begin_index(k) "
                                 f"with an int 0 <= k < num_inference_steps")
            self._begin_index = int(begin_index)

        def scale_model_input(self, sample: Tensor, *args, **kwargs) -> Tensor:
            return sample

        def _index_of(self, timestep) -> int:
            t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0].to(self.timesteps.device)
            return int((self.timesteps - t).abs().argmin())

        def _denoised(self, out: Tensor, x_vp: Tensor, sigma: float) -> Tensor:
            alpha = 1 / math.sqrt(1 + sigma ** 2)
            if out.shape[1] == 2 * x_vp.shape[1]:
                out = out[:, : x_vp.shape[1]]
            p = self.config.prediction_type
            if p == "epsilon":
                return x_vp / alpha - sigma * out
            if p == "v_prediction":
                return alpha * x_vp - sigma * alpha * out
            return out

        # ---------------------------------------------------------------------------------- step
        def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True,
                 **kwargs):
            """Advance one step: ``sample`` is ``x_vp`` at ``sigmas[i]``; returns ``x_vp`` at ``sigmas[i + 1]``."""
            if self.num_inference_steps is None:
                raise ValueError("call set_timesteps(num_inference_steps) before step()")
            if kwargs.get("eta", 0.0):
                raise ValueError("dmlab solvers here are deterministic: use eta=0 (or dmlab.samplers.sample_ddpm)")
            if self._step_index is None:
                k = self._begin_index if self._begin_index is not None else self._index_of(timestep)
                if not 0 <= k < self.num_inference_steps:
                    raise ValueError(f"begin index {k} is outside the {self.num_inference_steps} steps; call "
                                     f"set_begin_index(k) with 0 <= k < {self.num_inference_steps}")
                # starting mid-schedule (img2img): the warm-up restarts at sigmas[k] and the order is lowered where
                # fewer outputs exist, as diffusers' schedulers do (the final-step rules count the whole schedule)
                if k and self.config.solver == "spec":
                    raise ValueError("a searched SolverSpec runs its whole schedule; it cannot start mid-way")
                plan = self._plan if k == 0 else build_plan(self.config.solver, self.sigmas.tolist(),
                                                             dict(self.config.options or {}), start=k)
                self._step_index, self._stepper = k, Stepper(plan, start=k)
            i = self._step_index
            s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            dtype = sample.dtype
            x_vp = sample.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else sample
            out = model_output.to(x_vp.dtype)
            denoised = self._denoised(out, x_vp, s)
            _, x_next = self._stepper.step(x_vp * math.sqrt(1 + s ** 2), denoised)
            prev = (x_next / math.sqrt(1 + s_next ** 2)).to(dtype)
            self._step_index = i + 1
            if not return_dict:
                return (prev,)
            return DmlabSchedulerOutput(prev_sample=prev, pred_original_sample=denoised.to(dtype))

        def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
            """``x_vp = alpha x0 + sigma_t noise`` at the (fractional) training index ``timesteps``."""
            sig = schedules.index_to_sigma(torch.as_tensor(timesteps).reshape(-1).cpu(), self.sigmas_train)
            alpha = (1 + sig ** 2).rsqrt().to(original_samples)
            sig_t = (sig * (1 + sig ** 2).rsqrt()).to(original_samples)
            shape = (-1,) + (1,) * (original_samples.ndim - 1)
            return alpha.reshape(shape) * original_samples + sig_t.reshape(shape) * noise

        def __len__(self):
            return self.config.num_train_timesteps

    DmlabScheduler.__qualname__ = "DmlabScheduler"  # a module-level name: pickles, and pipelines find it
    DmlabSchedulerOutput.__qualname__ = "DmlabSchedulerOutput"
    return DmlabScheduler


def __getattr__(name: str):
    """``DmlabScheduler`` at module level, built on first use so that diffusers is imported
    only when needed. A saved pipeline names it ``("dmlab", "DmlabScheduler")`` in ``model_index.json``;
    ``dmlab.DmlabScheduler`` resolves here, so ``from_pretrained`` reloads it."""
    if name == "DmlabScheduler":
        return _scheduler_class()
    if name == "SchedulerMixin":  # diffusers picks the loading method by the base classes the library exposes
        from diffusers import SchedulerMixin

        return SchedulerMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_diffusers_scheduler(solver: str = "dpmpp_2m", scheduler=None, *, schedule: str = "karras",
                           sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                           timestep_spacing: str | None = None, steps_offset: int | None = None, **options):
    """A diffusers scheduler that runs the dmlab solver ``solver`` (see the module docstring for the names).

    Args:
        solver: the dmlab solver, e.g. ``"dpmpp_3m"`` (with ``variant="taylor"`` by default), ``"unipc"``.
        scheduler: a diffusers scheduler (or its config) whose noise schedule to copy, typically ``pipe.scheduler``:
            ``num_train_timesteps``, the betas (``beta_*``, ``trained_betas``, ``rescale_betas_zero_snr``),
            ``prediction_type``, ``timestep_spacing`` and ``steps_offset``; without it diffusers' DDPM defaults are
            used. Flow-matching and EDM schedulers are refused (:func:`dmlab.schedules.vp_config`).
        schedule: the sigma grid: ``"karras"`` (Karras et al. 2022, between the training sigmas' range unless
            ``sigma_min``/``sigma_max`` are given), ``"log_uniform"`` or ``"discrete"`` (training sigmas at
            ``timestep_spacing`` and ``steps_offset``, by default the source scheduler's, else ``"linspace"``, 0).
        **options: the solver's keyword options (``order``, ``solver_type``, ``variant``, ...), JSON-serialisable.

    Returns:
        a ``DmlabScheduler`` (``SchedulerMixin``, ``ConfigMixin``) to assign to ``pipe.scheduler``.
    """
    cls = _scheduler_class()
    kw = dict(schedules.vp_config(scheduler))  # refuses flow-matching / EDM schedulers
    if scheduler is not None:
        cfg = getattr(scheduler, "config", scheduler)
        get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
        for k in ("prediction_type", "timestep_spacing", "steps_offset"):
            if get(k) is not None:
                kw[k] = get(k)
    if timestep_spacing is not None:
        kw["timestep_spacing"] = timestep_spacing
    if steps_offset is not None:
        kw["steps_offset"] = steps_offset
    return cls(solver=solver, options=options, schedule=schedule, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
               **kw)
