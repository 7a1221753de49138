"""What a denoising network is made of, in one place: UNet or DiT, its block lists, attention and skip modules.

Every accelerator and probe asks this module instead of looking for attribute names itself. It knows the diffusers
layouts of the SD 1.5 / 2.1 ``UNet2DConditionModel``, ``UNet2DModel`` (the digit zoo's UNets) and
``DiTTransformer2DModel`` (DiT-XL/2 and the zoo's DiTs); other transformers with ``transformer_blocks`` /
``single_transformer_blocks`` / ``blocks`` / ``layers`` lists are recognised as generic transformers.

* :func:`kind` - ``"unet"``, ``"dit"`` or ``"transformer"`` (``TypeError`` for anything else);
  :func:`require_unet` / :func:`require_dit` / :func:`require_transformer` raise a ``TypeError`` that names the fix;
* :func:`transformer_blocks`, :func:`unet_blocks` (encoder / decoder stage names), :func:`stage_modules`
  (one name per stage), :func:`granularity_of` (block / layer / unit of a qualified name);
* :func:`attention_modules`, :func:`self_attention_names`, :func:`skip_shortcuts`;
* :func:`resolve_model` (the network inside a pipeline or adapter), :func:`module_names`, :func:`unknown_name_error`.

Everything works on models built on the meta device (only names and module types are read), so the full-size
configurations are checked without weights.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any

from torch import nn

__all__ = ["UNET_BLOCK_LISTS", "TRANSFORMER_BLOCK_LISTS", "BLOCK_LISTS", "kind", "is_unet", "is_dit",
           "is_transformer", "require_unet", "require_dit", "require_transformer", "transformer_blocks",
           "unet_blocks", "stage_modules", "granularity_of", "attention_modules", "self_attention_names", "cross_attention_names",
           "skip_shortcuts", "resolve_model", "module_names", "unknown_name_error"]

UNET_BLOCK_LISTS = ("down_blocks", "up_blocks")
TRANSFORMER_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
BLOCK_LISTS = UNET_BLOCK_LISTS + TRANSFORMER_BLOCK_LISTS
_DIT_PARTS = ("transformer_blocks", "pos_embed", "proj_out_1", "proj_out_2", "norm_out")


# ----------------------------------------------------------------------------------------------- model lookup
def resolve_model(obj: Any, *, method: str = "this accelerator") -> nn.Module:
    """The ``nn.Module`` a method attaches to: ``obj`` itself, a pipeline's ``.unet`` or ``.transformer``, or the
    ``.model`` of a dmlab adapter such as :class:`dmlab.denoisers.DiscreteVPDenoiser`."""
    if isinstance(obj, nn.Module):
        return obj
    for attr in ("unet", "transformer", "model"):
        m = getattr(obj, attr, None)
        if isinstance(m, nn.Module):
            return m
    raise TypeError(f"{method} needs a torch.nn.Module, a diffusers pipeline (with .unet or .transformer) or a dmlab "
                    f"adapter with .model (e.g. DiscreteVPDenoiser); got {type(obj).__name__}")


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    """``dict(model.named_modules())`` without the root."""
    return {k: v for k, v in model.named_modules() if k}


def unknown_name_error(name: str, names, what: str = "module") -> ValueError:
    """A ValueError for an unknown module name that lists the closest valid names."""
    close = difflib.get_close_matches(name, list(names), n=4, cutoff=0.5)
    hint = f"; did you mean {close}?" if close else ""
    return ValueError(f"no {what} named {name!r} in this model{hint} (list them with [n for n, _ in "
                      f"model.named_modules()])")


# ----------------------------------------------------------------------------------------------- kinds
def is_unet(model: nn.Module) -> bool:
    """A diffusers-style UNet: ``down_blocks`` and ``up_blocks`` module lists (skip connections between them)."""
    return all(isinstance(getattr(model, a, None), nn.ModuleList) for a in UNET_BLOCK_LISTS)


def is_dit(model: nn.Module) -> bool:
    """A DiT (``DiTTransformer2DModel``): patch embedding, ``transformer_blocks``, the adaLN final layer."""
    return all(hasattr(model, a) for a in _DIT_PARTS) and hasattr(getattr(model, "config", None), "patch_size")


def is_transformer(model: nn.Module) -> bool:
    """Any network with a transformer block list (DiT, PixArt, Flux-style ``single_transformer_blocks``, ...)."""
    return not is_unet(model) and bool(transformer_blocks(model))


def kind(model: Any) -> str:
    """``"unet"``, ``"dit"`` or ``"transformer"`` (a block-list transformer that is not DiT)."""
    model = resolve_model(model, method="anatomy.kind")
    if is_unet(model):
        return "unet"
    if is_dit(model):
        return "dit"
    if transformer_blocks(model):
        return "transformer"
    raise TypeError(f"{type(model).__name__} is neither a diffusers UNet (down_blocks / up_blocks) nor a transformer "
                    f"with block lists {TRANSFORMER_BLOCK_LISTS}")


def require_unet(model: nn.Module, method: str) -> None:
    """Raise a ``TypeError`` naming the transformer alternatives unless ``model`` is a UNet."""
    if is_unet(model):
        return
    raise TypeError(f"{method} needs a UNet with down_blocks / mid_block / up_blocks and skip connections (diffusers "
                    f"UNet2DModel or UNet2DConditionModel, or a pipeline holding one); {type(model).__name__} has "
                    f"none. For a transformer such as DiTTransformer2DModel use apply_feature_inheritance(model, "
                    f"FeatureInheritanceConfig(('transformer_blocks.*',), 'block', reuse='residual')) or "
                    f"dmlab.accelerators.apply_taylorseer(model)")


def require_dit(model: nn.Module, method: str = "early exit") -> None:
    """Raise a ``TypeError`` unless ``model`` is a DiT (a layer stack that can stop half-way)."""
    if is_dit(model):
        return
    hint = ("a UNet's decoder needs the skip features of every encoder level, so it cannot stop half-way; for UNets "
            "use feature caching (dmlab.accelerators.apply_deepcache)") if is_unet(model) else \
        "build or load a DiTTransformer2DModel (e.g. dmlab.zoo.load('dit_l'))"
    raise TypeError(f"{method} needs a DiT-style transformer (DiTTransformer2DModel: transformer_blocks, pos_embed, "
                    f"proj_out_1/2, norm_out), got {type(model).__name__}; {hint}")


def require_transformer(model: nn.Module, method: str) -> None:
    """Raise a ``TypeError`` unless ``model`` has transformer block lists (diffusers' block caches hook them)."""
    if transformer_blocks(model):
        return
    raise TypeError(f"{method} is one of diffusers' transformer caches: it needs a transformer denoiser with "
                    f"transformer_blocks (e.g. DiTTransformer2DModel, or a pipeline's .transformer); "
                    f"{type(model).__name__} has none. For a UNet use dmlab.accelerators.apply_deepcache or "
                    f"apply_feature_inheritance")


# ----------------------------------------------------------------------------------------------- blocks
def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, block)]`` of a transformer's block lists, in execution order (what diffusers' block caches hook)."""
    out = []
    for name, sub in model.named_children():
        if name in TRANSFORMER_BLOCK_LISTS and isinstance(sub, nn.ModuleList):
            out += [(f"{name}.{i}", b) for i, b in enumerate(sub)]
    return out


def unet_blocks(net: nn.Module) -> dict[str, list[str]]:
    """``{"encoder": [down_blocks.i ..., mid_block], "decoder": [up_blocks.i ...]}`` of a diffusers UNet (the split
    of Faster Diffusion, Li et al. 2024)."""
    net = resolve_model(net, method="unet_blocks")
    require_unet(net, "unet_blocks")
    enc = [f"down_blocks.{i}" for i in range(len(net.down_blocks))]
    if getattr(net, "mid_block", None) is not None:
        enc.append("mid_block")
    return {"encoder": enc, "decoder": [f"up_blocks.{i}" for i in range(len(net.up_blocks))]}


def stage_modules(model: Any) -> list[str]:
    """One name per stage: the UNet stages (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) or the DiT blocks
    (``transformer_blocks.i``), in the order of ``model.named_modules()`` (feature-distillation points)."""
    model = resolve_model(model, method="stage_modules")
    pat = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+|transformer_blocks\.\d+)")
    return [n for n, _ in model.named_modules() if pat.fullmatch(n)]


def granularity_of(name: str) -> str | None:
    """``"block"``, ``"layer"`` or ``"unit"`` for a qualified module name (A-SDM's three levels; Zhu et al. 2024),
    None outside the blocks: ``up_blocks.1`` / ``mid_block`` are blocks, ``up_blocks.1.resnets.0`` and
    ``transformer_blocks.3.attn1`` layers, anything deeper units."""
    parts = name.split(".")
    if parts[0] in BLOCK_LISTS and len(parts) >= 2 and parts[1].isdigit():
        rest = parts[2:]
    elif parts[0] == "mid_block":
        rest = parts[1:]
    else:
        return None
    if not rest:
        return "block"
    if len(rest) == 1 or (len(rest) == 2 and rest[1].isdigit()):
        return "layer"
    return "unit"


# ----------------------------------------------------------------------------------------------- attention, skips
def _attention_types() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention

    return (Attention,)


def attention_modules(model: nn.Module) -> list[str]:
    """Qualified names of every diffusers ``Attention`` module (self- and cross-attention)."""
    types = _attention_types()
    return [n for n, m in model.named_modules() if n and isinstance(m, types)]


def self_attention_names(model: nn.Module, pattern: str = "*attn1") -> list[str]:
    """Qualified names of the self-attention modules (diffusers names them ``attn1``; ``attn2`` is cross-attention)
    matching ``pattern`` (``fnmatch``)."""
    return [n for n in attention_modules(model) if fnmatch.fnmatchcase(n, pattern)]


def cross_attention_names(model: nn.Module) -> list[str]:
    """Qualified names of the cross-attention modules (diffusers ``Attention`` with ``is_cross_attention``: the
    ``attn2`` of Stable Diffusion's transformer blocks, which read the text embeddings)."""
    mods = dict(model.named_modules())
    return [n for n in attention_modules(model) if getattr(mods[n], "is_cross_attention", False)]


def skip_shortcuts(model: nn.Module) -> list[str]:
    """The layers of a UNet decoder that read the encoder's skip features concatenated to the hidden state: the
    ``conv_shortcut`` of every up-block resnet (PTQD / Q-Diffusion's shortcut-splitting targets)."""
    if not is_unet(model):
        return []
    return [n for n, _ in model.named_modules() if re.fullmatch(r"up_blocks\.\d+\.resnets\.\d+\.conv_shortcut", n)]
