"""Train the zoo's accelerator adapters with their recipes and register them.

* ``dit_l_exit``: DeeDiff exit heads and uncertainty modules for ``dit_l`` (paper 53;
  :data:`dmlab.accelerators.early_exit.EXIT_RECIPE`);
* ``dit_l_linear``: LinFusion linear attention distilled into ``dit_l`` (paper 2;
  :data:`dmlab.accelerators.linear_attention.LINEAR_RECIPE`).

Usage::

    python benchmarks/train_adapters.py                        # train on the CPU and register in data/zoo
    python benchmarks/train_adapters.py --device cuda --out DIR  # train elsewhere, write DIR/<name>/ only
    python benchmarks/train_adapters.py --register-from DIR      # register weights trained elsewhere
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

NAMES = ("dit_l_exit", "dit_l_linear")


def _build(name: str, device: str, steps: int | None):
    if name == "dit_l_exit":
        from dmlab.accelerators.early_exit import build_exit_heads

        return build_exit_heads(None, device=device, steps=steps)
    from dmlab.accelerators.linear_attention import build_linear_attention

    return build_linear_attention(None, device=device, steps=steps)


def _register(name: str, module, log: dict) -> dict:
    if name == "dit_l_exit":
        from dmlab.accelerators.early_exit import EXIT_RECIPE, save_exit_heads

        return save_exit_heads(module, name, base=EXIT_RECIPE["base"], recipe=EXIT_RECIPE, log=log)
    from dmlab.accelerators.linear_attention import LINEAR_RECIPE, save_linear_attention

    return save_linear_attention(module, name, base=LINEAR_RECIPE["base"], recipe=LINEAR_RECIPE, log=log)


def _empty(name: str):
    from dmlab import zoo

    if name == "dit_l_exit":
        from dmlab.accelerators.early_exit import exit_heads_for

        return exit_heads_for(zoo.load("dit_l"))
    from dmlab.accelerators.linear_attention import LINEAR_RECIPE, linear_attention_for

    return linear_attention_for(zoo.load("dit_l"), mid_dim=LINEAR_RECIPE["mid_dim"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(NAMES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write weights and logs here instead of registering them")
    ap.add_argument("--register-from", default=None, help="register weights written earlier with --out")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's steps (a smoke test; needs --out)")
    a = ap.parse_args(argv)
    from safetensors.torch import load_file, save_file

    for name in a.names:
        if name not in NAMES:
            raise SystemExit(f"unknown adapter {name!r}; choose from {NAMES}")
        if a.register_from:
            folder = pathlib.Path(a.register_from) / name
            module = _empty(name)
            module.load_state_dict(load_file(str(folder / "model.safetensors")))
            entry = _register(name, module.cpu().eval(), json.loads((folder / "log.json").read_text()))
            print(name, "registered:", {k: entry[k] for k in ("params", "train_seconds", "train_steps")})
            continue
        if a.steps is not None and not a.out:
            raise SystemExit("--steps changes the recipe: use it with --out (a smoke test), never to register")
        module = _build(name, a.device, a.steps).cpu().eval()
        log = module.train_log
        print(name, f"{log['train_seconds']} s", "loss", log["loss"][0], "->", log["loss"][-1], flush=True)
        if a.out:
            folder = pathlib.Path(a.out) / name
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
            (folder / "log.json").write_text(json.dumps(log))
        else:
            _register(name, module, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
