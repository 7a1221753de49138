"""The one reversible hook layer: how accelerators and probes attach to a model, and how they come off again.

Everything that changes or reads what a network computes goes through a :class:`Handle`:

* ``handle.remove()`` restores the model bit for bit (each module's ``__dict__``, its hook dicts, its outputs); it
  is idempotent, and it runs also when an exception leaves a ``with ... as h:`` block;
* ``handle.stats`` is a plain dict of what happened (root calls, cache hits, ...);
* :func:`claim` makes applying the same method twice to one model a clear ``RuntimeError``.

Building blocks:

* :func:`patch_forward` - a reversible forward patch ``wrapper(call_next, *args, **kwargs)``. Patches on one module
  stack (the last applied is the outermost) and come off in any order;
* :func:`add_hook` - a forward / forward-pre hook owned by a handle;
* :func:`foreign_hooks` - run a third-party hook installer (diffusers' ``diffusers.hooks.apply_*`` caches) so that
  what it installs becomes one patch layer per module, owned by the handle: it composes with dmlab's patches in
  any order of application and removal, and the installer's hook registries never see each other;
* :class:`Capture` / :func:`capture` - record the outputs of named submodules (a Handle that never edits outputs);
* :class:`CallCounter` - root calls, grouped into trajectories and steps (see its docstring);
* :func:`output_tensor` - the tensor in a module's or network's return value (the one reader);
  :func:`input_tensor` - the first tensor argument of a call.

Composition rules. Any set of handles on one model can be applied in any order and removed in any order: each
stays in force until its own removal, and once all are removed the model is exactly as before. A handle whose
construction *runs* the model (post-training quantization's calibration) would observe the other handles' effects;
it refuses with a ``RuntimeError`` when an output-changing handle is active (:func:`active_handles`, ``Handle.
alters_outputs``). ``copy.deepcopy(model)`` under active handles gives a clean copy: patches and hooks owned by
handles do not travel (the copy runs its own forward and has no live dmlab hook).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .anatomy import resolve_model

__all__ = ["Handle", "claim", "active_methods", "active_handles", "require_no_active", "patch_forward", "add_hook",
           "foreign_hooks", "Capture", "capture", "CallCounter", "count_calls", "timestep_of", "output_tensor",
           "input_tensor"]


# ----------------------------------------------------------------------------------------------- tensors
def output_tensor(out) -> Tensor:
    """The hidden state in a module's or network's return value: the tensor itself, ``.sample`` or
    ``.last_hidden_state`` of an output object, the first element of a tuple/list (diffusers down blocks return
    ``(hidden, res_samples)``, transformers layers ``(hidden, attn)``), the first value of a dict."""
    if isinstance(out, Tensor):
        return out
    for attr in ("sample", "last_hidden_state"):
        v = getattr(out, attr, None)
        if isinstance(v, Tensor):
            return v
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    if isinstance(out, dict) and out:
        return output_tensor(next(iter(out.values())))
    raise TypeError(f"cannot read a tensor from a module output of type {type(out).__name__}")


def input_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The first tensor argument of a call (the ``sample``/``hidden_states`` of diffusers modules), or None."""
    for a in args:
        if isinstance(a, Tensor):
            return a
    for k in ("hidden_states", "sample", "input_tensor", "x"):
        v = kwargs.get(k)
        if isinstance(v, Tensor):
            return v
    for v in kwargs.values():
        if isinstance(v, Tensor):
            return v
    return None


# ----------------------------------------------------------------------------------------------- Handle
class Handle:
    """What every accelerator and probe returns: a context manager whose :meth:`remove` undoes everything it did.

    ``stats`` is a dict the method fills in while the model runs. ``remove()`` runs the registered undo steps in
    reverse order (also if one of them fails: the first error is re-raised after all ran) and may be called any
    number of times. ``reset()`` forgets per-trajectory state (caches) without removing anything.
    ``alters_outputs`` is False for handles that only read (captures, counters).
    """

    alters_outputs = True

    def __init__(self, name: str, model: nn.Module | None = None, stats: dict | None = None, *,
                 alters_outputs: bool | None = None):
        self.name = name
        self.model = model
        self.stats: dict[str, Any] = {} if stats is None else stats
        if alters_outputs is not None:
            self.alters_outputs = bool(alters_outputs)
        self._undo: list[Callable[[], None]] = []
        self._resets: list[Callable[[], None]] = []
        self._removed = False

    def on_remove(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Register an undo step (run in reverse order of registration by :meth:`remove`)."""
        if self._removed:
            raise RuntimeError(f"{self.name}: this handle was already removed")
        self._undo.append(fn)
        return fn

    def on_reset(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Register a step of :meth:`reset` (forget caches between sampling runs)."""
        self._resets.append(fn)
        return fn

    @property
    def removed(self) -> bool:
        return self._removed

    def reset(self) -> None:
        """Forget per-trajectory state (cached features, step counters); the next call starts a new trajectory."""
        for fn in self._resets:
            fn()

    def remove(self) -> None:
        """Undo everything this handle did; idempotent."""
        if self._removed:
            return
        self._removed = True
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - finish undoing, then report the first failure
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"{type(self).__name__}({self.name!r}, {state}, stats={self.stats})"


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, dict[str, Handle]]" = weakref.WeakKeyDictionary()


