"""What the model-zoo chapter shows: a measured quality table, sample panels and training curves."""
from __future__ import annotations

import json

import torch
from torch import Tensor

from .evaluate import DEFAULT_STEPS, balanced_labels, sample_digits

__all__ = ["quality_table", "plot_sample_panels", "final_losses", "training_curve", "plot_training_curves"]


def quality_table(names, *, n_per_class: int, generator: torch.Generator, n_steps: int = DEFAULT_STEPS,
                  guidance: float = 1.0, classifier=None) -> tuple[dict, dict]:
    """Sample ``n_per_class`` digits of every class from each zoo model (Heun, ``2 n_steps - 1`` NFE) and measure
    conditional accuracy and digits-FD (Ho et al. 2020 models; Heusel et al. 2017 distance).

    Returns ``(rows, samples)``: ``rows[name] = {"params", "flops_per_call", "class_accuracy", "digits_fd"}`` and
    ``samples[name]`` the images (class-major order), so a figure can reuse them.
    """
    from .. import metrics
    from . import info, load, load_denoiser

    clf = classifier if classifier is not None else load("classifier")
    y = balanced_labels(n_per_class)
    rows, samples = {}, {}
    for name in names:
        den, _ = load_denoiser(name)
        x = sample_digits(den, y, generator=generator, n_steps=n_steps, guidance=guidance)
        e = info(name)
        rows[name] = {"params": e["params"], "flops_per_call": e["flops_per_call"],
                      "class_accuracy": metrics.class_accuracy(x, y, classifier=clf),
                      "digits_fd": metrics.digits_fd(x, classifier=clf)}
        samples[name] = x
    return rows, samples


def _tile(x: Tensor, n_per_class: int, per_class: int) -> Tensor:
    """A [per_class * H, 10 * W] mosaic: column c holds the first ``per_class`` samples of class c."""
    x = x.reshape(10, n_per_class, *x.shape[-2:])[:, :per_class]
    return torch.cat([torch.cat(list(col), dim=0) for col in x], dim=1)


def plot_sample_panels(samples: dict, n_per_class: int, *, per_class: int = 3, ncols: int = 2):
    """One panel per model; column ``c`` of each panel shows samples asked to be digit ``c``."""
    import math

    import matplotlib.pyplot as plt

    nrows = math.ceil(len(samples) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, (0.38 * per_class + 0.35) * nrows), dpi=90,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, x) in zip(axes.flat, samples.items()):
        ax.imshow(_tile(x.clamp(-1, 1), n_per_class, per_class), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    return fig


def final_losses(names) -> dict:
    """The last recorded training loss of each model."""
    return {n: training_curve(n)[-1][1] for n in names}


def training_curve(name: str) -> list:
    """``[[step, mean loss over 50 steps], ...]`` of a zoo model, read from its (verified) ``train_log.json``."""
    from .registry import fetch, get_entry

    folder = fetch(name, get_entry(name))
    return json.loads((folder / "train_log.json").read_text())["curve"]


def plot_training_curves(names, *, vae_steps: dict | None = None):
    """Training loss against step for the zoo's diffusion models (log scale)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2), dpi=90)
    for name in names:
        c = training_curve(name)
        off = (vae_steps or {}).get(name, 0)
        pts = [(s - off, v) for s, v in c if s > off]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training step (denoiser)")
    ax.set_ylabel("eps-MSE, mean of 50 steps")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    return fig
