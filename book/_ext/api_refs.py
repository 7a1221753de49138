"""Sphinx extension: Python references in the API reference and the paper map resolve the way Python does.

The packages ``dmlab.samplers``, ``dmlab.probes``, ``dmlab.accelerators`` and ``dmlab.zoo`` re-export names that
``book/api.md`` documents where they are defined, and docstrings name objects by short, relative or package
paths. For a reference Sphinx cannot find, this extension imports the target (also relative to the module of the
docstring), takes the object's defining path (``obj.__module__`` + ``obj.__qualname__``) and resolves that. A target
that imports but is not documented (a private helper, a torch class) becomes plain code text; a target that does
not import at all is left to Sphinx, which reports it (``-n``). Loaded from ``_config.yml`` (``local_extensions``).
"""
from __future__ import annotations

import importlib
import inspect
import re

_MISSING = object()


def _import(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:  # not a module (or not importable): try a shorter prefix
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return _MISSING
        return obj
    return _MISSING


def _candidates(target: str, module: str | None, cls: str | None) -> list[str]:
    target = target.lstrip("~")
    rel = target.startswith(".")
    target = target.lstrip(".")
    out = [] if rel else [target]
    if module:
        parts = module.split(".")
        if cls:
            out.append(f"{module}.{cls}.{target}")
        out += [".".join(parts[:i] + [target]) for i in range(len(parts), 0, -1)]
    return out


def _defining_path(obj, name: str) -> str:
    if inspect.ismodule(obj):
        return obj.__name__
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(mod, str) and isinstance(qual, str) and (inspect.isclass(obj) or callable(obj)):
        return f"{mod}.{qual}"
    return name


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    # the page's module context, then the docstring's own path ("docstring of dmlab.hooks.Capture"): a re-exported
    # object's docstring names things relative to where it is defined
    m = re.search(r"docstring of ([\w.]+)", str(node.source or ""))
    names = _candidates(node["reftarget"], node.get("py:module"), node.get("py:class"))
    names += _candidates(node["reftarget"], m.group(1), None) if m else []
    for name in dict.fromkeys(names):
        obj = _import(name)
        if obj is _MISSING:
            continue
        path = _defining_path(obj, name)
        found = domain.resolve_xref(env, node["refdoc"], app.builder, "obj", path, node, contnode)
        if found is None and path != name:
            found = domain.resolve_xref(env, node["refdoc"], app.builder, "obj", name, node, contnode)
        return found if found is not None else contnode  # imports but is not documented: plain code text
    return None


def setup(app):
    app.connect("missing-reference", _missing_reference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
