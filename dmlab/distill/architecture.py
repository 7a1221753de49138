"""Architecture distillation: a teacher with blocks removed, trained to imitate the teacher (chapter 27).

KOALA (Lee et al., "KOALA: Self-Attention Matters in Knowledge Distillation of Latent Diffusion Models", NeurIPS
2024) compresses a diffusion backbone by *removing blocks*, initialises the student from the teacher's kept blocks,
and trains it with the task loss, an output-distillation loss and a feature-distillation loss (the recipe of
BK-SDM, Kim et al. 2023). Its finding is about *where* the features are matched: the outputs of the
**self-attention** layers transfer more than the outputs of the whole blocks or of the other layers.

Here (a re-implementation from the paper text, on diffusers' ``DiTTransformer2DModel``):

* :func:`remove_blocks` builds the student from the teacher's config with fewer ``transformer_blocks`` and copies
  every kept tensor, so at initialisation the student is the teacher with some blocks skipped;
* :func:`kd_sites` names the matched layers of a site: ``"attn"`` (self-attention ``attn1``), ``"ff"`` (the
  feed-forward layer, the transformer's counterpart of a UNet resnet), ``"block"`` (whole block outputs) or
  ``"out"`` (no features: output distillation only);
* :func:`kd_loss` is ``L_task + L_outKD + w_feat * L_featKD`` with features captured by the one hook layer
  (:func:`dmlab.hooks.capture`; the student's with ``detach=False`` so the loss reaches its weights);
* :func:`distill_student` trains a student with :func:`dmlab.train.fit` on DDPM batches of digits.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..anatomy import transformer_blocks
from ..hooks import capture

__all__ = ["SITES", "remove_blocks", "kd_sites", "kd_loss", "distill_student"]

SITES = ("out", "attn", "ff", "block")
_SUFFIX = {"attn": ".attn1", "ff": ".ff", "block": ""}


def _check_dit(model) -> None:
    if not isinstance(model, nn.Module) or not transformer_blocks(model) or not hasattr(model, "config"):
        raise TypeError(f"architecture distillation needs a diffusers transformer with transformer_blocks and a "
                        f"config (e.g. DiTTransformer2DModel, zoo 'dit_s'); got {type(model).__name__}")


def _check_keep(keep, n: int) -> list[int]:
    keep = [int(k) for k in keep]
    if not keep:
        raise ValueError("keep is empty: name at least one block index of the teacher to keep")
    if sorted(set(keep)) != keep:
        raise ValueError(f"keep must be strictly increasing block indices, got {keep}")
    if keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"keep indices must lie in 0..{n - 1} (the teacher has {n} blocks), got {keep}")
    return keep


def remove_blocks(teacher: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` (a diffusers transformer) with only the blocks ``keep``, built from the teacher's config
    with ``num_layers=len(keep)``; every kept tensor (embeddings, kept blocks, output head) is copied, so block ``j``
    of the student starts as block ``keep[j]`` of the teacher (KOALA / BK-SDM initialisation). The student's
    label dropout inside the network is switched off: classifier-free-guidance dropout belongs to the batches
    (:func:`dmlab.train.ddpm_batch`, drawn from the run's generator), so a training run is reproducible."""
    _check_dit(teacher)
    keep = _check_keep(keep, len(teacher.transformer_blocks))
    cfg = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
    cfg["num_layers"] = len(keep)
    student = type(teacher)(**cfg)
    src = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith("transformer_blocks."):
            _, j, rest = key.split(".", 2)
            key_t = f"transformer_blocks.{keep[int(j)]}.{rest}"
        else:
            key_t = key
        state[key] = src[key_t].clone()
    student.load_state_dict(state)
    for mod in student.modules():  # diffusers' DiT drops labels in train mode from the global RNG: the batches
        if hasattr(mod, "dropout_prob") and hasattr(mod, "token_drop"):  # drop them instead (through a generator)
            mod.dropout_prob = 0.0
    return student.to(next(teacher.parameters()).device).train()


