"""Bias mitigation by invariant guidance: InvDiff (Hou et al., "InvDiff: Invariant Guidance for Bias Mitigation in
Diffusion Models", KDD 2025).

InvDiff keeps a pre-trained (biased) diffusion model frozen and learns a lightweight module ``G_psi`` whose output is
added to the frozen network's noise prediction, ``eps(x, t, c) = eps_frozen(x, t, c) + G_psi(x, t, Phi(c))``
(:class:`EpsWithDelta`; the paper's "mean-shift" guidance term, its last layer initialised to zero so training starts
from the frozen model; the official scripts mix the outputs, ``(1 - r) eps_frozen + r G_psi`` with a smaller UNet as
``G_psi``, and also provide this additive form). ``G_psi`` is trained with the denoising loss averaged *per group* of
the training data plus an invariance penalty, the variance of the group losses across groups (:func:`invariant_loss`):

    L = mean_g L_g + lambda * Var_g L_g,    L_g = mean over the group's rows of ||eps - eps_theta(x_t, t, c)||^2.

The groups should separate the rows whose spurious attribute agrees with the bias from those where it does not. The
paper infers them without labels (:func:`infer_groups`, a "grouper" that maximises the spread of the frozen model's
per-group losses); they can also come from a small annotated subset (:func:`annotate`). With ``lambda = 0`` the same
loss is group-balanced *reweighting* (each group weighted by the inverse of its frequency), the simplest baseline;
with no groups it is the plain denoising loss (ERM).

The toy bias (:func:`biased_digits`): a white bar along the left edge of an 8x8 digit (a column that is background
in every real digit), put on 90 % of the even digits and 10 % of the odd ones, read back exactly by :func:`has_mark`.
The official code (Hundredl/InvDiff, ``src/model/epsilon_with_delta.py``, ``src/train_text_to_image.py``) was read
for the structure of the module and the loss; this is a reimplementation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .denoisers import net_output

__all__ = ["MARK", "add_mark", "has_mark", "biased_digits", "aligned", "annotate", "DeltaNet", "EpsWithDelta",
           "group_losses", "invariant_loss", "train_delta", "infer_groups", "with_delta", "train_entry", "load_entry"]

MARK = 1  # the mark is a white bar: the MARK left-most columns set to +1


def _check_images(x, fn: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[-1] <= MARK:
        raise TypeError(f"{fn}: x must be a tensor of images [n, c, h, w] (w > {MARK}), got "
                        f"{type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}")
    return x


def add_mark(x: Tensor, mark: Tensor) -> Tensor:
    """A copy of images ``x`` in ``[-1, 1]`` with the mark (a white bar: the ``MARK`` left-most columns set to 1)
    where the boolean ``mark`` [n] is true."""
    x = _check_images(x, "add_mark").clone()
    if not isinstance(mark, Tensor) or mark.dtype != torch.bool or mark.shape != x.shape[:1]:
        raise TypeError(f"add_mark: mark must be a bool tensor of shape [{x.shape[0]}], got "
                        f"{getattr(mark, 'dtype', type(mark).__name__)} {tuple(getattr(mark, 'shape', ()))}")
    x[mark, :, :, :MARK] = 1.0
    return x


def has_mark(x: Tensor) -> Tensor:
    """The exact detector: ``True`` where the mean of the bar's pixels is above 0 (real 8x8 digits: at most
    -0.84; marked ones: 1)."""
    return _check_images(x, "has_mark")[:, :, :, :MARK].mean((1, 2, 3)) > 0


def aligned(mark: Tensor, y: Tensor) -> Tensor:
    """``True`` where the attribute follows the bias (mark on an even digit, no mark on an odd one)."""
    if not isinstance(mark, Tensor) or not isinstance(y, Tensor) or mark.shape != y.shape:
        raise TypeError("aligned: mark and y must be tensors of the same shape [n]")
    return mark == (y % 2 == 0)


def biased_digits(split: str = "train", *, rate: float = 0.9, seed: int = 0, size: int = 8
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, y, mark)``: the digits of ``split`` with the edge bar on a fraction ``rate`` of the even digits and
    ``1 - rate`` of the odd ones (each row's draw from ``torch.Generator().manual_seed(seed)``); ``rate = 0.5`` is
    the unbiased set."""
    from .data import load_digits

    if not (isinstance(rate, (int, float)) and 0 <= rate <= 1):
        raise ValueError(f"rate must be a probability in [0, 1], got {rate!r}")
    x, y = load_digits(split, size=size)
    u = torch.rand(len(y), generator=torch.Generator().manual_seed(seed))
    mark = torch.where(y % 2 == 0, u < rate, u < 1 - rate)
    return add_mark(x, mark), y, mark


