"""``python -m dmlab.zoo train NAME`` | ``register NAME`` | ``list`` | ``verify``.

``train`` runs a recipe (resuming an interrupted run), saves the weights under the zoo folder and registers them
(sha256, params, FLOPs per call, training time, measured metrics). ``register`` re-measures a saved model.
``accelerate launch -m dmlab.zoo train NAME`` trains data-parallel (:func:`dmlab.train.fit`) and shards the metric
samples across the processes; the main process writes the files.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dmlab.zoo", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a recipe, save and register it")
    t.add_argument("name")
    t.add_argument("--device", default="cpu")
    t.add_argument("--fresh", action="store_true", help="ignore a saved run and start from step 0")
    t.add_argument("--no-register", action="store_true", help="save the weights, skip measuring/registering")
    t.add_argument("--out", default=None, help="zoo folder to write (default: dmlab.zoo.zoo_dir())")
    r = sub.add_parser("register", help="measure a saved model and (re)write its registry entry")
    r.add_argument("name")
    r.add_argument("--out", default=None)
    r.add_argument("--keep-metrics", action="store_true", help="re-hash and re-cost, keep the recorded metrics")
    sub.add_parser("list", help="list the registry")
    sub.add_parser("verify", help="check every registered file's sha256")
    a = p.parse_args(argv)

    import pathlib

    from . import registry_table, verify_all
    from .build import register, train_and_save

    from ..train import process_info

    main, world = process_info()[0] == 0, process_info()[1]

    def barrier():
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    def show(entry):
        if main:
            print({k: entry.get(k) for k in ("config_hash", "params", "flops_per_call", "train_seconds", "metrics")})

    if a.cmd == "train":
        folder = train_and_save(a.name, device=a.device, resume=not a.fresh,
                                root=pathlib.Path(a.out) if a.out else None)
        barrier()
        if main:
            print(f"saved {folder}" + (f" ({world} processes)" if world > 1 else ""))
        if not a.no_register:
            show(register(a.name, root=pathlib.Path(a.out) if a.out else None))
            barrier()
    elif a.cmd == "register":
        show(register(a.name, root=pathlib.Path(a.out) if a.out else None, measure=not a.keep_metrics))
    elif a.cmd == "list":
        print(registry_table())
    elif a.cmd == "verify":
        for name, ok in verify_all().items():
            print(f"{name:12s} {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
