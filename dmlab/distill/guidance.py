"""Guidance distillation: one network pass per step instead of classifier-free guidance's two.

* :func:`cfg_target` -- the classifier-free-guided denoiser ``D_u + w (D_c - D_u)`` with a per-sample weight ``w``
  (two teacher calls; ``w = 1`` is the conditional denoiser). :class:`dmlab.denoisers.CFG` is the same with one
  scalar weight, for sampling.
* :class:`GuidanceEmbedding` and :class:`WStudent` -- a student that takes ``w`` as an input (Meng et al. 2023,
  :cite:`meng2023distillation`, stage 1): an embedding of ``w`` (Fourier features, a linear layer initialised at
  zero) is added by a forward hook to the output of one layer of the network (the class embedding of the toy
  :class:`ClassMLP`, the time embedding of a diffusers UNet), so the student starts as the teacher's conditional
  denoiser. ``student(x, sigma, w=w, **cond)``.
* :func:`guidance_distill` -- stage 1: regress the student on the guided teacher,
  ``lambda(sigma) |S(x_sigma, sigma, c, w) - [D_u + w (D_c - D_u)](x_sigma)|^2`` over data ``x_0``, log-uniform
  ``sigma`` and uniform ``w``. The student is a full copy of the teacher, or the teacher's own network with LoRA
  adapters (LoRA-enhanced distillation, Golnari 2023, :cite:`golnari2023loraenhanced`): then the teacher is the same module
  with the adapters switched off (:func:`adapters_off`, :func:`base_teacher`), so one set of weights is held.
* :func:`progressive_distill` -- stage 2 (Salimans & Ho 2022, as in :cite:`meng2023distillation`): a student on every
  other level of the teacher's grid learns, in one Euler (DDIM) step, the end point of two teacher steps; each call
  halves the number of sampling steps.
* :func:`training_bytes` -- the memory one training step holds: weights of teacher and student (each storage once),
  trainable tensors, their gradients and Adam's moments, and the activations saved for the backward pass.
* The chapter's exact test bed: :func:`class_ring` (four classes, each two adjacent modes of the 8-Gaussian ring) as a
  :class:`ClassGMM` (exact class-conditional and unconditional denoisers, null class = ``n_classes``), the
  class-conditional toy network :class:`ClassMLP`, and :func:`train_guided_students` (the zoo recipe
  ``guided_students``: teacher, full and LoRA stage-1 students, progressive students, 3 training seeds).

No official code of either paper is public; this is a re-implementation from the papers' text. Every denoiser is in
the VE convention of :mod:`dmlab.denoisers` (``x = x_0 + sigma eps``).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..denoisers import EDMPrecond, as_sigma, bcast
from ..hooks import Handle, add_hook
from ..train import FitConfig, FitResult, fit

__all__ = ["cfg_target", "GuidedTeacher", "GuidanceEmbedding", "WStudent", "adapters_off", "base_teacher", "guidance_distill",
           "progressive_distill", "training_bytes", "ClassGMM", "class_ring", "ClassMLP", "GUIDED_KEYS",
           "ring_student", "stage1_batch_loss", "train_guided_students", "GuidedStudents", "load_guided_students", "unet_student",
           "sd_guidance_distill"]


def _check_denoiser(d, name: str) -> None:
    if not callable(d):
        raise TypeError(f"{name} must be a denoiser: a callable D(x, sigma, **cond) -> x0_hat")


def _per_sample(w, x: Tensor, name: str = "w") -> Tensor:
    if isinstance(w, (int, float)) and not isinstance(w, bool):
        w = torch.full((x.shape[0],), float(w))
    if not isinstance(w, Tensor) or w.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a number or a tensor [B] = [{x.shape[0]}] (one guidance weight per sample), "
                         f"got {tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} must be finite")
    return w.to(device=x.device)


def cfg_target(teacher: Callable, x: Tensor, sigma, cond: dict, uncond: dict, w) -> Tensor:
    """The guided denoiser ``D(x, **uncond) + w (D(x, **cond) - D(x, **uncond))`` with one weight per sample
    (``w`` a number or ``[B]``; 1 = conditional, 0 = unconditional). Two calls of ``teacher``."""
    _check_denoiser(teacher, "teacher")
    if not (isinstance(cond, dict) and isinstance(uncond, dict)):
        raise TypeError("cond and uncond must be dicts of the teacher's keyword arguments, e.g. "
                        "{'class_labels': y} and {'class_labels': torch.full_like(y, n_classes)}")
    w = _per_sample(w, x)
    d_u = teacher(x, sigma, **uncond)
    d_c = teacher(x, sigma, **cond)
    return d_u + bcast(w.to(d_u.dtype), d_u) * (d_c - d_u)


class GuidedTeacher:
    """The classifier-free-guided teacher with the student's signature, ``D(x, sigma, w=w, **cond)``: two calls of
    ``denoiser`` per evaluation (:func:`cfg_target`), the unconditional one with ``uncond(cond)``."""

    calls_per_step = 2

    def __init__(self, denoiser: Callable, uncond: Callable[[dict], dict]):
        _check_denoiser(denoiser, "denoiser")
        if not callable(uncond):
            raise TypeError("uncond must be callable: uncond(cond) -> the unconditional call's keyword arguments")
        self.denoiser, self.uncond = denoiser, uncond

    def __call__(self, x: Tensor, sigma, *, w, **cond) -> Tensor:
        return cfg_target(self.denoiser, x, sigma, cond, self.uncond(cond), w)


# ----------------------------------------------------------------------------------------------- the w input
class GuidanceEmbedding(nn.Module):
    """``w -> [B, width]``: Fourier features ``sin/cos(w f_k)`` (``f_k = 2^k / 4``, ``k < n_freq``) and a linear
    layer initialised at zero (so a fresh student computes exactly what its network computed before)."""

    def __init__(self, width: int, n_freq: int = 6):
        super().__init__()
        if not (isinstance(width, int) and width >= 1 and isinstance(n_freq, int) and n_freq >= 1):
            raise ValueError(f"width and n_freq must be positive ints, got {width!r}, {n_freq!r}")
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 4, persistent=False)
        self.proj = nn.Linear(2 * n_freq, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, w: Tensor) -> Tensor:
        a = w.reshape(-1, 1).to(self.proj.weight.dtype) * self.freqs.to(self.proj.weight.dtype)
        return self.proj(torch.cat([torch.sin(a), torch.cos(a)], dim=1))


class WStudent:
    """A guidance-conditioned student: ``student(x, sigma, w=w, **cond)`` (Meng et al. 2023, stage 1).

    ``net`` is the network (an ``nn.Module``), ``wrap(net)`` the denoiser around it (e.g. ``EDMPrecond(net)``,
    ``DiscreteVPDenoiser.from_scheduler(unet, scheduler)``); ``site`` names the layer of ``net`` whose output
    ``[B, width]`` gets ``embed(w)`` added (a class or time embedding). ``modules`` is the ``nn.ModuleDict`` of the
    network and the embedding (what a trainer optimises); ``handle.remove()`` takes the hook off.
    """

    def __init__(self, net: nn.Module, wrap: Callable[[nn.Module], Callable], site: str, *, width: int | None = None,
                 n_freq: int = 6, embed: GuidanceEmbedding | None = None):
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if not callable(wrap):
            raise TypeError("wrap must be callable: wrap(net) -> denoiser D(x, sigma, **cond)")
        try:
            layer = net.get_submodule(site)
        except AttributeError:
            raise ValueError(f"site {site!r} is not a submodule of the network; use a name from "
                             "net.named_modules(), e.g. 'label_emb' (ClassMLP) or 'time_embedding' (UNet)") from None
        if embed is None:
            if width is None:
                raise ValueError("give width= (the size of the site's output) or a GuidanceEmbedding as embed=")
            embed = GuidanceEmbedding(width, n_freq)
        if not isinstance(embed, GuidanceEmbedding):
            raise TypeError("embed must be a GuidanceEmbedding")
        p = next(net.parameters())
        self.net, self.wrap, self.site, self.embed = net, wrap, site, embed.to(device=p.device)
        self.denoiser = wrap(net)
        self.modules = nn.ModuleDict({"net": net, "embed": self.embed})
        self._w: Tensor | None = None
        self.handle = Handle("guidance_embedding", net)
        add_hook(layer, self._add, self.handle, pre=False, with_kwargs=False)

    def _add(self, module, args, out):
        if self._w is None:
            return None
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != self._w.shape[0]:
            raise ValueError(f"the site {self.site!r} must output [B, width] with B = {self._w.shape[0]}, got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out + self.embed(self._w).to(out.dtype)

    def __call__(self, x: Tensor, sigma, *, w, **cond) -> Tensor:
        self._w = _per_sample(w, x)
        try:
            return self.denoiser(x, sigma, **cond)
        finally:
            self._w = None

    def copy(self) -> "WStudent":
        """An independent deep copy (network and embedding), e.g. the start of a progressive-distillation round."""
        return WStudent(copy.deepcopy(self.net), self.wrap, self.site, embed=copy.deepcopy(self.embed))

    def eval(self) -> "WStudent":
        self.modules.eval()
        return self


def _lora_layers(module: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(module: nn.Module):
    """Run ``module`` with its peft (LoRA) adapters switched off: the base network, i.e. the teacher of a LoRA
    student (:cite:`golnari2023loraenhanced`). The adapters are switched back on (and trainable) on exit."""
    layers = _lora_layers(module)
    if not layers:
        raise ValueError("module has no peft adapter layers; add LoRA first (dmlab.finetuning.adapt(net, 'lora'))")
    for m in layers:
        m.enable_adapters(False)
    try:
        yield module
    finally:
        for m in layers:
            m.enable_adapters(True)


def base_teacher(student: WStudent) -> Callable:
    """The teacher that shares a LoRA student's weights: ``student``'s denoiser with the adapters off and no ``w``
    input (the hook adds nothing without ``w``)."""
    if not isinstance(student, WStudent):
        raise TypeError("student must be a WStudent")

    def teacher(x, sigma, **cond):
        with adapters_off(student.net):
            return student.denoiser(x, sigma, **cond)

    return teacher


# ----------------------------------------------------------------------------------------------- training
def _edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def _check_run(steps, batch, generator, w_range):
    from .consistency import _check_common

    _check_common(None, steps, batch, generator)
    lo, hi = (float(v) for v in w_range)
    if not lo <= hi:
        raise ValueError(f"w_range must be (low, high) with low <= high, got {w_range!r}")
    return lo, hi


def _draw_w(g: Tensor, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _stage1_loss(student, teacher, data, uncond, w_lo, w_hi, sigma_range, sigma_data, batch):
    s_lo, s_hi = math.log(sigma_range[0]), math.log(sigma_range[1])

    def draw(g):
        x0, cond = data(g, batch)
        sigma = (s_lo + (s_hi - s_lo) * torch.rand(batch, generator=g)).exp()
        eps = torch.randn(x0.shape, generator=g)
        return x0, cond, sigma, eps, _draw_w(g, batch, w_lo, w_hi)

    def loss(b):
        x0, cond, sigma, eps, w = b
        dev = next(student.net.parameters()).device
        x0, sigma, eps, w = (t.to(dev) for t in (x0, sigma, eps, w))
        x = x0 + bcast(sigma, x0) * eps
        with torch.no_grad():
            target = cfg_target(teacher, x, sigma, cond, uncond(cond), w)
        err = (student(x, sigma, w=w, **cond) - target).pow(2).flatten(1).mean(1)
        return (_edm_weight(sigma, sigma_data) * err).mean()

    return draw, loss


def guidance_distill(student: WStudent, teacher: Callable, data: Callable, uncond: Callable[[dict], dict], *,
                     w_range: tuple = (1.0, 4.0), sigma_range: tuple = (0.002, 20.0), sigma_data: float = 1.0,
                     steps: int = 1000, batch: int = 256, lr: float = 2e-3,
                     generator: torch.Generator) -> FitResult:
    """Stage 1 of Meng et al. (2023): train ``student`` (in place) to output the guided teacher in one call.

    Each step draws ``x0, cond = data(generator, batch)``, ``log sigma ~ U[log sigma_range]``, ``w ~ U[w_range]``
    and minimises ``lambda(sigma) |student(x, sigma, w=w, **cond) - cfg_target(teacher, x, sigma, cond,
    uncond(cond), w)|^2`` (EDM weight ``lambda``). The student may also be a
    :class:`dmlab.distill.speedup.SpeedUpStudent` (SpeedUpNet's cross-attention adapter, :cite:`chai2024speedupnet`).
    Only parameters that require grad train: all of a full copy, or
    the LoRA adapters and the w-embedding of a student made with ``dmlab.finetuning.adapt(net, "lora",
    copy_model=False)`` whose teacher is :func:`base_teacher` (:cite:`golnari2023loraenhanced`). Adam with cosine decay
    through :func:`dmlab.train.fit`.
    """
    if not (callable(student) and isinstance(getattr(student, "modules", None), nn.Module)
            and isinstance(getattr(student, "net", None), nn.Module)):
        raise TypeError("student must be a WStudent (the network with a w input) or another one-pass student with "
                        "its trainable .modules and its .net, such as dmlab.distill.speedup.SpeedUpStudent")
    _check_denoiser(teacher, "teacher")
    if not callable(data) or not callable(uncond):
        raise TypeError("data(generator, n) -> (x0, cond) and uncond(cond) -> dict must be callables")
    lo, hi = _check_run(steps, batch, generator, w_range)
    draw, loss = _stage1_loss(student, teacher, data, uncond, lo, hi, sigma_range, sigma_data, batch)
    return fit(loss, student.modules, FitConfig(steps=steps, lr=lr, schedule="cosine"), generator=generator,
               data=draw)


def progressive_distill(student: WStudent, teacher: WStudent, sigmas: Tensor, data: Callable, *,
                        w_range: tuple = (1.0, 4.0), sigma_data: float = 1.0, steps: int = 1000, batch: int = 256,
                        lr: float = 1e-3, generator: torch.Generator) -> FitResult:
    """Stage 2 (progressive distillation, Salimans & Ho 2022, with the w input of :cite:`meng2023distillation`):
    train ``student`` (in place; start it as ``teacher.copy()``) so that ONE Euler (DDIM) step on the grid
    ``sigmas[::2]`` lands where TWO Euler steps of ``teacher`` on ``sigmas`` land.

    ``sigmas`` is the teacher's grid (an even number of steps, ending at 0). For ``x = x0 + s_i eps`` at an even level
    ``i``, the teacher's two steps give ``x''`` at ``s_{i+2}``, and the student's target is the denoised estimate
    that one step would need, ``D* = x - s_i (x'' - x) / (s_{i+2} - s_i)`` (``= x''`` when ``s_{i+2} = 0``).
    """
    if not (isinstance(student, WStudent) and isinstance(teacher, WStudent)):
        raise TypeError("student and teacher must be WStudents (both take the guidance weight w)")
    lo, hi = _check_run(steps, batch, generator, w_range)
    s = torch.as_tensor(sigmas, dtype=torch.float32)
    n = len(s) - 1
    if s.ndim != 1 or n < 2 or n % 2 or s[-1] != 0 or not (s[1:] < s[:-1]).all():
        raise ValueError("sigmas must be a decreasing grid with an even number of steps ending at 0 (e.g. "
                         "schedules.karras(8, 0.002, 20)); the student learns sigmas[::2]")

    def draw(g):
        x0, cond = data(g, batch)
        i = 2 * torch.randint(n // 2, (batch,), generator=g)
        return x0, cond, i, torch.randn(x0.shape, generator=g), _draw_w(g, batch, lo, hi)

    def loss(b):
        x0, cond, i, eps, w = b
        s0, s1, s2 = s[i], s[i + 1], s[i + 2]
        x = x0 + bcast(s0, x0) * eps
        with torch.no_grad():
            x1 = x + bcast((s1 - s0) / s0, x) * (x - teacher(x, s0, w=w, **cond))
            x2 = x1 + bcast((s2 - s1) / s1, x) * (x1 - teacher(x1, s1, w=w, **cond))
            target = x - bcast(s0 / (s2 - s0), x) * (x2 - x)
        err = (student(x, s0, w=w, **cond) - target).pow(2).flatten(1).mean(1)
        return (_edm_weight(s0, sigma_data) * err).mean()

    teacher.eval()
    return fit(loss, student.modules, FitConfig(steps=steps, lr=lr, schedule="cosine"), generator=generator,
               data=draw)


def training_bytes(modules, loss: Callable[[], Tensor], *, optimizer_moments: int = 2) -> dict:
    """Bytes one training step holds: ``weights`` (every parameter storage of ``modules`` -- teacher and student --
    counted once, so a LoRA student that shares its teacher's weights adds only its adapters), ``trainable``
    (parameters that require grad), ``grads`` (same size), ``optimizer`` (Adam's ``optimizer_moments`` moments),
    ``activations`` (tensors autograd saves for the backward pass of ``loss()``, weights excluded) and ``total``.
    Measured from the tensors (``torch.autograd.graph.saved_tensors_hooks``); works on any device."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    params = {}
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError("modules must be nn.Modules (the teacher's and the student's)")
        for p in m.parameters():
            params[p.untyped_storage().data_ptr()] = p
    weights = sum(p.untyped_storage().nbytes() for p in params.values())
    trainable = sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)
    seen, act = set(), [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            act[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    del value
    out = {"weights": weights, "trainable": trainable, "grads": trainable, "optimizer": optimizer_moments * trainable,
           "activations": act[0]}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------- exact test bed
class ClassGMM:
    """Exact class-conditional denoiser of a labelled Gaussian mixture: ``D(x, sigma, class_labels=y)`` is the exact
    denoiser of the components with label ``y``; label ``n_classes`` (the null class) gives the exact unconditional
    denoiser of the whole mixture, as classifier-free guidance's dropped label does."""

    def __init__(self, weights, means, covs, labels, n_classes: int):
        from ..exact import GMMDenoiser

        lab = torch.as_tensor(labels, dtype=torch.long)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if lab.shape != w.shape:
            raise ValueError(f"labels must have one entry per component ({tuple(w.shape)}), got {tuple(lab.shape)}")
        if set(lab.tolist()) != set(range(n_classes)):
            raise ValueError(f"labels must use every class 0..{n_classes - 1}")
        m, c = torch.as_tensor(means, dtype=torch.float64), torch.as_tensor(covs, dtype=torch.float64)
        self.n_classes, self.labels = int(n_classes), lab
        self.uncond = GMMDenoiser(w, m, c)
        self.per_class = [GMMDenoiser(w[lab == k], m[lab == k], c[lab == k]) for k in range(n_classes)]
        self.class_prior = torch.stack([w[lab == k].sum() for k in range(n_classes)]) / w.sum()

    def __call__(self, x: Tensor, sigma, *, class_labels: Tensor) -> Tensor:
        y = torch.as_tensor(class_labels).reshape(-1)
        if y.shape[0] != x.shape[0] or (y < 0).any() or (y > self.n_classes).any():
            raise ValueError(f"class_labels must be [B] = [{x.shape[0]}] ints in 0..{self.n_classes} "
                             f"({self.n_classes} = unconditional)")
        sigma = as_sigma(sigma, x)
        out = torch.empty_like(x)
        for k in y.unique().tolist():
            i = y == k
            d = self.uncond if k == self.n_classes else self.per_class[k]
            out[i] = d(x[i], sigma[i]).to(x.dtype)
        return out

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """One draw of class ``labels[i]`` per entry (float64)."""
        labels = torch.as_tensor(labels).reshape(-1)
        out = torch.empty(len(labels), self.uncond.dim, dtype=torch.float64)
        for k in range(self.n_classes):
            i = labels == k
            if i.any():
                out[i] = self.per_class[k].sample(int(i.sum()), generator).reshape(-1, self.uncond.dim)
        return out

    def class_posterior(self, x: Tensor) -> Tensor:
        """``p(class | x)`` of clean points under the mixture, ``[B, n_classes]``."""
        logp = torch.stack([d.log_prob(x.double(), 0.0) for d in self.per_class], 1) + self.class_prior.log()
        return torch.softmax(logp, 1)


def class_ring() -> ClassGMM:
    """The 8-Gaussian ring (:func:`dmlab.data.toy_gmm8_params`) with four classes, each two adjacent modes
    (modes ``2k`` and ``2k + 1`` are class ``k``); class 4 is the null class."""
    from ..data import toy_gmm8_params

    w, m, c = toy_gmm8_params(dtype=torch.float64)
    return ClassGMM(w, m, c, torch.arange(8) // 2, 4)


class ClassMLP(nn.Module):
    """Class-conditional toy network ``F(x_in, c_noise, class_labels) -> [B, dim]`` for :class:`EDMPrecond`:
    ``h = inp([x_in, fourier(c_noise)]) + label_emb(y)``, then ``depth - 1`` SiLU-Linear layers and ``out``.
    ``label_emb`` has ``n_classes + 1`` rows (the last is the null class of classifier-free guidance)."""

    def __init__(self, dim: int = 2, hidden: int = 64, depth: int = 3, n_classes: int = 4, n_freq: int = 6):
        super().__init__()
        if not all(isinstance(v, int) and v >= 1 for v in (dim, hidden, depth, n_classes, n_freq)):
            raise ValueError("dim, hidden, depth, n_classes and n_freq must be positive ints")
        self.dim, self.n_classes = dim, n_classes
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freq, dtype=torch.float32), persistent=False)
        self.inp = nn.Linear(dim + 2 * n_freq, hidden)
        self.label_emb = nn.Embedding(n_classes + 1, hidden)
        layers = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.trunk = nn.Sequential(*layers, nn.SiLU())
        self.out = nn.Linear(hidden, dim)

    def lora_targets(self) -> list[str]:
        """The linear layers a LoRA student adapts (every one of them)."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]

    def forward(self, x_in: Tensor, c_noise: Tensor, class_labels: Tensor) -> Tensor:
        if x_in.ndim != 2 or x_in.shape[1] != self.dim:
            raise ValueError(f"ClassMLP takes x of shape [B, {self.dim}], got {tuple(x_in.shape)}")
        x_in = x_in.to(self.inp.weight.dtype)
        c = c_noise.reshape(-1, 1).to(x_in.dtype) * self.freqs
        h = self.inp(torch.cat([x_in, torch.sin(c), torch.cos(c)], 1)) + self.label_emb(class_labels.long())
        return self.out(self.trunk(h))


# ----------------------------------------------------------------------------------------------- the zoo entry
GUIDED_KEYS = ("seeds", "hidden", "depth", "teacher_steps", "steps", "pd_steps", "batch", "lr", "lora_rank",
               "w_range", "sigma_min", "sigma_max", "grid_steps", "p_uncond")


def _guided_config(config) -> dict:
    if not isinstance(config, dict) or set(GUIDED_KEYS) - set(config):
        raise ValueError(f"config must be the guided_students recipe's model dict with keys {GUIDED_KEYS} "
                         "(dmlab.zoo.get_recipe('guided_students').model)")
    return dict(config)


def _wrap(net: nn.Module):
    return EDMPrecond(net, sigma_data=1.0)


def _ring_data(ring: ClassGMM):
    def data(g, n):
        y = torch.randint(ring.n_classes, (n,), generator=g)
        return ring.sample(y, g).float(), {"class_labels": y}

    return data


def _null(ring: ClassGMM):
    return lambda cond: {"class_labels": torch.full_like(cond["class_labels"], ring.n_classes)}


def _seed_from(g: torch.Generator) -> int:
    return int(torch.randint(2 ** 31, (1,), generator=g))


def _fresh_net(cfg: dict, seed: int) -> ClassMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClassMLP(2, cfg["hidden"], cfg["depth"], 4)


def ring_student(teacher_net: ClassMLP, config: dict, method: str, *, seed: int = 0) -> WStudent:
    """A fresh stage-1 student of the ring teacher, as :func:`train_guided_students` starts it: ``"full"`` (a
    trainable deep copy with a w input) or ``"lora"`` (a copy with rank-``lora_rank`` LoRA on every linear layer,
    only the adapters and the w-embedding trainable; its teacher is :func:`base_teacher`). ``seed`` seeds LoRA's A."""
    from ..finetuning import adapt

    cfg = _guided_config(config)
    if not isinstance(teacher_net, ClassMLP):
        raise TypeError("teacher_net must be the ClassMLP of the ring teacher")
    if method == "full":
        st = WStudent(copy.deepcopy(teacher_net), _wrap, "label_emb", width=cfg["hidden"])
        st.modules.requires_grad_(True)
        return st
    if method == "lora":
        net = adapt(teacher_net, "lora", rank=cfg["lora_rank"], target_modules=teacher_net.lora_targets(),
                    init_seed=seed).model
        return WStudent(net, _wrap, "label_emb", width=cfg["hidden"])
    raise ValueError(f"method must be 'full' or 'lora', got {method!r}")


def stage1_batch_loss(student: WStudent, teacher: Callable, config: dict, generator: torch.Generator) -> Tensor:
    """The ring's stage-1 loss of one batch drawn from ``generator`` (the loss :func:`train_guided_students`
    minimises; for :func:`training_bytes`)."""
    cfg = _guided_config(config)
    ring = class_ring()
    draw, loss = _stage1_loss(student, teacher, _ring_data(ring), _null(ring), *cfg["w_range"],
                              (cfg["sigma_min"], cfg["sigma_max"]), 1.0, cfg["batch"])
    return loss(draw(generator))


def train_guided_students(config: dict, *, progress: bool = False) -> tuple[dict, dict]:
    """Train chapter 24's networks on :func:`class_ring` (the zoo recipe ``guided_students``; ``config`` is its
    model dict).

    * ``teacher``: a :class:`ClassMLP` regressed on the exact class-conditional denoiser (label dropped to the null
      class with probability ``p_uncond``), EDM weight, log-uniform sigma; seed 2400, once.
    * per training seed ``s`` (one generator, seed ``2400 + 1 + s``, draws everything in this order):
      ``full``: a full copy of the teacher with a w input, :func:`guidance_distill` for ``steps``;
      ``lora``: the teacher's own network with rank-``lora_rank`` LoRA on every linear layer plus the w input,
      teacher = adapters off, the same steps, batch and learning rate;
      ``pd{n/2}``, ``pd{n/4}``: :func:`progressive_distill` from ``full`` on the ``grid_steps``-step Karras grid,
      twice (``pd_steps`` each).

    Returns ``(state dict with keys "name.seed.param", log)``; the log holds the final losses, the trainable
    parameter counts and the :func:`training_bytes` of the full and LoRA students.
    """
    from ..schedules import karras

    cfg = _guided_config(config)
    ring, smin, smax = class_ring(), float(cfg["sigma_min"]), float(cfg["sigma_max"])
    data, null = _ring_data(ring), _null(ring)
    kw = dict(w_range=tuple(cfg["w_range"]), steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"])
    g = torch.Generator().manual_seed(2400)
    teacher_net = _fresh_net(cfg, _seed_from(g))
    teacher = _wrap(teacher_net)

    def tdraw(gen):
        x0, cond = data(gen, cfg["batch"])
        drop = torch.rand(cfg["batch"], generator=gen) < cfg["p_uncond"]
        y = torch.where(drop, torch.full_like(cond["class_labels"], 4), cond["class_labels"])
        sigma = (math.log(smin) + (math.log(smax) - math.log(smin)) * torch.rand(cfg["batch"], generator=gen)).exp()
        return x0, y, sigma, torch.randn(x0.shape, generator=gen)

    def tloss(b):
        x0, y, sigma, eps = b
        x = x0 + sigma[:, None] * eps
        target = ring(x.double(), sigma.double(), class_labels=y).float()
        err = (teacher(x, sigma, class_labels=y) - target).pow(2).mean(1)
        return (_edm_weight(sigma, 1.0) * err).mean()

    res = fit(tloss, teacher_net, FitConfig(steps=cfg["teacher_steps"], lr=cfg["lr"], schedule="cosine"),
              generator=g, data=tdraw)
    for p in teacher_net.parameters():
        p.requires_grad_(False)
    teacher_net.eval()
    state = {f"teacher.{k}": v.detach().clone().contiguous() for k, v in teacher_net.state_dict().items()}
    log = {"final_loss": {"teacher": float(sum(res.losses[-5:]) / len(res.losses[-5:]))}, "params": {},
           "bytes": {}}
    grid = karras(cfg["grid_steps"], smin, smax)
    for seed in cfg["seeds"]:
        g = torch.Generator().manual_seed(2401 + int(seed))
        out, losses = {}, {}
        full = ring_student(teacher_net, cfg, "full")
        lora = ring_student(teacher_net, cfg, "lora", seed=_seed_from(g))
        for name, st, tch in (("full", full, teacher), ("lora", lora, base_teacher(lora))):
            if seed == cfg["seeds"][0]:
                mods = [teacher_net, st.modules] if name == "full" else [st.modules]
                log["bytes"][name] = training_bytes(
                    mods, lambda: stage1_batch_loss(st, tch, cfg, torch.Generator().manual_seed(0)))
                log["params"][name] = sum(p.numel() for p in st.modules.parameters() if p.requires_grad)
            losses[name] = guidance_distill(st, tch, data, null, sigma_range=(smin, smax), generator=g,
                                            **kw).losses
            out[name] = st
        prev, sig = full, grid
        for _ in range(2):
            st = prev.copy()
            name = f"pd{(len(sig) - 1) // 2}"
            losses[name] = progressive_distill(st, prev, sig, data, w_range=tuple(cfg["w_range"]),
                                               steps=cfg["pd_steps"], batch=cfg["batch"], lr=cfg["lr"] / 2,
                                               generator=g).losses
            out[name], prev, sig = st, st, sig[::2]
        for name, st in out.items():
            for k, v in st.modules.state_dict().items():
                state[f"{name}.{seed}.{k}"] = v.detach().float().clone().contiguous()
        log["final_loss"][str(seed)] = {m: float(sum(v[-5:]) / len(v[-5:])) for m, v in losses.items()}
        if progress:
            print(f"guided students, seed {seed}: done", flush=True)
    return state, log


class GuidedStudents(dict):
    """``{"teacher": denoiser, "full"/"lora"/"pd4"/"pd2": [WStudent per seed]}`` (plus ``ring``, the exact
    :class:`ClassGMM`); ``.to("cpu")`` is the zoo's device hook (2-D CPU toys)."""

    def to(self, device) -> "GuidedStudents":
        if torch.device(device).type != "cpu":
            raise ValueError("the guided students are 2-D CPU toys; load them with device='cpu'")
        return self


def _take(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_guided_students(state: dict, config: dict) -> GuidedStudents:
    """The networks of :func:`train_guided_students` from its state dict (the zoo entry's weights)."""
    cfg = _guided_config(config)
    teacher_net = _fresh_net(cfg, 0)
    teacher_net.load_state_dict(_take(state, "teacher."))
    teacher_net.eval().requires_grad_(False)
    out = GuidedStudents(teacher=_wrap(teacher_net), ring=class_ring(), teacher_net=teacher_net)
    names = sorted({k.split(".")[0] for k in state} - {"teacher"})
    for name in names:
        out[name] = []
        for seed in cfg["seeds"]:
            sd = _take(state, f"{name}.{seed}.")
            if not sd:
                raise ValueError(f"guided students: no weights for {name}, seed {seed}; retrain with "
                                 "`python -m dmlab.zoo train guided_students`")
            st = ring_student(teacher_net, cfg, "lora" if name == "lora" else "full")
            st.modules.load_state_dict(sd)
            st.modules.requires_grad_(False)
            out[name].append(st.eval())
    return out


# ----------------------------------------------------------------------------------------------- full scale
def unet_student(unet: nn.Module, scheduler, *, rank: int = 8,
                 target_modules=("to_q", "to_k", "to_v", "to_out.0"), init_seed: int = 0) -> WStudent:
    """A LoRA guidance student of a diffusers ``UNet2DConditionModel`` (SD 1.5 at full scale): rank-``rank`` LoRA on
    the attention projections (``dmlab.finetuning.adapt``, in place: the base weights are the teacher's, see
    :func:`base_teacher`) and the w-embedding added to the time embedding, behind
    :class:`dmlab.denoisers.DiscreteVPDenoiser` (call it with ``encoder_hidden_states=...``)."""
    from ..denoisers import DiscreteVPDenoiser
    from ..finetuning import adapt

    if not isinstance(unet, nn.Module) or not hasattr(unet, "time_embedding"):
        raise TypeError("unet must be a diffusers UNet2DConditionModel (it has a .time_embedding)")
    width = unet.time_embedding.linear_2.out_features
    net = adapt(unet, "lora", rank=rank, target_modules=list(target_modules), init_seed=init_seed,
                copy_model=False).model
    return WStudent(net, lambda m: DiscreteVPDenoiser.from_scheduler(m, scheduler), "time_embedding", width=width)


def sd_guidance_distill(pipe, prompts, *, w: float = 7.5, rank: int = 8, n_steps: int = 20, train_steps: int = 400,
                        batch: int = 2, lr: float = 1e-4, w_range: tuple = (2.0, 12.0),
                        generator: torch.Generator) -> dict:
    """LoRA guidance distillation of a diffusers Stable Diffusion pipeline (the chapter's full-scale path).

    The student is :func:`unet_student` on ``pipe.unet`` (in place: LoRA on the attention projections and the
    w-embedding); the teacher is the same UNet with the adapters off, guided against the empty prompt. The
    training latents are the teacher's own ``n_steps``-step Euler samples at guidance ``w`` for ``prompts``
    (no dataset needed); then :func:`guidance_distill` for ``train_steps`` and one-pass sampling from the same
    noise. Returns ``{"student", "teacher_latents", "student_latents", "losses"}``.
    """
    from ..samplers.ode import sample_euler
    from ..schedules import karras

    if isinstance(prompts, str) or not len(prompts):
        raise TypeError("prompts must be a non-empty list of strings (one image per prompt)")
    dev = pipe.unet.device
    n = len(prompts)
    pos, neg = pipe.encode_prompt(list(prompts), dev, 1, True, [""] * n)
    st = unet_student(pipe.unet, pipe.scheduler, rank=rank)
    base = base_teacher(st)

    def uncond(c):
        e = c["encoder_hidden_states"]
        return {"encoder_hidden_states": neg[:1].expand(e.shape[0], *neg.shape[1:])}

    smin, smax = st.denoiser.sigma_min, st.denoiser.sigma_max
    size = pipe.unet.config.sample_size
    noise = torch.randn(n, pipe.unet.config.in_channels, size, size, generator=generator).to(dev)
    cond = {"encoder_hidden_states": pos, "w": torch.full((n,), float(w), device=dev)}
    grid = karras(n_steps, smin, smax)
    with torch.no_grad():
        lat = sample_euler(GuidedTeacher(base, uncond), smax * noise, grid, cond=cond)

    def data(g, k):
        i = torch.randint(n, (k,), generator=g).to(dev)
        return lat[i], {"encoder_hidden_states": pos[i]}

    res = guidance_distill(st, base, data, uncond, w_range=w_range, sigma_range=(smin, smax), sigma_data=1.0,
                           steps=train_steps, batch=batch, lr=lr, generator=generator)
    st.eval()
    with torch.no_grad():
        one = sample_euler(st, smax * noise, grid, cond=cond)
    return {"student": st, "teacher_latents": lat, "student_latents": one, "losses": res.losses}