def annotate(n_rows: int, n: int, *, seed: int) -> Tensor:
    """The rows (sorted indices into ``n_rows`` training rows) whose attribute is annotated: ``n`` drawn without
    replacement from ``torch.Generator().manual_seed(seed)``."""
    if not (isinstance(n, int) and 2 <= n <= n_rows):
        raise ValueError(f"n must be an int in [2, {n_rows}] (annotated rows), got {n!r}")
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))[:n].sort().values


class _Sinusoidal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        f = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        a = t.float()[:, None] * f[None]
        return torch.cat([a.sin(), a.cos()], 1)


class DeltaNet(nn.Module):
    """The lightweight module ``G_psi(x_t, t, Phi(c))``: three 3x3 convolutions (with two coordinate channels, so it
    can act on one edge) modulated (FiLM) by an embedding of the timestep and of the condition ``Phi(c)``: a class
    embedding (``n_classes``) or a linear map of the mean-pooled ``encoder_hidden_states`` (``cond_dim``, for text
    models such as SD 1.5). The last convolution starts at zero, so ``EpsWithDelta`` starts as the frozen model;
    the other initial weights come from ``torch.manual_seed(seed)`` inside a forked RNG."""

    def __init__(self, channels: int = 1, *, width: int = 16, n_classes: int | None = None,
                 cond_dim: int | None = None, emb: int = 32, seed: int = 0):
        if (n_classes is None) == (cond_dim is None):
            raise ValueError("give exactly one of n_classes (class labels) or cond_dim (encoder_hidden_states)")
        with torch.random.fork_rng(devices=[]):  # the initial weights come from ``seed``, not the global RNG
            torch.manual_seed(seed)
            self._build(channels, width, n_classes, cond_dim, emb)

    def _build(self, channels, width, n_classes, cond_dim, emb):
        super().__init__()
        self.config = {"channels": channels, "width": width, "n_classes": n_classes, "cond_dim": cond_dim,
                       "emb": emb}
        self.t_emb = _Sinusoidal(emb)
        self.phi = nn.Embedding(n_classes, emb) if n_classes is not None else nn.Linear(cond_dim, emb)
        self.film = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, 4 * width))
        self.c1 = nn.Conv2d(channels + 2, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, sample: Tensor, timestep, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, **_) -> Tensor:
        out_dtype, dt = sample.dtype, self.c1.weight.dtype  # run in the module's dtype (fp32 beside a fp16 UNet)
        sample = sample.to(dt)
        B, _, H, W = sample.shape
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        if isinstance(self.phi, nn.Embedding):
            if class_labels is None:
                raise ValueError("this DeltaNet is class-conditional: pass class_labels")
            c = self.phi(class_labels.to(sample.device).long())
        else:
            if encoder_hidden_states is None:
                raise ValueError("this DeltaNet is text-conditional: pass encoder_hidden_states")
            c = self.phi(encoder_hidden_states.to(sample.dtype).mean(1))
        g1, b1, g2, b2 = self.film(self.t_emb(t).to(sample.dtype) + c)[:, :, None, None].chunk(4, 1)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, H, device=sample.device, dtype=sample.dtype),
                                torch.linspace(-1, 1, W, device=sample.device, dtype=sample.dtype), indexing="ij")
        h = torch.cat([sample, yy.expand(B, 1, H, W), xx.expand(B, 1, H, W)], 1)
        h = F.silu(self.c1(h) * (1 + g1) + b1)
        h = F.silu(self.c2(h) * (1 + g2) + b2)
        return self.out(h).to(out_dtype)


class EpsWithDelta(nn.Module):
    """``base(x, t, **cond) + delta(x, t, **cond)`` with the base network frozen: a drop-in network for
    :class:`dmlab.denoisers.DiscreteVPDenoiser` (called as ``model(x, timestep=t, **cond)``). ``base`` is a diffusers
    UNet (its ``.sample`` or first output is used; a DiT's learned-variance channels are dropped)."""

    def __init__(self, base: nn.Module, delta: nn.Module):
        super().__init__()
        if not isinstance(base, nn.Module) or not isinstance(delta, nn.Module):
            raise TypeError("base and delta must be torch modules (a diffusers UNet and a DeltaNet)")
        self.base, self.delta = base, delta
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, sample: Tensor, timestep, **cond) -> Tensor:
        base_dtype = next(self.base.parameters()).dtype  # e.g. a float16 UNet fed float32 training batches
        with torch.no_grad():
            eps = net_output(self.base(sample.to(base_dtype), timestep, **cond)).to(sample.dtype)
        d = self.delta(sample, timestep, **cond)
        return eps[:, : d.shape[1]] + d


