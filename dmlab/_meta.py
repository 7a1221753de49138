"""Where the book lives (one place: Colab badges, launch buttons and the pip-install cell read it)."""
REPO = "dmlab-book/dmlab"
BRANCH = "main"
REPO_URL = f"https://github.com/{REPO}"


def colab_url(path: str) -> str:
    """The Open-in-Colab URL of a notebook path relative to the repository root."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/{path}"
