"""Pre-training choices that decide what a conditional diffusion model learns and what it can pass on.

Two papers of chapter 23, on one exact test bed (:func:`class_triads`: a class-conditional 2-D Gaussian mixture in
which every class is itself three modes, so the exact class-conditional density, denoiser and mode labels are known):

* **Slight label corruption and CEP** (Chen et al. 2024, ``chen2024slight``, paper 9). Replacing a few percent of
  the training labels by other classes (:func:`corrupt_labels`) is claimed to *improve* the quality and diversity
  of a conditional model, and so is conditional embedding perturbation, CEP: noise added to the condition
  embedding during training only, ``c(y) + delta`` with ``delta ~ N(0, (gamma / sqrt(d))^2 I)`` (CEP-G) or
  ``U(-gamma / sqrt(d), gamma / sqrt(d))`` (CEP-U), ``d`` the embedding width, ``gamma = 1`` in the paper
  (:func:`cep_delta`; :func:`perturb_embedding` adds it to any embedding module's output through the hook layer,
  so the same code perturbs a diffusers UNet's ``class_embedding`` or a DiT's class embedder; for text conditions
  add :func:`cep_delta` to ``encoder_hidden_states``). The paper prints ``N(0, gamma / sqrt(d))`` without saying
  whether that is the variance or the standard deviation; here it is the standard deviation, the scale of CEP-U.
* **KIND** (Xie et al. 2025, ``xie2025kind``, paper 45): every weight matrix is held in SVD form
  ``W = U diag(s) V^T`` and its rank-one components are split into *learngenes* (shared by all classes) and
  *tailors* (one group per class, switched on by a class gate). Pre-training condenses class-agnostic knowledge
  into the learngenes; a new class is learned by training fresh tailors on top of the frozen learngenes
  (:class:`KindLinear`, :class:`KindMLP`, :func:`kind_transfer`). :func:`kind_from_linear` builds KIND layers from
  a pretrained ``nn.Linear`` by its SVD (the top components the learngenes, the rest the tailor groups' start),
  the path to a pretrained DiT or UNet at full scale.

Training is one :func:`dmlab.train.fit` call per network (:func:`train_class_toy`: EDM denoising loss, Karras et
al. 2022). The zoo entries ``corruption_gmm`` and ``kind_gmm`` are trained by :func:`train_corruption_models` and
:func:`train_kind_models` and loaded by :func:`load_corruption_models` / :func:`load_kind_models`.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import Tensor, nn

from .denoisers import EDMPrecond
from .hooks import Handle, add_hook, output_tensor
from .train import FitConfig, fit

__all__ = ["CEP_KINDS", "class_triads", "corrupt_labels", "cep_delta", "perturb_embedding", "train_class_toy",
           "judge_samples", "w2_floor", "corruption_conditions", "cep_step_loss", "kind_report",
           "KindLinear", "KindMLP", "kind_from_linear", "kind_transfer", "train_corruption_models",
           "load_corruption_models", "train_kind_models", "load_kind_models", "CORRUPTION_KEYS", "KIND_KEYS"]

CEP_KINDS = ("gaussian", "uniform")
SIGMA_DATA = 2.0  # the triads' data scale (their standard deviation per coordinate is about 2.1)


# ----------------------------------------------------------------------------------------------- test bed
def class_triads(n_classes: int = 10, *, radius: float = 3.0, spread: float = 0.5, std: float = 0.12):
    """The exact class-conditional test bed: class ``k`` is three equal Gaussian modes (standard deviation ``std``)
    on the corners of a triangle of circumradius ``spread``, rotated by ``0.7 k`` radians, centred at angle
    ``2 pi k / n_classes`` on a circle of ``radius``. Every class has the same shape (what classes share) at its
    own place and angle (what is class-specific). Returns a :class:`dmlab.distill.guidance.ClassGMM` (exact
    per-class denoisers, ``sample``, ``class_posterior``; class ``n_classes`` is the unconditional mixture)."""
    from .distill.guidance import ClassGMM

    if not (isinstance(n_classes, int) and n_classes >= 2):
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if not (radius > 0 and spread > 0 and std > 0):
        raise ValueError("radius, spread and std must be positive")
    k = torch.arange(n_classes, dtype=torch.float64).repeat_interleave(3)
    j = torch.arange(3, dtype=torch.float64).repeat(n_classes)
    centre = 2 * math.pi * k / n_classes
    turn = 0.7 * k + 2 * math.pi * j / 3
    means = torch.stack([radius * centre.cos() + spread * turn.cos(), radius * centre.sin() + spread * turn.sin()], 1)
    return ClassGMM(torch.ones(3 * n_classes), means, torch.full((3 * n_classes,), std ** 2), k.long(), n_classes)


def corrupt_labels(labels: Tensor, rate: float, n_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Slight corruption (paper 9): ``round(rate * N)`` labels, chosen at random, replaced by a uniformly drawn
    *other* class. Returns ``(corrupted labels, bool mask of the changed entries)``; ``rate = 0`` changes nothing
    (and draws nothing)."""
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point:
        raise TypeError("labels must be a 1-D integer tensor of class ids")
    if not 0 <= rate < 1:
        raise ValueError(f"rate must lie in [0, 1) (the paper's slight corruption is 0.025-0.075), got {rate!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator: which labels flip is a random draw")
    out, mask = labels.clone(), torch.zeros(len(labels), dtype=torch.bool)
    n = int(round(rate * len(labels)))
    if n == 0:
        return out, mask
    idx = torch.randperm(len(labels), generator=generator)[:n]
    shift = torch.randint(1, n_classes, (n,), generator=generator)
    out[idx] = (labels[idx] + shift) % n_classes
    mask[idx] = True
    return out, mask


