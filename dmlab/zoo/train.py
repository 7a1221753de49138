"""Training loops of the zoo recipes: fixed seed, tqdm progress, resumable, config hash recorded.

* classifier: cross-entropy with random +-1 pixel shifts (edge padding).
* ``unet`` / ``dit``: the DDPM "simple" loss ``|| eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y) ||^2``
  (Ho et al. 2020, Alg. 1) with ``t`` uniform over the 1000 training steps and the label replaced by the null class
  with probability ``p_uncond`` (classifier-free guidance training, Ho & Salimans 2022).

Every ``checkpoint_every`` steps the full state (weights, EMA weights, AdamW moments, the data generator's state, the
loss curve, elapsed time) is written as safetensors + JSON (no pickle) to ``<cache>/runs/<name>-<config hash>/``; a
rerun of the same recipe continues from there and gives the same weights as an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recipes import NULL_CLASS, SCHEDULER_CONFIG, Recipe
from .store import cache_dir


def _lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to 0 (Loshchilov & Hutter 2017)."""
    tc = recipe.train
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    frac = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def run_dir(recipe: Recipe) -> pathlib.Path:
    """The resumable-state folder of a recipe (keyed by its config hash)."""
    return cache_dir() / "runs" / f"{recipe.name}-{recipe.config_hash}"


# ----------------------------------------------------------------------------------------------- state I/O
def _save_state(path: pathlib.Path, model, ema, opt, gen: torch.Generator, meta: dict) -> None:
    """Write weights, EMA weights, optimizer state(s) (``opt``: an optimizer or ``{name: optimizer}``), the
    generator state and ``meta`` as ``state.safetensors`` + ``state.json`` (no pickle)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    opts = opt if isinstance(opt, dict) else {"opt": opt}
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    groups = {}
    for name, o in opts.items():
        sd = o.state_dict()
        groups[name] = sd["param_groups"]
        for i, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"{name}.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["generator_state"] = gen.get_state()
    save_file(tensors, str(path / "state.safetensors.tmp"))
    (path / "state.safetensors.tmp").replace(path / "state.safetensors")
    (path / "state.json").write_text(json.dumps(dict(meta, param_groups=groups)))


def _load_state(path: pathlib.Path, model, ema, opt, gen: torch.Generator, device) -> dict | None:
    """Restore what :func:`_save_state` wrote (in place); return its ``meta`` or ``None`` when there is none."""
    if not (path / "state.json").is_file() or not (path / "state.safetensors").is_file():
        return None
    from safetensors.torch import load_file

    opts = opt if isinstance(opt, dict) else {"opt": opt}
    meta = json.loads((path / "state.json").read_text())
    t = load_file(str(path / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(t[f"ema.{k}"])
    groups = meta.pop("param_groups")
    for name, o in opts.items():
        state: dict = {}
        for k, v in t.items():
            if k.startswith(name + "."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v.to(device) if key != "step" else v
        o.load_state_dict({"state": state, "param_groups": groups[name]})
    gen.set_state(t["generator_state"])
    return meta


# ----------------------------------------------------------------------------------------------- losses
def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by -1, 0 or +1 pixel in each direction (edge padding), drawn from ``gen``."""
    B, _, H, W = x.shape
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx, dy = torch.randint(0, 3, (2, B), generator=gen).tolist()
    return torch.stack([pad[b, :, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)])


def classifier_loss(model, x0: Tensor, y: Tensor, gen: torch.Generator, recipe: Recipe) -> Tensor:
    """Cross-entropy on randomly shifted digits."""
    return F.cross_entropy(model(_shift(x0.cpu(), gen).to(x0.device)), y)


