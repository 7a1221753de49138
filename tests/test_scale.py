import subprocess
import sys

import pytest
import torch

import dmlab


def test_import_is_cheap():
    code = ("import sys, dmlab; heavy = [m for m in ('diffusers', 'transformers', 'scipy', 'matplotlib', 'ipywidgets',"
            " 'sklearn', 'skimage') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_setup_defaults_and_determinism(monkeypatch):
    monkeypatch.delenv("DMLAB_SCALE", raising=False)
    sc, g = dmlab.setup(seed=3)
    assert sc.tiny and sc.device == "cpu" and sc.pick(1, 2) == 1
    a = torch.randn(5, generator=g)
    _, g2 = dmlab.setup(seed=3)
    assert torch.equal(a, torch.randn(5, generator=g2))
    _, g3 = dmlab.setup(seed=4)
    assert not torch.equal(a, torch.randn(5, generator=g3))


def test_scale_from_env(monkeypatch):
    monkeypatch.setenv("DMLAB_SCALE", "bogus")
    with pytest.raises(ValueError, match="DMLAB_SCALE"):
        dmlab.setup()
    monkeypatch.setenv("DMLAB_SCALE", "full")
    with pytest.warns(UserWarning, match="no GPU") if not torch.cuda.is_available() else _noop():
        sc = dmlab.get_scale()
    assert sc.full and sc.pick(1, 2) == 2


def test_bad_seed():
    with pytest.raises(TypeError, match="seed"):
        dmlab.seed_everything(-1)


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
