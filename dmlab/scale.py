"""Scale presets (tiny / full) and the one setup call every chapter makes.

``SCALE, gen = dmlab.setup(seed=0)`` reads ``DMLAB_SCALE`` (``tiny`` by default, or ``full``), seeds every
random number generator, makes CPU results bit-reproducible and returns the :class:`torch.Generator` that every
random draw in a chapter goes through. Nothing happens at import time.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Scale", "get_scale", "seed_everything", "setup", "SCALES"]

SCALES = ("tiny", "full")


@dataclass(frozen=True)
class Scale:
    """Where and how big a chapter runs.

    ``tiny``: CPU, float32, offline, the committed zoo models and exact denoisers (what CI executes).
    ``full``: the hub models (Stable Diffusion, DiT-XL, DINOv2) on a GPU, float16 where the GPU supports it.
    """

    name: str = "tiny"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.name not in SCALES:
            raise ValueError(f"unknown scale {self.name!r}; use one of {SCALES} (set DMLAB_SCALE=tiny or DMLAB_SCALE=full)")

    @property
    def tiny(self) -> bool:
        return self.name == "tiny"

    @property
    def full(self) -> bool:
        return self.name == "full"

    def pick(self, tiny, full):
        """``tiny`` at tiny scale, ``full`` at full scale: ``n = SCALE.pick(tiny=64, full=1024)``."""
        return tiny if self.tiny else full

    def __repr__(self) -> str:
        return f"Scale({self.name!r}, device={self.device!r}, dtype={str(self.dtype).replace('torch.', '')})"


def get_scale(name: str | None = None) -> Scale:
    """The :class:`Scale` named by ``name`` or by the ``DMLAB_SCALE`` environment variable (default ``tiny``)."""
    name = (name or os.environ.get("DMLAB_SCALE") or "tiny").strip().lower()
    if name not in SCALES:
        raise ValueError(f"DMLAB_SCALE={name!r} is not a scale; use one of {SCALES}")
    if name == "tiny":
        return Scale("tiny", "cpu", torch.float32)
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return Scale("full", "cuda", torch.float16 if major >= 7 else torch.float32)
    warnings.warn("DMLAB_SCALE=full but no GPU is visible: full-scale cells will run on the CPU and be very slow "
                  "(on Colab: Runtime > Change runtime type > GPU)", stacklevel=2)
    return Scale("full", "cpu", torch.float32)


def seed_everything(seed: int, *, deterministic: bool = True) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU ``torch.Generator`` seeded with ``seed``.

    Noise is always drawn on the CPU from this generator (then moved to the device), so the same seed gives the same
    starting noise on every machine. With ``deterministic`` CPU kernels are bit-reproducible; on CUDA the
    non-deterministic kernels only warn.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
        torch.backends.cudnn.benchmark = False
    return torch.Generator("cpu").manual_seed(seed)


_SET_BY_SETUP: dict[str, str] = {}  # environment variables setup() set itself (and may therefore unset)


def _hub_offline_flag(value: bool) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: keep its flag in step with what setup changed."""
    import sys

    constants = getattr(sys.modules.get("huggingface_hub"), "constants", None)
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = value


def _set_progress_for(sc: "Scale") -> None:
    """Hub download bars: off at tiny scale (nothing is downloaded; stored outputs stay clean), on at full scale
    (gigabytes are), unless the caller set ``HF_HUB_DISABLE_PROGRESS_BARS`` themselves."""
    import sys

    key = "HF_HUB_DISABLE_PROGRESS_BARS"
    if sc.tiny:
        if key not in os.environ:
            os.environ[key] = _SET_BY_SETUP[key] = "1"
        disabled = True
    elif _SET_BY_SETUP.pop(key, None) is not None and os.environ.get(key) == "1":
        del os.environ[key]
        disabled = False
    else:
        return
    constants = getattr(sys.modules.get("huggingface_hub"), "constants", None)
    if constants is not None and hasattr(constants, key):  # read once at import: keep it in step
        constants.HF_HUB_DISABLE_PROGRESS_BARS = True if disabled else None


def _set_offline_for(sc: "Scale") -> None:
    on = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
    if sc.tiny:
        if "HF_HUB_OFFLINE" not in os.environ:
            os.environ["HF_HUB_OFFLINE"] = _SET_BY_SETUP["HF_HUB_OFFLINE"] = "1"
            _hub_offline_flag(True)
        return
    if _SET_BY_SETUP.get("HF_HUB_OFFLINE") is not None and os.environ.get("HF_HUB_OFFLINE") == "1":
        # a tiny-scale setup() earlier in this kernel put the hub offline: undo exactly that
        del os.environ["HF_HUB_OFFLINE"]
        _SET_BY_SETUP.pop("HF_HUB_OFFLINE")
        _hub_offline_flag(os.environ.get("TRANSFORMERS_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on"))
    elif on:
        warnings.warn("DMLAB_SCALE=full with HF_HUB_OFFLINE set outside dmlab: full-scale models load only from the "
                      "local Hugging Face cache. To download them, unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) "
                      "and restart the runtime (Runtime > Restart session on Colab)", stacklevel=3)


def setup(seed: int = 0, *, scale: str | None = None, deterministic: bool = True) -> tuple[Scale, torch.Generator]:
    """Prepare a chapter: pick the scale, seed everything, quiet the libraries, apply the book's figure style
    (:func:`dmlab.viz.use_style`); return ``(SCALE, gen)``.

    At tiny scale the Hugging Face hub is put in offline mode (``HF_HUB_OFFLINE=1``) unless the caller set it, so a
    missing model fails at once instead of retrying for half a minute. A later full-scale ``setup`` in the same
    kernel unsets what a tiny one set (no restart needed); an ``HF_HUB_OFFLINE`` set outside dmlab is left alone,
    with a warning that downloads need it unset and the runtime restarted.
    """
    sc = get_scale(scale)
    _set_offline_for(sc)
    _set_progress_for(sc)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_printoptions(precision=4, sci_mode=False)
    from . import viz

    viz.use_style()  # the book's one figure style
    gen = seed_everything(seed, deterministic=deterministic)
    return sc, gen