def diffusion_loss(model, x0: Tensor, y: Tensor, gen: torch.Generator, recipe: Recipe,
                   alphas_cumprod: Tensor) -> Tensor:
    """DDPM eps-prediction loss with label dropout to the null class (all draws from ``gen``, on the CPU)."""
    B = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (B,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(B, generator=gen) < recipe.train.p_uncond
    y = torch.where(drop.to(y.device), torch.full_like(y, NULL_CLASS), y)
    ac = alphas_cumprod[t].view(-1, 1, 1, 1)
    eps, t, ac = eps.to(x0.device), t.to(x0.device), ac.to(x0.device)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    out = model(x_t, timestep=t, class_labels=y)
    out = out.sample if hasattr(out, "sample") else out
    return F.mse_loss(out[:, : x0.shape[1]], eps)


# ----------------------------------------------------------------------------------------------- loop
def train(recipe: Recipe, *, device: str = "cpu", resume: bool = True, progress: bool = True,
          stop_after: int | None = None, state_dir: pathlib.Path | None = None):
    """Train ``recipe`` (resuming from its run folder when ``resume``); return ``(model with EMA weights, log)``.

    ``log`` holds ``config_hash``, ``steps``, ``train_seconds`` (summed over resumed sessions) and ``curve``
    (``[[step, mean loss over the last 50 steps], ...]``). ``stop_after`` ends the session early after that many
    total steps (what an interrupted run looks like; used by the tests). Ho et al. 2020 (DDPM) for the loss.
    """
    from tqdm.auto import tqdm

    from ..data import load_digits
    from .nets import build_model

    if recipe.kind not in ("classifier", "unet", "dit"):
        raise ValueError(f"recipe {recipe.name!r} has kind {recipe.kind!r}; train it with dmlab.zoo.latent")
    tc = recipe.train
    x_all, y_all = load_digits("train", size=recipe.size)
    if "train_rows" in recipe.extra:
        from .recipes import classifier_rows

        rows = classifier_rows(recipe.extra["train_rows"], x_all.shape[0])
        x_all, y_all = x_all[rows], y_all[rows]
    x_all, y_all = x_all.to(device), y_all.to(device)
    model = build_model(recipe).to(device).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    if recipe.kind == "classifier":
        loss_fn = classifier_loss
    else:
        from ..schedules import betas_for

        sc = SCHEDULER_CONFIG
        betas = betas_for(sc["num_train_timesteps"], sc["beta_start"], sc["beta_end"], sc["beta_schedule"])
        ac = torch.cumprod(1 - betas.double(), 0).float()
        loss_fn = lambda m, x, y, g, r: diffusion_loss(m, x, y, g, r, ac)  # noqa: E731

    state_dir = state_dir or run_dir(recipe)
    meta = _load_state(state_dir, model, ema, opt, gen, device) if resume else None
    step, elapsed, curve = (meta["step"], meta["train_seconds"], meta["curve"]) if meta else (0, 0.0, [])
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    window: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=tc.steps, initial=step, desc=recipe.name, disable=not progress, mininterval=2.0)
    while step < end:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe)
        idx = torch.randint(0, x_all.shape[0], (tc.batch_size,), generator=gen).to(device)
        loss = loss_fn(model, x_all[idx], y_all[idx], gen, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(tc.ema, (1 + step) / (10 + step))  # EMA warmup (as in many DDPM codebases)
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        step += 1
        window.append(loss.item())
        if step % 50 == 0 or step == tc.steps:
            curve.append([step, sum(window) / len(window)])
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
            window = []
        bar.update(1)
        if step % tc.checkpoint_every == 0 or step == end:
            _save_state(state_dir, model, ema, opt, gen,
                        {"step": step, "train_seconds": elapsed + time.perf_counter() - t0, "curve": curve,
                         "config_hash": recipe.config_hash, "recipe": recipe.name})
    bar.close()
    elapsed += time.perf_counter() - t0
    model.load_state_dict(ema)
    model.eval()
    log = {"config_hash": recipe.config_hash, "steps": step, "complete": step >= tc.steps,
           "train_seconds": round(elapsed, 1), "device": str(device), "torch_threads": torch.get_num_threads(),
           "curve": [[s, round(v, 6)] for s, v in curve]}
    return model, log


def save_model(recipe: Recipe, model: nn.Module, log: dict, folder: pathlib.Path) -> pathlib.Path:
    """Write a trained model as safetensors (+ JSON config, the scheduler config and the training log)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file():
            old.unlink()
    model = model.to("cpu")
    if recipe.kind == "classifier":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(recipe.model, indent=1) + "\n")
    else:
        from diffusers import DDPMScheduler

        model.save_pretrained(folder, safe_serialization=True)
        DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder)
    (folder / "train_log.json").write_text(json.dumps(log) + "\n")
    return folder
