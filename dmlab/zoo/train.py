"""Training loops of the zoo recipes: fixed seed, tqdm progress, resumable, config hash recorded.

* classifier: cross-entropy with random +-1 pixel shifts (edge padding).
* ``unet`` / ``dit``: the DDPM "simple" loss ``|| eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y) ||^2``
  (Ho et al. 2020, Alg. 1) with ``t`` uniform over the 1000 training steps and the label replaced by the null class
  with probability ``p_uncond`` (classifier-free guidance training, Ho & Salimans 2022).

The loop is :func:`dmlab.train.fit` (one for the library): every ``checkpoint_every`` steps accelerate's
``save_state`` writes the full state (weights, EMA weights, AdamW moments, the data generator) to the recipe's run
folder (:func:`run_dir`, keyed by the config hash and the training code's hash, under the checkout or
``$DMLAB_CACHE``), verified by sha256 before reuse; a rerun continues from there (and says so) and gives the same
weights as an uninterrupted run. ``accelerate launch -m dmlab.zoo train NAME`` trains data-parallel.
"""
from __future__ import annotations

import json
import pathlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recipes import NULL_CLASS, SCHEDULER_CONFIG, Recipe

__all__ = [
    "fit_config",
    "run_dir",
    "classifier_batch",
    "classifier_loss",
    "diffusion_batch",
    "diffusion_loss",
    "training_alphas_cumprod",
    "train",
    "save_model",
]


def fit_config(recipe: Recipe, *, progress: bool = True, steps: int | None = None, lr: float | None = None,
               ema: bool = True) -> "FitConfig":
    """The :class:`dmlab.train.FitConfig` of a recipe: AdamW, linear warmup then cosine decay, EMA with warmup."""
    from ..train import FitConfig

    tc = recipe.train
    return FitConfig(steps=tc.steps if steps is None else steps, lr=tc.lr if lr is None else lr, optimizer="adamw",
                     weight_decay=tc.weight_decay, schedule="cosine", warmup=tc.warmup,
                     ema=tc.ema if ema else None, checkpoint_every=tc.checkpoint_every, progress=progress,
                     desc=recipe.name)


def run_dir(recipe: Recipe) -> pathlib.Path | None:
    """The resumable-state folder of a recipe, keyed by its config hash and the training code's hash
    (:func:`dmlab.train.run_dir`: under the checkout or ``$DMLAB_CACHE``; ``None`` when neither exists)."""
    from .. import train as core
    from . import latent

    return core.run_dir(recipe.name, recipe.config_hash, __import__(__name__, fromlist=["x"]), latent)


# ----------------------------------------------------------------------------------------------- losses
def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by -1, 0 or +1 pixel in each direction (edge padding), drawn from ``gen``."""
    B, _, H, W = x.shape
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx, dy = torch.randint(0, 3, (2, B), generator=gen).tolist()
    return torch.stack([pad[b, :, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)])


def classifier_batch(x_all: Tensor, y_all: Tensor, batch_size: int, gen: torch.Generator) -> dict:
    """A batch of randomly shifted digits and their labels (rows and shifts drawn from ``gen``)."""
    idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
    return {"x": _shift(x_all[idx], gen), "y": y_all[idx]}


def classifier_loss(model, batch: dict, device="cpu") -> Tensor:
    """Cross-entropy on randomly shifted digits."""
    return F.cross_entropy(model(batch["x"].to(device)), batch["y"].to(device))


def diffusion_batch(x_all: Tensor, y_all: Tensor, batch_size: int, gen: torch.Generator, recipe: Recipe,
                    alphas_cumprod: Tensor) -> dict:
    """A DDPM training batch: rows, timesteps ``t`` uniform over the training steps, noise, and labels dropped to the
    null class with probability ``p_uncond`` (every draw from ``gen``, on the CPU)."""
    from ..train import ddpm_batch

    return ddpm_batch(x_all, alphas_cumprod, batch_size, gen, labels=y_all, p_uncond=recipe.train.p_uncond,
                      null_class=NULL_CLASS)


def diffusion_loss(model, batch: dict, device="cpu") -> Tensor:
    """DDPM eps-prediction loss ``|| eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y) ||^2``."""
    x0, eps, x_t = (batch[k].to(device) for k in ("x0", "eps", "xt"))
    out = model(x_t, timestep=batch["t"].to(device), class_labels=batch["y"].to(device))
    out = out.sample if hasattr(out, "sample") else out
    return F.mse_loss(out[:, : x0.shape[1]], eps)


def training_alphas_cumprod() -> Tensor:
    """``alpha_bar_t`` of the zoo's DDPM schedule (:data:`SCHEDULER_CONFIG`)."""
    from ..schedules import betas_for

    sc = SCHEDULER_CONFIG
    betas = betas_for(sc["num_train_timesteps"], sc["beta_start"], sc["beta_end"], sc["beta_schedule"])
    return torch.cumprod(1 - betas.double(), 0).float()


