"""Measuring zoo models: class-conditional sampling, FLOPs per call, and the quality numbers of the registry."""
from __future__ import annotations

import torch
from torch import Tensor

from .recipes import NULL_CLASS

__all__ = [
    "balanced_labels",
    "sample_digits",
    "sample_digits_sharded",
    "flops_per_call",
    "measure_digits_model",
    "measure_classifier",
    "cpu_seconds_per_step",
]

DEFAULT_STEPS = 25  # Heun: 2 * 25 - 1 = 49 model calls, the "50-NFE" budget of the quality bar


def balanced_labels(n_per_class: int, n_classes: int = 10) -> Tensor:
    """``[0]*k + [1]*k + ... + [9]*k``: the labels of a class-balanced sample batch."""
    return torch.arange(n_classes).repeat_interleave(n_per_class)


@torch.no_grad()
def sample_digits(denoiser, labels: Tensor, *, generator: torch.Generator, n_steps: int = DEFAULT_STEPS,
                  guidance: float = 1.0, sigma_min: float | None = None, sigma_max: float | None = None,
                  size: int = 8, sampler=None, batch_size: int = 250, device="cpu",
                  noise: Tensor | None = None) -> Tensor:
    """Class-conditional digits ``[B, 1, size, size]`` from a zoo denoiser with Heun's sampler (Karras et al. 2022)
    on a Karras sigma grid (``rho = 7``) spanning the model's training sigmas. ``guidance != 1`` applies
    classifier-free guidance (Ho & Salimans 2022) against the null class. Noise is drawn on the CPU from ``generator``
    and moved to ``device`` (or given as standard-normal ``noise``); the result is returned on the CPU."""
    from .. import samplers, schedules
    from ..denoisers import cfg

    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    labels = torch.as_tensor(labels, dtype=torch.long).to(device)
    smin = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", 0.002)
    smax = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", 80.0)
    sigmas = schedules.karras(n_steps, smin, smax, dtype=torch.float32).to(device)
    sampler = sampler or samplers.sample_heun
    if noise is None:
        noise = torch.randn(labels.shape[0], 1, size, size, generator=generator)
    noise = noise.to(device)
    out = []
    for i in range(0, labels.shape[0], batch_size):
        y = labels[i:i + batch_size]
        d = denoiser if guidance == 1.0 else cfg(denoiser, guidance, {"class_labels": torch.full_like(y, NULL_CLASS)})
        out.append(sampler(d, noise[i:i + batch_size] * sigmas[0], sigmas, cond={"class_labels": y}).cpu())
    return torch.cat(out)


def sample_digits_sharded(denoiser, labels: Tensor, *, generator: torch.Generator, size: int = 8, **kw) -> Tensor:
    """:func:`sample_digits` with the samples split across the processes of an ``accelerate launch`` run
    (accelerate's ``split_between_processes``) and gathered in order. Every process draws the noise of all samples
    from ``generator`` first, so each sample starts from the same noise as on one process."""
    from ..train import gather_tensors, process_info, split_between_processes

    if process_info()[1] == 1:
        return sample_digits(denoiser, labels, generator=generator, size=size, **kw)
    labels = torch.as_tensor(labels, dtype=torch.long)
    noise = torch.randn(labels.shape[0], 1, size, size, generator=generator)
    mine = split_between_processes(labels.shape[0])
    x = (sample_digits(denoiser, labels[mine.start:mine.stop], generator=generator, size=size,
                       noise=noise[mine.start:mine.stop], **kw) if len(mine) else torch.empty(0, 1, size, size))
    return gather_tensors(x)


