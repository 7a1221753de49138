"""Feature caching: reuse what a network computed at an earlier step instead of computing it again.

One primitive, :func:`apply_feature_cache`: a set of modules whose outputs are computed at *key* steps and served
from a cache at the steps in between. Three papers are configurations of it:

* **DeepCache** (Ma, Fang & Wang, CVPR 2024, arXiv 2312.00858; paper 73): a UNet's deep features change slowly,
  so every ``interval``-th step runs the whole UNet and the steps between run only the shallow skip branch
  ``branch`` (the first down layers and the last up layers) on top of the cached deep features.
  :class:`DeepCacheConfig`, :func:`apply_deepcache`; the module set mirrors the official helper
  (``DeepCache/extension/deepcache.py``, Apache-2.0) so the outputs are identical at the same interval and branch.
* **Encoder propagation** (Li et al., "Faster Diffusion", NeurIPS 2024, arXiv 2312.09608; paper 35): the UNet
  encoder (``conv_in``, down blocks, mid block) changes gently, the decoder a lot, so the encoder runs only at key
  steps and the decoder at every step on the cached encoder features. :class:`EncoderPropagationConfig`,
  :func:`apply_encoder_propagation` (the paper's parallel decoding and prior-noise injection are sampler-level and
  not included).
* **Feature inheritance** (Zhu et al., A-SDM, arXiv 2406.00210; paper 3, its tuning-free part): skip local
  computations at *block*, *layer* or *unit* granularity and inherit their features from the previous key step.
  :class:`FeatureInheritanceConfig`, :func:`apply_feature_inheritance`.

Steps are counted from root forward calls (:class:`dmlab.hooks.CallCounter`): step ``s`` is a key
step when ``s % interval == 0`` (or ``s in key_steps``); the first step of every trajectory is always a key step.
A Heun step is two calls: set ``calls_per_step=2`` (each call position in a step gets its own cache), likewise for
classifier-free guidance run as two calls (diffusers pipelines batch it into one call).

``handle.stats``: ``calls`` (root calls), ``trajectories``, ``full_calls`` (calls that computed every cached module),
``cached_calls`` (calls that reused), ``cache_hits`` (module outputs served from the cache), ``forced_full``
(reuse calls turned into full calls because the input shape changed since the key step).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import anatomy
from ..anatomy import BLOCK_LISTS, granularity_of, module_names, resolve_model, unknown_name_error
from ..hooks import CallCounter, Handle, add_hook, claim, input_tensor, patch_forward

__all__ = ["FeatureCacheConfig", "DeepCacheConfig", "EncoderPropagationConfig", "FeatureInheritanceConfig",
           "apply_feature_cache", "apply_deepcache", "apply_encoder_propagation", "apply_feature_inheritance",
           "deepcache_modules", "encoder_modules", "granularity_of", "dense_early_keys"]

REUSE_MODES = ("output", "residual")
GRANULARITIES = ("block", "layer", "unit")


# ----------------------------------------------------------------------------------------------- configs
def _check_int(v, name: str, lo: int, hint: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}; {hint}")


def _check_schedule(cfg) -> None:
    _check_int(cfg.interval, "interval", 1, "interval=1 computes every step (no caching), 3 reuses for 2 of every 3 steps")
    _check_int(cfg.calls_per_step, "calls_per_step", 1, "use 2 for Heun or for CFG run as two calls")
    if cfg.key_steps is not None:
        ks = tuple(cfg.key_steps)
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in ks):
            raise ValueError(f"key_steps must be a non-empty sequence of step indices >= 0, got {cfg.key_steps!r}; "
                             f"e.g. dense_early_keys(n_steps=20, n_keys=8)")
        object.__setattr__(cfg, "key_steps", tuple(sorted(set(ks))))


def _is_key(cfg, step: int) -> bool:
    if step == 0:
        return True
    if cfg.key_steps is not None:
        return step in cfg.key_steps
    return step % cfg.interval == 0


def dense_early_keys(n_steps: int, n_keys: int, power: float = 2.0) -> tuple[int, ...]:
    """``n_keys`` key steps out of ``n_steps``, denser at the start: ``round((n_steps-1) (i/(n_keys-1))^power)``.

    The shape of Faster Diffusion's hand-picked SD list (keys 0,1,2,3,5,10,15,25,35 of 50; Li et al. 2024) and of
    DeepCache's non-uniform schedule (Ma et al. 2024, Sec. 3.3). Duplicates are filled with the next free steps.
    """
    _check_int(n_steps, "n_steps", 1, "the sampler's number of steps")
    _check_int(n_keys, "n_keys", 1, "how many steps compute the cached modules")
    if n_keys > n_steps:
        raise ValueError(f"n_keys={n_keys} > n_steps={n_steps}; at most every step can be a key step")
    if not power > 0:
        raise ValueError(f"power must be > 0 (1 is uniform, > 1 denser early), got {power}")
    if n_keys == 1:
        return (0,)
    keys: list[int] = []
    for i in range(n_keys):
        k = round((n_steps - 1) * (i / (n_keys - 1)) ** power)
        while k in keys:
            k += 1
        keys.append(min(k, n_steps - 1))
    return tuple(sorted(set(keys)))


@dataclass(frozen=True)
class FeatureCacheConfig:
    """The caching primitive: the outputs of ``modules`` are computed at key steps and reused in between.

    ``modules``: qualified names (``model.named_modules()``) of the modules whose work is skipped at reuse steps.
    ``interval``: step ``s`` is a key step when ``s % interval == 0`` (1 = never reuse: a no-op).
    ``key_steps``: explicit key steps instead (step 0 is always one).
    ``reuse``: ``"output"`` serves the stored output; ``"residual"`` serves ``input + (output - input)`` from the key
    step, i.e. only the module's update is reused (right for residual blocks such as transformer blocks, whose input
    stays fresh).
    ``calls_per_step``: root calls per sampler step (2 for Heun or two-call CFG); each call position has its own cache.
    """

    modules: tuple[str, ...]
    interval: int = 2
    key_steps: tuple[int, ...] | None = None
    reuse: str = "output"
    calls_per_step: int = 1

    def __post_init__(self):
        if isinstance(self.modules, str):
            object.__setattr__(self, "modules", (self.modules,))
        mods = tuple(self.modules)
        if not mods or not all(isinstance(m, str) and m for m in mods):
            raise ValueError(f"modules must be a non-empty sequence of module names, got {self.modules!r}")
        object.__setattr__(self, "modules", mods)
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {REUSE_MODES}, got {self.reuse!r}")
        _check_schedule(self)


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache (Ma, Fang & Wang 2024): full UNet every ``interval`` steps, the shallow ``branch`` in between.

    ``branch = 3 * block + layer`` (the official ``cache_branch_id``): the skip connection whose decoder side is
    recomputed; 0 is the shallowest (``conv_in`` -> last up layer) and the fastest. ``interval=1`` is a no-op.
    """

    interval: int = 3
    branch: int = 0
    key_steps: tuple[int, ...] | None = None
    calls_per_step: int = 1

    def __post_init__(self):
        _check_int(self.branch, "branch", 0, "branch = 3 * block + layer selects the skip branch kept fresh (0 = shallowest)")
        _check_schedule(self)


