"""``python -m dmlab.zoo train NAME`` | ``register NAME`` | ``list`` | ``verify``.

``train`` runs a recipe (resuming an interrupted run), saves the weights under the zoo folder and registers them
(sha256, params, FLOPs per call, training time, measured metrics). ``register`` re-measures a saved model.
A user error (unknown name, nothing trained in ``--out``, a broken registry, no GPU for ``--device cuda``) is one
line on stderr, ``python -m dmlab.zoo: error: ...``, and exit status 2, as for argparse's own errors.
``accelerate launch -m dmlab.zoo train NAME`` trains data-parallel (:func:`dmlab.train.fit`) and shards the metric
samples across the processes; the main process writes the files.
"""
from __future__ import annotations

import argparse
import sys


PROG = "python -m dmlab.zoo"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): ``PROG: error: message``, exit status 2."""

    def error(self, message):
        _fail(f"{message} (see `{PROG} -h`)")


def _fail(message: str):
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


def main(argv=None) -> int:
    """Run the command line; user errors end in one line on stderr and exit status 2 (see the module docstring)."""
    from .store import ZooIntegrityError

    try:
        return _main(argv)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ZooIntegrityError) as err:
        _fail(str(err) or type(err).__name__)


def _main(argv=None) -> int:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    from .recipes import get_recipe

    if a.cmd in ("train", "register"):
        get_recipe(a.name)  # an unknown name fails here, before anything is imported or trained
        if a.out is not None and pathlib.Path(a.out).exists() and not pathlib.Path(a.out).is_dir():
            raise NotADirectoryError(f"--out {a.out} is a file; pass a folder (it is created if missing)")
    if a.cmd == "train" and a.device != "cpu":
        import torch

        try:
            dev = torch.device(a.device)
        except RuntimeError as err:
            raise ValueError(f"--device {a.device!r} is not a torch device ({err}); use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {a.device} but no GPU is visible; use --device cpu")

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
