"""What CI runs (README command 2): unit tests, nbval over the chapters, and the book build.

``python -m dmlab.tools.test`` runs, in the chapter environment (:mod:`dmlab.tools.env`):

1. ``pytest tests/`` (2 workers);
2. ``pytest --nbval-lax notebooks/``: every chapter re-executed in a fresh kernel; cells marked
   ``# NBVAL_CHECK_OUTPUT`` must print what is stored (the chapter's key numbers);
3. ``jupyter-book build . -W -n --keep-going`` on the stored outputs (warnings are errors);
4. ``python -m dmlab.tools.pages``: every built page opened in headless Chromium at 1400x900 (overflowing code,
   outputs or tables, unrendered math, network requests; screenshots under ``_build/screenshots``). Skipped, with a
   message, where Chromium, ChromeDriver or selenium is missing (``.ci/run`` installs them with apt-get).

Every step runs even if an earlier one failed; the exit status is non-zero if any failed. ``--quick`` runs only
step 1. Options after ``--`` go to every pytest call (e.g. ``-- -k orders``).
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import time

from .env import apply_ci_env

__all__ = ["main", "ROOT"]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(name: str, cmd: list[str], timeout: int) -> bool:
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        ok = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"=== {name}: timed out after {timeout} s", flush=True)
        ok = False
    print(f"=== {name}: {'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return ok


def _browser_missing() -> str:
    """What the page check lacks on this machine ('' when it can run)."""
    import importlib.util

    from .pages import browser_paths

    chromium, driver = browser_paths()
    missing = [n for n, p in (("Chromium", chromium), ("ChromeDriver", driver)) if p is None]
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium")
    return " and ".join(missing)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmlab.tools.test", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="unit tests only")
    ap.add_argument("--workers", default="2", help="pytest-xdist workers (default 2)")
    ap.add_argument("pytest_args", nargs="*")
    a = ap.parse_args(argv)
    apply_ci_env()
    py = sys.executable
    results = {"unit tests": _run("unit tests", [py, "-m", "pytest", "-q", "-n", a.workers, "tests/", *a.pytest_args],
                                  timeout=45 * 60)}
    if not a.quick:
        nbs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))
        results["chapters (nbval)"] = _run("chapters (nbval)", [
            py, "-m", "pytest", "-q", "--nbval-lax", "--nbval-current-env",
            "--nbval-sanitize-with", ".ci/nbval_sanitize.cfg", "--nbval-cell-timeout", "600",
            "-n", a.workers, "--dist", "loadscope", "-p", "no:randomly", *nbs, *a.pytest_args], timeout=50 * 60)
        shutil.rmtree(ROOT / "_build", ignore_errors=True)
        jb = shutil.which("jupyter-book", path=str(pathlib.Path(py).parent)) or "jupyter-book"
        ok = _run("book", [jb, "build", ".", "-W", "-n", "--keep-going"], timeout=15 * 60)
        results["book"] = ok and (ROOT / "_build/html/index.html").exists()
        missing = _browser_missing()
        if not results["book"]:
            print("\n=== pages: skipped (no book was built)", flush=True)
        elif missing:
            print(f"\n=== pages: SKIPPED, {missing} not installed (apt-get install chromium chromium-driver; "
                  "pip install selenium)", flush=True)
        else:
            results["pages"] = _run("pages", [py, "-m", "dmlab.tools.pages"], timeout=5 * 60)
    print("\n=== summary: " + ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
