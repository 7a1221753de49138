"""Train a recipe, save it under the zoo folder, and write its registry entry (what ``python -m dmlab.zoo`` runs).

What differs between kinds (how to train, cost and measure) comes from :data:`dmlab.zoo.kinds.KINDS`. Under
``accelerate launch`` every process trains (data-parallel) and measures its share of the samples; the main process
alone writes files.
"""
from __future__ import annotations

import json
import pathlib

from .kinds import kind_of
from .recipes import get_recipe
from .store import base_fingerprint, file_table, read_registry, write_registry, zoo_dir

__all__ = ["train_and_save", "register"]


def train_and_save(name: str, *, device: str = "cpu", resume: bool = True, root: pathlib.Path | None = None,
                   progress: bool = True) -> pathlib.Path:
    """Run recipe ``name`` (resuming an interrupted run) and save the result to ``<root>/<name>/``."""
    recipe = get_recipe(name)
    root = root or zoo_dir()
    return kind_of(recipe.kind).train(recipe, root / name, device=device, resume=resume, progress=progress)


def register(name: str, *, root: pathlib.Path | None = None, measure: bool = True, cpu_cost: bool = True) -> dict:
    """Hash the saved files of ``name`` and record params, FLOPs per call, training time, the recipe's CPU cost
    (``cpu_cost``) and measured metrics (``measure``; otherwise the registry's previous metrics are kept)."""
    import torch

    from ..train import process_info
    from . import evaluate
    from .registry import _load_unverified

    main = process_info()[0] == 0
    recipe = get_recipe(name)
    kind = kind_of(recipe.kind)
    root = root or zoo_dir()
    folder = root / name
    if not (folder / "train_log.json").is_file():
        raise FileNotFoundError(f"{folder} holds no trained {name!r} (no train_log.json); train it first with "
                                f"`python -m dmlab.zoo train {name}" + (f" --out {root}`" if root != zoo_dir() else "`"))
    log = json.loads((folder / "train_log.json").read_text())
    if log["config_hash"] != recipe.config_hash:
        raise ValueError(f"{folder} was trained with config hash {log['config_hash']}, the recipe now hashes to "
                         f"{recipe.config_hash}; retrain with `python -m dmlab.zoo train {name}`")
    reg = read_registry(root)
    old = reg.get(name, {})
    entry = {"kind": recipe.kind, "description": recipe.description, "recipe": recipe.to_dict(),
             "config_hash": recipe.config_hash, "files": file_table(folder),
             "train_seconds": log["train_seconds"], "train_steps": log["steps"], "train_device": log["device"],
             "torch_version": torch.__version__}
    if kind.adapter:
        base = recipe.extra["base"]
        if base not in reg:
            raise ValueError(f"base model {base!r} is not in the zoo registry; train it first "
                             f"(`python -m dmlab.zoo train {base}`)")
        entry.update(base=base, base_weights=base_fingerprint(reg[base]))
    reg[name] = dict(entry, metrics=old.get("metrics", {}))
    if main:
        write_registry(reg, root)  # files known before measuring: load() can verify them
    obj = _load_unverified(name, root)
    entry.update(kind.cost(obj, recipe))
    entry["metrics"] = kind.evaluate(name, root) if measure else old.get("metrics", {})
    # CPU cost per step is measured for the networks dmlab.zoo.train trains and for the latent pipeline; the
    # chapters' small multi-model entries record their own training time in train_log.json
    if cpu_cost and not kind.adapter and (kind.single_network or recipe.kind == "sd"):
        entry.update(evaluate.cpu_seconds_per_step(recipe))
    else:
        entry.update({k: old[k] for k in ("cpu_seconds_per_step", "cpu_minutes_estimate") if k in old})
    reg = read_registry(root)
    reg[name] = entry
    if main:
        write_registry(reg, root)
    return entry
