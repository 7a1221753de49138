"""Where the zoo's files live, the registry that lists them, and sha256 verification.

Files are found, in this order:

1. the repository's ``data/zoo`` when dmlab runs from a checkout (``dmlab/`` next to ``data/``);
2. ``$DMLAB_DATA/zoo`` when the ``DMLAB_DATA`` environment variable is set;
3. otherwise (a ``pip install`` from git, which does not ship ``data/``) each file is downloaded from
   ``https://raw.githubusercontent.com/<REPO>/<ZOO_REF>/data/zoo/...``, pinned to the package's release tag
   (:mod:`dmlab._meta`), into a cache directory per tag (``$DMLAB_CACHE`` or ``~/.cache/dmlab``, then
   ``zoo/<ZOO_REF>``: a new version brings a fresh registry), and its size and sha256 are checked against the
   registry. Offline this fails with one message saying what to do.

The registry is checked when read (valid JSON, every entry with its ``kind`` and a ``files`` table of relative
paths inside the zoo folder with ``sha256`` and ``bytes``); errors name the file and the fix.

Only the standard library is imported here, so ``import dmlab.zoo`` stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

from .._meta import REPO, ZOO_REF

__all__ = [
    "ZooIntegrityError",
    "checkout_zoo_dir",
    "cache_dir",
    "zoo_dir",
    "raw_url",
    "sha256",
    "read_registry",
    "write_registry",
    "base_fingerprint",
    "file_table",
    "fetch",
]

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
    """The directory that holds (or will hold) the zoo: checkout, then ``$DMLAB_DATA/zoo``, then the cache (one
    folder per pinned release, ``zoo/<ZOO_REF>``)."""
    d = checkout_zoo_dir()
    if d is not None:
        return d
    if os.environ.get("DMLAB_DATA"):
        return pathlib.Path(os.environ["DMLAB_DATA"]) / "zoo"
    return cache_dir() / "zoo" / ZOO_REF


def _remote(root: pathlib.Path | None) -> bool:
    """Whether missing files of the default zoo are downloaded (no checkout, no ``DMLAB_DATA``, no explicit root)."""
    return root is None and checkout_zoo_dir() is None and not os.environ.get("DMLAB_DATA")


def raw_url(rel: str) -> str:
    """The raw.githubusercontent.com URL of ``data/zoo/<rel>`` at the package's release tag (``_meta.ZOO_REF``)."""
    return f"https://raw.githubusercontent.com/{REPO}/{ZOO_REF}/data/zoo/{rel}"


def _fix(root: pathlib.Path | None, name: str | None = None) -> str:
    """How to restore a zoo file under ``root`` (the checkout, ``DMLAB_DATA``, a custom root or the download cache)."""
    what = f"data/zoo/{name}" if name else "data/zoo/registry.json"
    train = f"`python -m dmlab.zoo train {name or 'NAME'}`"
    if root is not None and root != checkout_zoo_dir() and root != zoo_dir():
        return f"rewrite it in that folder with {train[:-1]} --out {root}`"
    if checkout_zoo_dir() is not None:
        return f"restore it with `git checkout -- {what}`, or retrain and re-register with {train}"
    if os.environ.get("DMLAB_DATA"):
        return f"copy {what} of the repository into $DMLAB_DATA again ({zoo_dir()})"
    return f"delete {zoo_dir()} to download it again"


def safe_path(root: pathlib.Path, *parts: str) -> pathlib.Path:
    """``root / parts...`` for registry names and file paths, refusing any that would leave ``root`` (absolute,
    ``..``, backslashes, drive letters, empty) instead of reading or writing there."""
    import ntpath

    for part in parts:
        pp = pathlib.PurePosixPath(part) if isinstance(part, str) else None
        if pp is None or not part or pp.is_absolute() or ".." in pp.parts or "\\" in part or ntpath.splitdrive(part)[0] \
                or part.startswith("~"):
            raise ZooIntegrityError(f"the zoo registry lists the path {part!r}, which would leave the zoo folder "
                                    f"{root}; paths must be relative and stay inside it (a corrupted or hostile "
                                    f"registry.json: {_fix(root)})")
    path = root.joinpath(*parts)
    base = root.resolve()
    if base not in path.resolve().parents and path.resolve() != base:
        raise ZooIntegrityError(f"the zoo path {path} resolves to {path.resolve()}, outside the zoo folder {base} "
                                "(a symbolic link?); remove the link")
    return path


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: pathlib.Path, timeout: float = 30.0, size: int | None = None) -> None:
    """Download ``url`` to ``dest`` through ``dest.part`` (replaced only when complete; ``size``: the registry's
    byte count, a longer file is cut off and refused)."""
    import urllib.error
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            n = 0
            while block := r.read(1 << 20):
                n += len(block)
                if size is not None and n > size:
                    raise ZooIntegrityError(f"the download {url} is longer than the {size} bytes the registry "
                                            f"says; it was stopped and nothing was kept. {_fix(None)}")
                f.write(block)
    except ZooIntegrityError:
        tmp.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"could not download the zoo file {url} ({err}). dmlab is not running from a git checkout with "
            f"data/zoo, so it fetches the committed checkpoints from GitHub, which needs internet. Fix: clone "
            f"https://github.com/{REPO} and run from it, or set DMLAB_DATA to a folder holding zoo/ "
            f"(a copy of the repository's data/), or retrain with `python -m dmlab.zoo train NAME`.") from err
    tmp.replace(dest)


