"""dmlab.hooks: patches, hooks, foreign (diffusers-style) hook installers, capture, output_tensor, deepcopy."""
import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dmlab import hooks


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _state(m):
    return {n: (sorted(s.__dict__), len(s._forward_hooks), len(s._forward_pre_hooks)) for n, s in m.named_modules()}


def _fake_installer(scale):
    """Replaces ``a.forward`` like diffusers' HookRegistry: a partial over the previous forward, kept in a
    registry attribute on the module."""
    def install(model):
        prev = model.a.forward

        def new_forward(module, *args, **kwargs):
            return prev(*args, **kwargs) * scale

        model.a.forward = functools.update_wrapper(functools.partial(new_forward, model.a), prev)
        model.a._diffusers_hook = SimpleNamespace(_hook_order=[], hooks={}, _module_ref=model.a)

    return install


def test_output_and_input_tensor():
    t = torch.ones(2)
    assert hooks.output_tensor(t) is t
    assert hooks.output_tensor(SimpleNamespace(sample=t)) is t
    assert hooks.output_tensor((t, None)) is t and hooks.output_tensor([(t,)]) is t
    assert hooks.output_tensor({"h": t}) is t
    with pytest.raises(TypeError, match="cannot read a tensor"):
        hooks.output_tensor(("no",))
    assert hooks.input_tensor((1, t), {}) is t and hooks.input_tensor((), {"hidden_states": t}) is t
    assert hooks.input_tensor((), {}) is None


def test_patches_and_foreign_hooks_compose_in_any_order():
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(4, 3)
    before, ref = _state(net), net(x)
    make = {
        "double": lambda: _patch(net, 2.0),
        "foreign": lambda: _foreign(net, 3.0),
        "hook": lambda: _hook(net, 5.0),
    }
    alone = {}
    for k, f in make.items():
        with f():
            alone[k] = net(x)
        assert _state(net) == before and torch.equal(net(x), ref)
    for a, b in [(a, b) for a in make for b in make if a != b]:
        for removed in (a, b):
            h = {a: make[a]()}
            h[b] = make[b]()
            both = net(x)
            assert not torch.equal(both, alone[a]) and not torch.equal(both, alone[b])
            h[removed].remove()
            keep = b if removed == a else a
            assert torch.equal(net(x), alone[keep]), (a, b, removed)
            h[keep].remove()
            assert _state(net) == before and torch.equal(net(x), ref)


def _patch(net, s):
    h = hooks.Handle("double")
    hooks.patch_forward(net.a, lambda call_next, *a, **k: call_next(*a, **k) * s, h)
    return h


def _foreign(net, s):
    h = hooks.Handle("foreign")
    regs = hooks.foreign_hooks(net, _fake_installer(s), h)
    assert len(regs) == 1 and "_diffusers_hook" not in net.a.__dict__  # the registry stays with the handle
    return h


def _hook(net, s):
    h = hooks.Handle("hook")
    hooks.add_hook(net.a, lambda m, a, out: out + s, h, pre=False, with_kwargs=False)
    return h


def test_deepcopy_under_handles_is_clean():
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(4, 3)
    ref = net(x)
    calls = []
    h = _patch(net, 2.0)
    hooks.add_hook(net, lambda m, a, k: calls.append(1), h, pre=True)
    h2 = _foreign(net, 3.0)
    clone = copy.deepcopy(net)
    assert torch.equal(clone(x), ref) and not calls  # no patch, no live hook travelled
    assert not torch.equal(net(x), ref) and calls == [1]
    h.remove()
    h2.remove()
    assert torch.equal(net(x), ref)


def test_claim_refuses_twice_and_exclusions():
    net = Net()
    h = hooks.Handle("x", net)
    hooks.claim(net, "x", h, excludes=("y",), why="they fight")
    with pytest.raises(RuntimeError, match="already applied"):
        hooks.claim(net, "x", hooks.Handle("x", net))
    with pytest.raises(RuntimeError, match="cannot be combined with x.*they fight"):
        hooks.claim(net, "y", hooks.Handle("y", net))
    assert hooks.active_methods(net) == {"x"}
    with pytest.raises(RuntimeError, match="Apply z first"):
        hooks.require_no_active(net, "z", "runs the model")
    h.remove()
    assert hooks.active_methods(net) == set()
    hooks.require_no_active(net, "z", "runs the model")


def test_capture_is_a_read_only_handle():
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(4, 3)
    ref = net(x)
    sink = []
    with hooks.capture(net, ["a", "b"], sink=sink) as cap:
        assert isinstance(cap, hooks.Handle) and not cap.alters_outputs
        assert torch.equal(net(x), ref)
    assert not cap.active and len(sink) == 2 and torch.equal(cap["b"], ref)
    with pytest.raises(ValueError, match="did you mean"):
        hooks.capture(net, ["aa"])
