"""The accelerator benchmark protocol for the digit zoo, as one object.

:class:`Testbed` (the benchmark protocol) fixes everything but the method: the weights, the sampler, the schedule, the starting noise and the
labels. Each :meth:`Testbed.measure` call samples with a method (an ``apply`` function returning a
:class:`~dmlab.accelerators.handle.Handle`, another denoiser such as a T-Stitch one, or another schedule) and adds a
row to ``protocol.table`` with

* ``flop_speedup`` - FLOPs(baseline) / FLOPs(method) of the very runs that made the samples
  (:class:`dmlab.bench.FlopAccountant`: each network's per-module FLOPs are profiled once, then every module that
  really computes is charged; cached modules cost nothing);
* ``psnr`` - fidelity to the baseline sample from the same noise (dB; ``inf`` when identical);
* ``fd`` / ``acc`` - digits-FD against the test digits and class accuracy (when a classifier is given);
* ``wall`` (``wall_lo``-``wall_hi``) - with ``time=True``: interleaved 1-thread timing, median of pair ratios.

:meth:`Testbed.fewer_steps` adds the trivial competitor, *the same sampler with fewer steps at matched FLOPs*.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .. import bench, samplers, schedules

__all__ = ["Testbed"]


class Testbed:
    """Baseline and methods on the same weights, sampler, steps, noise and labels (see the module docstring).

    ``denoiser``: the baseline Denoiser (e.g. from :func:`dmlab.zoo.load_denoiser`); ``model``: the network the
    accelerators attach to; ``labels``: class labels ``[B]``; ``n_steps`` of ``sampler`` (default Euler, which is
    DDIM with eta = 0) on the model's own discrete timesteps (``schedules.discrete``), or ``sigmas`` given.
    ``others``: ``(denoiser, model)`` pairs of further networks a method may call (T-Stitch's small model), so their
    FLOPs are accounted too.
    """

    def __init__(self, denoiser: Callable, model: torch.nn.Module, labels: Tensor, *, generator: torch.Generator,
                 n_steps: int = 20, sampler: Callable | None = None, sigmas: Tensor | None = None,
                 classifier=None, size: int = 8, channels: int = 1, title: str = "",
                 others: tuple = ()):
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
        self.denoiser, self.model, self.classifier = denoiser, model, classifier
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.sampler = sampler or samplers.sample_euler
        self.n_steps = n_steps
        self.sigmas = sigmas if sigmas is not None else self.schedule(n_steps)
        self.noise = torch.randn(len(self.labels), channels, size, size, generator=generator)
        self.table = bench.Table(title, columns=["steps", "flop_speedup", "wall", "wall_range", "psnr", "fd", "acc"])
        self._base: Tensor | None = None
        self._base_flops: float | None = None
        pairs = ((denoiser, model), *others)
        self.acct = bench.FlopAccountant(*(m for _, m in pairs))
        s0, y0 = self.sigmas[:1], self.labels[:1]
        self.acct.profile(*(lambda d=d: d(self.noise[:1] * s0, s0, class_labels=y0) for d, _ in pairs))

    def schedule(self, n_steps: int) -> Tensor:
        """The sampler's schedule with ``n_steps`` steps (the model's discrete timesteps, 'leading' spacing)."""
        return schedules.discrete(n_steps, self.denoiser.sigmas_train, dtype=torch.float32)

    def sample(self, denoiser: Callable | None = None, *, sigmas: Tensor | None = None, n: int | None = None,
               apply: Callable | None = None) -> Tensor:
        """Samples from the fixed noise and labels (the first ``n``), optionally under ``apply(model)``."""
        d = denoiser or self.denoiser
        s = self.sigmas if sigmas is None else sigmas
        k = len(self.labels) if n is None else n
        run = lambda: self.sampler(d, self.noise[:k] * s[0], s, cond={"class_labels": self.labels[:k]})  # noqa: E731
        if apply is None:
            return run()
        with apply(self.model):
            return run()

    def _counted(self, **kw) -> tuple[Tensor, float]:
        with self.acct.counting() as c:
            x = self.sample(**kw)
        return x, c.total

    @property
    def baseline(self) -> Tensor:
        if self._base is None:
            self._base, self._base_flops = self._counted()
        return self._base

    @property
    def baseline_flops(self) -> float:
        self.baseline
        return self._base_flops

    def measure(self, name: str, *, denoiser: Callable | None = None, sigmas: Tensor | None = None,
                apply: Callable | None = None, time: bool = False, pairs: int = 3, time_n: int | None = None,
                **extra: Any) -> dict:
        """Sample with one method and add its row (see the module docstring). ``extra`` goes into the row; the row's
        ``samples`` holds the images. ``time_n`` samples are timed (default all)."""
        base, base_flops = self.baseline, self.baseline_flops
        x, flops = self._counted(denoiser=denoiser, sigmas=sigmas, apply=apply)
        s = self.sigmas if sigmas is None else sigmas
        row = {"steps": len(s) - 1, "flop_speedup": base_flops / flops, "psnr": bench.psnr(x, base)}
        if self.classifier is not None:
            from .. import metrics

            row["fd"] = metrics.digits_fd(x, classifier=self.classifier)
            row["acc"] = metrics.class_accuracy(x, self.labels, classifier=self.classifier)
        if time:
            t = bench.time_pair(lambda: self.sample(n=time_n),
                                lambda: self.sample(denoiser, sigmas=sigmas, n=time_n, apply=apply), pairs=pairs)
            row.update(wall=t.speedup, wall_lo=t.lo, wall_hi=t.hi, wall_range=f"[{t.lo:.2f}-{t.hi:.2f}]")
        row.update(extra)
        row["samples"] = x
        self.table.add(name, **row)
        return self.table.rows[-1]

    def fewer_steps(self, speedup: float, *, name: str | None = None, **kw) -> dict:
        """The trivial competitor at matched FLOPs: the same sampler with ``matched_steps(n_steps, speedup)``
        steps."""
        k = bench.matched_steps(self.n_steps, speedup)
        return self.measure(name or f"same sampler, {k} steps (matched FLOPs)", sigmas=self.schedule(k), **kw)


