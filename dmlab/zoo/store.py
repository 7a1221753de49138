"""Where the zoo's files live, the registry that lists them, and sha256 verification.

Files are found, in this order:

1. the repository's ``data/zoo`` when dmlab runs from a checkout (``dmlab/`` next to ``data/``);
2. ``$DMLAB_DATA/zoo`` when the ``DMLAB_DATA`` environment variable is set;
3. otherwise (a ``pip install`` from git, which does not ship ``data/``) each file is downloaded from
   ``https://raw.githubusercontent.com/<REPO>/<REF>/data/zoo/...`` (:mod:`dmlab._meta`) into a cache directory
   (``$DMLAB_CACHE`` or ``~/.cache/dmlab``) and its sha256 checked against the registry. Offline this fails with one
   message saying what to do.

Only the standard library is imported here, so ``import dmlab.zoo`` stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

from .._meta import REF, REPO

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]
REGISTRY_NAME = "registry.json"


class ZooIntegrityError(ValueError):
    """A zoo file's sha256 does not match the registry (a corrupted or hand-edited file)."""


def checkout_zoo_dir() -> pathlib.Path | None:
    """``<repo>/data/zoo`` if dmlab is imported from a checkout that has that folder, else ``None``."""
    d = PACKAGE_ROOT / "data" / "zoo"
    return d if d.is_dir() and (PACKAGE_ROOT / "dmlab").is_dir() else None


def cache_dir() -> pathlib.Path:
    """Where downloaded zoo files go: ``$DMLAB_CACHE`` or ``~/.cache/dmlab`` (resumable training runs never go to
    the home cache: :func:`dmlab.train.runs_root`)."""
    return pathlib.Path(os.environ.get("DMLAB_CACHE") or pathlib.Path.home() / ".cache" / "dmlab")


def zoo_dir() -> pathlib.Path:
    """The directory that holds (or will hold) the zoo: checkout, then ``$DMLAB_DATA/zoo``, then the cache."""
    d = checkout_zoo_dir()
    if d is not None:
        return d
    if os.environ.get("DMLAB_DATA"):
        return pathlib.Path(os.environ["DMLAB_DATA"]) / "zoo"
    return cache_dir() / "zoo"


def raw_url(rel: str) -> str:
    """The raw.githubusercontent.com URL of ``data/zoo/<rel>`` on the book's branch."""
    return f"https://raw.githubusercontent.com/{REPO}/{REF}/data/zoo/{rel}"


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: pathlib.Path, timeout: float = 30.0) -> None:
    import urllib.error
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"could not download the zoo file {url} ({err}). dmlab is not running from a git checkout with "
            f"data/zoo, so it fetches the committed checkpoints from GitHub, which needs internet. Fix: clone "
            f"https://github.com/{REPO} and run from it, or set DMLAB_DATA to a folder holding zoo/ "
            f"(a copy of the repository's data/), or retrain with `python -m dmlab.zoo train NAME`.") from err
    tmp.replace(dest)


def read_registry(root: pathlib.Path | None = None) -> dict:
    """The registry ``{name: entry}``; downloaded first when the zoo is remote."""
    root = root or zoo_dir()
    path = root / REGISTRY_NAME
    if not path.is_file():
        if checkout_zoo_dir() is None and not os.environ.get("DMLAB_DATA"):
            _download(raw_url(REGISTRY_NAME), path)
        else:
            return {}
    with open(path) as f:
        return json.load(f)


def write_registry(reg: dict, root: pathlib.Path | None = None) -> pathlib.Path:
    """Write the registry sorted by name (stable diffs)."""
    root = root or zoo_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / REGISTRY_NAME
    path.write_text(json.dumps({k: reg[k] for k in sorted(reg)}, indent=1, sort_keys=False) + "\n")
    return path


def base_fingerprint(entry: dict) -> str:
    """A hash of the sha256 of the weight files of a registry entry: changes whenever that model is retrained (an
    adapter records its base model's fingerprint)."""
    shas = sorted(meta["sha256"] for rel, meta in entry.get("files", {}).items() if rel.endswith(".safetensors"))
    return hashlib.sha256("".join(shas).encode()).hexdigest()[:16]


def file_table(folder: pathlib.Path) -> dict:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``folder`` (sorted)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    return out


def fetch(name: str, entry: dict, root: pathlib.Path | None = None, *, verify: bool = True) -> pathlib.Path:
    """The folder of zoo model ``name`` with every file the registry lists present and (optionally) verified.

    Raises ``FileNotFoundError`` for a missing file (after trying to download it when the zoo is remote) and
    :class:`ZooIntegrityError` for a file whose sha256 differs from the registry.
    """
    root = root or zoo_dir()
    folder = root / name
    remote = checkout_zoo_dir() is None and not os.environ.get("DMLAB_DATA")
    for rel, meta in entry["files"].items():
        path = folder / rel
        if not path.is_file():
            if remote:
                _download(raw_url(f"{name}/{rel}"), path)
            else:
                raise FileNotFoundError(
                    f"zoo model {name!r}: file {path} is missing. Restore it with `git checkout -- data/zoo/{name}` "
                    f"(or `git lfs pull` if your clone skipped binaries), or retrain it with "
                    f"`python -m dmlab.zoo train {name}`.")
        if verify:
            got = sha256(path)
            if got != meta["sha256"]:
                if remote:  # a stale or partial download: fetch once more
                    path.unlink()
                    _download(raw_url(f"{name}/{rel}"), path)
                    got = sha256(path)
                if got != meta["sha256"]:
                    raise ZooIntegrityError(
                        f"zoo model {name!r}: {path} has sha256 {got[:12]}..., the registry says "
                        f"{meta['sha256'][:12]}... The file is corrupted or was changed. Restore it with "
                        f"`git checkout -- data/zoo/{name}`, or retrain and re-register with "
                        f"`python -m dmlab.zoo train {name}`.")
    return folder
