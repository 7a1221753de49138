"""``python -m dmlab.zoo``: every user error is one line on stderr and exit status 2 (no traceback), like argparse."""
import os
import subprocess
import sys

import pytest

from dmlab.zoo import store


def _run(*args, env=None, cwd=None):
    full = {**os.environ, "PYTHONPATH": str(store.PACKAGE_ROOT), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dmlab.zoo", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, match", [
    (["train", "nonexistent"], "unknown zoo model 'nonexistent'; known: "),
    (["register", "unet_s", "--out", "{tmp}/empty"], "no train_log.json.*--out"),
    (["register", "unet_s", "--out", "{tmp}/a_file"], "is a file"),
    (["train", "unet_s", "--device", "cuda"], "no GPU is visible"),
    (["frob"], "invalid choice"),
    (["train"], "required: name"),
    ([], "required: cmd"),
], ids=["train unknown", "register empty out", "out is a file", "cuda without GPU", "unknown command",
        "train without name", "no command"])
def test_user_errors_are_one_line_and_status_2(tmp_path, args, match):
    import re

    (tmp_path / "a_file").write_text("x")
    r = _run(*[a.format(tmp=tmp_path) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("python -m dmlab.zoo: error: "), r.stderr
    assert re.search(match, lines[0]) and "Traceback" not in r.stderr
    assert not (tmp_path / "empty").exists()  # nothing was written for a refused command


def test_a_broken_registry_is_one_line_too(tmp_path, monkeypatch, capsys):
    """In-process (outside a checkout, DMLAB_DATA holding a malformed registry): the same one-line error."""
    from dmlab.zoo.__main__ import main

    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "registry.json").write_text("{oops")
    monkeypatch.setattr(store, "checkout_zoo_dir", lambda: None)
    monkeypatch.setenv("DMLAB_DATA", str(tmp_path))
    for cmd in ("list", "verify"):
        with pytest.raises(SystemExit) as ex:
            main([cmd])
        err = capsys.readouterr().err.strip().splitlines()
        assert ex.value.code == 2 and len(err) == 1 and "registry.json is not valid JSON" in err[0]


def test_help_still_works():
    r = _run("-h")
    assert r.returncode == 0 and "register" in r.stdout
