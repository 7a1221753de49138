"""Short fine-tunes under a handle, undone bit for bit when the handle is removed.

Compression methods that train a little after compressing - QuEST's selective fine-tuning of a quantized network
(paper 52), the recovery distillation after layer pruning (LAPTOP-Diff, paper 22; LD-Pruner, paper 48) - change
weights. :func:`protect_parameters` copies the parameters they will train (and their ``requires_grad`` flags) and
registers the restore on the method's :class:`~dmlab.accelerators.handle.Handle`, so ``handle.remove()`` still gives
back the original model exactly. :func:`net_output` reads the tensor out of a diffusers model's return value.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import Tensor, nn

from ..denoisers import net_output  # re-exported: one reader of diffusers outputs
from .handle import Handle

__all__ = ["protect_parameters", "select_parameters", "net_output"]


def select_parameters(model: nn.Module, patterns: Iterable[str]) -> dict[str, nn.Parameter]:
    """Parameters whose *module* name matches one of the fnmatch ``patterns`` (``"*"`` selects all)."""
    pats = tuple(patterns)
    out: dict[str, nn.Parameter] = {}
    for mname, m in model.named_modules():
        if not any(fnmatch.fnmatchcase(mname, p) for p in pats):
            continue
        for pname, p in m.named_parameters(recurse=False):
            out[f"{mname}.{pname}" if mname else pname] = p
    return out


def protect_parameters(handle: Handle, params: dict[str, nn.Parameter]) -> None:
    """Save a copy of ``params`` (and their ``requires_grad``) and restore both when ``handle`` is removed; the
    parameters are then switched to ``requires_grad=True`` and every other parameter of ``handle.model`` to False."""
    if handle.removed:
        raise RuntimeError("the handle was already removed; apply the method again before fine-tuning")
    if not params:
        raise ValueError("no parameters selected to fine-tune; check the selection patterns")
    model = handle.model
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()} if model is not None else {}
    for p in params.values():
        flags.setdefault(id(p), (p, p.requires_grad))
    saved = [(p, p.detach().clone()) for p in params.values()]

    def restore():
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
        for p, flag in flags.values():
            p.requires_grad_(flag)
    handle.on_remove(restore)
    chosen = {id(p) for p in params.values()}
    for p, _ in flags.values():
        p.requires_grad_(id(p) in chosen)