def read_registry(root: pathlib.Path | None = None) -> dict:
    """The registry ``{name: entry}``, checked (:func:`check_registry`); downloaded first when the zoo is remote
    (and downloaded again once if the cached copy is unreadable)."""
    remote = _remote(root)
    root = root or zoo_dir()
    path = root / REGISTRY_NAME
    if not path.is_file():
        if not remote:
            return {}
        _download(raw_url(REGISTRY_NAME), path)
    try:
        return check_registry(path, root)
    except ZooIntegrityError:
        if not remote:
            raise
        _download(raw_url(REGISTRY_NAME), path)
        return check_registry(path, root)


def check_registry(path: pathlib.Path, root: pathlib.Path | None = None) -> dict:
    """Parse and check a registry file: ``{name: {"kind": ..., "files": {rel: {"sha256": hex, "bytes": int}}}}``
    with names and paths inside the zoo folder; a :class:`ZooIntegrityError` naming ``path`` otherwise."""
    root = path.parent if root is None else root
    try:
        reg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ZooIntegrityError(f"the zoo registry {path} is not valid JSON ({err}); {_fix(root)}") from None

    def bad(what: str):
        return ZooIntegrityError(f"the zoo registry {path}: {what}; {_fix(root)}")

    if not isinstance(reg, dict):
        raise bad(f"the top level must be an object {{name: entry}}, got {type(reg).__name__}")
    for name, e in reg.items():
        safe_path(root, name)
        if not isinstance(e, dict) or not isinstance(e.get("kind"), str) or not isinstance(e.get("files"), dict) \
                or not e["files"]:
            raise bad(f"entry {name!r} needs a 'kind' and a non-empty 'files' table")
        for rel, meta in e["files"].items():
            safe_path(root, name, rel)
            sha, size = (meta.get("sha256"), meta.get("bytes")) if isinstance(meta, dict) else (None, None)
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                raise bad(f"file {name}/{rel} needs a 'sha256' of 64 hex digits")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise bad(f"file {name}/{rel} needs its size as an integer 'bytes'")
    return reg


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
    :class:`ZooIntegrityError` for a file whose size or sha256 differs from the registry, or whose path would leave
    the zoo folder. A remote file that fails the check is downloaded once more; the bad copy is replaced only when
    the new download is complete.
    """
    remote = _remote(root)
    root = root or zoo_dir()
    folder = safe_path(root, name)
    if not isinstance(entry.get("files"), dict):
        raise ZooIntegrityError(f"zoo model {name!r}: its registry entry has no 'files' table; {_fix(root)}")
    for rel, meta in entry["files"].items():
        path = safe_path(root, name, rel)
        size = meta.get("bytes")
        if not path.is_file():
            if remote:
                _download(raw_url(f"{name}/{rel}"), path, size=size)
            else:
                raise FileNotFoundError(f"zoo model {name!r}: file {path} is missing. Fix: {_fix(root, name)} (or "
                                        "`git lfs pull` if your clone skipped binaries).")
        if not verify:
            continue
        problem = _check_file(path, meta)
        if problem and remote:  # a stale or partial download: fetch once more (the copy is kept if that fails)
            try:
                _download(raw_url(f"{name}/{rel}"), path, size=size)
            except FileNotFoundError as err:
                raise ZooIntegrityError(f"zoo model {name!r}: {path} {problem}, and downloading it again failed: "
                                        f"{err}") from None
            problem = _check_file(path, meta)
        if problem:
            raise ZooIntegrityError(f"zoo model {name!r}: {path} {problem}. The file is corrupted or was changed; "
                                    f"{_fix(root, name)}.")
    return folder


def _check_file(path: pathlib.Path, meta: dict) -> str | None:
    """What is wrong with a zoo file against its registry record (size first: cheap), or None."""
    size = meta.get("bytes")
    if size is not None and path.stat().st_size != size:
        return f"has {path.stat().st_size} bytes, the registry says {size}"
    got = sha256(path)
    if got != meta["sha256"]:
        return f"has sha256 {got[:12]}..., the registry says {meta['sha256'][:12]}..."
    return None
