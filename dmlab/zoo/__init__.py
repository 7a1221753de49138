"""The model zoo: small real diffusion models (the same diffusers classes as Stable Diffusion and DiT) trained on
digits that ship with scikit-learn, committed as safetensors under ``data/zoo/`` with a registry.

>>> clf = dmlab.zoo.load("classifier")                    # the yardstick's feature network
>>> denoiser, unet = dmlab.zoo.load_denoiser("unet_l")     # a Denoiser D(x, sigma, class_labels=y) + the raw model
>>> pipe = dmlab.zoo.load("sd_tiny")                        # a real StableDiffusionPipeline, offline

Every file's sha256 is checked against ``registry.json`` before it is loaded. Retrain any model with
``python -m dmlab.zoo train NAME`` (recipes in :mod:`dmlab.zoo.recipes`). Where files come from (checkout,
``$DMLAB_DATA``, download cache): :mod:`dmlab.zoo.store`. Class id 10 is the "null" label for classifier-free guidance.
"""
from __future__ import annotations

import pathlib

from .recipes import N_CLASSES, NULL_CLASS, RECIPES, get_recipe
from .store import ZooIntegrityError, fetch, read_registry, zoo_dir

__all__ = ["load", "load_denoiser", "names", "info", "registry_table", "verify_all", "get_recipe", "RECIPES",
           "N_CLASSES", "NULL_CLASS", "ZooIntegrityError", "zoo_dir"]


def _entry(name: str, root: pathlib.Path | None = None) -> dict:
    if not isinstance(name, str):
        raise TypeError(f"a zoo name is a string such as 'unet_l', got {type(name).__name__}")
    reg = read_registry(root)
    if name not in reg:
        if name in RECIPES:
            raise ValueError(f"zoo model {name!r} has a recipe but is not in the registry of {root or zoo_dir()}; "
                             f"train it with `python -m dmlab.zoo train {name}`")
        raise ValueError(f"unknown zoo model {name!r}; registered: {', '.join(sorted(reg)) or '(none)'}")
    return reg[name]


def names(root: pathlib.Path | None = None) -> list[str]:
    """Names of the registered models."""
    return sorted(read_registry(root))


def info(name: str, root: pathlib.Path | None = None) -> dict:
    """The registry entry of ``name``: recipe, config hash, files with sha256, params, FLOPs, training time,
    metrics."""
    import copy

    return copy.deepcopy(_entry(name, root))


def _load_folder(kind: str, folder: pathlib.Path):
    if kind == "classifier":
        import json

        from safetensors.torch import load_file

        from .nets import DigitClassifier

        model = DigitClassifier(**json.loads((folder / "config.json").read_text()))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()
    if kind == "sd":
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog
        from diffusers import StableDiffusionPipeline

        bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
        dlog.disable_progress_bar()  # no "Loading pipeline components" widgets in the chapters
        tlog.disable_progress_bar()
        try:
            pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        finally:
            if bars[0]:
                dlog.enable_progress_bar()
            if bars[1]:
                tlog.enable_progress_bar()
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from .nets import model_class

    return model_class(kind).from_pretrained(folder, local_files_only=True).eval()


def _load_unverified(name: str, root: pathlib.Path | None = None):
    return _load_folder(_entry(name, root)["kind"], (root or zoo_dir()) / name)


def load(name: str, *, device: str = "cpu", verify: bool = True, root: pathlib.Path | None = None):
    """Load zoo model ``name`` after checking every file's sha256 against the registry.

    Returns a ``DigitClassifier`` (``"classifier"``), a diffusers ``UNet2DModel`` / ``DiTTransformer2DModel`` in
    eval mode, or a ``StableDiffusionPipeline`` (``"sd_tiny"``). Raises ``ValueError`` for an unknown name,
    ``FileNotFoundError`` for a missing file and :class:`ZooIntegrityError` (a ``ValueError``) for a corrupted one.
    """
    entry = _entry(name, root)
    folder = fetch(name, entry, root, verify=verify)
    return _load_folder(entry["kind"], folder).to(device)


def load_denoiser(name: str, *, device: str = "cpu", verify: bool = True, root: pathlib.Path | None = None):
    """``(denoiser, model)``: zoo diffusion model ``name`` as a :class:`dmlab.denoisers.DiscreteVPDenoiser` built
    from the DDPM scheduler config saved with it, and the raw network (for hooks, probes and accelerators).

    Class-conditional models take ``class_labels`` (10 = null class); for ``sd_tiny`` the network is the pipeline's
    latent UNet, conditioned with ``encoder_hidden_states``.
    """
    from ..denoisers import DiscreteVPDenoiser

    entry = _entry(name, root)
    if entry["kind"] == "classifier":
        raise ValueError("'classifier' is not a diffusion model; use dmlab.zoo.load('classifier')")
    obj = load(name, device=device, verify=verify, root=root)
    if entry["kind"] == "sd":
        return DiscreteVPDenoiser.from_scheduler(obj.unet, obj.scheduler), obj.unet
    from diffusers import DDPMScheduler

    sch = DDPMScheduler.from_pretrained((root or zoo_dir()) / name)
    return DiscreteVPDenoiser.from_scheduler(obj, sch), obj


def verify_all(root: pathlib.Path | None = None) -> dict:
    """``{name: "ok" | error message}`` for every registered model."""
    out = {}
    for name, entry in read_registry(root).items():
        try:
            fetch(name, entry, root)
            out[name] = "ok"
        except (FileNotFoundError, ValueError) as err:
            out[name] = str(err)
    return out


def registry_table(root: pathlib.Path | None = None) -> str:
    """A plain-text table of the registry: params, FLOPs per call, training time and metrics."""
    lines = [f"{'name':11s} {'params':>9s} {'MFLOPs/call':>11s} {'trained':>12s} {'1-CPU est.':>10s}  metrics"]
    for name, e in sorted(read_registry(root).items()):
        m = ", ".join(f"{k}={v}" for k, v in e.get("metrics", {}).items()
                      if isinstance(v, (int, float)) and k not in ("guidance", "steps"))
        trained = f"{e.get('train_seconds', 0):.0f} s {e.get('train_device', '?')}"
        cpu = f"{e['cpu_minutes_estimate']:.1f} min" if "cpu_minutes_estimate" in e else "-"
        lines.append(f"{name:11s} {e.get('params', 0):>9,d} {e.get('flops_per_call', 0) / 1e6:>11.2f} "
                     f"{trained:>12s} {cpu:>10s}  {m}")
    return "\n".join(lines)