def claim(model: nn.Module, method: str, handle: Handle, *, excludes: Iterable[str] = (), why: str = "") -> None:
    """Mark ``method`` as applied to ``model`` until ``handle`` is removed; raise if it already is.

    ``excludes``: methods that cannot run together with this one (in either order); ``why`` says why in the error.
    """
    active = _ACTIVE.setdefault(model, {})
    handle._excludes = (set(excludes), why)
    for other, oh in active.items():
        ex, owhy = getattr(oh, "_excludes", (set(), ""))
        if other in handle._excludes[0] or method in ex:
            raise RuntimeError(f"{method} cannot be combined with {other}, which is active on this "
                               f"{type(model).__name__}: {why or owhy}. Remove one (handle.remove()) before applying "
                               f"the other")
    if method in active:
        raise RuntimeError(f"{method} is already applied to this {type(model).__name__}; remove the first handle "
                           f"(handle.remove(), or leave its `with` block) before applying it again. To compare two "
                           f"settings side by side, apply each to its own copy made with copy.deepcopy(model) (a "
                           f"copy never carries dmlab's patches, so copy the clean model, then apply)")
    active[method] = handle

    def release():
        d = _ACTIVE.get(model)
        if d is not None and d.get(method) is handle:
            del d[method]
            if not d:
                del _ACTIVE[model]

    handle.on_remove(release)


def active_methods(model: nn.Module) -> set[str]:
    """The dmlab methods currently applied to ``model`` (a copy of the set)."""
    return set(_ACTIVE.get(model, ()))


def active_handles(model: nn.Module) -> dict[str, Handle]:
    """``{method: handle}`` of the handles currently applied to ``model`` (a copy)."""
    return dict(_ACTIVE.get(model, {}))


def require_no_active(model: nn.Module, method: str, why: str) -> None:
    """Refuse (``RuntimeError``) to run ``method`` while an output-changing handle is active on ``model``."""
    others = sorted(m for m, h in _ACTIVE.get(model, {}).items() if h.alters_outputs and m != method)
    if others:
        raise RuntimeError(f"{method} {why}, and {others} {'is' if len(others) == 1 else 'are'} active on this "
                           f"{type(model).__name__} and would change what it sees. Apply {method} first and the "
                           f"others after it, or remove them (handle.remove()) before applying {method}")


# ----------------------------------------------------------------------------------------------- patches
class _PatchedForward:
    """Installed as ``module.forward``: calls the stacked wrappers around the module's own forward.

    A wrapper is ``fn(call_next, *args, **kwargs)``; the last one applied is the outermost. A deep copy of the
    module gets its plain forward back (the copy carries no patch).
    """

    __slots__ = ("had_instance_forward", "saved", "base", "__wrapped__", "layers", "_fns", "_chain", "module_ref",
                 "__weakref__")

    def __init__(self, module: nn.Module):
        self.had_instance_forward = "forward" in module.__dict__
        self.saved = module.__dict__.get("forward")
        self.base = self.saved if self.had_instance_forward else type(module).forward.__get__(module)
        self.__wrapped__ = self.base  # inspect.signature(module.forward) still shows the real arguments
        self.layers: list[list] = []
        self.module_ref = weakref.ref(module)
        self._rebuild()

    def _rebuild(self) -> None:
        """Precompose the chain once per change of the stack (a call costs one C-level partial per layer)."""
        call = self.base
        for _, fn in self.layers:
            call = functools.partial(fn, call)
        self._chain = call

    def __call__(self, *args, **kwargs):
        return self._chain(*args, **kwargs)

    def __deepcopy__(self, memo):
        src = self.module_ref()
        dst = memo.get(id(src)) if src is not None else None
        if self.had_instance_forward:
            import copy

            return copy.deepcopy(self.saved, memo)
        if dst is None:
            raise RuntimeError("cannot deep-copy a dmlab forward patch on its own; copy the whole model")
        return type(dst).forward.__get__(dst)  # the copy runs its own forward


