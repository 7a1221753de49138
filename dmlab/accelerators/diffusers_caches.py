"""diffusers' own transformer caches, made usable on DiT-style models that are not ``CacheMixin`` (with a handle).

diffusers (>= 0.36) ships cache hooks for transformer denoisers in ``diffusers.hooks``; on classes without
``CacheMixin`` (``DiTTransformer2DModel`` among them) they need two things users trip over: every denoiser call must
run inside a *cache context* (else ``ValueError: No cache context is set``), and stateful hooks must be reset between
sampling runs. TaylorSeer's default identifiers also match nothing in DiT (whose attention modules are ``attn1``),
so it silently does nothing. :func:`apply_diffusers_cache` fixes all three: a pre-hook on the model sets the
context per root call (named by the call's slot, so two-call CFG keeps two states) and resets stateful hooks when a
new trajectory starts. diffusers' hooks are installed through :func:`dmlab.hooks.foreign_hooks`: each hooked module
gets one dmlab patch layer and the handle keeps its own hook registries, so these caches compose with every other
handle in any order of application and removal, and removal restores the modules' ``__dict__`` exactly.

Friendly front ends with defaults that work on DiT:

* :func:`apply_first_block_cache` - First Block Cache (ParaAttention; after TeaCache, Liu et al. 2024):
  skip the remaining blocks when the first block's residual changed by less than ``threshold``.
* :func:`apply_taylorseer` - TaylorSeer (Liu et al. 2025, arXiv 2503.06923): predict attention / MLP outputs
  between full steps with a Taylor series in the step index.
* :func:`apply_mag_cache` + :func:`calibrate_mag_ratios` - MagCache (Ma et al. 2025): skip steps while the
  accumulated residual-magnitude ratio error stays small.
* :func:`apply_pab` - Pyramid Attention Broadcast (Zhao et al. 2024, arXiv 2408.12588): reuse self-attention
  outputs every ``skip_range`` calls inside a timestep window.

``handle.stats``: ``calls``, ``trajectories``, ``module_calls`` (calls of the hooked modules), ``module_computes``
(how many of them really ran) and ``cache_hits = module_calls - module_computes``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..anatomy import require_transformer, resolve_model, transformer_blocks
from ..hooks import CallCounter, Handle, add_hook, claim, foreign_hooks, patch_forward, timestep_of

__all__ = ["apply_diffusers_cache", "apply_first_block_cache", "apply_taylorseer", "apply_mag_cache",
           "calibrate_mag_ratios", "apply_pab", "transformer_blocks"]


def _require_transformer(model: nn.Module, method: str) -> None:
    require_transformer(model, method)


def _state_managers(registries: list) -> list:
    """The ``StateManager`` of every stateful hook in these registries (what diffusers' ``_set_cache_context`` sets)."""
    from diffusers.hooks.hooks import StateManager

    out = []
    for reg in registries:
        for name in reversed(reg._hook_order):
            hook = reg.hooks[name]
            if hook._is_stateful:
                out += [a for a in vars(hook).values() if isinstance(a, StateManager)]
    return out


def apply_diffusers_cache(model_or_pipeline: Any, apply_fn: Callable[[nn.Module], None], *, method: str,
                          counted: Sequence[str] = (), calls_per_step: int = 1,
                          on_timestep: Callable[[float | None], None] | None = None) -> Handle:
    """Run ``apply_fn(model)`` (a ``diffusers.hooks.apply_*`` call) under a :class:`Handle` that sets the cache
    context per root call, resets stateful hooks per trajectory and removes everything exactly.

    ``counted``: regexes (``re.fullmatch``) of module names whose calls / real computations ``stats`` counts.
    ``on_timestep(t)`` is told each root call's timestep (Pyramid Attention Broadcast reads it).
    """
    from diffusers.hooks.hooks import CacheContext

    model = resolve_model(model_or_pipeline, method=method)
    _require_transformer(model, method)
    h = Handle(method, model)
    h.batch_state = True  # the hooks keep per-module state of the whole batch (per-sample early exit refuses)
    claim(model, method, h)
    for k in ("module_calls", "module_computes", "cache_hits"):
        h.stats[k] = 0
    try:
        mods = {n: m for n, m in model.named_modules() if n and any(re.fullmatch(p, n) for p in counted)}
        for n, m in mods.items():  # inner patches (under diffusers' hooks) count real computations
            def inner(call_next, *a, **k):
                h.stats["module_computes"] += 1
                h.stats["cache_hits"] = h.stats["module_calls"] - h.stats["module_computes"]
                return call_next(*a, **k)

            def outer(mod, args, kwargs):
                h.stats["module_calls"] += 1
                h.stats["cache_hits"] = h.stats["module_calls"] - h.stats["module_computes"]

            patch_forward(m, inner, h)
            add_hook(m, outer, h, pre=True)

        registries = foreign_hooks(model, apply_fn, h)  # one patch layer per hooked module, own registries
        managers = _state_managers(registries)
        counter = CallCounter(calls_per_step, h.stats)
        counter.on_new_trajectory(lambda: [r.reset_stateful_hooks(recurse=False) for r in registries])

        def on_call(c, args, kwargs):
            t = timestep_of(args, kwargs)
            if on_timestep is not None:
                on_timestep(t)
            ctx = CacheContext(f"call{c.slot}", step_index=c.step, timestep=t)
            for sm in managers:
                sm.set_context(ctx)

        counter.attach(model, h, on_call)

        def clear(*_):
            for sm in managers:
                sm.set_context(None)

        add_hook(model, clear, h, pre=False, always_call=True)
    except BaseException:
        h.remove()
        raise
    return h


def apply_first_block_cache(model_or_pipeline: Any, threshold: float = 0.1, *, calls_per_step: int = 1) -> Handle:
    """First Block Cache (diffusers ``FirstBlockCacheConfig``): skip all blocks after the first while its residual's
    relative change stays under ``threshold`` (0.05 is diffusers' default; on small DiTs it never skips)."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 (0 never skips), got {threshold}")
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache as _apply

    return apply_diffusers_cache(model_or_pipeline, lambda m: _apply(m, FirstBlockCacheConfig(threshold=threshold)),
                                 method="first_block_cache", counted=[r"(transformer_blocks|blocks|layers)\.\d+"],
                                 calls_per_step=calls_per_step)


def _dit_identifiers(model: nn.Module) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    subs = sorted({n.split(".")[2] for n in names if re.fullmatch(r"(transformer_blocks|blocks)\.\d+\.(attn\d?|ff)", n)})
    if not subs:
        raise ValueError("found no attention / feed-forward modules (transformer_blocks.N.attn1 / .ff) to predict; "
                         "pass identifiers=[regex, ...] matching module names (re.fullmatch)")
    return [rf"(transformer_blocks|blocks)\.\d+\.({'|'.join(subs)})"]


def apply_taylorseer(model_or_pipeline: Any, interval: int = 3, *, warmup: int = 2, order: int = 1,
                     identifiers: Sequence[str] | None = None, calls_per_step: int = 1) -> Handle:
    """TaylorSeer (Liu et al. 2025) through diffusers' ``TaylorSeerCacheConfig``, with identifiers that match DiT.

    ``interval``: a full computation every ``interval`` steps after ``warmup`` full steps; ``order``: Taylor order.
    The default identifiers are the ``attn1``/``attn2``/``ff`` modules of every transformer block (diffusers'
    defaults look for ``...attn`` and match nothing in DiT). Factors are kept in the model's dtype.
    """
    for name, v, lo in (("interval", interval, 1), ("warmup", warmup, 1), ("order", order, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    model = resolve_model(model_or_pipeline, method="TaylorSeer")
    _require_transformer(model, "TaylorSeer")
    ids = list(identifiers) if identifiers is not None else _dit_identifiers(model)
    if not any(re.fullmatch(p, n) for p in ids for n, _ in model.named_modules()):
        raise ValueError(f"identifiers {ids} match no module of this {type(model).__name__}; they are matched with "
                         f"re.fullmatch against names such as 'transformer_blocks.0.attn1'")
    dtype = next(model.parameters()).dtype
    cfg = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=order,
                                taylor_factors_dtype=dtype, cache_identifiers=ids)
    return apply_diffusers_cache(model, lambda m: apply_taylorseer_cache(m, cfg), method="taylorseer", counted=ids,
                                 calls_per_step=calls_per_step)


def apply_mag_cache(model_or_pipeline: Any, mag_ratios: Sequence[float], *, threshold: float = 0.06,
                    max_skip_steps: int = 3, retention_ratio: float = 0.2, calls_per_step: int = 1) -> Handle:
    """MagCache (Ma et al. 2025) through diffusers' ``MagCacheConfig``: ``mag_ratios`` from
    :func:`calibrate_mag_ratios` (one per step of the schedule you will sample with)."""
    if mag_ratios is None or len(mag_ratios) < 2:
        raise ValueError("mag_ratios must hold one ratio per sampling step; get them with "
                         "calibrate_mag_ratios(model, run) on the same sampler and number of steps")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    from diffusers.hooks import MagCacheConfig, apply_mag_cache as _apply

    cfg = MagCacheConfig(threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio,
                         num_inference_steps=len(mag_ratios), mag_ratios=torch.tensor(list(mag_ratios)))
    return apply_diffusers_cache(model_or_pipeline, lambda m: _apply(m, cfg), method="mag_cache",
                                 counted=[r"(transformer_blocks|blocks|layers)\.\d+"], calls_per_step=calls_per_step)


@torch.no_grad()
def calibrate_mag_ratios(model_or_pipeline: Any, run: Callable[[], Any]) -> list[float]:
    """MagCache's calibration (Ma et al. 2025, as in diffusers' ``calibrate=True``): run ``run()`` (one sampling
    run) and return, per root call, ``mean_tokens(|r_t| / |r_{t-1}|)`` of the residual ``r`` = last block output -
    first block input (1.0 for the first call). Hooks only; the model is untouched afterwards."""
    model = resolve_model(model_or_pipeline, method="calibrate_mag_ratios")
    _require_transformer(model, "MagCache")
    blocks = transformer_blocks(model)
    h = Handle("calibrate_mag_ratios", model, alters_outputs=False)
    state: dict = {"inp": None, "prev": None, "ratios": []}

    def head(mod, args, kwargs):
        state["inp"] = args[0] if args else kwargs["hidden_states"]

    def tail(mod, args, kwargs, out):
        o = out[0] if isinstance(out, tuple) else out
        r = (o - state["inp"]).float()
        if state["prev"] is None:
            state["ratios"].append(1.0)
        else:
            ratio = torch.linalg.norm(r, dim=-1) / (torch.linalg.norm(state["prev"], dim=-1) + 1e-8)
            state["ratios"].append(float(ratio.mean()))
        state["prev"] = r

    with h:
        add_hook(blocks[0][1], head, h, pre=True)
        add_hook(blocks[-1][1], tail, h, pre=False)
        run()
    return state["ratios"]


def apply_pab(model_or_pipeline: Any, skip_range: int = 2, *, timestep_range: tuple[float, float] = (100, 800),
              calls_per_step: int = 1) -> Handle:
    """Pyramid Attention Broadcast (Zhao et al. 2024) through diffusers: every self-attention output is reused for
    ``skip_range - 1`` calls out of ``skip_range`` while the model's timestep is inside ``timestep_range`` (in the
    network's own timestep units, 0-1000 for DDPM-trained models). The timestep comes from the root call."""
    if not isinstance(skip_range, int) or isinstance(skip_range, bool) or skip_range < 1:
        raise ValueError(f"skip_range must be an int >= 1 (1 never reuses), got {skip_range!r}")
    lo, hi = timestep_range
    if not lo < hi:
        raise ValueError(f"timestep_range must be (low, high) with low < high, got {timestep_range}")
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    now = {"t": None}
    cfg = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=skip_range,
                                          spatial_attention_timestep_skip_range=(lo, hi),
                                          current_timestep_callback=lambda: now["t"] if now["t"] is not None else -1)
    return apply_diffusers_cache(model_or_pipeline, lambda m: apply_pyramid_attention_broadcast(m, cfg), method="pab",
                                 counted=[r"(transformer_blocks|blocks)\.\d+\.attn1"], calls_per_step=calls_per_step,
                                 on_timestep=lambda t: now.__setitem__("t", t))