# ----------------------------------------------------------------------------------------------- loop
def train(recipe: Recipe, *, device: str = "cpu", resume: bool = True, progress: bool = True,
          stop_after: int | None = None, state_dir: pathlib.Path | None = None):
    """Train ``recipe`` with :func:`dmlab.train.fit` (resuming from its run folder when ``resume``); return
    ``(model with EMA weights, log)``.

    ``log`` holds ``config_hash``, ``steps``, ``train_seconds`` (summed over resumed sessions), ``processes`` and
    ``curve`` (``[[step, mean loss over the last 50 steps], ...]``). ``stop_after`` ends the session early after that
    many total steps (what an interrupted run looks like; used by the tests). Under ``accelerate launch`` the run is
    data-parallel. Ho et al. 2020 (DDPM) for the loss.
    """
    import shutil

    from ..data import load_digits
    from ..train import fit, process_info
    from .kinds import kind_of
    from .nets import build_model

    if not kind_of(recipe.kind).single_network:
        raise ValueError(f"recipe {recipe.name!r} has kind {recipe.kind!r}; train it with dmlab.zoo.build")
    tc = recipe.train
    x_all, y_all = load_digits("train", size=recipe.size)
    if "train_rows" in recipe.extra:
        from .recipes import classifier_rows

        rows = classifier_rows(recipe.extra["train_rows"], x_all.shape[0])
        x_all, y_all = x_all[rows], y_all[rows]
    if "classes" in recipe.extra:  # a source-domain model trained on some digit classes only (chapter 23)
        keep = torch.isin(y_all, torch.tensor(recipe.extra["classes"]))
        x_all, y_all = x_all[keep], y_all[keep]
    model = build_model(recipe).to(device)
    gen = torch.Generator().manual_seed(tc.seed)
    if kind_of(recipe.kind).denoiser:
        ac = training_alphas_cumprod()
        data = lambda g: diffusion_batch(x_all, y_all, tc.batch_size, g, recipe, ac)  # noqa: E731
        loss = lambda b: diffusion_loss(model, b, device)  # noqa: E731
    else:
        data = lambda g: classifier_batch(x_all, y_all, tc.batch_size, g)  # noqa: E731
        loss = lambda b: classifier_loss(model, b, device)  # noqa: E731
    state_dir = state_dir or run_dir(recipe)
    if state_dir is not None and not resume and process_info()[0] == 0:
        shutil.rmtree(state_dir, ignore_errors=True)
    res = fit(loss, model, fit_config(recipe, progress=progress), generator=gen, data=data, run=state_dir,
              run_key=recipe.config_hash, stop_after=stop_after)
    log = {"config_hash": recipe.config_hash, "steps": res.steps, "complete": res.complete,
           "train_seconds": round(res.seconds, 1), "device": str(device), "torch_threads": torch.get_num_threads(),
           "processes": process_info()[1], "curve": [[s, round(v, 6)] for s, v in res.curve]}
    return model, log


def save_model(recipe: Recipe, model: nn.Module, log: dict, folder: pathlib.Path) -> pathlib.Path:
    """Write a trained model as safetensors (+ JSON config, the scheduler config and the training log); only the
    main process writes in a data-parallel run."""
    from ..train import process_info

    if process_info()[0] != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file():
            old.unlink()
    model = model.to("cpu")
    if not hasattr(model, "save_pretrained"):  # the classifier: a plain module
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(recipe.model, indent=1) + "\n")
    else:
        from diffusers import DDPMScheduler

        model.save_pretrained(folder, safe_serialization=True)
        DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder)
    (folder / "train_log.json").write_text(json.dumps(log) + "\n")
    return folder