@dataclass(frozen=True)
class EncoderPropagationConfig:
    """Faster Diffusion's encoder propagation (Li et al. 2024): the encoder (``conv_in``, down blocks, mid block)
    runs at key steps only; the decoder runs every step on the cached encoder features. ``interval=1`` is a no-op."""

    interval: int = 2
    key_steps: tuple[int, ...] | None = None
    include_mid: bool = True
    calls_per_step: int = 1

    def __post_init__(self):
        _check_schedule(self)


@dataclass(frozen=True)
class FeatureInheritanceConfig:
    """A-SDM feature inheritance (Zhu et al. 2024, tuning-free part): skip ``targets`` at one ``granularity``.

    ``granularity``: ``"block"`` (``up_blocks.1``, ``mid_block``, ``transformer_blocks.3``), ``"layer"`` (a layer of a
    block: ``up_blocks.1.resnets.0``, ``transformer_blocks.3.attn1``) or ``"unit"`` (anything inside a layer:
    ``up_blocks.1.resnets.0.conv2``, ``transformer_blocks.3.ff.net.2``). ``targets`` are names or ``fnmatch``
    patterns (``"up_blocks.*"``); a pattern keeps the matches at ``granularity``.
    """

    targets: tuple[str, ...]
    granularity: str = "block"
    interval: int = 2
    key_steps: tuple[int, ...] | None = None
    reuse: str = "output"
    calls_per_step: int = 1

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        t = tuple(self.targets)
        if not t or not all(isinstance(m, str) and m for m in t):
            raise ValueError(f"targets must be a non-empty sequence of module names or patterns, got {self.targets!r}")
        object.__setattr__(self, "targets", t)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {REUSE_MODES}, got {self.reuse!r}")
        _check_schedule(self)


