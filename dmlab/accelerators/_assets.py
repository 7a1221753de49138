"""Small trained accelerator weights (exit heads, linear-attention modules) stored next to the zoo models.

Their files sit in the zoo folder (``data/zoo/<name>/``) and go through the zoo's store (:mod:`dmlab.zoo.store`:
``file_table``, ``fetch``, ``sha256``), so every file's hash is recorded and checked before loading, and a pip install
without the checkout downloads them like the zoo models. Their registry is a file of its own,
``data/zoo/adapters.json``, so the zoo's ``registry.json`` keeps exactly one entry per zoo recipe. An entry looks like
a zoo entry with ``kind`` set to the adapter kind (``"exit_heads"``, ``"linear_attention"``) and ``base`` naming the zoo model it belongs to (with a fingerprint
of that model's files, so a retrained base is detected).
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import time

import torch

ADAPTER_KINDS = ("exit_heads", "linear_attention")
REGISTRY = "adapters.json"


def read_adapters(root: pathlib.Path | None = None) -> dict:
    """The adapter registry ``{name: entry}`` of the zoo folder (downloaded first when the zoo is remote)."""
    import os

    from ..zoo.store import _download, checkout_zoo_dir, raw_url, zoo_dir

    path = (root or zoo_dir()) / REGISTRY
    if not path.is_file():
        if root is None and checkout_zoo_dir() is None and not os.environ.get("DMLAB_DATA"):
            _download(raw_url(REGISTRY), path)
        else:
            return {}
    return json.loads(path.read_text())


def write_adapters(reg: dict, root: pathlib.Path | None = None) -> pathlib.Path:
    """Write the adapter registry sorted by name."""
    from ..zoo.store import zoo_dir

    path = (root or zoo_dir()) / REGISTRY
    path.write_text(json.dumps({k: reg[k] for k in sorted(reg)}, indent=1) + "\n")
    return path


def recipe_hash(recipe: dict) -> str:
    """sha256 (16 hex digits) of the canonical JSON of an adapter's recipe."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def base_fingerprint(entry: dict) -> str:
    """A hash of the sha256 of the weight files of a registry entry: changes whenever the base model is retrained."""
    shas = sorted(meta["sha256"] for rel, meta in entry.get("files", {}).items() if rel.endswith(".safetensors"))
    return hashlib.sha256("".join(shas).encode()).hexdigest()[:16]


def save_adapter(name: str, module: torch.nn.Module, *, kind: str, base: str, config: dict, recipe: dict,
                 description: str, log: dict, root: pathlib.Path | None = None) -> dict:
    """Write ``module``'s weights (safetensors), its ``config`` and training ``log`` to ``<zoo>/<name>/`` and
    register them (``kind``, ``base`` and its config hash, the recipe and its hash, file hashes, params)."""
    from safetensors.torch import save_file

    from ..zoo.store import file_table, read_registry, zoo_dir

    if kind not in ADAPTER_KINDS:
        raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {kind!r}")
    root = root or zoo_dir()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    (folder / "train_log.json").write_text(json.dumps(log, sort_keys=True) + "\n")
    reg = read_registry(root)
    if base not in reg:
        raise ValueError(f"base model {base!r} is not in the zoo registry; train it first "
                         f"(`python -m dmlab.zoo train {base}`)")
    entry = {"kind": kind, "description": description, "base": base, "base_weights": base_fingerprint(reg[base]),
             "recipe": recipe, "config_hash": recipe_hash(recipe), "files": file_table(folder),
             "train_seconds": log.get("train_seconds"), "train_steps": log.get("steps"),
             "params": sum(p.numel() for p in module.parameters()), "torch_version": torch.__version__,
             "metrics": log.get("metrics", {}), "saved": time.strftime("%Y-%m-%d")}
    reg = read_adapters(root)
    reg[name] = entry
    write_adapters(reg, root)
    return entry


def load_adapter(name: str, *, kind: str, root: pathlib.Path | None = None) -> tuple[dict, dict, dict]:
    """``(state_dict, config, registry entry)`` of a registered adapter after checking every file's sha256."""
    from safetensors.torch import load_file

    from ..zoo.store import fetch, read_registry, zoo_dir

    reg = read_adapters(root)
    if name not in reg:
        raise FileNotFoundError(f"no adapter {name!r} in {(root or zoo_dir()) / REGISTRY}; train it with its recipe "
                                f"(python benchmarks/train_adapters.py {name}) or use the chapter's fallback")
    entry = reg[name]
    if entry.get("kind") != kind:
        raise ValueError(f"adapter {name!r} is a {entry.get('kind')!r}, not {kind!r}")
    base = read_registry(root).get(entry["base"])
    if base is not None and base_fingerprint(base) != entry.get("base_weights"):
        raise ValueError(f"adapter {name!r} was trained on other weights of {entry['base']!r} than the registered "
                         f"ones (the base model was retrained); retrain the adapter with its recipe")
    folder = fetch(name, entry, root)
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    return state, config, entry
