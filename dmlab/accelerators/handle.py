"""Handles: the one reversible way accelerators (and probes) attach to a model (CONVENTIONS §1.5 and §4).

Every ``apply_<method>(model_or_pipeline, config)`` returns a :class:`Handle`:

* ``handle.remove()`` restores the model bit for bit (its ``__dict__``, hooks and therefore its outputs); it is
  idempotent, and it runs also when an exception leaves a ``with apply_...(...) as h:`` block;
* ``handle.stats`` is a plain dict of what happened (root calls, cache hits, ...), documented by each method;
* applying the same method twice to one model raises a :class:`RuntimeError` that says what to do.

The building blocks, for anyone writing a new method:

* :func:`patch_forward` - a reversible forward patch. Several patches on one module stack (the last applied is the
  outermost) and come off in any order; the module's own ``forward`` is back once the last one is removed.
* :func:`add_hook` - a forward / forward-pre hook whose removal the handle owns.
* :class:`CallCounter` - counts **root forward calls** with a pre-hook on the model (never scheduler timesteps):
  a sampler step is one call for Euler/DDIM/DPM-Solver, **two for a Heun step** (predictor and corrector) and two
  for classifier-free guidance run as two calls; ``calls_per_step`` groups them. A new trajectory starts when the
  model's ``timestep`` argument goes up (noise levels only go down inside one sampling run), or on ``reset()``.
* :func:`resolve_model` - the network inside a diffusers pipeline (``.unet`` / ``.transformer``) or a dmlab
  adapter (``.model``).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

from torch import Tensor, nn

__all__ = ["Handle", "CallCounter", "add_hook", "claim", "count_calls", "patch_forward", "resolve_model",
           "timestep_of"]


# ----------------------------------------------------------------------------------------------- Handle
class Handle:
    """What every accelerator returns: a context manager whose :meth:`remove` undoes everything it did.

    ``stats`` is a dict the method fills in while the model runs. ``remove()`` runs the registered undo steps in
    reverse order (also if one of them fails: the first error is re-raised after all ran) and may be called any
    number of times. ``reset()`` forgets per-trajectory state (caches) without removing anything.
    """

    def __init__(self, name: str, model: nn.Module | None = None, stats: dict | None = None):
        self.name = name
        self.model = model
        self.stats: dict[str, Any] = {} if stats is None else stats
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
        return f"Handle({self.name!r}, {state}, stats={self.stats})"


# ----------------------------------------------------------------------------------------------- model lookup
def resolve_model(obj: Any, *, method: str = "this accelerator") -> nn.Module:
    """The ``nn.Module`` an accelerator attaches to: ``obj`` itself, a pipeline's ``.unet`` or ``.transformer``, or
    the ``.model`` of a dmlab adapter such as :class:`dmlab.denoisers.DiscreteVPDenoiser`."""
    if isinstance(obj, nn.Module):
        return obj
    for attr in ("unet", "transformer", "model"):
        m = getattr(obj, attr, None)
        if isinstance(m, nn.Module):
            return m
    raise TypeError(f"{method} needs a torch.nn.Module, a diffusers pipeline (with .unet or .transformer) or a dmlab "
                    f"adapter with .model (e.g. DiscreteVPDenoiser); got {type(obj).__name__}")


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def claim(model: nn.Module, method: str, handle: Handle) -> None:
    """Mark ``method`` as applied to ``model`` until ``handle`` is removed; raise if it already is."""
    active = _ACTIVE.setdefault(model, set())
    if method in active:
        raise RuntimeError(f"{method} is already applied to this {type(model).__name__}; remove the first handle "
                           f"(handle.remove(), or leave its `with` block) before applying it again, or apply it to a "
                           f"copy (copy.deepcopy(model)) to compare the two side by side")
    active.add(method)

    def release():
        s = _ACTIVE.get(model)
        if s is not None:
            s.discard(method)
            if not s:
                del _ACTIVE[model]

    handle.on_remove(release)


def active_methods(model: nn.Module) -> set[str]:
    """The dmlab methods currently applied to ``model`` (a copy)."""
    return set(_ACTIVE.get(model, ()))


# ----------------------------------------------------------------------------------------------- patches
class _PatchedForward:
    """Installed as ``module.forward``: calls the stacked wrappers around the module's own forward.

    A wrapper is ``fn(call_next, *args, **kwargs)``; the last one applied is the outermost.
    """

    def __init__(self, module: nn.Module):
        self.had_instance_forward = "forward" in module.__dict__
        self.saved = module.__dict__.get("forward")
        self.base = self.saved if self.had_instance_forward else type(module).forward.__get__(module)
        self.__wrapped__ = self.base  # inspect.signature(module.forward) still shows the real arguments
        self.layers: list[list] = []

    def _run(self, i: int, args, kwargs):
        if i < 0:
            return self.base(*args, **kwargs)
        return self.layers[i][1](lambda *a, **k: self._run(i - 1, a, k), *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if len(self.layers) == 1:  # the common case, without building a chain
            return self.layers[0][1](self.base, *args, **kwargs)
        return self._run(len(self.layers) - 1, args, kwargs)


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

    def undo():
        disp.layers[:] = [e for e in disp.layers if e is not entry]
        if disp.layers:
            return
        if module.__dict__.get("forward") is disp:
            if disp.had_instance_forward:
                module.__dict__["forward"] = disp.saved
            else:
                del module.__dict__["forward"]
        else:  # something patched on top of us and is still there: stay as a pass-through
            warnings.warn(f"{handle.name}: {type(module).__name__}.forward was patched again by someone else after "
                          f"dmlab; left a pass-through in place. Remove patches in reverse order to restore exactly.",
                          stacklevel=3)

    handle.on_remove(undo)


def add_hook(module: nn.Module, fn: Callable, handle: Handle, *, pre: bool, always_call: bool = False) -> None:
    """Register a forward (``pre=False``) or forward-pre hook with keyword arguments; ``handle`` removes it."""
    if pre:
        h = module.register_forward_pre_hook(fn, with_kwargs=True)
    else:
        h = module.register_forward_hook(fn, with_kwargs=True, always_call=always_call)
    handle.on_remove(h.remove)


# ----------------------------------------------------------------------------------------------- call counting
def timestep_of(args: tuple, kwargs: dict) -> float | None:
    """The largest value of a network call's ``timestep`` (keyword, or the second positional argument), or None.

    diffusers ``UNet2DModel``/``UNet2DConditionModel``/``DiTTransformer2DModel`` all take it there.
    """
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    if isinstance(t, Tensor):
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
    h = Handle("count_calls", model)
    claim(model, "count_calls", h)
    counter = CallCounter(calls_per_step, h.stats)
    h.stats["steps"] = 0

    def on_call(c, args, kwargs):
        h.stats["steps"] = c.n // c.calls_per_step + 1

    counter.attach(model, h, on_call)
    return h


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    """``dict(model.named_modules())`` without the root."""
    return {k: v for k, v in model.named_modules() if k}


def unknown_name_error(name: str, names, what: str = "module") -> ValueError:
    """A ValueError for an unknown module name that lists the closest valid names."""
    import difflib

    close = difflib.get_close_matches(name, list(names), n=4, cutoff=0.5)
    hint = f"; did you mean {close}?" if close else ""
    return ValueError(f"no {what} named {name!r} in this model{hint} (list them with [n for n, _ in "
                      f"model.named_modules()])")


def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The first tensor argument of a call (the ``sample``/``hidden_states`` of diffusers modules)."""
    for a in args:
        if isinstance(a, Tensor):
            return a
    for k in ("hidden_states", "sample", "input_tensor", "x"):
        if isinstance(kwargs.get(k), Tensor):
            return kwargs[k]
    for v in kwargs.values():
        if isinstance(v, Tensor):
            return v
    return None
