"""Make, execute and check the book's chapters.

* :func:`make_notebook` writes a chapter from a list of cells, with the standard first two cells (title + Colab
  badge + papers; the setup cell) so every chapter starts the same way.
* :func:`execute` runs a notebook top to bottom in a fresh kernel in the CI environment and stores its outputs
  (and widget state), which is what the book shows and what nbval re-checks.
* :func:`check_conventions` lists what a chapter does wrong (used by ``tests/test_notebooks.py``).

``python -m dmlab.tools.notebooks run notebooks/01_forward_and_exact.ipynb`` re-executes chapters in place;
``python -m dmlab.tools.notebooks check`` checks them all; ``... retarget`` points the badges, setup cells and
``_config.yml`` at the repository and tag in :mod:`dmlab._meta`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

from .. import _meta
from .._meta import colab_url

__all__ = ["badge", "header", "setup_source", "needs_gpu", "make_notebook", "execute", "check_conventions",
           "retarget", "main", "ROOT", "MAX_BYTES", "SETUP_SOURCE"]

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_BYTES = 1_000_000



def setup_source(repo: str | None = None, ref: str | None = None) -> str:
    """The standard setup cell: on Colab it installs dmlab from ``repo`` at ``ref`` (``dmlab._meta``; the
    environment variables ``DMLAB_REPO`` / ``DMLAB_REF`` override them in the running notebook too)."""
    repo, ref = repo or _meta.REPO, ref or _meta.REF
    return f'''# Setup: on Colab this installs dmlab; elsewhere it only seeds and configures.
import os, sys
if "google.colab" in sys.modules:
    repo = os.environ.get("DMLAB_REPO") or "{repo}"
    ref = os.environ.get("DMLAB_REF") or "{ref}"  # a release tag or commit
    %pip install -q "dmlab[all] @ git+https://github.com/{{repo}}@{{ref}}"
import dmlab
SCALE, gen = dmlab.setup(seed=0)
print(SCALE)'''


SETUP_SOURCE = setup_source()


def badge(path: str) -> str:
    """Markdown of the Open-in-Colab badge for a notebook path relative to the repository root (the badge image
    is the book's own ``_static/colab-badge.svg``: nothing is fetched to show it)."""
    up = "../" * path.count("/")
    return f"[![Open In Colab]({up}_static/colab-badge.svg)]({colab_url(path)})"


def needs_gpu(cells) -> bool:
    """Whether a chapter has full-scale cells (``SCALE.full``): only those ask Colab for a GPU runtime."""
    return any(c["cell_type"] == "code" and "SCALE.full" in "".join(c.get("source", "")) for c in cells)


def _gpu_metadata(nb) -> None:
    nb.metadata.setdefault("colab", {"provenance": []})
    if needs_gpu(nb.cells):
        nb.metadata["accelerator"] = "GPU"
        nb.metadata["colab"]["gpuType"] = "T4"
    else:
        nb.metadata.pop("accelerator", None)
        nb.metadata["colab"].pop("gpuType", None)


def header(path: str, title: str, *, papers: str, time_tiny: str, time_full: str, intro: str = "") -> str:
    """The first markdown cell of a chapter: title, badge, run times and the papers it covers."""
    return (f"# {title}\n\n{badge(path)}\n\n"
            f"*Runs in {time_tiny} on a laptop CPU at tiny scale (the default); {time_full} at full scale "
            f"(`DMLAB_SCALE=full`, a Colab GPU).*  \n*Papers:* {papers}\n\n{intro}").rstrip() + "\n"


def make_notebook(path: str | pathlib.Path, title: str, cells: list, *, papers: str, time_tiny: str,
                  time_full: str, intro: str = ""):
    """Write a chapter. ``cells`` holds ``("md", text)``, ``("code", source)`` or ``("code", source, [tags])``.

    Cells 0 and 1 (header and setup) are added here. A code cell whose first line is ``# NBVAL_CHECK_OUTPUT`` is a
    checkpoint nbval re-checks; tag timing and widget cells ``nbval-ignore-output``.
    """
    import nbformat

    path = pathlib.Path(path)
    rel = path.resolve().relative_to(ROOT).as_posix()
    nb = nbformat.v4.new_notebook()
    nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                        "language_info": {"name": "python"},
                        "colab": {"provenance": []}})
    nb.cells.append(nbformat.v4.new_markdown_cell(header(rel, title, papers=papers, time_tiny=time_tiny,
                                                         time_full=time_full, intro=intro)))
    setup = nbformat.v4.new_code_cell(SETUP_SOURCE)
    setup.metadata["tags"] = ["nbval-ignore-output", "hide-input"]
    nb.cells.append(setup)
    for c in cells:
        kind, src = c[0], c[1].strip("\n")
        tags = list(c[2]) if len(c) > 2 else []
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        if kind not in ("md", "code"):
            raise ValueError(f"cell kind must be 'md' or 'code', got {kind!r}")
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids: diffs stay readable
        cell["id"] = f"c{i:03d}"
    _gpu_metadata(nb)
    nbformat.write(nb, path)
    return path


