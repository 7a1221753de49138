"""Loading zoo entries: registry look-up, sha256 verification (:mod:`dmlab.zoo.store`), and the kind's loader
(:mod:`dmlab.zoo.kinds`)."""
from __future__ import annotations

import os
import pathlib

from .kinds import kind_of
from .recipes import RECIPES
from .store import fetch, read_registry, zoo_dir

__all__ = ["load", "load_denoiser", "names", "info", "get_entry", "registry_table", "verify_all"]


def get_entry(name: str, root: pathlib.Path | None = None) -> dict:
    """The registry entry of ``name`` (not a copy); clear errors for unknown or untrained names."""
    root = _root(root)
    if not isinstance(name, str):
        raise TypeError(f"a zoo name is a string such as 'unet_l', got {type(name).__name__}")
    reg = read_registry(root)
    if name not in reg:
        where = (root or zoo_dir()) / "registry.json"
        if not where.is_file():
            raise FileNotFoundError(f"there is no zoo registry at {where}" + (
                f" (DMLAB_DATA={os.environ['DMLAB_DATA']} must be a folder holding zoo/registry.json, a copy of the "
                "repository's data/)" if os.environ.get("DMLAB_DATA") and root is None else "") +
                f"; train {name!r} into it with `python -m dmlab.zoo train {name}`, or point DMLAB_DATA at a copy "
                "of the repository's data/")
        if name in RECIPES:
            raise ValueError(f"zoo model {name!r} has a recipe but is not in the registry of {root or zoo_dir()}; "
                             f"train it with `python -m dmlab.zoo train {name}`")
        raise ValueError(f"unknown zoo model {name!r}; registered: {', '.join(sorted(reg)) or '(none)'}")
    return reg[name]


def _root(root) -> pathlib.Path | None:
    if root is None:
        return root
    if isinstance(root, str):
        root = pathlib.Path(root)
    if isinstance(root, pathlib.Path):
        if not (root / "registry.json").is_file():
            raise ValueError(f"root {root} holds no registry.json; pass the zoo folder (data/zoo of a checkout, or "
                             "the --out folder of `python -m dmlab.zoo train`), or leave root=None")
        return root
    raise TypeError(f"root must be a folder path (str or pathlib.Path) holding registry.json, got {type(root).__name__}")


def names(root: pathlib.Path | None = None) -> list[str]:
    """Names of the registered models."""
    root = _root(root)
    return sorted(read_registry(root))


def info(name: str, root: pathlib.Path | None = None) -> dict:
    """The registry entry of ``name``: recipe, config hash, files with sha256, params, FLOPs, training time,
    metrics."""
    root = _root(root)
    import copy

    return copy.deepcopy(get_entry(name, root))


def _load_folder(kind: str, folder: pathlib.Path, entry: dict | None = None, root: pathlib.Path | None = None):
    return kind_of(kind).load(folder, entry or {}, root)


def _load_unverified(name: str, root: pathlib.Path | None = None):
    e = get_entry(name, root)
    return _load_folder(e["kind"], (root or zoo_dir()) / name, e, root)


def load(name: str, *, device: str = "cpu", verify: bool = True, root: pathlib.Path | None = None):
    """Load zoo model ``name`` after checking every file's sha256 against the registry.

    Returns a ``DigitClassifier`` (``"classifier"``), a diffusers ``UNet2DModel`` / ``DiTTransformer2DModel`` in
    eval mode, or a ``StableDiffusionPipeline`` (``"sd_tiny"``). Raises ``ValueError`` for an unknown name,
    ``FileNotFoundError`` for a missing file and :class:`ZooIntegrityError` (a ``ValueError``) for a corrupted one.
    """
    root = _root(root)
    entry = get_entry(name, root)
    if kind_of(entry["kind"]).adapter:
        _check_base(name, entry, root)
    folder = fetch(name, entry, root, verify=verify)
    return _load_folder(entry["kind"], folder, entry, root).to(device)


def _check_base(name: str, entry: dict, root: pathlib.Path | None) -> None:
    """An adapter must have been trained on the registered weights of its base model."""
    from .store import base_fingerprint

    base = read_registry(root).get(entry["base"])
    if base is not None and base_fingerprint(base) != entry.get("base_weights"):
        raise ValueError(f"zoo adapter {name!r} was trained on other weights of {entry['base']!r} than the "
                         f"registered ones (the base model was retrained); retrain the adapter with "
                         f"`python -m dmlab.zoo train {name}`")


def load_denoiser(name: str, *, device: str = "cpu", verify: bool = True, root: pathlib.Path | None = None):
    """``(denoiser, model)``: zoo diffusion model ``name`` as a :class:`dmlab.denoisers.DiscreteVPDenoiser` built
    from the DDPM scheduler config saved with it, and the raw network (for hooks, probes and accelerators).

    Class-conditional models take ``class_labels`` (10 = null class); for ``sd_tiny`` the network is the pipeline's
    latent UNet, conditioned with ``encoder_hidden_states``.
    """
    root = _root(root)
    from ..denoisers import DiscreteVPDenoiser

    entry = get_entry(name, root)
    if not kind_of(entry["kind"]).denoiser:
        raise ValueError(f"{name!r} ({entry['kind']}) is not a diffusion model; use dmlab.zoo.load({name!r})")
    obj = load(name, device=device, verify=verify, root=root)
    if hasattr(obj, "unet") and hasattr(obj, "scheduler"):  # a pipeline: its latent UNet and scheduler
        return DiscreteVPDenoiser.from_scheduler(obj.unet, obj.scheduler), obj.unet
    from diffusers import DDPMScheduler

    sch = DDPMScheduler.from_pretrained((root or zoo_dir()) / name)
    from .recipes import N_CLASSES

    # the digit models take labels 0-9 and the null class 10 (a DiT's embedding table has one more, untrained row)
    return DiscreteVPDenoiser.from_scheduler(obj, sch, n_classes=N_CLASSES + 1), obj


def verify_all(root: pathlib.Path | None = None) -> dict:
    """``{name: "ok" | error message}`` for every registered model."""
    root = _root(root)
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
    root = _root(root)
    lines = [f"{'name':12s} {'params':>9s} {'MFLOPs/call':>11s} {'trained':>12s} {'1-CPU est.':>10s}  metrics"]
    for name, e in sorted(read_registry(root).items()):
        m = ", ".join(f"{k}={v}" for k, v in e.get("metrics", {}).items()
                      if isinstance(v, (int, float)) and k not in ("guidance", "steps"))
        trained = f"{e.get('train_seconds', 0):.0f} s {e.get('train_device', '?')}"
        flops = f"{e['flops_per_call'] / 1e6:.2f}" if "flops_per_call" in e else "-"
        cpu = f"{e['cpu_minutes_estimate']:.1f} min" if "cpu_minutes_estimate" in e else "-"
        lines.append(f"{name:12s} {e.get('params', 0):>9,d} {flops:>11s} "
                     f"{trained:>12s} {cpu:>10s}  {m}")
    return "\n".join(lines)


_entry = get_entry  # the name the zoo's modules used before