def cep_delta(shape, gamma: float, kind: str, generator: torch.Generator, *, dtype=torch.float32) -> Tensor:
    """CEP's perturbation of condition embeddings of width ``d = shape[-1]``: ``gamma / sqrt(d)`` times a standard
    normal (``"gaussian"``, CEP-G) or a uniform draw on ``[-1, 1]`` (``"uniform"``, CEP-U), Chen et al. 2024 eq. 6."""
    if kind not in CEP_KINDS:
        raise ValueError(f"kind must be one of {CEP_KINDS} (CEP-G / CEP-U), got {kind!r}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0 (the paper uses 1), got {gamma!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (CEP draws fresh noise every training step)")
    shape = tuple(shape)
    if kind == "gaussian":
        z = torch.randn(shape, generator=generator)
    else:
        z = 2 * torch.rand(shape, generator=generator) - 1
    return (gamma / math.sqrt(shape[-1]) * z).to(dtype)


def perturb_embedding(module: nn.Module, gamma: float, kind: str, generator: torch.Generator) -> Handle:
    """Add a fresh :func:`cep_delta` to every output of ``module`` (a class-embedding layer) until the returned
    :class:`dmlab.hooks.Handle` is removed (use it as ``with perturb_embedding(...):`` around training only)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be the condition-embedding nn.Module, got {type(module).__name__}")
    cep_delta((1,), gamma, kind, torch.Generator())  # validate gamma / kind before hooking
    handle = Handle("cep", module)

    def hook(mod, args, kwargs, out):
        t = output_tensor(out)
        return t + cep_delta(t.shape, gamma, kind, generator, dtype=t.dtype).to(t.device)

    add_hook(module, hook, handle, pre=False)
    return handle


def cep_step_loss(model: nn.Module, batch: dict, gamma: float, kind: str, generator: torch.Generator) -> Tensor:
    """The DDPM loss (:func:`dmlab.finetuning.ddpm_loss`) of one training batch with CEP: for a text-conditional
    model (``batch["encoder_hidden_states"]``, Stable Diffusion's UNet) :func:`cep_delta` is added to the text
    embedding; for a class-conditional diffusers model the class embedding (``class_embedding`` of a UNet, the
    class embedder of a DiT) is perturbed through :func:`perturb_embedding`. Backpropagate it to train."""
    from .finetuning import _class_embedding, ddpm_loss

    if "encoder_hidden_states" in batch:
        ctx = batch["encoder_hidden_states"]
        noisy = ctx + cep_delta(ctx.shape, gamma, kind, generator, dtype=ctx.dtype).to(ctx.device)
        return ddpm_loss(model, dict(batch, encoder_hidden_states=noisy))
    emb = [m for n, m in model.named_modules() if n.endswith("class_embedding") or n.endswith("class_embedder")]
    if not emb or not _class_embedding(model):
        raise ValueError("cep_step_loss needs batch['encoder_hidden_states'] or a model with a class embedding "
                         "(diffusers UNet class_embedding / DiT class_embedder)")
    with perturb_embedding(emb[0], gamma, kind, generator):
        return ddpm_loss(model, batch)


def train_class_toy(net: nn.Module, x: Tensor, y: Tensor, *, steps: int, batch: int, lr: float,
                    generator: torch.Generator, params=None, cep: tuple | None = None,
                    cep_generator: torch.Generator | None = None, p_mean: float = -0.5,
                    p_std: float = 1.4) -> list:
    """Train a class-conditional toy network (``net(x_in, c_noise, class_labels)``, e.g. :class:`KindMLP` or
    :class:`dmlab.distill.guidance.ClassMLP`) in place on points ``x [N, 2]`` with labels ``y`` by denoising score
    matching (EDM loss and preconditioning with ``sigma_data = 2``, ``log sigma ~ N(p_mean, p_std^2)``, Adam with
    cosine decay) through :func:`dmlab.train.fit`. ``cep=(kind, gamma)`` perturbs ``net.label_emb`` during training
    with draws from ``cep_generator`` (a separate stream, so the batches are those of the unperturbed run).
    ``params``: the tensors to train (default all that require grad). Returns the loss per step."""
    if cep is not None and not isinstance(cep_generator, torch.Generator):
        raise TypeError("cep needs cep_generator=torch.Generator(...) for its noise")
    den = EDMPrecond(net, sigma_data=SIGMA_DATA)
    xf = x.float()

    def draw(g):
        i = torch.randint(len(xf), (batch,), generator=g)
        s = (p_mean + p_std * torch.randn(batch, generator=g)).exp()
        return xf[i], y[i], s, torch.randn(batch, xf.shape[1], generator=g)

    def loss(b):
        x0, yy, s, e = b
        w = (s ** 2 + SIGMA_DATA ** 2) / (s * SIGMA_DATA) ** 2
        return (w * ((den(x0 + s[:, None] * e, s, class_labels=yy) - x0) ** 2).mean(1)).mean()

    ctx = perturb_embedding(net.label_emb, cep[1], cep[0], cep_generator) if cep else contextlib.nullcontext()
    with ctx:
        res = fit(loss, net, FitConfig(steps=steps, lr=lr, schedule="cosine", log_every=max(1, steps)),
                  generator=generator, data=draw, params=params)
    return res.losses


@torch.no_grad()
def judge_samples(denoiser, classes, n: int, seed: int, *, steps: int = 24, sigma_max: float = 20.0,
                  sigma_min: float = 0.002) -> dict:
    """Sample ``n`` points of each class in ``classes`` (Heun, Karras grid of ``steps`` steps; the noise from
    ``torch.Generator().manual_seed(seed)``, so every model judged at one ``seed`` starts from the same points) and
    judge them exactly against :func:`class_triads`. Per sample (class-major order): ``w2``, the cost of the sample
    in the optimal assignment of its class's samples to ``n`` exact draws of that class (generator ``seed + 1``;
    its mean over a class is that class's squared W2), and ``ok``, 1 when the exact class posterior of the sample
    favours the asked-for class. Also ``x``, ``y`` and ``modes`` (per class, the total-variation distance of the
    samples' mode histogram, by exact responsibilities, from the uniform one: 0 = every mode equally covered)."""
    from .samplers import sample_heun
    from .schedules import karras
    from .score_distillation import transport_costs

    tri = class_triads()
    y = torch.tensor([int(c) for c in classes]).repeat_interleave(n)
    z = torch.randn(len(y), 2, generator=torch.Generator().manual_seed(seed))
    x = sample_heun(denoiser, sigma_max * z, karras(steps, sigma_min, sigma_max), cond={"class_labels": y})
    ref = tri.sample(y, torch.Generator().manual_seed(seed + 1)).float()
    w2 = torch.cat([transport_costs(x[y == c], ref[y == c]) for c in y.unique()])
    ok = (tri.class_posterior(x).argmax(1) == y).double()
    modes = []
    for c in y.unique().tolist():
        d = tri.per_class[c]
        r = torch.softmax(torch.stack([-((x[y == c].double() - m) ** 2).sum(1) / (2 * d.covs[k, 0, 0])
                                       for k, m in enumerate(d.means)], 1), 1).mean(0)
        modes.append(float(0.5 * (r - 1 / len(r)).abs().sum()))
    return {"x": x, "y": y, "w2": w2, "ok": ok, "modes": torch.tensor(modes)}


def w2_floor(classes, n: int, seed: int) -> float:
    """The floor of :func:`judge_samples`' ``w2``: its mean for ``n`` exact draws per class in place of a model's
    samples (two independent exact sample sets are this far apart at this ``n``)."""
    from .score_distillation import transport_costs

    tri = class_triads()
    y = torch.tensor([int(c) for c in classes]).repeat_interleave(n)
    a = tri.sample(y, torch.Generator().manual_seed(seed + 7)).float()
    b = tri.sample(y, torch.Generator().manual_seed(seed + 1)).float()
    return float(torch.cat([transport_costs(a[y == c], b[y == c]) for c in y.unique()]).mean())


# ----------------------------------------------------------------------------------------------- KIND
def _orthonormal(rows: int, cols: int, g: torch.Generator) -> Tensor:
    """``[rows, cols]`` with orthonormal columns (unit-norm random columns when ``cols > rows``)."""
    z = torch.randn(rows, max(cols, 1), generator=g)
    if cols > rows:
        return (z / z.norm(dim=0, keepdim=True))[:, :cols].contiguous()
    return torch.linalg.qr(z)[0][:, :cols].contiguous()


class KindLinear(nn.Module):
    """A linear layer in KIND's decomposed form (Xie et al. 2025, Sec. 3.1-3.2):

    ``y = x V_g diag(s_g) U_g^T + x V_c diag(s_c) U_c^T + b`` for a sample of class ``c``: ``r_shared`` learngene
    components ``(U_g, s_g, V_g)`` used by every class, and per class a group of ``r_class`` tailor components
    ``(U_c, s_c, V_c)`` selected by the class gate (``class_labels``). A label outside ``0..n_classes-1`` (the null
    class of classifier-free guidance) uses the learngenes alone.
    """

    def __init__(self, d_in: int, d_out: int, r_shared: int, r_class: int, n_classes: int, *, seed: int = 0):
        super().__init__()
        if not all(isinstance(v, int) and v >= 0 for v in (r_shared, r_class)) or r_shared + r_class < 1:
            raise ValueError(f"r_shared and r_class must be ints >= 0 with r_shared + r_class >= 1, got "
                             f"{r_shared!r}, {r_class!r}")
        if not (isinstance(n_classes, int) and n_classes >= 1):
            raise ValueError(f"n_classes must be an int >= 1, got {n_classes!r}")
        g = torch.Generator().manual_seed(seed)
        self.d_in, self.d_out, self.r_shared, self.r_class, self.n_classes = d_in, d_out, r_shared, r_class, n_classes
        scale = math.sqrt(d_out / (3 * (r_shared + r_class)))  # the Frobenius norm of nn.Linear's default init
        self.U_g = nn.Parameter(_orthonormal(d_out, r_shared, g))
        self.s_g = nn.Parameter(torch.full((r_shared,), scale))
        self.V_g = nn.Parameter(_orthonormal(d_in, r_shared, g))
        self.U_t = nn.Parameter(torch.stack([_orthonormal(d_out, r_class, g) for _ in range(n_classes)]))
        self.s_t = nn.Parameter(torch.full((n_classes, r_class), scale))
        self.V_t = nn.Parameter(torch.stack([_orthonormal(d_in, r_class, g) for _ in range(n_classes)]))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def reset_tailors(self, classes, seed: int) -> None:
        """Fresh tailor groups for ``classes`` (new orthonormal factors, the initial singular values)."""
        g = torch.Generator().manual_seed(seed)
        scale = math.sqrt(self.d_out / (3 * (self.r_shared + self.r_class)))
        with torch.no_grad():
            for c in classes:
                self.U_t[c] = _orthonormal(self.d_out, self.r_class, g)
                self.V_t[c] = _orthonormal(self.d_in, self.r_class, g)
                self.s_t[c] = scale

    def tailor_params(self, classes) -> int:
        """Number of scalars in the tailor groups of ``classes``."""
        return len(list(classes)) * self.r_class * (self.d_in + self.d_out + 1)

    def forward(self, x: Tensor, class_labels: Tensor) -> Tensor:
        out = ((x @ self.V_g) * self.s_g) @ self.U_g.T + self.bias
        if self.r_class == 0:
            return out
        y = class_labels.long()
        gate = (y >= 0) & (y < self.n_classes)
        yc = y.clamp(0, self.n_classes - 1)
        h = torch.einsum("bi,bir->br", x, self.V_t[yc]) * self.s_t[yc]
        return out + gate[:, None].to(x.dtype) * torch.einsum("br,bor->bo", h, self.U_t[yc])


class KindMLP(nn.Module):
    """The class-conditional toy network of :class:`dmlab.distill.guidance.ClassMLP` with every linear layer a
    :class:`KindLinear`: ``h = inp([x_in, fourier(c_noise)], y) + label_emb(y)``, ``depth - 1`` SiLU-KindLinear
    layers, SiLU, ``out``. ``learngene_params()`` / ``tailor_params(classes)`` list the shared and the
    class-specific tensors (the label embedding is neither: it is per class and trained on transfer)."""

    def __init__(self, dim: int = 2, hidden: int = 32, depth: int = 3, n_classes: int = 10, *, r_shared: int = 8,
                 r_class: int = 2, n_freq: int = 6, seed: int = 0):
        super().__init__()
        if not all(isinstance(v, int) and v >= 1 for v in (dim, hidden, depth, n_classes, n_freq)):
            raise ValueError("dim, hidden, depth, n_classes and n_freq must be positive ints")
        self.dim, self.n_classes = dim, n_classes
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freq, dtype=torch.float32), persistent=False)
        widths = [dim + 2 * n_freq] + [hidden] * depth + [dim]
        self.layers = nn.ModuleList(KindLinear(a, b, r_shared, r_class, n_classes, seed=seed * 101 + i)
                                    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.label_emb = nn.Embedding(n_classes + 1, hidden)

    def forward(self, x_in: Tensor, c_noise: Tensor, class_labels: Tensor) -> Tensor:
        if x_in.ndim != 2 or x_in.shape[1] != self.dim:
            raise ValueError(f"KindMLP takes x of shape [B, {self.dim}], got {tuple(x_in.shape)}")
        x_in = x_in.to(self.label_emb.weight.dtype)
        c = c_noise.reshape(-1, 1).to(x_in.dtype) * self.freqs
        y = class_labels.long()
        h = self.layers[0](torch.cat([x_in, torch.sin(c), torch.cos(c)], 1), y) + self.label_emb(y)
        for layer in self.layers[1:]:
            h = layer(torch.nn.functional.silu(h), y)
        return h

    def learngene_params(self) -> list:
        """The shared (class-agnostic) tensors: learngene factors and biases of every layer."""
        return [p for m in self.layers for p in (m.U_g, m.s_g, m.V_g, m.bias)]

    def tailor_params(self, classes) -> int:
        """Number of tailor scalars of ``classes`` over all layers."""
        return sum(m.tailor_params(classes) for m in self.layers)


def kind_from_linear(linear: nn.Linear, r_shared: int, r_class: int, n_classes: int) -> KindLinear:
    """A :class:`KindLinear` from a pretrained ``nn.Linear`` by its SVD ``W = U diag(s) V^T``: the top
    ``r_shared`` components become the learngenes and every class's tailor group starts as the next ``r_class``
    components, so that under any class gate the layer computes the rank-``(r_shared + r_class)`` truncation of
    ``W`` (``W`` itself when that is its rank). The full-scale path: KIND layers on a pretrained DiT or UNet, whose
    tailors are then trained per class."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
    W = linear.weight.detach().float()
    if r_shared + r_class > min(W.shape):
        raise ValueError(f"r_shared + r_class = {r_shared + r_class} exceeds the rank bound {min(W.shape)} of a "
                         f"{tuple(W.shape)} weight; use fewer components")
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    k = KindLinear(W.shape[1], W.shape[0], r_shared, r_class, n_classes)
    a, b = r_shared, r_shared + r_class
    with torch.no_grad():
        k.U_g.copy_(U[:, :a]), k.s_g.copy_(s[:a]), k.V_g.copy_(Vh[:a].T)
        k.U_t.copy_(U[:, a:b].expand(n_classes, -1, -1)), k.s_t.copy_(s[a:b].expand(n_classes, -1))
        k.V_t.copy_(Vh[a:b].T.expand(n_classes, -1, -1))
        k.bias.copy_(linear.bias.detach() if linear.bias is not None else torch.zeros(W.shape[0]))
    return k.to(linear.weight.dtype)


def kind_report(model: nn.Module, *, r_shared: int, r_class: int, block: int = 0, n_inputs: int = 64):
    """KIND layers from a pretrained diffusers transformer (DiT, or the transformers inside a UNet): for each linear
    layer of the ``block``-th ``BasicTransformerBlock``, ``(name, relative error of the rank-(r_shared + r_class)
    KIND layer on random inputs, tailor parameters one class trains)`` (:func:`kind_from_linear`)."""
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    if not blocks:
        raise ValueError("kind_report needs a model with BasicTransformerBlock layers (a diffusers DiT or UNet)")
    name, blk = blocks[block]
    out = []
    for sub, lin in blk.named_modules():
        if not isinstance(lin, nn.Linear) or r_shared + r_class > min(lin.weight.shape):
            continue
        k = kind_from_linear(lin, r_shared, r_class, 1).to(lin.weight.device)
        x = torch.randn(n_inputs, lin.in_features, generator=torch.Generator().manual_seed(0)).to(lin.weight)
        with torch.no_grad():
            ref = lin(x)
            err = float((k(x, torch.zeros(n_inputs, dtype=torch.long, device=x.device)) - ref).norm() / ref.norm())
        out.append((f"{name}.{sub}", err, k.tailor_params([0])))
    return out


def kind_transfer(model: KindMLP, new_classes, *, seed: int = 0) -> tuple[KindMLP, list]:
    """KIND's transfer to new classes: a copy of ``model`` with fresh tailor groups for ``new_classes`` and the
    learngenes (and every other tailor) frozen. Returns ``(copy, trainable tensors)``: the tailor factors (only
    the new classes' rows receive gradient) and the label embedding. The count of trained scalars is
    ``model.tailor_params(new_classes)`` plus the new classes' embedding rows."""
    if not isinstance(model, KindMLP):
        raise TypeError(f"model must be a KindMLP, got {type(model).__name__}")
    new_classes = [int(c) for c in new_classes]
    if not new_classes or any(not 0 <= c < model.n_classes for c in new_classes):
        raise ValueError(f"new_classes must be class ids in 0..{model.n_classes - 1}, got {new_classes}")
    out = copy.deepcopy(model)
    out.requires_grad_(False)
    params = []
    for i, m in enumerate(out.layers):
        m.reset_tailors(new_classes, seed * 1009 + i)
        params += [m.U_t, m.s_t, m.V_t]
    params.append(out.label_emb.weight)
    for p in params:
        p.requires_grad_(True)
    keep = torch.zeros(model.n_classes + 1, dtype=torch.bool)
    keep[new_classes] = True

    def only_new(grad, keep=keep):  # gradients of the old classes' rows are zeroed: they stay as pretrained
        mask = keep[: grad.shape[0]].to(grad.dtype).view(-1, *([1] * (grad.ndim - 1)))
        return grad * mask
    for p in params:
        p.register_hook(only_new)
    return out, params


# ----------------------------------------------------------------------------------------------- zoo entries
CORRUPTION_KEYS = ("seeds", "n_per_class", "data_seed", "hidden", "depth", "steps", "batch", "lr", "rates", "cep")
KIND_KEYS = ("seeds", "n_per_class", "data_seed", "hidden", "depth", "pre_steps", "steps", "batch", "lr",
             "pre_lr", "r_shared", "r_class", "lora_rank", "source", "target")


def _check(config, keys, entry) -> dict:
    if not isinstance(config, dict) or set(keys) - set(config):
        raise ValueError(f"config must be the {entry} recipe's model dict with keys {keys} "
                         f"(dmlab.zoo.get_recipe('{entry}').model)")
    return dict(config)


def _class_mlp(cfg: dict, seed: int, n_classes: int = 10):
    from .distill.guidance import ClassMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClassMLP(2, cfg["hidden"], cfg["depth"], n_classes)


def _dataset(cfg: dict, classes) -> tuple[Tensor, Tensor]:
    tri = class_triads()
    y = torch.tensor(list(classes)).repeat_interleave(cfg["n_per_class"])
    return tri.sample(y, torch.Generator().manual_seed(cfg["data_seed"])).float(), y


def corruption_conditions(cfg: dict) -> dict:
    """``{name: (label corruption rate, cep or None)}`` of a ``corruption_gmm`` config, clean first."""
    out = {("clean" if r == 0 else f"corrupt{r * 100:g}"): (float(r), None) for r in cfg["rates"]}
    out.update({name: (0.0, tuple(v)) for name, v in cfg["cep"].items()})
    return out


def train_corruption_models(config: dict, *, progress: bool = False) -> tuple[dict, dict]:
    """Paper 9's models (the zoo recipe ``corruption_gmm``): per training seed ``s`` and condition (clean labels,
    each corruption rate, CEP-G and CEP-U) a :class:`~dmlab.distill.guidance.ClassMLP` trained on the same
    ``n_per_class`` points per class of :func:`class_triads` (drawn once, ``data_seed``) with the same
    initialisation (seed ``s``), the same batches (generator ``9000 + s``), steps and learning rate; only the labels
    (:func:`corrupt_labels`, generator ``9100 + s``) or the embedding noise (generator ``9200 + s``) differ.
    Returns ``(state dict "condition.seed.param", log)``."""
    cfg = _check(config, CORRUPTION_KEYS, "corruption_gmm")
    x, y = _dataset(cfg, range(10))
    state, log = {}, {"final_loss": {}, "flipped": {}}
    for name, (rate, cep) in corruption_conditions(cfg).items():
        for s in cfg["seeds"]:
            net = _class_mlp(cfg, s)
            yc, flipped = corrupt_labels(y, rate, 10, torch.Generator().manual_seed(9100 + s))
            losses = train_class_toy(net, x, yc, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                                     generator=torch.Generator().manual_seed(9000 + s), cep=cep,
                                     cep_generator=torch.Generator().manual_seed(9200 + s))
            state.update({f"{name}.{s}.{k}": v.detach().clone().contiguous() for k, v in net.state_dict().items()})
            log["final_loss"][f"{name}.s{s}"] = float(sum(losses[-20:]) / 20)
            log["flipped"][f"{name}.s{s}"] = int(flipped.sum())
        if progress:
            print(f"corruption_gmm: {name} done", flush=True)
    return state, log


def _take(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_corruption_models(state: dict, config: dict) -> dict:
    """``{condition: [EDMPrecond denoiser per seed]}`` from :func:`train_corruption_models`' state dict."""
    cfg = _check(config, CORRUPTION_KEYS, "corruption_gmm")
    out = {}
    for name in corruption_conditions(cfg):
        out[name] = []
        for s in cfg["seeds"]:
            net = _class_mlp(cfg, s)
            net.load_state_dict(_take(state, f"{name}.{s}."))
            out[name].append(EDMPrecond(net.eval().requires_grad_(False), sigma_data=SIGMA_DATA))
    return _CPUDict(out)


class _CPUDict(dict):
    """A dict of 2-D CPU toys; ``.to("cpu")`` is the zoo's device hook."""

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise ValueError("these are 2-D CPU toys; load them with device='cpu'")
        return self


def _kind_mlp(cfg: dict, seed: int) -> KindMLP:
    return KindMLP(2, cfg["hidden"], cfg["depth"], 10, r_shared=cfg["r_shared"], r_class=cfg["r_class"], seed=seed)


def _lora_copy(net: nn.Module, rank: int, seed: int):
    from .finetuning import adapt

    targets = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    ad = adapt(net, "lora", rank=rank, target_modules=targets, init_seed=seed)
    ad.model.label_emb.weight.requires_grad_(True)  # new classes need their embedding rows (as KIND's transfer)
    return ad.model, [p for p in ad.model.parameters() if p.requires_grad]


def train_kind_models(config: dict, *, progress: bool = False) -> tuple[dict, dict]:
    """Paper 45's models (the zoo recipe ``kind_gmm``), per training seed ``s``:

    * ``plain``: a :class:`~dmlab.distill.guidance.ClassMLP` pre-trained on the ``source`` classes of
      :func:`class_triads` (``pre_steps``), and ``lora``: its transfer to the ``target`` classes by LoRA of rank
      ``lora_rank`` on every linear layer plus the label embedding;
    * ``kind``: a :class:`KindMLP` pre-trained on the same points, steps and batches, and ``kind_t``: its KIND
      transfer (:func:`kind_transfer`: fresh tailors for the target classes, learngenes frozen) plus the label
      embedding.

    Both transfers see the same target points, batches (generator ``4500 + s``), ``steps`` and learning rate.
    Returns ``(state dict "name.seed.param", log)``; the log holds the trainable counts."""
    cfg = _check(config, KIND_KEYS, "kind_gmm")
    xs, ys = _dataset(cfg, cfg["source"])
    xt, yt = _dataset(dict(cfg, data_seed=cfg["data_seed"] + 1), cfg["target"])
    state, log = {}, {"final_loss": {}, "trainable": {}}
    for s in cfg["seeds"]:
        nets = {"plain": _class_mlp(cfg, s), "kind": _kind_mlp(cfg, s)}
        for name, net in nets.items():
            train_class_toy(net, xs, ys, steps=cfg["pre_steps"], batch=cfg["batch"], lr=cfg["pre_lr"],
                            generator=torch.Generator().manual_seed(4400 + s))
            net.requires_grad_(False)
        lora, lp = _lora_copy(nets["plain"], cfg["lora_rank"], s)
        kt, kp = kind_transfer(nets["kind"], cfg["target"], seed=s)
        n_emb = len(cfg["target"]) * cfg["hidden"]
        log["trainable"] = {"lora": sum(p.numel() for p in lp) - lora.label_emb.weight.numel() + n_emb,
                            "kind": nets["kind"].tailor_params(cfg["target"]) + n_emb}
        for name, net, params in (("lora", lora, lp), ("kind_t", kt, kp)):
            losses = train_class_toy(net, xt, yt, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                                     generator=torch.Generator().manual_seed(4500 + s), params=params)
            log["final_loss"][f"{name}.s{s}"] = float(sum(losses[-20:]) / 20)
            nets[name] = net
        for name, net in nets.items():
            state.update({f"{name}.{s}.{k}": v.detach().clone().contiguous()
                          for k, v in net.state_dict().items() if _kept(name, k)})
        if progress:
            print(f"kind_gmm: seed {s} done", flush=True)
    return state, log


def _kept(name: str, key: str) -> bool:
    """What the ``kind_gmm`` entry stores of each network: the transfers only what they changed (LoRA's factors and
    the label embedding; KIND's tailors and the label embedding), the rest comes from the pre-trained network."""
    if name == "lora":
        return "lora_" in key or key.startswith("label_emb")
    if name == "kind_t":
        return key.endswith((".U_t", ".s_t", ".V_t")) or key.startswith("label_emb")
    return True


def load_kind_models(state: dict, config: dict) -> dict:
    """``{"plain", "lora", "kind", "kind_t": [EDMPrecond denoiser per seed]}`` from :func:`train_kind_models`."""
    cfg = _check(config, KIND_KEYS, "kind_gmm")
    out = {k: [] for k in ("plain", "lora", "kind", "kind_t")}
    for s in cfg["seeds"]:
        nets = {"plain": _class_mlp(cfg, s), "kind": _kind_mlp(cfg, s)}
        for name in ("plain", "kind"):
            nets[name].load_state_dict(_take(state, f"{name}.{s}."))
        nets["lora"] = _lora_copy(nets["plain"], cfg["lora_rank"], s)[0]
        nets["kind_t"] = copy.deepcopy(nets["kind"])
        for name in ("lora", "kind_t"):
            sd = _take(state, f"{name}.{s}.")
            if not sd or any(not _kept(name, k) for k in sd):
                raise ValueError(f"kind_gmm: unexpected weights for {name}, seed {s}; retrain with "
                                 "`python -m dmlab.zoo train kind_gmm`")
            nets[name].load_state_dict(sd, strict=False)
        for name, net in nets.items():
            out[name].append(EDMPrecond(net.eval().requires_grad_(False), sigma_data=SIGMA_DATA))
    return _CPUDict(out)