def kd_sites(model: nn.Module, site: str, blocks: Sequence[int] | None = None) -> list[str]:
    """Names of the layers matched at ``site`` (one of :data:`SITES`) in the blocks ``blocks`` (default: all)."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    _check_dit(model)
    names = [n for n, _ in transformer_blocks(model)]
    blocks = range(len(names)) if blocks is None else blocks
    if site == "out":
        return []
    return [names[i] + _SUFFIX[site] for i in blocks]


def _eps(out) -> Tensor:
    return out.sample if hasattr(out, "sample") else out


def kd_loss(student: nn.Module, teacher: nn.Module, batch: dict, *, keep: Sequence[int], site: str = "attn",
            w_out: float = 1.0, w_feat: float = 1.0) -> Tensor:
    """``L_task + w_out L_outKD + w_feat L_featKD`` on a DDPM batch (:func:`dmlab.train.ddpm_batch` with labels).

    ``L_task`` is the DDPM loss of the student, ``L_outKD`` the MSE between the student's and the teacher's
    eps-prediction, ``L_featKD`` the mean over matched layers of the MSE between student layer ``j`` and teacher
    layer ``keep[j]`` at ``site`` (:func:`kd_sites`; none for ``"out"``)."""
    keep = _check_keep(keep, len(teacher.transformer_blocks))
    if len(keep) != len(student.transformer_blocks):
        raise ValueError(f"keep has {len(keep)} indices but the student has {len(student.transformer_blocks)} blocks")
    s_names, t_names = kd_sites(student, site), kd_sites(teacher, site, keep)
    c = batch["x0"].shape[1]
    kw = {"timestep": batch["t"], "class_labels": batch["y"]}
    with torch.no_grad():
        if t_names:
            with capture(teacher, t_names) as cap_t:
                out_t = _eps(teacher(batch["xt"], **kw))[:, :c]
        else:
            out_t = _eps(teacher(batch["xt"], **kw))[:, :c]
    if s_names:
        with capture(student, s_names, detach=False) as cap_s:
            out_s = _eps(student(batch["xt"], **kw))[:, :c]
        feat = sum(F.mse_loss(cap_s[a], cap_t[b]) for a, b in zip(s_names, t_names)) / len(s_names)
    else:
        out_s = _eps(student(batch["xt"], **kw))[:, :c]
        feat = out_s.new_zeros(())
    return F.mse_loss(out_s, batch["eps"]) + w_out * F.mse_loss(out_s, out_t) + w_feat * feat


def distill_student(teacher: nn.Module, keep: Sequence[int], site: str, x0: Tensor, y0: Tensor,
                    alphas_cumprod: Tensor, *, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                    p_uncond: float = 0.1, w_out: float = 1.0, w_feat: float = 1.0) -> tuple[nn.Module, dict]:
    """Build the student (:func:`remove_blocks`) and train it with :func:`kd_loss` by :func:`dmlab.train.fit`
    (Adam, constant ``lr``); every draw (batches, timesteps, noise, label dropout) comes from one generator seeded
    ``seed``, so students of the same seed see the same batches whatever the site. Returns ``(student, log)``."""
    from ..train import FitConfig, ddpm_batch, fit

    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = remove_blocks(teacher, keep)
    t0 = time.time()
    res = fit(lambda b: kd_loss(student, teacher, b, keep=keep, site=site, w_out=w_out, w_feat=w_feat), student,
              FitConfig(steps=steps, lr=lr, log_every=max(1, steps // 10)),
              generator=torch.Generator().manual_seed(seed),
              data=lambda g: ddpm_batch(x0, alphas_cumprod, batch_size, g, labels=y0, p_uncond=p_uncond))
    log = {"steps": steps, "train_seconds": round(time.time() - t0, 1), "site": site, "keep": list(keep),
           "loss": [[s, round(v, 6)] for s, v in res.curve]}
    return student.eval(), log
