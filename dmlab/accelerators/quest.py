"""QuEST: selective fine-tuning of a low-bit quantized diffusion network (Wang, Shang, Yuan, Wu & Yan, ICCV 2025,
arXiv 2402.03666; paper 52). Re-implementation from the paper's text.

Low-bit activations break because their distributions are imbalanced; QuEST fine-tunes *weights* so that the
quantized network reproduces the full-precision one, and only a few layers: those that carry temporal information
(the time-embedding MLP and the per-block time projections) and those most sensitive to low bits (attention). It is
data-free: the targets are the full-precision network's outputs on the calibration inputs (sampler states), which
:meth:`QuantHandle.bypass` gives on the same model object. Gradients pass the rounding with the straight-through
estimator. Simplifications: only the output (global) loss, no per-layer (local) terms; the time-aware activation
quantizer is ``QuantConfig(per_step_acts=True)``.

``select``: ``"quest"`` (temporal + attention projections), ``"temporal"``, ``"attention"``, ``"all"`` (every
parameter: the full fine-tuning QuEST compares against) or a tuple of module-name patterns.
"""
from __future__ import annotations

import torch

from .finetune import net_output, protect_parameters, select_parameters
from .quant_calibration import CalibrationSet
from .quantization import TEMPORAL_PATTERNS, QuantHandle

__all__ = ["quest_finetune", "QUEST_SELECTIONS", "ATTENTION_PATTERNS"]

ATTENTION_PATTERNS = ("*attn*.to_q", "*attn*.to_k", "*attn*.to_v", "*attn*.to_out.0",
                      "*attentions.*.to_q", "*attentions.*.to_k", "*attentions.*.to_v", "*attentions.*.to_out.0")
QUEST_SELECTIONS = {"quest": TEMPORAL_PATTERNS + ATTENTION_PATTERNS, "temporal": TEMPORAL_PATTERNS,
                    "attention": ATTENTION_PATTERNS, "all": ("*",)}


def quest_finetune(handle: QuantHandle, calibration: CalibrationSet, *, select="quest", steps: int = 100,
                   lr: float = 1e-4, generator: torch.Generator) -> dict:
    """Fine-tune the selected parameters of the quantized model under ``handle`` (from
    :func:`~dmlab.accelerators.quantization.apply_quantization`) to match its full-precision outputs on
    ``calibration``; ``handle.remove()`` restores the original weights bit for bit.

    Each of ``steps`` Adam steps takes one calibration batch (drawn with ``generator``). Returns (and stores in
    ``handle.stats["quest"]``) ``{"params": trained parameter count, "initial_loss", "final_loss", "steps"}``;
    the losses are the mean squared output error over all calibration batches before and after.
    """
    if not isinstance(handle, QuantHandle) or handle.removed:
        raise TypeError("handle must be an active QuantHandle from apply_quantization(model, QuantConfig(...), calib)")
    if not isinstance(calibration, CalibrationSet) or not calibration.calls:
        raise TypeError("calibration must be a CalibrationSet (dmlab.accelerators.quant_calibration.calibration_set)")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    patterns = QUEST_SELECTIONS.get(select) if isinstance(select, str) else tuple(select)
    if patterns is None:
        raise ValueError(f"select must be one of {sorted(QUEST_SELECTIONS)} or a tuple of module-name patterns, "
                         f"got {select!r}")
    model = handle.model
    params = select_parameters(model, patterns)
    if not params:
        raise ValueError(f"select={select!r} matches no parameter of {type(model).__name__}; try 'all'")
    calls = calibration.calls
    with torch.no_grad(), handle.bypass():
        targets = [net_output(model(*a, **k)).detach() for a, k in calls]

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float((net_output(model(*a, **k)) - t).pow(2).mean()) for (a, k), t in zip(calls, targets)) / len(calls)

    initial = mean_loss()
    protect_parameters(handle, params)
    from ..train import FitConfig, fit

    def loss_of(g):  # one calibration batch per step, drawn with the generator
        i = int(torch.randint(len(calls), (1,), generator=g))
        a, k = calls[i]
        return (net_output(model(*a, **k)) - targets[i]).pow(2).mean()

    if steps:
        fit(loss_of, None, FitConfig(steps=steps, lr=lr, optimizer="adam"), generator=generator,
            params=list(params.values()))
    for p in params.values():
        p.requires_grad_(False)
    info = {"params": sum(p.numel() for p in params.values()), "initial_loss": initial, "final_loss": mean_loss(),
            "steps": steps}
    handle.stats["quest"] = info
    return info