def group_losses(per_row: Tensor, groups: Tensor) -> Tensor:
    """The mean of ``per_row`` losses [n] in each group present in the batch; ``groups`` [n] holds integer group
    ids (the official code's one-hot ``loss.T @ groups / counts``, empty groups dropped)."""
    if not isinstance(per_row, Tensor) or not isinstance(groups, Tensor) or per_row.shape != groups.shape:
        raise TypeError("group_losses: per_row and groups must be tensors of the same shape [n]")
    ids = groups.unique()
    return torch.stack([per_row[groups == g].mean() for g in ids])


def invariant_loss(per_row: Tensor, groups: Tensor | None, lam: float) -> Tensor:
    """InvDiff's objective on one batch: ``mean_g L_g + lam * Var_g L_g`` (unbiased variance over the groups present;
    one group: its mean). ``groups=None`` is the plain mean (ERM); ``lam=0`` is group-balanced reweighting."""
    if not (isinstance(lam, (int, float)) and lam >= 0):
        raise ValueError(f"lam must be a number >= 0 (the invariance weight; 0 = reweighting), got {lam!r}")
    if groups is None:
        return per_row.mean()
    g = group_losses(per_row, groups)
    return g.mean() + lam * g.var() if len(g) > 1 else g.mean()


def train_delta(model: EpsWithDelta, x: Tensor, cond: Tensor, alphas_cumprod: Tensor, *, groups: Tensor | None,
                lam: float, steps: int, lr: float = 2e-3, batch_size: int = 64, seed: int = 0,
                cond_key: str = "class_labels"):
    """Train ``model.delta`` (the frozen base untouched) on rows ``x`` with their conditions ``cond`` (class labels,
    or ``encoder_hidden_states`` with ``cond_key="encoder_hidden_states"``) by :func:`invariant_loss` through
    :func:`dmlab.train.fit` (Adam, constant ``lr``); every draw from ``torch.Generator().manual_seed(seed)``, the
    same batches for every ``groups``/``lam`` at one seed. Returns the ``FitResult`` (its ``losses`` per step)."""
    from .train import FitConfig, ddpm_batch, fit

    if not isinstance(model, EpsWithDelta):
        raise TypeError("model must be an EpsWithDelta (frozen base + delta)")
    if not isinstance(x, Tensor) or not isinstance(cond, Tensor) or len(cond) != len(x):
        raise TypeError("x and cond must be tensors with one condition per row")
    if groups is not None and (not isinstance(groups, Tensor) or groups.shape != (len(x),)):
        raise TypeError(f"groups must be None or an integer tensor of shape [{len(x)}] (one group id per row)")
    rows, x = torch.arange(len(x)), x.detach().cpu()  # batches are drawn on the CPU, then moved to the module
    p = next(model.delta.parameters())

    def data(g):  # the row ids ride as labels (no dropout): the same draws as a labelled DDPM batch
        return ddpm_batch(x, alphas_cumprod, batch_size, g, labels=rows, p_uncond=0.0)

    def loss(b):
        out = model(b["xt"].to(p.device), b["t"].to(p.device), **{cond_key: cond[b["y"].to(cond.device)]})
        per_row = (out.float() - b["eps"].to(p.device)).pow(2).flatten(1).mean(1)
        return invariant_loss(per_row, None if groups is None else groups[b["y"]].to(p.device), lam)

    res = fit(loss, model.delta, FitConfig(steps=steps, lr=lr, optimizer="adam", log_every=max(1, steps // 10)),
              generator=torch.Generator().manual_seed(seed), data=data)
    model.eval()
    return res


def infer_groups(model: nn.Module, x: Tensor, y: Tensor, alphas_cumprod: Tensor, *, n_groups: int = 2,
                 draws: int = 16, seed: int = 0, steps: int = 500, lr: float = 0.01,
                 min_weight: float = 3.0) -> Tensor:
    """InvDiff's bias-annotation inference (the official ``src/group/train_group.py``) without any label of the
    attribute: the frozen ``model``'s denoising loss per row (``draws`` stratified timesteps, noise from
    ``torch.Generator().manual_seed(seed)``), then soft assignments ``w`` [n, n_groups] on the simplex that
    maximise the spread (std) of the per-group mean losses, with ``min_weight`` times the smallest weighted loss
    added so that no group empties (Adam, ``steps`` steps, projected back to the simplex). Returns the hard group
    of each row (``argmax w``), int64 [n]."""
    if not (isinstance(n_groups, int) and n_groups >= 2):
        raise ValueError(f"n_groups must be an int >= 2, got {n_groups!r}")
    g = torch.Generator().manual_seed(seed)
    per_row = torch.zeros(len(x))
    with torch.no_grad():
        for k in range(draws):
            t = torch.full((len(x),), int((k + 0.5) * len(alphas_cumprod) / draws))
            a = alphas_cumprod[t].view(-1, *[1] * (x.ndim - 1))
            eps = torch.randn(x.shape, generator=g)
            out = net_output(model(a.sqrt() * x + (1 - a).sqrt() * eps, t, class_labels=y))
            per_row += (out[:, : x.shape[1]] - eps).pow(2).flatten(1).mean(1) / draws
    w = torch.rand(len(x), n_groups, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        weighted = per_row[:, None] * w
        loss = -torch.std(weighted.sum(0) / w.sum(0)) - min_weight * weighted.min()
        loss.backward()
        opt.step()
        with torch.no_grad():
            w.clamp_(min=0)
            w /= w.sum(1, keepdim=True)
    return w.detach().argmax(1)


def _entry_data(cfg: dict, draw: int) -> tuple[Tensor, Tensor, Tensor]:
    """The annotated rows of one draw: their images, labels and group ids (1 = the mark follows the bias)."""
    x, y, mark = biased_digits("train", rate=cfg["rate"], seed=cfg["data_seed"])
    rows = annotate(len(y), cfg["n_annotated"], seed=draw)
    return x[rows], y[rows], aligned(mark[rows], y[rows]).long()


def train_entry(cfg: dict, *, progress: bool = True) -> tuple[dict, dict]:
    """Train the zoo entry ``invdiff_deltas``: per draw and method (``{name: {"lam": lambda, "groups":
    "annotated" | "inferred"}}``), one :class:`DeltaNet` on the frozen ``cfg["base"]``: from the draw's annotated
    rows and their groups, or from every training row with groups from :func:`infer_groups` (no attribute label;
    stored as ``"inferred.s{draw}.groups"``). Same initial weights and batch draws per draw. Returns
    ``(state_dict, log)`` with keys ``"{method}.s{draw}.*"``."""
    from .zoo import load
    from .zoo.train import training_alphas_cumprod

    base, ac = load(cfg["base"]), training_alphas_cumprod()
    x_all, y_all, _ = biased_digits("train", rate=cfg["rate"], seed=cfg["data_seed"])
    state, log = {}, {"final_loss": {}}
    for draw in cfg["draws"]:
        x_a, y_a, g_a = _entry_data(cfg, draw)
        for method, spec in cfg["methods"].items():
            key = f"{method}.s{draw}"
            if spec["groups"] == "inferred":
                x, y = x_all, y_all
                groups = infer_groups(base, x, y, ac, seed=draw)
                state[f"{key}.groups"] = groups.to(torch.int8)
            else:
                x, y, groups = x_a, y_a, g_a
            delta = DeltaNet(1, width=cfg["width"], n_classes=11, seed=draw)
            res = train_delta(EpsWithDelta(base, delta), x, y, ac, groups=groups, lam=spec["lam"],
                              steps=cfg["steps"], lr=cfg["lr"], batch_size=cfg["batch"], seed=draw)
            tail = res.losses[-max(1, cfg["steps"] // 10):]
            log["final_loss"][key] = round(sum(tail) / len(tail), 6)
            state.update({f"{key}.{k}": v for k, v in delta.state_dict().items()})
            if progress:
                print(f"{key}: final loss {log['final_loss'][key]:.4f}")
    return state, log


def load_entry(state: dict, cfg: dict) -> nn.ModuleDict:
    """The modules of the zoo entry ``invdiff_deltas``: an ``nn.ModuleDict`` of :class:`DeltaNet` keyed
    ``"{method}_s{draw}"`` (in eval mode); its attribute ``groups`` maps ``"{method}_s{draw}"`` to the inferred
    group of every training row for the methods that inferred them."""
    out, groups = nn.ModuleDict(), {}
    for draw in cfg["draws"]:
        for method in cfg["methods"]:
            d = DeltaNet(1, width=cfg["width"], n_classes=11)
            pre = f"{method}.s{draw}."
            if pre + "groups" in state:
                groups[f"{method}_s{draw}"] = state[pre + "groups"].long()
            d.load_state_dict({k[len(pre):]: v for k, v in state.items() if k.startswith(pre) and k != pre + "groups"})
            out[f"{method}_s{draw}"] = d.eval()
    out.groups = groups
    return out


def with_delta(denoiser, delta: nn.Module):
    """A :class:`dmlab.denoisers.DiscreteVPDenoiser` on ``EpsWithDelta(denoiser.model, delta)`` with the same
    training schedule, prediction type and class range as ``denoiser`` (one base call plus one ``delta`` call per
    evaluation)."""
    from .denoisers import DiscreteVPDenoiser

    if not isinstance(denoiser, DiscreteVPDenoiser):
        raise TypeError("denoiser must be a DiscreteVPDenoiser (zoo.load_denoiser or DiscreteVPDenoiser."
                        "from_scheduler(pipe.unet, pipe.scheduler))")
    ac = 1.0 / (1.0 + denoiser.sigmas_train.double() ** 2)
    return DiscreteVPDenoiser(EpsWithDelta(denoiser.model, delta), ac, prediction_type=denoiser.prediction_type,
                              n_classes=denoiser.n_classes)
