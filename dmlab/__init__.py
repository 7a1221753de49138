"""dmlab: see, run and measure diffusion-model papers.

``import dmlab`` imports torch only; diffusers, transformers, scipy, matplotlib and ipywidgets are imported inside
the functions that need them. Start a chapter with ``SCALE, gen = dmlab.setup(seed=0)``.
"""
from . import data, denoisers, exact, samplers, schedules, viz
from . import accelerators, bench
from . import metrics, zoo
from . import probes
from .denoisers import Denoiser
from .scale import Scale, get_scale, seed_everything, setup

__version__ = "0.1.0"


def __getattr__(name: str):
    # a saved pipeline names its scheduler ("dmlab", "DmlabScheduler") with older diffusers, which then look up the
    # class and its loadable base (SchedulerMixin) on this package; both are built or imported on first use
    if name in ("DmlabScheduler", "SchedulerMixin"):
        from .samplers import diffusers_compat

        return getattr(diffusers_compat, name)
    raise AttributeError(f"module 'dmlab' has no attribute {name!r}")
__all__ = ["Denoiser", "Scale", "denoisers", "exact", "get_scale", "samplers", "schedules", "seed_everything", "setup", "data", "viz", "accelerators", "bench", "metrics", "zoo", "probes"]
