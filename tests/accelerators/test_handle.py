import inspect

import pytest
import torch

from dmlab import samplers, schedules
from dmlab.accelerators import Handle
from dmlab.hooks import count_calls, patch_forward, resolve_model
from dmlab.accelerators.handle import CallCounter, claim
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, assert_restored, snapshot


def test_handle_undo_order_idempotent_and_context_manager():
    log = []
    h = Handle("demo")
    h.on_remove(lambda: log.append(1))
    h.on_remove(lambda: log.append(2))
    with pytest.raises(KeyError):
        with h:
            raise KeyError("inside")
    assert log == [2, 1] and h.removed
    h.remove()
    assert log == [2, 1]  # idempotent
    with pytest.raises(RuntimeError, match="already removed"):
        h.on_remove(lambda: None)


def test_handle_runs_every_undo_even_if_one_fails():
    log = []
    h = Handle("demo")
    h.on_remove(lambda: log.append("first"))
    h.on_remove(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        h.remove()
    assert log == ["first"]


def test_patches_stack_and_come_off_in_either_order():
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    y0 = lin(x)
    before = dict(lin.__dict__)
    for order in ([0, 1], [1, 0]):
        ha, hb = Handle("a"), Handle("b")
        patch_forward(lin, lambda nxt, *a, **k: nxt(*a, **k) + 1, ha)
        patch_forward(lin, lambda nxt, *a, **k: nxt(*a, **k) * 2, hb)
        assert torch.equal(lin(x), (y0 + 1) * 2)  # the last applied is the outermost
        assert list(inspect.signature(lin.forward).parameters) == ["input"]
        hs = [ha, hb]
        hs[order[0]].remove()
        assert torch.equal(lin(x), y0 * 2 if order[0] == 0 else y0 + 1)
        hs[order[1]].remove()
        assert torch.equal(lin(x), y0)
        assert lin.__dict__.keys() == before.keys() and "forward" not in lin.__dict__


def test_count_calls_counts_root_calls_not_scheduler_steps(tiny_unet, gen):
    d = DiscreteVPDenoiser(tiny_unet, AC)
    sig = schedules.karras(6, 0.01, 80.0)
    x = torch.randn(2, 1, 8, 8, generator=gen) * sig[0]
    y = torch.tensor([1, 2])
    snap = snapshot(tiny_unet)
    with count_calls(d) as h:
        samplers.sample_euler(d, x, sig, cond={"class_labels": y})
        assert h.stats == {"calls": 6, "trajectories": 1, "steps": 6}
        samplers.sample_heun(d, x, sig, cond={"class_labels": y})  # a Heun step makes two calls, the last one one
        assert h.stats == {"calls": 6 + 11, "trajectories": 2, "steps": 11}
    assert_restored(tiny_unet, snap)
    with count_calls(tiny_unet, calls_per_step=2) as h:
        samplers.sample_heun(d, x, sig, cond={"class_labels": y})
        assert h.stats["steps"] == 6 and h.stats["calls"] == 11


def test_call_counter_new_trajectory_when_timestep_goes_up():
    c = CallCounter(calls_per_step=2)
    for t in [900, 900, 500, 500, 100]:
        c.observe((None, torch.tensor([t])), {})
    assert (c.n, c.step, c.slot, c.stats["trajectories"]) == (4, 2, 0, 1)
    c.observe((None,), {"timestep": 950.0})
    assert (c.n, c.stats["trajectories"], c.stats["calls"]) == (0, 2, 6)
    c.reset()
    c.observe((None,), {"timestep": 10.0})
    assert c.stats["trajectories"] == 3
    with pytest.raises(ValueError, match="calls_per_step"):
        CallCounter(0)


def test_applying_twice_raises_and_removal_frees_the_name():
    m = torch.nn.Linear(2, 2)
    h = count_calls(m)
    with pytest.raises(RuntimeError, match="already applied.*remove the first handle"):
        count_calls(m)
    h.remove()
    count_calls(m).remove()
    h2 = Handle("x")
    claim(m, "x", h2)
    h2.remove()


def test_resolve_model_finds_the_network():
    m = torch.nn.Linear(2, 2)

    class Pipe:
        unet = m

    class Adapter:
        model = m

    assert resolve_model(Pipe()) is m and resolve_model(Adapter()) is m and resolve_model(m) is m
    with pytest.raises(TypeError, match="pipeline"):
        resolve_model(object())