# ----------------------------------------------------------------------------------------------- module sets
def _require_unet(model: nn.Module, method: str) -> None:
    anatomy.require_unet(model, method)


def deepcache_modules(unet: nn.Module, branch: int = 0) -> tuple[str, ...]:
    """The modules DeepCache serves from its cache between key steps, for skip branch ``branch``.

    Mirrors ``DeepCacheSDHelper.is_skip_step`` of the official code (block ``branch // 3``, layer ``branch % 3``):
    down layers at or after the branch, the mid block, and up layers before the branch's partner (counted from the
    output end) are reused; the outermost reused module of each subtree is listed.
    """
    _require_unet(unet, "DeepCache")
    n_down = len(unet.down_blocks)
    if not 0 <= branch < 3 * n_down:
        raise ValueError(f"branch must be in 0..{3 * n_down - 1} for this UNet ({n_down} down blocks; "
                         f"branch = 3 * block + layer), got {branch}")
    block_id, layer_id = divmod(branch, 3)
    out = []
    for i, blk in enumerate(unet.down_blocks):
        if i > block_id or (i == block_id and layer_id == 0):
            out.append(f"down_blocks.{i}")
        elif i == block_id:
            n_res = len(blk.resnets)
            out += [f"down_blocks.{i}.attentions.{j}" for j in range(len(getattr(blk, "attentions", None) or []))
                    if j >= layer_id]
            out += [f"down_blocks.{i}.resnets.{j}" for j in range(n_res) if j >= layer_id]
            if getattr(blk, "downsamplers", None) and n_res >= layer_id:
                out += [f"down_blocks.{i}.downsamplers.{k}" for k in range(len(blk.downsamplers))]
    if getattr(unet, "mid_block", None) is not None:
        out.append("mid_block")
    n_up = len(unet.up_blocks)
    for i, blk in enumerate(unet.up_blocks):
        r = n_up - i - 1
        if r > block_id:
            out.append(f"up_blocks.{i}")
        elif r == block_id:
            n_res = len(blk.resnets)
            out += [f"up_blocks.{i}.resnets.{j}" for j in range(n_res) if n_res - j - 1 > layer_id]
            out += [f"up_blocks.{i}.attentions.{j}" for j in range(len(getattr(blk, "attentions", None) or []))
                    if n_res - j - 1 > layer_id]
    return tuple(out)