def execute(path: str | pathlib.Path, *, timeout: int = 600) -> float:
    """Execute a notebook in place in a fresh kernel, in the CI environment; return the wall time in seconds."""
    import nbformat
    from nbclient import NotebookClient

    from .env import apply_ci_env

    apply_ci_env()
    path = pathlib.Path(path)
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    for cell in nb.cells:  # no per-cell timing metadata: re-execution diffs show only real changes
        cell.metadata.pop("execution", None)
    # widget state of an earlier run (e.g. progress bars since switched off) would make the book load the widget
    # manager for nothing; nbclient stores the state of this run's widgets again
    nb.metadata.pop("widgets", None)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True, record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - t0
    nbformat.write(nb, path)
    return elapsed


WIDTH = 88  # characters of code and printed output the book's pages show without scrolling


def check_conventions(path: str | pathlib.Path, toc_text: str | None = None) -> list[str]:
    """The conventions a chapter breaks, as readable problems; empty when it is fine."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"no notebook at {path}; pass a chapter such as notebooks/01_forward_and_exact.ipynb")
    try:
        rel = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        raise ValueError(f"{path} is outside the repository ({ROOT}): chapters are checked where the book holds "
                         "them (their Colab badge names that path); copy it into notebooks/ first") from None
    problems = []
    try:
        nb = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{rel} is not a notebook (invalid JSON: {err})") from None
    if not isinstance(nb, dict):
        raise ValueError(f"{rel} is not a notebook (its JSON is not an object with 'cells')")
    cells = nb.get("cells", [])
    src = lambda c: "".join(c.get("source", ""))  # noqa: E731
    if path.stat().st_size > MAX_BYTES:
        problems.append(f"{rel} is {path.stat().st_size / 1e6:.2f} MB; keep chapters under 1 MB (smaller figures, fewer outputs)")
    if not re.match(r"^\d\d_[a-z0-9_]+\.ipynb$", path.name):
        problems.append(f"{path.name}: name chapters NN_topic.ipynb")
    if len(cells) < 2 or cells[0]["cell_type"] != "markdown" or not src(cells[0]).startswith("# "):
        problems.append(f"{rel}: cell 0 must be a markdown title ('# ...')")
    elif badge(rel) not in src(cells[0]):
        problems.append(f"{rel}: cell 0 must hold the Colab badge for this path ({badge(rel)}); "
                        "python -m dmlab.tools.notebooks retarget writes it")
    if len(cells) < 2 or cells[1]["cell_type"] != "code" or src(cells[1]) != SETUP_SOURCE:
        problems.append(f"{rel}: cell 1 must be the standard setup cell (dmlab.tools.notebooks.SETUP_SOURCE); "
                        "python -m dmlab.tools.notebooks retarget writes it")
    meta = nb.get("metadata", {})
    if needs_gpu(cells) != (meta.get("accelerator") == "GPU"):
        problems.append(f"{rel}: ask Colab for a GPU (metadata accelerator) exactly when the chapter has "
                        "full-scale cells (SCALE.full); python -m dmlab.tools.notebooks retarget sets it")
    code = [c for c in cells if c["cell_type"] == "code" and src(c).strip()]
    counts = [c.get("execution_count") for c in code]
    if any(n is None for n in counts):
        problems.append(f"{rel}: {sum(n is None for n in counts)} code cell(s) not executed; run "
                        f"python -m dmlab.tools.notebooks run {rel}")
    elif counts != list(range(1, len(counts) + 1)):
        problems.append(f"{rel}: stored outputs are not from one top-to-bottom run; re-execute it")
    rich = ("text/markdown", "text/html", "image/png", "application/vnd.jupyter.widget-view+json")
    for k, c in enumerate(code):
        wide = [len(line) for line in src(c).split("\n") if len(line) > WIDTH]
        if wide:
            problems.append(f"{rel}: code cell {k + 1} has a line of {max(wide)} characters; the book shows "
                            f"{WIDTH}: split it (format the cell as black -l {WIDTH} would)")
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                text = "".join(o.get("text", ""))
            elif "text/plain" in o.get("data", {}) and not any(r in o["data"] for r in rich):
                text = "".join(o["data"]["text/plain"])
            else:
                text = ""
            wide = [len(line) for line in text.split("\n") if len(line) > WIDTH]
            if wide:
                problems.append(f"{rel}: code cell {k + 1} prints a line of {max(wide)} characters; the book "
                                f"shows {WIDTH}: print narrower columns or wrap (textwrap.fill)")
            if o.get("output_type") == "error":
                problems.append(f"{rel}: a stored output is an error ({o.get('ename')})")
            if "image/svg+xml" in o.get("data", {}):
                problems.append(f"{rel}: SVG output found; figures must be PNG (nbval compares SVG as text)")
    checks = sum(1 for c in code if src(c).lstrip().startswith("# NBVAL_CHECK_OUTPUT")
                 or "nbval-check-output" in c.get("metadata", {}).get("tags", []))
    if checks < 2:
        problems.append(f"{rel}: {checks} checkpoint cell(s); a chapter needs 2-4 '# NBVAL_CHECK_OUTPUT' cells with its key numbers")
    if toc_text is not None and f"notebooks/{path.stem}" not in toc_text:
        problems.append(f"{rel}: not listed in _toc.yml")
    return problems


def retarget(paths=None, *, config: bool = True) -> list[str]:
    """Point the book at ``dmlab._meta`` (``REPO``/``REF``, or ``DMLAB_REPO``/``DMLAB_REF``): each chapter's badge
    (cell 0), setup cell (cell 1) and Colab GPU metadata, and the repository settings in ``_config.yml``. Only
    those are rewritten (no re-execution needed: the setup cell's output is not checked); ``config=False``
    leaves ``_config.yml`` alone. Returns what changed."""
    import nbformat

    changed = []
    paths = [pathlib.Path(p) for p in paths] if paths else sorted((ROOT / "notebooks").glob("*.ipynb"))
    for p in paths:
        rel = p.resolve().relative_to(ROOT).as_posix()
        nb = nbformat.read(p, as_version=4)
        before = nbformat.writes(nb)
        nb.cells[0].source = re.sub(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)", lambda m: badge(rel),
                                    nb.cells[0].source)
        nb.cells[1].source = SETUP_SOURCE
        _gpu_metadata(nb)
        if nbformat.writes(nb) != before:
            nbformat.write(nb, p)
            changed.append(rel)
    cfg = ROOT / "_config.yml"
    if config and cfg.exists():
        text = cfg.read_text()
        new = re.sub(r"(?m)^(  url: )https://github\.com/\S+", lambda m: m.group(1) + _meta.REPO_URL, text)
        new = re.sub(r"(?m)^(  branch: )\S+", lambda m: m.group(1) + _meta.REF, new)
        if new != text:
            cfg.write_text(new)
            changed.append("_config.yml")
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmlab.tools.notebooks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute chapters in place (stored outputs)")
    r.add_argument("paths", nargs="*", help="notebooks (default: all of notebooks/)")
    sub.add_parser("check", help="check every chapter's conventions")
    t = sub.add_parser("retarget", help="rewrite badges, setup cells, GPU metadata and _config.yml for dmlab._meta")
    t.add_argument("paths", nargs="*", help="notebooks (default: all of notebooks/)")
    a = ap.parse_args(argv)
    paths = [pathlib.Path(p) for p in getattr(a, "paths", [])] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if a.cmd == "run":
        from tqdm import tqdm

        for p in tqdm(paths, desc="chapters", unit="nb"):
            tqdm.write(f"{p.name}: {execute(p):.1f} s")
        return 0
    if a.cmd == "retarget":
        changed = retarget(paths)
        print(f"retargeted to {_meta.REPO}@{_meta.REF}: " + (", ".join(changed) or "nothing to change"))
        return 0
    toc = (ROOT / "_toc.yml").read_text() if (ROOT / "_toc.yml").exists() else ""
    bad = [msg for p in paths for msg in check_conventions(p, toc)]
    print("\n".join(bad) or f"{len(paths)} chapters follow the conventions")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
