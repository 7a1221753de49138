"""The main job (README command 1): execute every chapter at tiny scale, then build the HTML book.

``python -m dmlab.tools.book`` re-executes each notebook under ``notebooks/`` in a fresh kernel (stored outputs
are rewritten, in the same environment CI checks them in), then runs ``jupyter-book build . -W -n --keep-going``.
The book opens at ``_build/html/index.html``. ``--no-execute`` only builds; ``--only 01_forward`` picks chapters.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys

from .env import apply_ci_env
from .notebooks import execute

__all__ = ["main", "ROOT"]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmlab.tools.book", description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-execute", action="store_true", help="build from the stored outputs only")
    ap.add_argument("--only", nargs="*", default=None, help="execute only chapters whose name contains one of these")
    a = ap.parse_args(argv)
    apply_ci_env()
    if not a.no_execute:
        from tqdm import tqdm

        nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
        if a.only:
            nbs = [p for p in nbs if any(s in p.name for s in a.only)]
        for p in tqdm(nbs, desc="executing chapters", unit="nb"):
            tqdm.write(f"{p.name}: {execute(p):.1f} s")
    shutil.rmtree(ROOT / "_build", ignore_errors=True)
    jb = shutil.which("jupyter-book", path=str(pathlib.Path(sys.executable).parent)) or "jupyter-book"
    rc = subprocess.run([jb, "build", ".", "-W", "-n", "--keep-going"], cwd=ROOT).returncode
    index = ROOT / "_build/html/index.html"
    print(f"\nThe book: {index}" if rc == 0 and index.exists() else "\nThe book build failed (see above).")
    return rc


if __name__ == "__main__":
    sys.exit(main())
