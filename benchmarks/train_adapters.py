"""Train the zoo's accelerator adapters with their recipes and register them (they are zoo entries).

* ``dit_l_exit``: DeeDiff exit heads and uncertainty modules for ``dit_l`` (paper 53);
* ``dit_l_linear``: LinFusion linear attention distilled into ``dit_l`` (paper 2).

The recipes are :data:`dmlab.zoo.recipes.RECIPES` entries and the training loop is :func:`dmlab.train.fit`, so this
is the same as ``python -m dmlab.zoo train dit_l_exit``. Usage::

    python benchmarks/train_adapters.py                          # train on the CPU and register in data/zoo
    python benchmarks/train_adapters.py --device cuda --out DIR  # train elsewhere, write DIR/<name>/ only
    python benchmarks/train_adapters.py --register-from DIR      # copy DIR/<name>/ into the zoo and register it
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

NAMES = ("dit_l_exit", "dit_l_linear")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(NAMES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write weights and logs here instead of registering them")
    ap.add_argument("--register-from", default=None, help="register weights written earlier with --out")
    a = ap.parse_args(argv)
    from dmlab.zoo import zoo_dir
    from dmlab.zoo.build import register, train_and_save

    for name in a.names:
        if name not in NAMES:
            raise SystemExit(f"unknown adapter {name!r}; choose from {NAMES}")
        if a.register_from:
            dest = zoo_dir() / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(pathlib.Path(a.register_from) / name, dest)
        elif a.out:
            print(name, "saved", train_and_save(name, device=a.device, root=pathlib.Path(a.out)))
            continue
        else:
            train_and_save(name, device=a.device)
        entry = register(name)
        print(name, "registered:", {k: entry[k] for k in ("params", "train_seconds", "train_steps", "metrics")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