def flops_per_call(model, kind: str, size: int = 8) -> int:
    """FLOPs of one forward call on a batch of one (``torch.utils.flop_counter``; 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .kinds import kind_of

    x = torch.zeros(1, 1, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        if kind_of(kind).denoiser:
            model(x, timestep=torch.tensor([500]), class_labels=torch.tensor([0]))
        else:
            model(x)
    return int(fc.get_total_flops())


def measure_digits_model(name: str, *, n_per_class: int = 50, n_steps: int = DEFAULT_STEPS, seed: int = 0,
                         guidance: float = 1.0) -> dict:
    """Class accuracy and digits-FD (with the real-vs-real floor at the same n) of a zoo diffusion model's samples."""
    from .. import metrics
    from . import load, load_denoiser

    clf = load("classifier")
    den, _ = load_denoiser(name)
    gen = torch.Generator().manual_seed(seed)
    y = balanced_labels(n_per_class)
    x = sample_digits_sharded(den, y, generator=gen, n_steps=n_steps, guidance=guidance)
    n = y.numel()
    return {"class_accuracy": round(metrics.class_accuracy(x, y, classifier=clf), 4),
            "digits_fd": round(metrics.digits_fd(x, classifier=clf), 4),
            "digits_fd_floor": round(metrics.digits_fd_floor(n, generator=torch.Generator().manual_seed(seed),
                                                             classifier=clf, repeats=3), 4),
            "n_samples": n, "nfe": 2 * n_steps - 1, "guidance": guidance,
            "sampler": f"heun, karras rho=7, {n_steps} steps, seed {seed}"}


def measure_classifier() -> dict:
    """Test accuracy of the digit classifier on the 359 held-out digits (8x8 and the 16x16 upsampled copies)."""
    from .. import metrics
    from ..data import load_digits
    from . import load

    clf = load("classifier")
    x, y = load_digits("test")
    x16, _ = load_digits("test", size=16)
    return {"test_accuracy": round(metrics.class_accuracy(x, y, classifier=clf), 4),
            "test_accuracy_16px": round(metrics.class_accuracy(x16, y, classifier=clf), 4)}


def cpu_seconds_per_step(recipe, *, steps: int = 10) -> dict:
    """CPU (process) seconds per training step of a recipe with 1 thread, from a short throwaway run after a warm-up
    step, and the implied minutes for the whole recipe. Process time, not wall time: on a shared machine it is far
    less inflated by other jobs than the wall clock (but still somewhat, through shared caches)."""
    import dataclasses
    import pathlib
    import tempfile
    import time

    from .kinds import kind_of

    if not (kind_of(recipe.kind).single_network or recipe.kind == "sd"):
        raise ValueError(f"cpu_seconds_per_step measures single networks and the latent pipeline, not kind "
                         f"{recipe.kind!r} ({recipe.name}): its train_log.json records its training time")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as d:
            d = pathlib.Path(d)
            if not kind_of(recipe.kind).single_network:
                from .latent import train_pipeline

                out = {}
                for phase, (n_vae, n_unet) in {"vae": (steps + 1, 1), "unet": (1, steps + 1)}.items():
                    r = dataclasses.replace(recipe.with_steps(n_unet, checkpoint_every=10 ** 6),
                                            extra=dict(recipe.extra, vae_steps=n_vae))
                    warm = dataclasses.replace(r.with_steps(1), extra=dict(r.extra, vae_steps=1))
                    train_pipeline(warm, d / f"w{phase}", progress=False, state_dir=d / f"sw{phase}")
                    t0 = time.process_time()
                    train_pipeline(r, d / phase, progress=False, state_dir=d / f"s{phase}")
                    t1 = time.process_time()
                    out[phase] = (t1 - t0) / (steps + 2)  # includes one step of the other phase and the save
                total = out["vae"] * recipe.extra["vae_steps"] + out["unet"] * recipe.train.steps
                return {"cpu_seconds_per_step": {k: round(v, 4) for k, v in out.items()},
                        "cpu_minutes_estimate": round(total / 60, 1)}
            from .train import train

            train(recipe.with_steps(1, checkpoint_every=10 ** 6), progress=False, state_dir=d / "warm")
            t0 = time.process_time()
            train(recipe.with_steps(steps, checkpoint_every=10 ** 6), progress=False, state_dir=d / "run")
            per = (time.process_time() - t0) / steps
            return {"cpu_seconds_per_step": round(per, 4),
                    "cpu_minutes_estimate": round(per * recipe.train.steps / 60, 1)}
    finally:
        torch.set_num_threads(threads)
