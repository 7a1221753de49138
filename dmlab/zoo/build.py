"""Train a recipe, save it under the zoo folder, and write its registry entry (what ``python -m dmlab.zoo`` runs)."""
from __future__ import annotations

import json
import pathlib

from .recipes import get_recipe
from .store import file_table, read_registry, write_registry, zoo_dir


def train_and_save(name: str, *, device: str = "cpu", resume: bool = True, root: pathlib.Path | None = None,
                   progress: bool = True) -> pathlib.Path:
    """Run recipe ``name`` (resuming an interrupted run) and save the result to ``<root>/<name>/``."""
    recipe = get_recipe(name)
    root = root or zoo_dir()
    if recipe.kind == "sd":
        from .latent import train_pipeline

        return train_pipeline(recipe, root / name, device=device, resume=resume, progress=progress)
    from .train import save_model, train

    model, log = train(recipe, device=device, resume=resume, progress=progress)
    return save_model(recipe, model, log, root / name)


def register(name: str, *, root: pathlib.Path | None = None, measure: bool = True, cpu_cost: bool = True) -> dict:
    """Hash the saved files of ``name`` and record params, FLOPs per call, training time, the recipe's CPU cost
    (``cpu_cost``) and measured metrics (``measure``; otherwise the registry's previous metrics are kept)."""
    import torch

    from . import _load_unverified, evaluate

    recipe = get_recipe(name)
    root = root or zoo_dir()
    folder = root / name
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
    reg[name] = dict(entry, metrics=old.get("metrics", {}))
    write_registry(reg, root)  # files known before measuring: load() can verify them
    obj = _load_unverified(name, root)
    if recipe.kind == "sd":
        from .latent import measure_pipeline, pipeline_cost

        entry.update(pipeline_cost(obj))
        metrics = measure_pipeline(obj) if measure else old.get("metrics", {})
    else:
        entry["params"] = sum(p.numel() for p in obj.parameters())
        entry["flops_per_call"] = evaluate.flops_per_call(obj, recipe.kind, recipe.size)
        if not measure:
            metrics = old.get("metrics", {})
        elif recipe.kind == "classifier":
            metrics = evaluate.measure_classifier()
        else:
            metrics = evaluate.measure_digits_model(name)
    if cpu_cost:
        entry.update(evaluate.cpu_seconds_per_step(recipe))
    else:
        entry.update({k: old[k] for k in ("cpu_seconds_per_step", "cpu_minutes_estimate") if k in old})
    entry["metrics"] = metrics
    reg = read_registry(root)
    reg[name] = entry
    write_registry(reg, root)
    return entry
