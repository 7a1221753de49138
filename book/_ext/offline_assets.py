"""Sphinx extension: the widget manager served by the book itself (no CDN), on the pages that need it only.

Jupyter Book adds every ``*.js`` under ``_static/`` to every page; the widget bundle (4 MB) belongs only on pages
with stored widget state, where myst-nb adds the files named in ``nb_ipywidgets_js`` (``_config.yml``). So the
bundle lives in ``book/_widgets/`` and this extension adds that folder to ``html_static_path`` after Jupyter Book
has made its list. Loaded from ``_config.yml`` (``sphinx: local_extensions: {offline_assets: book/_ext/}``).
"""
from __future__ import annotations

import pathlib

WIDGETS = pathlib.Path(__file__).resolve().parents[1] / "_widgets"


def _add_static(app, config):
    if not (WIDGETS / "embed-amd.js").is_file():
        raise FileNotFoundError(f"{WIDGETS}/embed-amd.js is missing (see {WIDGETS}/README.md)")
    config.html_static_path = [*config.html_static_path, str(WIDGETS)]


def setup(app):
    app.connect("config-inited", _add_static)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
