"""Where the book lives: one setting that the Colab badges, the setup cells' install, the zoo downloads and the
book's repository buttons all follow.

``REPO`` (``owner/name`` on GitHub) and ``REF`` (the tag or commit that the chapters install and download from)
default to the published book; the environment variables ``DMLAB_REPO`` and ``DMLAB_REF`` override them (set
them before ``import dmlab``: on Colab, ``%env DMLAB_REPO=you/dmlab`` before the setup cell). After changing the
defaults here, ``python -m dmlab.tools.notebooks retarget`` rewrites the chapters' badges and setup cells and the
repository settings in ``_config.yml`` to match.
"""
import os

__all__ = ["DEFAULT_REPO", "DEFAULT_REF", "REPO", "REF", "REPO_URL", "colab_url", "install_spec"]

DEFAULT_REPO = "dmlab-book/dmlab"
DEFAULT_REF = "v0.1.0"  # a release tag: installs and zoo files pinned to it, never to a moving branch

REPO = os.environ.get("DMLAB_REPO") or DEFAULT_REPO
REF = os.environ.get("DMLAB_REF") or DEFAULT_REF
if REPO.count("/") != 1 or not all(REPO.split("/")):
    raise ValueError(f"DMLAB_REPO must be 'owner/name' on GitHub, got {REPO!r}")
REPO_URL = f"https://github.com/{REPO}"


def colab_url(path: str) -> str:
    """The Open-in-Colab URL of a notebook path relative to the repository root, at ``REF``."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{REF}/{path}"


def install_spec(repo: str | None = None, ref: str | None = None) -> str:
    """The pip requirement that installs dmlab with every chapter's dependencies from ``repo`` at ``ref``."""
    return f"dmlab[all] @ git+https://github.com/{repo or REPO}@{ref or REF}"