def patch_forward(module: nn.Module, wrapper: Callable, handle: Handle) -> None:
    """Wrap ``module.forward`` with ``wrapper(call_next, *args, **kwargs)`` until ``handle`` is removed.

    Patches stack and come off in any order; when the last one is removed the module's ``__dict__`` is exactly as
    before (the instance attribute ``forward`` is deleted, or the one that was there is put back).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"patch_forward needs an nn.Module, got {type(module).__name__}")
    disp = module.__dict__.get("forward")
    if not isinstance(disp, _PatchedForward):
        disp = _PatchedForward(module)
        module.__dict__["forward"] = disp
    entry = [handle.name, wrapper]
    disp.layers.append(entry)
    disp._rebuild()

    def undo():
        disp.layers[:] = [e for e in disp.layers if e is not entry]
        disp._rebuild()
        if disp.layers:
            return
        if module.__dict__.get("forward") is disp:
            if disp.had_instance_forward:
                module.__dict__["forward"] = disp.saved
            else:
                del module.__dict__["forward"]
        else:  # something outside dmlab replaced forward after us and is still there: stay as a pass-through
            import warnings

            warnings.warn(f"{handle.name}: {type(module).__name__}.forward was replaced by code outside dmlab after "
                          f"dmlab patched it; left a pass-through in place. Remove that code's hook first to restore "
                          f"exactly.", stacklevel=3)

    handle.on_remove(undo)


class _OwnedHook:
    """A hook function owned by a handle; a deep copy of the module gets a no-op in its place."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _noop_hook


def _noop_hook(*args, **kwargs):
    return None


def add_hook(module: nn.Module, fn: Callable, handle: Handle, *, pre: bool, always_call: bool = False,
             with_kwargs: bool = True) -> None:
    """Register a forward (``pre=False``) or forward-pre hook; ``handle`` removes it.

    With ``with_kwargs`` (default) the hook is ``fn(module, args, kwargs)`` (pre) or ``fn(module, args, kwargs,
    output)``; without, torch's plain ``fn(module, args)`` / ``fn(module, args, output)``.
    """
    owned = _OwnedHook(fn)
    if pre:
        h = module.register_forward_pre_hook(owned, with_kwargs=with_kwargs)
    else:
        h = module.register_forward_hook(owned, with_kwargs=with_kwargs, always_call=always_call)
    handle.on_remove(h.remove)


# ----------------------------------------------------------------------------------------------- foreign hooks
class _Inner:
    """The "forward" a foreign hook installer sees: calls whatever lies below its layer in the patch stack."""

    __slots__ = ("target", "__weakref__")

    def __init__(self):
        self.target = None

    def __call__(self, *args, **kwargs):
        return self.target(*args, **kwargs)


_MISSING = object()


def foreign_hooks(model: nn.Module, install: Callable[[nn.Module], None], handle: Handle,
                  attr: str = "_diffusers_hook") -> list:
    """Run ``install(model)`` - a third-party installer that replaces ``module.forward`` and keeps its state in
    ``module.<attr>`` (diffusers' ``HookRegistry``) - so that it composes with every other handle.

    Each module whose ``forward`` the installer replaced gets one :func:`patch_forward` layer (owned by ``handle``)
    that runs the installed chain on top of whatever lies below that layer; the installer's registries are taken off
    the modules and returned (the caller drives them: cache contexts, resets), so two installers never share a
    registry and removing one never touches another's hooks. Removal calls each foreign hook's
    ``deinitalize_hook`` (diffusers' spelling) and drops the layers.
    """
    mods = list(model.named_modules())
    saved = []
    for _, m in mods:  # every module shows the installer a fresh stub and no registry
        d = m.__dict__
        stub = _Inner()
        saved.append((d.get("forward", _MISSING), d.pop(attr, _MISSING), stub))
        d["forward"] = stub
    registries = []
    installed = []
    try:
        install(model)
    finally:
        for (_, m), (fwd, reg, stub) in zip(mods, saved):
            d = m.__dict__
            now = d.pop("forward", stub)
            new_reg = d.pop(attr, _MISSING)
            if fwd is not _MISSING:
                d["forward"] = fwd
            if reg is not _MISSING:
                d[attr] = reg
            if new_reg is not _MISSING:
                registries.append(new_reg)
            if now is not stub:
                installed.append((m, now, stub))
    for m, chain, stub in installed:
        patch_forward(m, _foreign_layer(chain, stub), handle)

    def deinit():
        for reg in registries:
            for name in list(getattr(reg, "_hook_order", ())):
                hook = reg.hooks[name]
                if hasattr(hook, "deinitalize_hook"):
                    hook.deinitalize_hook(reg._module_ref)

    handle.on_remove(deinit)
    return registries