def encoder_modules(unet: nn.Module, include_mid: bool = True) -> tuple[str, ...]:
    """The UNet encoder of Faster Diffusion: ``conv_in``, every down block and (``include_mid``) the mid block."""
    _require_unet(unet, "Encoder propagation")
    out = ["conv_in"] + [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if include_mid and getattr(unet, "mid_block", None) is not None:
        out.append("mid_block")
    return tuple(out)


def _expand_targets(model: nn.Module, cfg: FeatureInheritanceConfig) -> tuple[str, ...]:
    names = module_names(model)
    chosen: list[str] = []
    for t in cfg.targets:
        if any(c in t for c in "*?["):
            hits = [n for n in names if fnmatch.fnmatchcase(n, t) and granularity_of(n) == cfg.granularity
                    and not isinstance(names[n], (nn.ModuleList, nn.ModuleDict))]
            if not hits:
                raise ValueError(f"pattern {t!r} matches no {cfg.granularity} of this {type(model).__name__}; "
                                 f"examples of its {cfg.granularity}s: "
                                 f"{[n for n in names if granularity_of(n) == cfg.granularity][:6]}")
            chosen += hits
            continue
        if t not in names:
            raise unknown_name_error(t, names)
        g = granularity_of(t)
        if g is None:
            raise ValueError(f"{t!r} is outside the network's blocks; feature inheritance skips a block, a layer or a "
                             f"unit inside {BLOCK_LISTS + ('mid_block',)}")
        if g != cfg.granularity:
            raise ValueError(f"{t!r} is a {g}, not a {cfg.granularity}; use granularity={g!r} or name a "
                             f"{cfg.granularity}")
        chosen.append(t)
    return tuple(dict.fromkeys(chosen))


# ----------------------------------------------------------------------------------------------- the engine
class _FeatureCache:
    def __init__(self, handle: Handle, cfg: Any, reuse: str):
        self.h, self.cfg, self.reuse = handle, cfg, reuse
        self.store: dict = {}
        self.shapes: dict = {}
        self.counts: dict = {}
        self.active = False
        self.full = True
        self.slot = 0
        self.shallow = None  # DeepCache's direct reuse route (_ShallowBranch), when it applies
        for k in ("full_calls", "cached_calls", "cache_hits", "forced_full"):
            handle.stats.setdefault(k, 0)

    def new_trajectory(self):
        self.store.clear()
        self.shapes.clear()

    def on_call(self, counter: CallCounter, args, kwargs):
        step, slot = counter.step, counter.slot
        x = input_tensor(args, kwargs)
        shape = tuple(x.shape) if x is not None else None
        full = _is_key(self.cfg, step)
        if not full and self.shapes.get(slot) != shape:
            full = True
            self.h.stats["forced_full"] += 1
        if full:
            self.shapes[slot] = shape
            if self.shallow is not None:
                self.shallow.key_step()
        self.full, self.slot, self.active = full, slot, True
        self.counts.clear()
        self.h.stats["full_calls" if full else "cached_calls"] += 1

    def done(self, *_):
        self.active = False

    def wrapper(self, name: str):
        def wrap(call_next, *args, **kwargs):
            if not self.active:
                return call_next(*args, **kwargs)
            k = self.counts.get(name, 0)
            self.counts[name] = k + 1
            key = (self.slot, name, k)
            if self.full or key not in self.store:
                out = call_next(*args, **kwargs)
                if self.reuse == "output":
                    self.store[key] = out
                else:
                    x = input_tensor(args, kwargs)
                    if not (isinstance(out, Tensor) and x is not None and out.shape == x.shape):
                        raise ValueError(f"reuse='residual' needs a module whose output has its input's shape; "
                                         f"{name} ({self.h.model.get_submodule(name).__class__.__name__}) does not: "
                                         f"use reuse='output' or pick a residual block")
                    self.store[key] = out - x
                return out
            self.h.stats["cache_hits"] += 1
            if self.reuse == "output":
                return self.store[key]
            return input_tensor(args, kwargs) + self.store[key]

        return wrap


def _apply(model: nn.Module, method: str, names: tuple[str, ...], cfg: Any, reuse: str, *,
           shallow: bool = False) -> Handle:
    all_names = module_names(model)
    for n in names:
        if n not in all_names:
            raise unknown_name_error(n, all_names)
        if isinstance(all_names[n], (nn.ModuleList, nn.ModuleDict)):
            raise ValueError(f"{n!r} is a container ({type(all_names[n]).__name__}), not a callable module; name its "
                             f"elements ({n}.0, {n}.1, ...)")
    h = Handle(method, model)
    claim(model, method, h)
    try:
        h.stats["modules"] = names
        counter = CallCounter(cfg.calls_per_step, h.stats)
        eng = _FeatureCache(h, cfg, reuse)
        counter.on_new_trajectory(eng.new_trajectory)
        counter.attach(model, h, eng.on_call)
        add_hook(model, eng.done, h, pre=False, always_call=True, with_kwargs=False)
        for n in names:
            patch_forward(all_names[n], eng.wrapper(n), h)
        if shallow:
            eng.shallow = _ShallowBranch(model, eng, names)
            patch_forward(model, eng.shallow.wrapper, h)
        h.on_reset(eng.new_trajectory)
    except BaseException:
        h.remove()
        raise
    return h


def apply_feature_cache(model_or_pipeline: Any, config: FeatureCacheConfig, *, method: str = "feature_cache") -> Handle:
    """Reuse the outputs of ``config.modules`` between key steps (the primitive behind DeepCache, Faster
    Diffusion's encoder propagation and A-SDM's feature inheritance). Returns a :class:`Handle`; see the module
    docstring for ``stats``."""
    if not isinstance(config, FeatureCacheConfig):
        raise TypeError(f"config must be a FeatureCacheConfig, got {type(config).__name__}")
    model = resolve_model(model_or_pipeline, method=method)
    return _apply(model, method, config.modules, config, config.reuse)


class _ShallowBranch:
    """DeepCache's reuse call on a ``UNet2DModel`` at branch 0, computed directly (Ma et al. 2024, Alg. 1).

    A reuse call needs only the time (and class) embedding, ``conv_in``, the last resnet (and attention) of the last
    up block on ``cat([cached deep feature, conv_in output])``, and the output head. Going through
    ``UNet2DModel.forward`` with every cached module patched computes the same thing but pays for the whole Python
    preamble, one wrapper call per cached module and diffusers' ``ModelMixin.dtype`` (a walk over every module and
    parameter) on each call. The statements below are those of ``UNet2DModel.forward`` and ``UpBlock2D``/
    ``AttnUpBlock2D.forward`` in the same order, so the result is bit-identical to the patched route.
    """

    def __init__(self, unet: nn.Module, eng: "_FeatureCache", names: tuple[str, ...]):
        last = unet.up_blocks[-1]
        n = len(last.resnets)
        attns = getattr(last, "attentions", None)
        self.prev = f"up_blocks.{len(unet.up_blocks) - 1}.{'attentions' if attns else 'resnets'}.{n - 2}"
        self.resnet, self.attn = last.resnets[-1], (attns[-1] if attns else None)
        self.unet, self.eng, self.n_cached = unet, eng, len(names)
        cfg = unet.config
        self.center, self.fourier = bool(cfg.center_input_sample), cfg.time_embedding_type == "fourier"
        self.class_timestep = cfg.class_embed_type == "timestep"
        self.dtype_param = next((p for p in unet.parameters() if p.is_floating_point()), None)
        self.dtype = None  # diffusers' ``unet.dtype``, read at key steps (it walks the whole model)

    @staticmethod
    def supports(unet: nn.Module, branch: int) -> bool:
        from diffusers import UNet2DModel

        if type(unet) is not UNet2DModel or branch != 0 or "forward" in unet.__dict__:
            return False
        last = unet.up_blocks[-1]
        kinds = ("UpBlock2D", "AttnUpBlock2D")
        return (type(last).__name__ in kinds and type(last).__module__.startswith("diffusers.")
                and len(last.resnets) >= 2 and last.upsamplers is None and not hasattr(last, "skip_conv")
                and not any(getattr(last, a, None) for a in ("s1", "s2", "b1", "b2"))
                and not any(hasattr(b, "skip_conv") for b in unet.down_blocks))

    def key_step(self) -> None:
        self.dtype = self.unet.dtype

    def wrapper(self, call_next, sample=None, timestep=None, class_labels=None, return_dict=True, *rest, **kw):
        eng = self.eng
        key = (eng.slot, self.prev, 0)
        if (eng.full or rest or kw or not isinstance(sample, Tensor) or key not in eng.store
                or self.dtype_param is None or self.dtype_param.dtype != self.dtype):
            return call_next(sample, timestep, class_labels, return_dict, *rest, **kw)
        unet, dtype = self.unet, self.dtype
        if self.center:
            sample = 2 * sample - 1.0
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=dtype))
        if unet.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if self.class_timestep:
                class_labels = unet.time_proj(class_labels)
            emb = emb + unet.class_embedding(class_labels).to(dtype=dtype)
        elif class_labels is not None:
            raise ValueError("class_embedding needs to be initialized in order to use class conditioning")
        res = unet.conv_in(sample)
        h = self.resnet(torch.cat([eng.store[key], res], dim=1), emb)
        if self.attn is not None:
            h = self.attn(h)
        h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        if self.fourier:
            h = h / timesteps.reshape((h.shape[0], *([1] * len(h.shape[1:]))))
        eng.h.stats["cache_hits"] += self.n_cached
        if not return_dict:
            return (h,)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=h)


