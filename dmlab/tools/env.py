"""The one environment every chapter is executed and checked in (stored outputs must match what CI recomputes)."""
from __future__ import annotations

import os

__all__ = ["apply_ci_env", "CI_ENV"]

CI_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    "DMLAB_SCALE": "tiny",
    "DMLAB_CI": "1",
}


def apply_ci_env(overrides: dict | None = None) -> dict:
    """Set the chapter environment in ``os.environ`` (kernels started afterwards inherit it); return it."""
    env = dict(CI_ENV, **(overrides or {}))
    os.environ.update(env)
    return env
