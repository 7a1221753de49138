"""Layer pruning of diffusion networks: remove whole residual units, score which ones, distil the rest back.

A *unit* is a residual piece whose removal leaves every shape intact: a ``ResnetBlock2D`` whose input already has its
output width (in the decoder, one whose skip connection is then dropped), an attention unit (``Transformer2DModel``
in Stable Diffusion, a residual ``Attention`` in a UNet mid-block) or a DiT ``transformer_blocks.N``.
:func:`apply_layer_pruning` replaces each chosen unit by the identity (a reversible forward patch, so the skipped
units do no arithmetic and the FLOP counter sees the saving); :func:`prunable_units` lists the candidates that pass a
probe forward.

Which units to remove:

* **LAPTOP-Diff** (Zhang et al., arXiv 2404.11098; paper 22): the *output loss* - the MSE between the full and the
  unit-removed network's outputs on calibration inputs - is nearly additive over units, so the ``k`` smallest
  single-unit losses are removed in one shot (:func:`unit_scores` ``"output"``, :func:`joint_output_loss` for the
  additivity check).
* **LD-Pruner** (Castells et al., CVPR-W 2024, arXiv 2404.11936; paper 48): task-agnostic importance measured on the
  *generated* outputs: ``|mean change| + |std change|`` of the samples (per position, over the batch) when the unit
  is removed (``"ld"``; needs a ``sample`` closure).
* the usual baselines, ``"magnitude"`` (mean absolute weight) and ``"random"``.

Recovery: :func:`distill_pruned` retrains the pruned network briefly with the task loss, output distillation and
feature distillation against the unpruned teacher; ``normalized=True`` divides every feature term by the teacher
feature's mean square (LAPTOP-Diff's *normalized* distillation, so no single stage dominates);
``progressive=True`` removes the units one by one during the run instead of all at once (the progressive
incubation idea of A-SDM, Zhu et al., arXiv 2312.15516; paper 4); ``spectral=True`` weights the output distillation
per spatial frequency by the inverse teacher spectrum magnitude (the spectrum-aware distillation of Spectral
Diffusion, Yang et al., CVPR 2023, arXiv 2211.17106; paper 61). Re-implementations from the papers' text; no
official code exists for LAPTOP-Diff, LD-Pruner, A-SDM or Spectral Diffusion.

``handle.stats``: ``units`` (removed), ``params_removed``, ``params_total``, ``calls`` (root calls).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .finetune import net_output, protect_parameters
from ..anatomy import module_names, resolve_model, stage_modules, unknown_name_error
from ..hooks import Handle, add_hook, capture, claim, patch_forward
from .quantization import _skip_channels

__all__ = ["LayerPruneConfig", "LayerPruneHandle", "apply_layer_pruning", "candidate_units", "prunable_units",
           "unit_scores", "joint_output_loss", "select_units", "distill_pruned", "stage_modules", "CRITERIA"]

CRITERIA = ("output", "ld", "magnitude", "random")
_KINDS = ("ResnetBlock2D", "Transformer2DModel", "Attention", "BasicTransformerBlock")
_TOP_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+$")


def _kind(m: nn.Module) -> str | None:
    name = type(m).__name__
    return name if name in _KINDS else None


def candidate_units(model: nn.Module) -> list[str]:
    """Residual units by structure (see the module docstring), before any probe: resnets, attention units of UNet
    blocks and the top-level transformer blocks of a DiT."""
    net = resolve_model(model, method="candidate_units")
    out = []
    for name, m in net.named_modules():
        k = _kind(m)
        if k == "ResnetBlock2D" or (k in ("Transformer2DModel", "Attention") and ".attentions." in f".{name}"):
            if k == "Attention" and not getattr(m, "residual_connection", False):
                continue
            out.append(name)
        elif k == "BasicTransformerBlock" and _TOP_BLOCK.match(name):
            out.append(name)
    return out


@dataclass(frozen=True)
class LayerPruneConfig:
    """Which units to remove: qualified module names (see :func:`prunable_units`)."""

    units: tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.units, str):
            object.__setattr__(self, "units", (self.units,))
        units = tuple(self.units)
        if not all(isinstance(u, str) and u for u in units):
            raise ValueError(f"units must be module names such as 'transformer_blocks.3', got {self.units!r}")
        if len(set(units)) != len(units):
            raise ValueError(f"units lists a name twice: {units}")
        object.__setattr__(self, "units", units)


class LayerPruneHandle(Handle):
    """The handle of :func:`apply_layer_pruning`; ``active`` is the set of units currently skipped (all of them
    unless :func:`distill_pruned` is removing them progressively)."""

    def __init__(self, model: nn.Module, config: LayerPruneConfig):
        super().__init__("layer_pruning", model)
        self.config = config
        self.active: set[str] = set(config.units)
        self.skips: dict[str, int] = {}  # decoder resnet -> channels of the skip it concatenates (seen at run time)


def _identity(name: str, m: nn.Module, h: LayerPruneHandle):
    kind = _kind(m)

    def wrapper(call_next, *args, **kwargs):
        if name not in h.active:
            return call_next(*args, **kwargs)
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        if kind == "ResnetBlock2D":
            c, skip = m.out_channels, h.skips.get(name, 0)
            if x.shape[1] - skip != c:
                raise ValueError(f"unit {name} maps {x.shape[1] - skip} to {c} channels and cannot be removed; use "
                                 f"prunable_units(model, ...) to list removable units")
            return x[:, :c]  # a decoder resnet's input is [h, skip]: keep h, drop the skip
        if kind == "Transformer2DModel":
            if not kwargs.get("return_dict", True):
                return (x,)
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=x)
        return x
    return wrapper


def apply_layer_pruning(model_or_pipeline, config: LayerPruneConfig) -> LayerPruneHandle:
    """Skip the units ``config.units`` (identity instead of the residual unit) until the handle is removed.

    Unknown names and modules that are not residual units raise ``ValueError``; applying twice raises
    ``RuntimeError``. Removal restores the model bit for bit (also weights trained by :func:`distill_pruned`).
    """
    if not isinstance(config, LayerPruneConfig):
        raise TypeError(f"config must be a LayerPruneConfig(units=(...)), got {type(config).__name__}")
    net = resolve_model(model_or_pipeline, method="apply_layer_pruning")
    names = module_names(net)
    for u in config.units:
        if u not in names:
            raise unknown_name_error(u, names, "unit")
        if _kind(names[u]) is None:
            raise ValueError(f"{u} is a {type(names[u]).__name__}, not a residual unit; removable units are resnets, "
                             f"attention units and transformer blocks: see candidate_units(model)")
    h = LayerPruneHandle(net, config)
    claim(net, "layer_pruning", h)
    removed = {id(p): p for u in config.units for p in names[u].parameters()}
    h.stats.update(units=len(config.units), params_removed=sum(p.numel() for p in removed.values()),
                   params_total=sum(p.numel() for p in net.parameters()), calls=0)
    add_hook(net, lambda m, a, k: h.stats.__setitem__("calls", h.stats["calls"] + 1), h, pre=True)
    for u in config.units:
        patch_forward(names[u], _identity(u, names[u], h), h)
    for b in {u.split(".resnets.")[0] for u in config.units if ".resnets." in u and u.startswith("up_blocks.")}:
        def pre(m, a, k, b=b):
            for i, c in enumerate(_skip_channels(m, a, k)):
                h.skips[f"{b}.resnets.{i}"] = c
        add_hook(names[b], pre, h, pre=True)
    return h


@torch.no_grad()
def prunable_units(model: nn.Module, *args, **kwargs) -> list[str]:
    """The :func:`candidate_units` whose removal lets ``model(*args, **kwargs)`` run with an unchanged output shape
    (one probe forward per candidate)."""
    net = resolve_model(model, method="prunable_units")
    ref = net_output(net(*args, **kwargs)).shape
    ok = []
    for u in candidate_units(net):
        try:
            with apply_layer_pruning(net, LayerPruneConfig((u,))):
                good = net_output(net(*args, **kwargs)).shape == ref
        except (RuntimeError, ValueError):
            good = False
        if good:
            ok.append(u)
    return ok


# ----------------------------------------------------------------------------------------------- criteria
def _calls(calibration):
    calls = getattr(calibration, "calls", calibration)
    if not isinstance(calls, (list, tuple)) or not calls:
        raise TypeError("calibration must be a CalibrationSet (dmlab.accelerators.quant_calibration.calibration_set) "
                        "or a non-empty list of (args, kwargs) network inputs")
    return calls


@torch.no_grad()
def joint_output_loss(model: nn.Module, units, calibration) -> float:
    """LAPTOP-Diff's output loss of removing ``units`` together: mean over calibration calls of
    ``MSE(out_pruned, out_full)``."""
    net = resolve_model(model, method="joint_output_loss")
    calls = _calls(calibration)
    ref = [net_output(net(*a, **k)) for a, k in calls]
    with apply_layer_pruning(net, LayerPruneConfig(tuple(units))):
        return sum(float((net_output(net(*a, **k)) - r).pow(2).mean()) for (a, k), r in zip(calls, ref)) / len(calls)


@torch.no_grad()
def unit_scores(model: nn.Module, units, criterion: str, *, calibration=None, sample: Callable[[], Tensor] | None = None,
                generator: torch.Generator | None = None) -> dict[str, float]:
    """Importance of each unit (lower = safer to remove) by ``criterion`` (see the module docstring):
    ``"output"`` needs ``calibration``; ``"ld"`` needs ``sample`` (a closure returning generated samples from fixed
    noise); ``"random"`` needs ``generator``."""
    net = resolve_model(model, method="unit_scores")
    units = list(units)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA} ('output' = LAPTOP-Diff, 'ld' = LD-Pruner), got {criterion!r}")
    if criterion == "output":
        calls = _calls(calibration)
        ref = [net_output(net(*a, **k)) for a, k in calls]
        out = {}
        for u in units:
            with apply_layer_pruning(net, LayerPruneConfig((u,))):
                out[u] = sum(float((net_output(net(*a, **k)) - r).pow(2).mean())
                             for (a, k), r in zip(calls, ref)) / len(calls)
        return out
    if criterion == "ld":
        if not callable(sample):
            raise TypeError("criterion='ld' needs sample=lambda: sampler(...) returning samples from fixed noise")
        ref = sample().double()
        mu, sd = ref.mean(0), ref.std(0)
        out = {}
        for u in units:
            with apply_layer_pruning(net, LayerPruneConfig((u,))):
                x = sample().double()
            out[u] = float((x.mean(0) - mu).abs().mean() + (x.std(0) - sd).abs().mean())
        return out
    if criterion == "magnitude":
        mods = module_names(net)
        return {u: float(torch.cat([p.detach().abs().reshape(-1) for p in mods[u].parameters()]).mean()) for u in units}
    if not isinstance(generator, torch.Generator):
        raise TypeError("criterion='random' needs generator=torch.Generator")
    r = torch.rand(len(units), generator=generator)
    return {u: float(v) for u, v in zip(units, r)}


def select_units(scores: dict[str, float], k: int) -> tuple[str, ...]:
    """The ``k`` units with the smallest scores (ties broken by name), in increasing score order."""
    if not isinstance(k, int) or not 0 <= k <= len(scores):
        raise ValueError(f"k must be an int in 0..{len(scores)}, got {k!r}")
    return tuple(sorted(scores, key=lambda u: (scores[u], u))[:k])


# ----------------------------------------------------------------------------------------------- recovery
def _capture(model: nn.Module, names, store: dict) -> list:
    """Record the (non-detached) outputs of ``names`` into ``store``; a list holding the one capture handle."""
    cap = capture(model, names, detach=False)
    cap.outputs = store
    return [cap]


def _spectral_mse(s: Tensor, t: Tensor) -> Tensor:
    """Output distillation per spatial frequency, weighted by 1 / |teacher spectrum| (normalised to mean 1)."""
    fs, ft = torch.fft.rfft2(s.float()), torch.fft.rfft2(t.float())
    w = 1.0 / (ft.abs().mean(0, keepdim=True) + 1e-3)
    w = w / w.mean()
    return ((fs - ft).abs().pow(2) * w).mean() / (s.shape[-1] * s.shape[-2])


def distill_pruned(handle: LayerPruneHandle, teacher: nn.Module, x0: Tensor, *, sigmas_train: Tensor,
                   cond: dict | None = None, steps: int = 100, batch_size: int = 64, lr: float = 2e-4,
                   normalized: bool = True, progressive: bool = False, spectral: bool = False,
                   features: list[str] | None = None, generator: torch.Generator) -> dict:
    """Retrain the network under a pruning ``handle`` for ``steps`` Adam steps with task loss (eps-MSE on noised
    ``x0``) + output distillation + feature distillation against ``teacher`` (the unpruned network, a separate copy),
    as in LAPTOP-Diff (see the module docstring for ``normalized``, ``progressive`` and ``spectral``).

    Training batches: rows of ``x0`` (and of the tensors in ``cond``, e.g. class labels) and DDPM timesteps drawn
    with ``generator``; ``sigmas_train`` is the model's training schedule (``denoiser.sigmas_train``). The trained
    weights are restored bit for bit when the handle is removed. Returns ``{"steps", "params", "initial_loss",
    "final_loss"}`` (losses: the mean of the first / last 10 % of steps) and stores it in ``handle.stats["distill"]``.
    """
    if not isinstance(handle, LayerPruneHandle) or handle.removed:
        raise TypeError("handle must be an active handle from apply_layer_pruning(model, LayerPruneConfig(...))")
    student = handle.model
    if teacher is student or not isinstance(teacher, nn.Module):
        raise ValueError("teacher must be a separate copy of the unpruned network: take copy.deepcopy(model) before "
                         "apply_layer_pruning")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    cond = dict(cond or {})
    feats = stage_modules(student) if features is None else list(features)
    ac = (1.0 / (1.0 + torch.as_tensor(sigmas_train, dtype=torch.float64) ** 2)).float()
    units = list(handle.config.units)
    if progressive:
        handle.active.clear()
    protect_parameters(handle, dict(student.named_parameters()))
    restore_active = set(units)
    handle.on_remove(lambda: (handle.active.clear(), handle.active.update(restore_active)))
    from ..train import FitConfig, ddpm_batch, fit

    dev, dt = next(student.parameters()).device, next(student.parameters()).dtype
    fs, ft = {}, {}
    hooks = _capture(student, feats, fs) + _capture(teacher, feats, ft)

    def grow(i):  # progressive: activate the pruned units one group at a time
        if progressive:
            handle.active.update(units[: min(len(units), 1 + i * len(units) // steps)])

    def draw(g):
        b = ddpm_batch(x0, ac, batch_size, g)
        kw = {k: v[b["idx"]] for k, v in cond.items() if isinstance(v, Tensor) and v.shape[:1] == x0.shape[:1]}
        return {"xt": b["xt"], "t": b["t"], "eps": b["eps"], "cond": kw}

    def loss_of(b):
        xt, eps, t = b["xt"].to(dev, dt), b["eps"].to(dev), b["t"].to(dev)
        kw = {k: (b["cond"][k].to(dev) if k in b["cond"] else v) for k, v in cond.items()}
        with torch.no_grad():
            out_t = net_output(teacher(xt, timestep=t, **kw))[:, : x0.shape[1]]
        out_s = net_output(student(xt, timestep=t, **kw))[:, : x0.shape[1]]
        loss = (out_s - eps).pow(2).mean()
        loss = loss + (_spectral_mse(out_s, out_t) if spectral else (out_s - out_t).pow(2).mean())
        for n in feats:
            if fs.get(n) is not None and ft.get(n) is not None and fs[n].shape == ft[n].shape:
                term = (fs[n] - ft[n].detach()).pow(2).mean()
                loss = loss + (term / ft[n].detach().pow(2).mean().clamp_min(1e-8) if normalized else term)
        return loss

    try:
        res = fit(loss_of, None, FitConfig(steps=steps, lr=lr, optimizer="adam"), generator=generator, data=draw,
                  params=[p for p in student.parameters() if p.requires_grad], before_step=grow)
        losses = res.losses
    finally:
        for hk in hooks:
            hk.remove()
        handle.active.update(units)
        for p in student.parameters():
            p.requires_grad_(False)
    k = max(1, steps // 10)
    info = {"steps": steps, "params": sum(p.numel() for p in student.parameters()),
            "initial_loss": sum(losses[:k]) / k, "final_loss": sum(losses[-k:]) / k}
    handle.stats["distill"] = info
    return info
