"""Structural masks over attention heads and feed-forward neurons, learned end to end: EcoDiff.

**EcoDiff** ("Effortless Efficiency: Low-Cost Pruning of Diffusion Models", Zhang, Jin et al., arXiv 2412.02852;
paper 60) learns a differentiable mask over the heads of every attention layer and the hidden neurons of every
feed-forward layer with an **end-to-end** objective: the final sample of a whole (short) denoising trajectory with
masks must match the unmasked model's sample from the same noise, plus a sparsity penalty. Back-propagating through
every step would hold every step's activations; **time-step gradient checkpointing** keeps only each step's input
and recomputes the step during the backward pass. No retraining follows: the mask is thresholded and the masked
heads/neurons are sliced away. The official code applies masks with forward hooks (``YaNgZhAnG-V5/EcoDiff``,
``src/sdib/hooks``); this is a re-implementation from the paper's text.

* :func:`mask_sites` - the maskable sites of a diffusers model (any ``Attention`` with ``to_out``, any
  ``FeedForward``), with their group counts and the parameters one group carries;
* :func:`apply_masks` - multiply each site's groups by a mask (forward pre-hooks on ``to_out.0`` / ``net.2``;
  reversible, composable) - soft masks while learning, 0/1 masks after thresholding;
* :func:`learn_masks` - the EcoDiff objective (``objective="e2e"``, with or without ``checkpoint``) or a per-step
  local objective (``"local"``: match the denoiser output at states of the reference trajectory) for comparison;
* :func:`threshold_masks` - 0/1 masks removing the lowest-scored groups up to a parameter budget;
* :func:`sliced_copy` - a physically smaller copy (fewer heads, narrower FFNs) for FLOP counts; its output equals
  the masked model's.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from ..anatomy import module_names, resolve_model
from ..hooks import Handle, add_hook, claim

__all__ = ["mask_sites", "apply_masks", "learn_masks", "threshold_masks", "sliced_copy"]


def _ffn_parts(ff: nn.Module):
    proj = getattr(ff.net[0], "proj", None)
    return proj, ff.net[2], (proj.out_features // ff.net[2].in_features if proj is not None else 1)


def mask_sites(model: nn.Module) -> dict[str, dict]:
    """``{site: {"kind": "heads" | "ffn", "groups": n, "group_params": p, "target": child name}}`` for every
    attention layer (groups = heads) and feed-forward layer (groups = hidden neurons) of ``model``."""
    net = resolve_model(model, method="mask_sites")
    sites = {}
    for name, m in net.named_modules():
        cls = type(m).__name__
        if cls == "Attention" and hasattr(m, "to_out") and hasattr(m, "to_q") and getattr(m, "heads", 0) > 0:
            dh = m.to_q.out_features // m.heads
            per = sum(dh * (lin.in_features + (lin.bias is not None)) for lin in (m.to_q, m.to_k, m.to_v))
            per += dh * m.to_out[0].out_features
            sites[name] = {"kind": "heads", "groups": m.heads, "group_params": per, "target": f"{name}.to_out.0"
                           if name else "to_out.0"}
        elif cls == "FeedForward" and isinstance(getattr(m, "net", None), nn.ModuleList) and len(m.net) >= 3:
            proj, out, mult = _ffn_parts(m)
            if proj is None or not isinstance(out, nn.Linear):
                continue
            per = mult * (proj.in_features + (proj.bias is not None)) + out.out_features
            sites[name] = {"kind": "ffn", "groups": out.in_features, "group_params": per,
                           "target": f"{name}.net.2" if name else "net.2"}
    return sites


def apply_masks(model_or_pipeline, masks: dict[str, Tensor]) -> Handle:
    """Multiply the groups of each site in ``masks`` (``{site: [groups] tensor}``; floats or 0/1) into its output
    projection's input until the handle is removed. The dict is read at every call (a learner may replace its
    tensors). ``stats``: ``sites``, ``groups_off`` and ``params_off`` (groups
    whose mask is exactly 0, and the parameters slicing them away removes)."""
    net = resolve_model(model_or_pipeline, method="apply_masks")
    sites = mask_sites(net)
    mods = module_names(net)
    for s, v in masks.items():
        if s not in sites:
            raise ValueError(f"{s!r} is not a mask site; sites are attention layers and feed-forward layers: "
                             f"{list(sites)[:4]}... (see mask_sites(model))")
        if not isinstance(v, Tensor) or v.shape != (sites[s]["groups"],):
            raise ValueError(f"mask for {s} must be a tensor of shape [{sites[s]['groups']}], got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
    h = Handle("masks", net)
    claim(net, "masks", h)
    off = {s: int((v.detach() == 0).sum()) for s, v in masks.items()}
    h.stats.update(sites=len(masks), groups_off=sum(off.values()),
                   params_off=sum(off[s] * sites[s]["group_params"] for s in masks))
    for s in masks:
        g = sites[s]["groups"]

        def pre(mod, args, s=s, g=g):
            x, v = args[0], masks[s]  # read at every call: a learner may update the dict's tensors
            shape = x.shape
            y = (x.reshape(*shape[:-1], g, shape[-1] // g) * v.to(x.device, x.dtype)[:, None]).reshape(shape)
            return (y, *args[1:])
        add_hook(mods[sites[s]["target"]], pre, h, pre=True, with_kwargs=False)
    return h


def threshold_masks(scores: dict[str, Tensor], sites: dict[str, dict], sparsity: float) -> dict[str, Tensor]:
    """0/1 masks that switch off the lowest-scored groups (across all sites) until at least ``sparsity`` of the
    maskable parameters are off; every site keeps at least one group."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of maskable parameters to remove), got {sparsity}")
    total = sum(sites[s]["groups"] * sites[s]["group_params"] for s in scores)
    order = sorted(((float(v[i]), s, i) for s, v in scores.items() for i in range(len(v))))
    masks = {s: torch.ones(len(v)) for s, v in scores.items()}
    removed = 0
    for _, s, i in order:
        if removed >= sparsity * total:
            break
        if int(masks[s].sum()) <= 1:
            continue
        masks[s][i] = 0.0
        removed += sites[s]["group_params"]
    return masks


