"""Where the book lives (one place: Colab badges, launch buttons and the pip-install cell read it)."""
REPO = "dmlab-book/dmlab"
BRANCH = "main"
VERSION = "0.1.0"  # the package version (pyproject.toml and dmlab.__version__ agree: tests/zoo/test_registry.py)
ZOO_REF = f"v{VERSION}"  # the git tag zoo files are downloaded from: the files of this release, never a moving branch
REPO_URL = f"https://github.com/{REPO}"


def colab_url(path: str) -> str:
    """The Open-in-Colab URL of a notebook path relative to the repository root."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/{path}"
