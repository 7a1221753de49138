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
    assert not any("characters" in m for m in problems)
    nb["cells"][-1]["source"] = "x = " + "1 + " * 30 + "1"
    nb["cells"][-1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "y" * 89 + "\n"}]
    p.write_text(json.dumps(nb))
    problems = check_conventions(p, TOC)
    assert any("has a line of 125 characters" in m for m in problems)
    assert any("prints a line of 89 characters" in m for m in problems)


def test_repository_and_tag_are_one_setting_overridable_by_the_environment():
    import subprocess
    import sys

    code = ("from dmlab import _meta; from dmlab.tools import notebooks as n; from dmlab.zoo import store; "
            "print(_meta.REPO, _meta.REF); print(n.SETUP_SOURCE); print(n.badge('notebooks/01_x.ipynb')); "
            "print(store.raw_url('unet_s/model.safetensors'))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DMLAB_REPO": "someone/fork", "DMLAB_REF": "abc1234"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "someone/fork abc1234"
    assert '"someone/fork"' in out.stdout and '"abc1234"' in out.stdout  # the setup cell's defaults
    assert "github/someone/fork/blob/abc1234/notebooks/01_x.ipynb" in out.stdout
    assert "githubusercontent.com/someone/fork/abc1234/data/zoo/unet_s/model.safetensors" in out.stdout
    bad = subprocess.run([sys.executable, "-c", "import dmlab._meta"], env=dict(env, DMLAB_REPO="no-slash"),
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "owner/name" in bad.stderr
    from dmlab import _meta
    from dmlab.tools.notebooks import SETUP_SOURCE

    assert _meta.REF != "main" and "@main" not in SETUP_SOURCE  # installs are pinned to a tag or commit
    assert f"url: {_meta.REPO_URL}" in (ROOT / "_config.yml").read_text()
    assert f"branch: {_meta.REF}" in (ROOT / "_config.yml").read_text()


def test_retarget_restores_badge_setup_cell_and_gpu_metadata(scratch_notebook):
    from dmlab import _meta
    from dmlab.tools.notebooks import retarget

    cpu = make_notebook(scratch_notebook / "98_cpu.ipynb", "CPU", [("code", "x = 1")], papers="-",
                        time_tiny="1 s", time_full="1 s")
    gpu = make_notebook(scratch_notebook / "97_gpu.ipynb", "GPU", [("code", "if SCALE.full:\n    pass")],
                        papers="-", time_tiny="1 s", time_full="1 s")
    assert "accelerator" not in json.loads(cpu.read_text())["metadata"]
    assert json.loads(gpu.read_text())["metadata"]["accelerator"] == "GPU"
    nb = json.loads(cpu.read_text())
    nb["metadata"]["accelerator"] = "GPU"
    src = lambda c: "".join(c["source"])  # noqa: E731
    nb["cells"][0]["source"] = src(nb["cells"][0]).replace("_static/colab-badge.svg", "https://x/badge.svg")
    nb["cells"][1]["source"] = src(nb["cells"][1]).replace(f'"{_meta.REF}"', '"main"')
    cpu.write_text(json.dumps(nb))
    problems = check_conventions(cpu)
    assert any("Colab badge" in m for m in problems) and any("setup cell" in m for m in problems)
    assert any("GPU" in m for m in problems)
    assert retarget([cpu, gpu], config=False) == [cpu.relative_to(ROOT).as_posix()]
    problems = check_conventions(cpu)
    assert not any("Colab badge" in m or "setup cell" in m or "GPU" in m for m in problems), problems


def _declared_distributions() -> set[str]:
    """``dmlab`` plus ``dmlab[all]`` from pyproject.toml, with what they require in turn (installed metadata)."""
    import re
    import tomllib
    from importlib import metadata

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = proj["optional-dependencies"]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    name = lambda req: re.match(r"[A-Za-z0-9_.-]+", req).group(0)  # noqa: E731
    todo, seen = list(proj["dependencies"]), set()

    def expand(extra):
        for req in extras[extra]:
            m = re.match(r"dmlab\[([^\]]+)\]", req)
            if m:
                for e in m.group(1).split(","):
                    expand(e.strip())
            else:
                todo.append(req)

    expand("all")
    while todo:
        req = todo.pop()
        if ";" in req and "extra ==" in req:
            continue
        n = norm(name(req))
        if n in seen:
            continue
        seen.add(n)
        try:
            todo += metadata.requires(n) or []
        except metadata.PackageNotFoundError:
            pass
    return seen


def _chapter_imports() -> dict[str, set[str]]:
    import ast
    import sys

    found = {}
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            lines = "".join(cell["source"]).splitlines()
            src = "\n".join(ln[: len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip().startswith(("%", "!")) else ln
                            for ln in lines)
            for node in ast.walk(ast.parse(src)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "dmlab":
                        found.setdefault(top, set()).add(path.stem)
    return found


def test_dmlab_all_satisfies_every_chapter_import():
    """``pip install dmlab[all]`` (Colab's setup cell) alone provides every module a chapter imports."""
    from importlib import metadata

    dists = metadata.packages_distributions()
    declared = _declared_distributions()
    imports = _chapter_imports()
    assert {"torch", "matplotlib"} <= set(imports)  # the parser sees the chapters' imports
    missing = {}
    for mod, chapters in imports.items():
        # a module not installed here (a full-scale-only import) is taken to come from the distribution of its name
        provided = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not provided & declared:
            missing[mod] = f"from {sorted(provided)}, not in dmlab[all] (chapters {sorted(chapters)})"
    assert not missing, f"add to pyproject.toml's optional dependencies: {missing}"
