"""Every chapter has the book's shape: title + Colab badge, the setup cell, executed top to bottom, no errors,
no SVG, under 1 MB, 2+ checkpoint cells, listed in _toc.yml. The checker itself is tested on broken copies."""
import json
import pathlib
import shutil

import pytest

from dmlab.tools.notebooks import ROOT, check_conventions, make_notebook

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TOC = (ROOT / "_toc.yml").read_text() if (ROOT / "_toc.yml").exists() else ""


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_conventions(path):
    assert check_conventions(path, TOC) == []


def test_every_toc_notebook_exists():
    import yaml

    def files(node):
        if isinstance(node, dict):
            if "file" in node:
                yield node["file"]
            for v in node.values():
                yield from files(v)
        elif isinstance(node, list):
            for v in node:
                yield from files(v)

    toc = yaml.safe_load(TOC)
    for f in [toc["root"], *files(toc)]:
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb")), f


@pytest.fixture
def scratch_notebook():
    d = ROOT / "notebooks" / "_scratch_test"
    d.mkdir(exist_ok=True)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_checker_catches_broken_chapters(scratch_notebook):
    p = make_notebook(scratch_notebook / "99_scratch.ipynb", "Scratch", [("code", "# NBVAL_CHECK_OUTPUT\nprint(1)")],
                      papers="-", time_tiny="1 s", time_full="1 s")
    problems = check_conventions(p, TOC)
    assert any("not executed" in m for m in problems)
    assert any("checkpoint" in m for m in problems)
    assert any("_toc.yml" in m for m in problems)
    nb = json.loads(p.read_text())
    for i, c in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        c["execution_count"] = 3 - i
    nb["cells"][0]["source"] = "# Scratch\n\nno badge"
    nb["cells"][-1]["outputs"] = [{"output_type": "display_data", "data": {"image/svg+xml": "<svg/>"}, "metadata": {}}]
    p.write_text(json.dumps(nb))
    problems = check_conventions(p, TOC)
    assert any("Colab badge" in m for m in problems)
    assert any("one top-to-bottom run" in m for m in problems)
    assert any("SVG" in m for m in problems)
