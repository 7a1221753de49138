"""Trained accelerator weights (exit heads, linear-attention modules) as zoo entries.

Adapters are entries of the zoo's one registry (``data/zoo/registry.json``) like the models: a recipe in
:data:`dmlab.zoo.recipes.RECIPES` (``dit_l_exit``, ``dit_l_linear``), ``kind`` set to the adapter kind
(:data:`dmlab.zoo.kinds.ADAPTER_KINDS`), ``base`` naming the zoo model they belong to with a fingerprint of that
model's weight files (a retrained base is detected), and every file's sha256 checked before loading. ``zoo.load(
"dit_l_exit")`` returns them; the functions here serve the accelerators' ``save_*`` / ``load_*`` helpers.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import time

import torch

from ..zoo.kinds import ADAPTER_KINDS
from ..zoo.store import base_fingerprint

__all__ = ["ADAPTER_KINDS", "read_adapters", "recipe_hash", "base_fingerprint", "save_adapter", "load_adapter"]


def read_adapters(root: pathlib.Path | None = None) -> dict:
    """The adapter entries ``{name: entry}`` of the zoo registry."""
    from ..zoo.store import read_registry

    return {k: v for k, v in read_registry(root).items() if v.get("kind") in ADAPTER_KINDS}


def recipe_hash(recipe) -> str:
    """The config hash of an adapter recipe: a zoo ``Recipe``'s own, or sha256 (16 hex digits) of a dict's
    canonical JSON."""
    if hasattr(recipe, "config_hash"):
        return recipe.config_hash
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def save_adapter(name: str, module: torch.nn.Module, *, kind: str, base: str, config: dict, recipe,
                 description: str, log: dict, root: pathlib.Path | None = None) -> dict:
    """Write ``module``'s weights (safetensors), its ``config`` and training ``log`` to ``<zoo>/<name>/`` and
    register them in the zoo registry (``kind``, ``base`` and its fingerprint, the recipe and its hash, file
    hashes, params)."""
    from safetensors.torch import save_file

    from ..zoo.store import file_table, read_registry, write_registry, zoo_dir

    if kind not in ADAPTER_KINDS:
        raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {kind!r}")
    root = root or zoo_dir()
    reg = read_registry(root)
    if base not in reg:
        raise ValueError(f"base model {base!r} is not in the zoo registry; train it first "
                         f"(`python -m dmlab.zoo train {base}`)")
    from ..zoo.kinds import adapter_recipe_dict
    from ..zoo.recipes import RECIPES

    if name in RECIPES and not hasattr(recipe, "config_hash") and adapter_recipe_dict(RECIPES[name]) == recipe:
        recipe = RECIPES[name]  # the zoo recipe these settings spell out: its hash is the entry's
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    chash = recipe_hash(recipe)
    (folder / "train_log.json").write_text(json.dumps(dict(log, config_hash=chash), sort_keys=True) + "\n")
    entry = {"kind": kind, "description": description, "base": base, "base_weights": base_fingerprint(reg[base]),
             "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe, "config_hash": chash,
             "files": file_table(folder), "train_seconds": log.get("train_seconds"), "train_steps": log.get("steps"),
             "train_device": log.get("device"), "params": sum(p.numel() for p in module.parameters()),
             "torch_version": torch.__version__, "metrics": log.get("metrics", {}), "saved": time.strftime("%Y-%m-%d")}
    reg[name] = entry
    write_registry(reg, root)
    return entry


def load_adapter(name: str, *, kind: str, root: pathlib.Path | None = None) -> tuple[dict, dict, dict]:
    """``(state_dict, config, registry entry)`` of a registered adapter after checking its base and every file's
    sha256."""
    from safetensors.torch import load_file

    from ..zoo.registry import _check_base
    from ..zoo.store import fetch, read_registry, zoo_dir

    reg = read_registry(root)
    if name not in reg:
        raise FileNotFoundError(f"no adapter {name!r} in {(root or zoo_dir()) / 'registry.json'}; train it with its "
                                f"recipe (`python -m dmlab.zoo train {name}`) or use the chapter's fallback")
    entry = reg[name]
    if entry.get("kind") != kind:
        raise ValueError(f"zoo entry {name!r} is a {entry.get('kind')!r}, not {kind!r}")
    _check_base(name, entry, root)
    folder = fetch(name, entry, root)
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    return state, config, entry