def _foreign_layer(chain: Callable, stub: _Inner) -> Callable:
    def layer(call_next, *args, **kwargs):
        prev = stub.target
        stub.target = call_next
        try:
            return chain(*args, **kwargs)
        finally:
            stub.target = prev

    return layer


# ----------------------------------------------------------------------------------------------- capture
def _check_layers(model: nn.Module, layers) -> list[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the network, not its Denoiser wrapper), "
                        f"got {type(model).__name__}")
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty; name at least one submodule, e.g. 'down_blocks.1' (see model.named_modules())")
    if not all(isinstance(n, str) for n in layers):
        raise TypeError("layers must be submodule names (str), as listed by model.named_modules()")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has duplicates: {layers}")
    names = dict(model.named_modules())
    for n in layers:
        if n not in names:
            import difflib

            close = difflib.get_close_matches(n, [k for k in names if k], n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                "; list the names with [n for n, _ in model.named_modules()]"
            raise ValueError(f"{type(model).__name__} has no submodule named {n!r}{hint}")
    return layers


class Capture(Handle):
    """A read-only :class:`Handle` that records the outputs of named submodules; returned by :func:`capture`.

    ``outputs[name]`` is the hidden state of the *last* call of that module (:func:`output_tensor` of its output,
    detached unless ``detach=False``); with ``keep_all=True`` ``history[name]`` lists every call's output. ``calls[name]`` counts the calls.
    ``remove()`` (or leaving the ``with`` block) removes every hook; it is idempotent.
    """

    alters_outputs = False

    def __init__(self, model: nn.Module, layers: Iterable[str], *, keep_all: bool = False, detach: bool = True,
                 sink: list | None = None):
        self.layers = _check_layers(model, layers)
        super().__init__("capture", model)
        self.keep_all, self.detach, self.sink = bool(keep_all), bool(detach), sink
        self.outputs: dict[str, Tensor] = {}
        self.history: dict[str, list[Tensor]] = {n: [] for n in self.layers}
        self.calls: dict[str, int] = {n: 0 for n in self.layers}
        modules = dict(model.named_modules())
        try:
            for n in self.layers:
                add_hook(modules[n], self._hook(n), self, pre=False, with_kwargs=False)
        except BaseException:
            self.remove()
            raise

    def _hook(self, name: str) -> Callable:
        def hook(module, args, out):
            h = output_tensor(out)
            h = h.detach().clone() if self.detach else h
            self.outputs[name] = h
            self.calls[name] += 1
            if self.keep_all:
                self.history[name].append(h)
            if self.sink is not None:
                self.sink.append(h)
            return None  # never replace the output

        return hook

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.outputs:
            raise KeyError(f"{name!r} has not run yet (captured: {sorted(self.outputs)}); call the model inside the block")
        return self.outputs[name]

    def clear(self) -> None:
        """Forget what was recorded (the hooks stay)."""
        self.outputs.clear()
        for n in self.layers:
            self.history[n].clear()
            self.calls[n] = 0

    @property
    def active(self) -> bool:
        return not self.removed

    def __enter__(self) -> "Capture":
        return self


def capture(model: nn.Module, layers, *, keep_all: bool = False, detach: bool = True,
            sink: list | None = None) -> Capture:
    """Record the outputs of ``model``'s submodules named in ``layers`` (names from ``model.named_modules()``).

    >>> with capture(unet, ["down_blocks.1", "mid_block"]) as cap:
    ...     unet(x, timestep=t)
    >>> cap["mid_block"].shape

    Hooks are forward hooks that return ``None``, so the model's output is unchanged bit for bit; they are removed
    when the block ends, also on an exception. A misspelt name raises ``ValueError`` with the closest names.
    ``detach=False`` keeps the graph (feature losses in distillation); ``sink`` (a list) also receives every
    recorded output in call order.
    """
    return Capture(model, layers, keep_all=keep_all, detach=detach, sink=sink)


# ----------------------------------------------------------------------------------------------- call counting
def timestep_of(args: tuple, kwargs: dict) -> float | None:
    """The largest value of a network call's ``timestep`` (keyword, or the second positional argument), or None.

    diffusers ``UNet2DModel``/``UNet2DConditionModel``/``DiTTransformer2DModel`` all take it there.
    """
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    if isinstance(t, Tensor):
        if t.numel() == 1:
            return t.item()
        return float(t.detach().max()) if t.numel() else None
    if isinstance(t, (list, tuple)):
        return float(max(float(v) for v in t)) if t else None
    try:
        return float(t)
    except (TypeError, ValueError):
        return None


class CallCounter:
    """Counts root forward calls of a model and places each in a trajectory, a step and a slot.

    Inside one trajectory the ``n``-th call (from 0) belongs to step ``n // calls_per_step`` and slot
    ``n % calls_per_step``. A Heun step makes two calls (``calls_per_step=2`` keeps the predictor and corrector
    apart; the final Euler step of Heun has one); classifier-free guidance as two calls (uncond, cond) is also 2.
    A new trajectory starts at the first call, after :meth:`reset`, and whenever the ``timestep`` argument is larger
    than at the previous call. ``stats`` gets ``calls`` (all root calls) and ``trajectories``.
    """

    def __init__(self, calls_per_step: int = 1, stats: dict | None = None):
        if not isinstance(calls_per_step, int) or isinstance(calls_per_step, bool) or calls_per_step < 1:
            raise ValueError(f"calls_per_step must be an int >= 1 (2 for Heun or two-call CFG), got {calls_per_step!r}")
        self.calls_per_step = calls_per_step
        self.stats = {} if stats is None else stats
        self.stats.setdefault("calls", 0)
        self.stats.setdefault("trajectories", 0)
        self.n = -1
        self.last_t: float | None = None
        self.fresh = True
        self._on_new: list[Callable[[], None]] = []

    @property
    def step(self) -> int:
        return max(self.n, 0) // self.calls_per_step

    @property
    def slot(self) -> int:
        return max(self.n, 0) % self.calls_per_step

    def on_new_trajectory(self, fn: Callable[[], None]) -> None:
        self._on_new.append(fn)

    def reset(self) -> None:
        """The next call starts a new trajectory."""
        self.fresh = True

    def observe(self, args: tuple, kwargs: dict) -> None:
        """Account for one root call with these arguments."""
        t = timestep_of(args, kwargs)
        if self.fresh or (t is not None and self.last_t is not None and t > self.last_t * (1 + 1e-6) + 1e-9):
            self.fresh = False
            self.n = 0
            self.stats["trajectories"] += 1
            for fn in self._on_new:
                fn()
        else:
            self.n += 1
        self.last_t = t
        self.stats["calls"] += 1

    def attach(self, model: nn.Module, handle: Handle, on_call: Callable | None = None) -> None:
        """Observe ``model``'s root calls (a forward pre-hook); ``on_call(counter, args, kwargs)`` runs after."""
        def pre(module, args, kwargs):
            self.observe(args, kwargs)
            if on_call is not None:
                on_call(self, args, kwargs)

        add_hook(model, pre, handle, pre=True)
        handle.on_reset(self.reset)


def count_calls(model_or_pipeline: Any, *, calls_per_step: int = 1) -> Handle:
    """Count root forward calls of a model: ``stats = {calls, trajectories, steps}`` (a pre-hook; no other effect).

    ``steps`` is the number of steps of the current trajectory, ``ceil(calls_in_trajectory / calls_per_step)``:
    an ``n``-step Euler/DDIM run makes ``n`` calls, an ``n``-step Heun run ``2n - 1`` (its last step is Euler).
    """
    model = resolve_model(model_or_pipeline, method="count_calls")
    h = Handle("count_calls", model, alters_outputs=False)
    claim(model, "count_calls", h)
    counter = CallCounter(calls_per_step, h.stats)
    h.stats["steps"] = 0

    def on_call(c, args, kwargs):
        h.stats["steps"] = c.n // c.calls_per_step + 1

    counter.attach(model, h, on_call)
    return h


def record_calls(model: nn.Module, run: Callable[[], object]) -> list[tuple[tuple, dict]]:
    """Run ``run()`` and return a copy of the ``(args, kwargs)`` of every root call of ``model`` (a pre-hook)."""
    calls: list[tuple[tuple, dict]] = []

    def pre(module, args, kwargs):
        calls.append((_clone(args), _clone(kwargs)))

    with Handle("record_calls", model, alters_outputs=False) as h, torch.no_grad():
        add_hook(model, pre, h, pre=True)
        run()
    return calls


def _clone(v):
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(u) for u in v)
    if isinstance(v, dict):
        return {k: _clone(u) for k, u in v.items()}
    return v


__all__ += ["record_calls"]
