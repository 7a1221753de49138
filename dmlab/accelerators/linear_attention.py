"""Linear attention: replace a diffusion model's self-attention by LinFusion's generalised linear attention.

Liu, Yu, Tan & Wang, "LinFusion: 1 GPU, 1 Minute, 16K Image" (arXiv 2409.02097; paper 2). Softmax self-attention
costs ``O(N^2 d)`` in the number of tokens ``N``; LinFusion replaces every self-attention (``attn1``) by a
normalised, non-causal linear attention

    ``q = phi(W_q (h + f_q(h)))``, ``k = phi(W_k (h + f_k(h)))``, ``v = W_v h``, ``phi = elu + 1``,
    ``out = W_o [ q (k^T v / N) / (q . mean(k)) ]``

whose cost is ``O(N d^2)`` (``f_q``, ``f_k``: small MLPs, Linear-LayerNorm-LeakyReLU-Linear), and distils it from the
original model with the loss ``mse(eps) + 0.5 mse(teacher output) + 0.5 mean_l mse(attention output l)`` while the
rest of the network stays frozen (official ``src/linfusion/attention.py`` and ``src/train/distill.py``, read for the
equations; this is our implementation). One deliberate change: the last layer of ``f_q``/``f_k`` starts at zero, so
the student starts from the teacher's own ``W_q, W_k, W_v, W_o`` (the official MLPs start random).

The linear modules live outside the model (:class:`LinearAttentionModules`); :func:`apply_linear_attention` patches
the ``forward`` of the chosen ``Attention`` modules reversibly, so the model's ``state_dict`` never changes.
``layers=()`` replaces nothing (the no-op). Works on any diffusers model whose self-attention modules are called
``attn1`` on ``[B, N, C]`` tokens: ``DiTTransformer2DModel`` and the transformer blocks of ``UNet2DConditionModel``.

``handle.stats``: ``calls`` (root calls), ``linear_calls`` (attention calls served by linear attention),
``tokens`` (largest ``N`` seen).

Cost vs resolution (:func:`cost_curve`) counts FLOPs on the ``meta`` device, so curves reach 16K tokens instantly.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..anatomy import resolve_model, self_attention_names
from ..hooks import Handle, add_hook, capture, claim, output_tensor, patch_forward

__all__ = ["GeneralizedLinearAttention", "LinearAttentionModules", "LinearAttentionConfig", "linear_attention_for",
           "apply_linear_attention", "distill_linear_attention", "self_attention_names", "cost_curve",
           "save_linear_attention", "load_linear_attention", "LINEAR_RECIPE", "build_linear_attention"]

#: How the committed modules ``dit_l_linear`` were distilled (CPU, 1 thread): :func:`build_linear_attention`.
LINEAR_RECIPE = {"base": "dit_l", "steps": 500, "batch_size": 64, "lr": 1e-3, "p_uncond": 0.1, "seed": 0,
                 "mid_dim": None, "w_eps": 1.0, "w_kd": 0.5, "w_feat": 0.5, "data": "load_digits('train')"}


def _mlp(dim: int, mid: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(), nn.Linear(mid, dim))
    nn.init.zeros_(mlp[3].weight)
    nn.init.zeros_(mlp[3].bias)
    return mlp


class GeneralizedLinearAttention(nn.Module):
    """LinFusion's generalised linear attention (Liu et al. 2024, Eq. in Sec. 3), built from a diffusers
    ``Attention`` whose ``to_q/to_k/to_v/to_out`` weights it copies. ``mid_dim`` of the q/k MLPs (default: the
    query width; ``-1`` drops them)."""

    def __init__(self, attn: nn.Module, mid_dim: int | None = None):
        super().__init__()
        self.heads = int(attn.heads)
        self.to_q, self.to_k, self.to_v = (copy.deepcopy(attn.to_q), copy.deepcopy(attn.to_k),
                                           copy.deepcopy(attn.to_v))
        self.to_out = copy.deepcopy(attn.to_out[0])
        dim = self.to_q.in_features
        self.to_q_ = _mlp(dim, mid_dim or dim) if mid_dim != -1 else nn.Identity()
        self.to_k_ = _mlp(dim, mid_dim or dim) if mid_dim != -1 else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        if h.ndim != 3:
            raise ValueError(f"linear attention works on tokens [B, N, C], got shape {tuple(h.shape)}; it replaces "
                             f"the self-attention of transformer blocks (attn1), not UNet2DModel's spatial attention")
        b, n, _ = h.shape
        q = self.to_q(h + self.to_q_(h))
        k = self.to_k(h + self.to_k_(h))
        v = self.to_v(h)
        split = lambda t: t.reshape(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731  [B, H, N, d]
        q, k, v = F.elu(split(q)) + 1.0, F.elu(split(k)) + 1.0, split(v)
        z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4   # [B, H, N, 1]
        kv = (k.transpose(-2, -1) / math.sqrt(n)) @ (v / math.sqrt(n))  # [B, H, d, d] = k^T v / N
        out = (q @ kv / z).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class LinearAttentionModules(nn.Module):
    """Linear-attention replacements for named self-attention modules of one model (kept outside the model)."""

    def __init__(self, names: list[str], mods: list[GeneralizedLinearAttention], mid_dim: int | None = None):
        super().__init__()
        if len(names) != len(mods):
            raise ValueError("names and modules must have the same length")
        self.names = list(names)
        self.mid_dim = mid_dim
        self.mods = nn.ModuleDict({n.replace(".", "__"): m for n, m in zip(names, mods)})

    def __getitem__(self, name: str) -> GeneralizedLinearAttention:
        return self.mods[name.replace(".", "__")]

    def config(self) -> dict:
        m = self[self.names[0]]
        return {"names": self.names, "mid_dim": self.mid_dim, "heads": m.heads, "dim": m.to_q.in_features,
                "inner": m.to_q.out_features}


def linear_attention_for(model_or_pipeline: Any, *, pattern: str = "*attn1", mid_dim: int | None = None
                         ) -> LinearAttentionModules:
    """Untrained :class:`LinearAttentionModules` for every self-attention of a model (LinFusion, Liu et al. 2024),
    initialised from the model's own projections (so before distillation only the attention *kernel* differs)."""
    model = resolve_model(model_or_pipeline, method="linear_attention_for")
    names = self_attention_names(model, pattern)
    if not names:
        raise ValueError(f"{type(model).__name__} has no diffusers Attention module matching {pattern!r}; linear "
                         f"attention replaces the self-attention (attn1) of transformer blocks (DiT, SD UNets)")
    mods = dict(model.named_modules())
    for n in names:
        a = mods[n]
        if (getattr(a, "residual_connection", False) or getattr(a, "rescale_output_factor", 1.0) != 1.0
                or getattr(a, "norm_q", None) is not None or getattr(a, "group_norm", None) is not None
                or getattr(a, "spatial_norm", None) is not None):
            raise ValueError(f"{n} uses a residual connection, output rescaling, q/k norms or a group/spatial norm "
                             f"inside the attention; linear attention only replaces plain self-attention (attn1 of "
                             f"transformer blocks)")
    out = LinearAttentionModules(names, [GeneralizedLinearAttention(mods[n], mid_dim) for n in names], mid_dim)
    p = next(model.parameters())
    return out.to(device=p.device, dtype=p.dtype)


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Which self-attention modules run LinFusion's linear attention (Liu et al. 2024).

    ``modules``: trained :class:`LinearAttentionModules` (:func:`distill_linear_attention` or
    :func:`load_linear_attention`). ``layers``: indices into ``modules.names`` to replace (``None``: all of them;
    ``()``: none, the no-op), e.g. ``(0, 1)`` for a hybrid that keeps softmax attention in the later blocks.
    """

    modules: LinearAttentionModules
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.modules, LinearAttentionModules):
            raise TypeError(f"modules must be LinearAttentionModules (linear_attention_for(model), then "
                            f"distill_linear_attention or load_linear_attention), got {type(self.modules).__name__}")
        if self.layers is not None:
            ls = tuple(self.layers)
            n = len(self.modules.names)
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in ls):
                raise ValueError(f"layers must be indices in 0..{n - 1} of modules.names (or None for all, () for "
                                 f"none), got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(ls))))

    @property
    def names(self) -> list[str]:
        idx = range(len(self.modules.names)) if self.layers is None else self.layers
        return [self.modules.names[i] for i in idx]


def apply_linear_attention(model_or_pipeline: Any, config: LinearAttentionConfig) -> Handle:
    """Serve the chosen self-attention modules by linear attention (LinFusion, Liu et al. 2024) until the handle
    is removed; see the module docstring. Raises ``ValueError`` when a module name is not in this model."""
    if not isinstance(config, LinearAttentionConfig):
        raise TypeError(f"config must be a LinearAttentionConfig, got {type(config).__name__}")
    model = resolve_model(model_or_pipeline, method="apply_linear_attention")
    mods = dict(model.named_modules())
    missing = [n for n in config.modules.names if n not in mods]
    if missing:
        raise ValueError(f"these linear-attention modules were built for another model: {missing[:3]} not found; "
                         f"build them for this one with linear_attention_for(model)")
    h = Handle("linear_attention", model, {"calls": 0, "linear_calls": 0, "tokens": 0})
    claim(model, "linear_attention", h)

    def count(module, args, kwargs):
        h.stats["calls"] += 1

    add_hook(model, count, h, pre=True)
    for name in config.names:
        lin = config.modules[name]

        def wrapper(call_next, hidden_states, encoder_hidden_states=None, attention_mask=None, _lin=lin,
                    **kwargs):
            if encoder_hidden_states is not None or attention_mask is not None:
                raise ValueError("linear attention replaces self-attention only; this module got "
                                 "encoder_hidden_states or an attention_mask (use pattern='*attn1')")
            h.stats["linear_calls"] += 1
            h.stats["tokens"] = max(h.stats["tokens"], int(hidden_states.shape[-2]))
            return _lin(hidden_states)

        patch_forward(mods[name], wrapper, h)
    return h


# ----------------------------------------------------------------------------------------------- distillation
def distill_linear_attention(model: Any, modules: LinearAttentionModules, x0: Tensor, labels: Tensor,
                             sigmas_train: Tensor, *, generator: torch.Generator, steps: int = 300,
                             batch_size: int = 64, lr: float = 1e-3, p_uncond: float = 0.1, null_class: int = 10,
                             w_eps: float = 1.0, w_kd: float = 0.5, w_feat: float = 0.5
                             ) -> tuple[LinearAttentionModules, dict]:
    """Distil linear attention into a frozen model (LinFusion, Liu et al. 2024, ``src/train/distill.py``).

    Per step: images ``x0`` with ``labels`` (null class with probability ``p_uncond``), a DDPM timestep uniform over
    ``sigmas_train``, noise; the teacher (the unpatched model) and the student (the same model with ``modules``
    applied) run on the same input. Loss ``w_eps mse(eps_student, eps) + w_kd mse(student, teacher) + w_feat
    mean_l mse(attn_l student, attn_l teacher)`` (LinFusion's weights 1, 0.5, 0.5 by default); AdamW on the linear
    modules only, cosine decay (:func:`dmlab.train.fit`). Returns ``(modules, log)`` with the loss curve every 10 steps and seconds.
    """
    model = resolve_model(model, method="distill_linear_attention")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"steps and batch_size must be ints >= 1, got {steps!r}, {batch_size!r}")
    ac = (1 / (1 + sigmas_train.detach().double().cpu() ** 2)).float()
    dev = next(model.parameters()).device
    c_in = model.config.in_channels
    req = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    feats: list[Tensor] = []
    hooks = [capture(model, modules.names, detach=False, sink=feats)]
    from ..train import FitConfig, ddpm_batch, fit

    def draw(g):
        b = ddpm_batch(x0, ac, batch_size, g, labels=labels, p_uncond=p_uncond, null_class=null_class)
        return b["xt"], b["t"], b["y"], b["eps"]

    def loss_of(b):
        xt, t, y, eps = (v.to(dev) for v in b)
        feats.clear()
        with torch.no_grad():
            teacher = output_tensor(model(xt, timestep=t, class_labels=y))[:, :c_in]
        f_teacher = [f.detach() for f in feats]
        feats.clear()
        with apply_linear_attention(model, LinearAttentionConfig(modules)):
            student = output_tensor(model(xt, timestep=t, class_labels=y))[:, :c_in]
        return (w_eps * F.mse_loss(student, eps) + w_kd * F.mse_loss(student, teacher)
                + w_feat * sum(F.mse_loss(s, f) for s, f in zip(feats, f_teacher)) / len(f_teacher))

    cfg = FitConfig(steps=steps, lr=lr, optimizer="adamw", schedule="cosine", log_every=10, desc="linear attention")
    try:
        res = fit(loss_of, modules, cfg, generator=generator, data=draw)
    finally:
        for hk in hooks:
            hk.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    log = {"loss": [(s, v) for s, v in enumerate(res.losses) if s % 10 == 0 or s == steps - 1], "steps": steps,
           "batch_size": batch_size, "lr": lr, "train_seconds": round(res.seconds, 1)}
    return modules, log


# ----------------------------------------------------------------------------------------------- cost
def cost_curve(model: Any, modules: LinearAttentionModules, sizes, *, batch: int = 1, **cond) -> list[dict]:
    """FLOPs of one call of ``model`` with softmax and with linear attention at each image size in ``sizes``
    (LinFusion's cost argument, Liu et al. 2024), counted on the ``meta`` device (no arithmetic runs, so 16K-token
    curves are instant). Rows: ``size``, ``tokens``, ``flops_softmax``, ``flops_linear``, ``attn_share`` (the
    fraction of the softmax model's FLOPs spent in attention matmuls), ``ratio`` (softmax / linear)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .. import bench

    model = resolve_model(model, method="cost_curve")
    m = copy.deepcopy(model).to("meta")
    lm = copy.deepcopy(modules).to("meta")
    p = getattr(model.config, "patch_size", None) or 1
    c = model.config.in_channels
    dtype = next(model.parameters()).dtype  # a half model gets half inputs (the timestep stays float32)
    as_meta = lambda v: v.to("meta", dtype if v.is_floating_point() else v.dtype)  # noqa: E731
    rows = []
    for s in sizes:
        x = torch.zeros(batch, c, s, s, device="meta", dtype=dtype)
        t = torch.full((batch,), 500.0, device="meta")
        kw = {k: (as_meta(v) if isinstance(v, Tensor) else v) for k, v in cond.items()}
        with torch.no_grad():
            with FlopCounterMode(display=False, custom_mapping=bench._cpu_sdpa_mapping()) as fc:
                m(x, timestep=t, **kw)
            f_soft = int(fc.get_total_flops())
            attn = sum(v for op, v in fc.get_flop_counts()["Global"].items() if "bmm" in str(op)
                       or "scaled_dot" in str(op))
            with apply_linear_attention(m, LinearAttentionConfig(lm)):
                f_lin = bench.count_flops(lambda: m(x, timestep=t, **kw))
        rows.append({"size": s, "tokens": (s // p) ** 2, "flops_softmax": f_soft, "flops_linear": f_lin,
                     "attn_share": attn / f_soft, "ratio": f_soft / f_lin})
    return rows


# ----------------------------------------------------------------------------------------------- storage
def save_linear_attention(modules: LinearAttentionModules, name: str, *, base: str, recipe: dict, log: dict,
                          root=None) -> dict:
    """Register distilled linear-attention modules in the zoo (``data/zoo/<name>/``)."""
    from ._assets import save_adapter

    return save_adapter(name, modules, kind="linear_attention", base=base, config=modules.config(), recipe=recipe,
                        description=f"LinFusion linear attention distilled into {base} (paper 2)", log=log, root=root)


def load_linear_attention(name: str, model: Any, *, root=None) -> LinearAttentionModules:
    """Linear-attention modules registered with :func:`save_linear_attention`, rebuilt on ``model`` (the base they
    were distilled into) and loaded after checking their sha256; ``modules.info`` is their registry entry."""
    from ._assets import load_adapter

    state, config, entry = load_adapter(name, kind="linear_attention", root=root)
    mid = config.get("mid_dim")
    model = resolve_model(model, method="load_linear_attention")
    mods = linear_attention_for(model, mid_dim=mid)
    if mods.names != config["names"]:
        raise ValueError(f"{name!r} was distilled for modules {config['names'][:2]}..., this model has "
                         f"{mods.names[:2]}...; pass the base model it was trained on")
    mods.load_state_dict(state)
    mods.info = entry  # the registry entry: recipe, params, training steps and seconds
    return mods.eval()


def build_linear_attention(name: str | None = "dit_l_linear", recipe: dict | None = None, *,
                           steps: int | None = None, root=None, device: str = "cpu") -> LinearAttentionModules:
    """Distil linear attention with ``recipe`` (default :data:`LINEAR_RECIPE`) into its zoo base model and, when
    ``name`` is given, register the modules (the training log is kept as ``modules.train_log``). ``steps`` overrides
    the step count (a quick stand-in; not saved)."""
    from .. import zoo
    from ..data import load_digits

    recipe = dict(LINEAR_RECIPE if recipe is None else recipe)
    den, model = zoo.load_denoiser(recipe["base"], root=root, device=device)
    x0, y0 = load_digits("train")
    mods = linear_attention_for(model, mid_dim=recipe["mid_dim"])
    mods, log = distill_linear_attention(model, mods, x0, y0, den.sigmas_train,
                                         generator=torch.Generator().manual_seed(recipe["seed"]),
                                         steps=steps or recipe["steps"], batch_size=recipe["batch_size"],
                                         lr=recipe["lr"], p_uncond=recipe["p_uncond"], w_eps=recipe["w_eps"],
                                         w_kd=recipe["w_kd"], w_feat=recipe["w_feat"])
    log.update(torch_threads=torch.get_num_threads(), device=device)
    if name is not None and steps is None:
        save_linear_attention(mods, name, base=recipe["base"], recipe=recipe, log=log, root=root)
    mods.train_log = log
    return mods
