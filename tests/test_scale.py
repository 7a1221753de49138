import os
import subprocess
import warnings
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


def test_full_setup_unsets_what_a_tiny_setup_set(monkeypatch):
    import huggingface_hub.constants as hc

    from dmlab import hub, scale

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(scale, "_SET_BY_SETUP", {})
    dmlab.setup(0, scale="tiny")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hc.HF_HUB_OFFLINE and hub._offline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no GPU here
        sc, _ = dmlab.setup(0, scale="full")
    assert sc.full and "HF_HUB_OFFLINE" not in os.environ and not hc.HF_HUB_OFFLINE and not hub._offline()


def test_full_setup_leaves_a_users_offline_mode_and_says_to_restart(monkeypatch):
    from dmlab import scale

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(scale, "_SET_BY_SETUP", {})
    with pytest.warns(UserWarning, match="unset HF_HUB_OFFLINE.*restart the runtime"):
        dmlab.setup(0, scale="full")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
