"""Where the book lives: one setting that the Colab badges, the setup cells' install, the zoo downloads and the
book's repository buttons all follow.

``REPO`` (``owner/name`` on GitHub) and ``REF`` (the tag or commit that the chapters install and download from)
default to the published book; the environment variables ``DMLAB_REPO`` and ``DMLAB_REF`` override them (set
them before ``import dmlab``: on Colab, ``%env DMLAB_REPO=you/dmlab`` before the setup cell). After changing the
defaults here, ``python -m dmlab.tools.notebooks retarget`` rewrites the chapters' badges and setup cells and the
repository settings in ``_config.yml`` to match.
"""
import os

__all__ = [
    "VERSION", "DEFAULT_REPO", "DEFAULT_REF", "REPO", "REF", "ZOO_REF", "REPO_URL", "colab_url",
    "install_spec",
]

VERSION = "0.1.0"  # the package version (pyproject.toml and dmlab.__version__ agree: tests/zoo/test_registry.py)
DEFAULT_REPO = "dmlab-book/dmlab"
DEFAULT_REF = f"v{VERSION}"  # the release tag: installs and zoo files pinned to it, never a moving branch

REPO = os.environ.get("DMLAB_REPO") or DEFAULT_REPO
REF = os.environ.get("DMLAB_REF") or DEFAULT_REF
if REPO.count("/") != 1 or not all(REPO.split("/")):
    raise ValueError(f"DMLAB_REPO must be 'owner/name' on GitHub, got {REPO!r}")
ZOO_REF = REF  # the git ref zoo files are downloaded from (one cache folder per ref)
REPO_URL = f"https://github.com/{REPO}"


def colab_url(path: str) -> str:
    """The Open-in-Colab URL of a notebook path relative to the repository root, at ``REF``."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{REF}/{path}"


def install_spec(repo: str | None = None, ref: str | None = None) -> str:
    """The pip requirement that installs dmlab with every chapter's dependencies from ``repo`` at ``ref``."""
    return f"dmlab[all] @ git+https://github.com/{repo or REPO}@{ref or REF}"