def _euler_unroll(denoiser: Callable, x: Tensor, sigmas: Tensor, cond: dict, checkpoint: bool) -> Tensor:
    from torch.utils.checkpoint import checkpoint as ckpt

    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        def step(x, s=s, s_next=s_next):
            d = denoiser(x, s.expand(x.shape[0]), **cond)
            return x + (s_next - s) * (x - d) / s
        x = ckpt(step, x, use_reentrant=False) if checkpoint else step(x)
    return x


def learn_masks(denoiser: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None, steps: int = 50,
                lr: float = 0.1, sparsity_weight: float = 0.05, objective: str = "e2e", checkpoint: bool = True,
                sites: list[str] | None = None, generator: torch.Generator) -> tuple[dict[str, Tensor], dict]:
    """Learn mask scores (sigmoid of logits, initialised at 0.95) for the sites of ``denoiser.model`` by EcoDiff's
    end-to-end objective - ``MSE(final sample with masks, final sample without) + sparsity_weight * mean(mask)``
    over an Euler (DDIM) unroll of ``sigmas`` from ``x`` - or by ``objective="local"`` (the denoiser outputs at the
    states of the reference trajectory, one random step per iteration, drawn with ``generator``).

    Returns ``(scores, info)``: scores ``{site: [groups]}`` in (0, 1) (threshold them with
    :func:`threshold_masks`) and ``info = {"loss": final objective, "saved_bytes": bytes of tensors held for the
    backward pass in the first iteration (what time-step checkpointing cuts)}``.
    """
    if objective not in ("e2e", "local"):
        raise ValueError(f"objective must be 'e2e' (EcoDiff) or 'local', got {objective!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    net = resolve_model(denoiser, method="learn_masks")
    all_sites = mask_sites(net)
    names = list(all_sites) if sites is None else list(sites)
    cond = dict(cond or {})
    dev = next(net.parameters()).device
    logits = {s: torch.full((all_sites[s]["groups"],), 3.0, device=dev, requires_grad=True) for s in names}
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    with torch.no_grad():
        states, outs = [], []
        xi = x
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            d = denoiser(xi, s.expand(xi.shape[0]), **cond)
            states.append(xi)
            outs.append(d)
            xi = xi + (s_next - s) * (xi - d) / s
        ref = xi
    from ..train import FitConfig, fit

    info = {"saved_bytes": 0, "loss": float("nan")}
    it = [0]
    try:
        soft = {s: torch.sigmoid(v) for s, v in logits.items()}

        def loss_of(g):
            for s, v in logits.items():
                soft[s] = torch.sigmoid(v)  # the hooks read this dict's tensors
            saved = [0]

            def pack(t):
                saved[0] += t.numel() * t.element_size()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if it[0] == 0 else _null():
                if objective == "e2e":
                    fit_term = (_euler_unroll(denoiser, x, sigmas, cond, checkpoint) - ref).pow(2).mean()
                else:
                    i = int(torch.randint(len(states), (1,), generator=g))
                    fit_term = (denoiser(states[i], sigmas[i].expand(x.shape[0]), **cond) - outs[i]).pow(2).mean()
                density = torch.cat(list(soft.values())).mean()
                loss = fit_term + sparsity_weight * density
            if it[0] == 0:
                info["saved_bytes"] = saved[0]
            it[0] += 1
            return loss

        with apply_masks(net, soft):
            if steps:
                res = fit(loss_of, None, FitConfig(steps=steps, lr=lr, optimizer="adam"), generator=generator,
                          params=list(logits.values()))
                info["loss"] = res.losses[-1]
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    return {s: torch.sigmoid(v.detach()).cpu() for s, v in logits.items()}, info


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def sliced_copy(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """A deep copy of ``model`` with the groups whose mask is 0 physically removed (fewer attention heads, narrower
    feed-forward layers); its outputs equal the masked model's (see :func:`apply_masks`)."""
    net = copy.deepcopy(resolve_model(model, method="sliced_copy"))
    sites = mask_sites(net)
    mods = module_names(net)
    mods[""] = net

    def cut(lin: nn.Linear, idx: Tensor, dim: int) -> nn.Linear:
        idx = idx.to(lin.weight.device)
        w = lin.weight.index_select(dim, idx)
        new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias if dim == 1 else lin.bias.index_select(0, idx))
        return new

    for s, v in masks.items():
        keep = torch.nonzero(v != 0).reshape(-1)
        if keep.numel() == 0:
            raise ValueError(f"mask for {s} removes every group; keep at least one (threshold_masks does)")
        m = mods[s]
        if sites[s]["kind"] == "heads":
            dh = m.to_q.out_features // m.heads
            rows = (keep[:, None] * dh + torch.arange(dh)[None, :]).reshape(-1)
            m.to_q, m.to_k, m.to_v = (cut(lin, rows, 0) for lin in (m.to_q, m.to_k, m.to_v))
            m.to_out[0] = cut(m.to_out[0], rows, 1)
            m.heads = int(keep.numel())
            if hasattr(m, "inner_dim"):
                m.inner_dim = m.heads * dh
        else:
            proj, out, mult = _ffn_parts(m)
            inner = out.in_features
            rows = torch.cat([keep + j * inner for j in range(mult)])
            m.net[0].proj = cut(proj, rows, 0)
            m.net[2] = cut(out, keep, 1)
    return net
