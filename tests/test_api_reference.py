"""book/api.md documents every public module (a module with ``__all__``), and every ``api`` field of the paper map
names an object that the page documents (so its link in the paper map resolves)."""
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import dmlab
from dmlab import papermap

ROOT = Path(dmlab.__file__).resolve().parent.parent
API = (ROOT / "book/api.md").read_text()
DOCUMENTED = set(re.findall(r"^\.\. automodule:: (\S+)", API, re.M))


def _public_modules():
    for m in pkgutil.walk_packages(dmlab.__path__, "dmlab."):
        if ".tools" in m.name or m.name == "dmlab.papermap" or m.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        if m.ispkg or getattr(importlib.import_module(m.name), "__all__", None):
            yield m.name


def test_every_public_module_is_in_the_api_reference():
    missing = sorted(set(_public_modules()) - DOCUMENTED)
    assert not missing, f"add to book/api.md: {missing}"
    assert "   :members:" in API and "{eval-rst}" in API


def test_paper_map_code_column_points_at_documented_objects():
    papers = papermap.load_papers(ROOT / "book/papers.yml")
    apis = {p["api"] for p in papers if p.get("api")}
    assert apis
    for path in apis:
        parts, obj = path.split("."), None
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for a in parts[i:]:
                obj = getattr(obj, a)
            break
        home = obj.__name__ if inspect.ismodule(obj) else obj.__module__
        assert home in DOCUMENTED, f"{path} is defined in {home}, which book/api.md does not document"
        if not inspect.ismodule(obj):
            assert obj.__name__ in importlib.import_module(home).__all__, f"{path}: not in {home}.__all__"
    assert "{py:obj}`" in (ROOT / "book/paper_map.md").read_text()  # rendered as links