def apply_deepcache(model_or_pipeline: Any, config: DeepCacheConfig = DeepCacheConfig(), *,
                    shortcut: bool = True) -> Handle:
    """DeepCache (Ma, Fang & Wang, CVPR 2024; paper 73) on a diffusers UNet or a pipeline holding one.

    Gives the same outputs as the ``DeepCache`` package's ``DeepCacheSDHelper`` at the same ``cache_interval`` and
    ``cache_branch_id`` when the sampler makes one call per step. ``stats`` as in the module docstring.
    ``shortcut`` (default): on a ``UNet2DModel`` at branch 0, reuse calls compute only the shallow branch directly
    instead of running ``forward`` with the cached modules patched (same bits, less Python per call);
    ``shortcut=False`` always takes the patched route (the reference the tests compare against).
    """
    if not isinstance(config, DeepCacheConfig):
        raise TypeError(f"config must be a DeepCacheConfig, got {type(config).__name__}")
    model = resolve_model(model_or_pipeline, method="DeepCache")
    names = deepcache_modules(model, config.branch)
    fast = shortcut and config.interval > 1 and _ShallowBranch.supports(model, config.branch)
    h = _apply(model, "deepcache", names, config, "output", shallow=fast)
    h.stats["shortcut"] = fast
    return h


def apply_encoder_propagation(model_or_pipeline: Any, config: EncoderPropagationConfig = EncoderPropagationConfig()) -> Handle:
    """Encoder propagation from Faster Diffusion (Li et al., NeurIPS 2024; paper 35) on a diffusers UNet."""
    if not isinstance(config, EncoderPropagationConfig):
        raise TypeError(f"config must be an EncoderPropagationConfig, got {type(config).__name__}")
    model = resolve_model(model_or_pipeline, method="Encoder propagation")
    return _apply(model, "encoder_propagation", encoder_modules(model, config.include_mid), config, "output")


def apply_feature_inheritance(model_or_pipeline: Any, config: FeatureInheritanceConfig) -> Handle:
    """A-SDM feature inheritance (Zhu et al. 2024; paper 3, tuning-free part) at block, layer or unit granularity,
    on any network with diffusers-style block lists (UNets and DiT-style transformers)."""
    if not isinstance(config, FeatureInheritanceConfig):
        raise TypeError(f"config must be a FeatureInheritanceConfig, got {type(config).__name__}")
    model = resolve_model(model_or_pipeline, method="Feature inheritance")
    return _apply(model, "feature_inheritance", _expand_targets(model, config), config, config.reuse)


