"""Parameter-efficient fine-tuning of diffusion models: full fine-tuning, LoRA, DiffFit and SaRA, one interface.

Each method turns a (copy of a) pretrained diffusers model into an :class:`Adapted` model: the network whose forward
is the adapted one, the list of tensors the optimizer trains, and a count of them. Training is one call of the
library's loop (:func:`dmlab.train.fit`) through :func:`finetune`, with the DDPM loss on a batch from
:func:`dmlab.train.ddpm_batch`, so every method sees the same data, timesteps and noise for a given seed.

* ``"full"``: every parameter trains.
* ``"lora"``: low-rank updates ``W + (alpha / r) B A`` on the chosen convolutions and linear layers (Hu et al. 2022,
  ``hu2022lora``), injected with 🤗 ``peft`` (``inject_adapter_in_model``), so the same code adapts Stable
  Diffusion's ``UNet2DConditionModel`` (``target_modules`` the attention projections) at full scale.
* ``"difffit"``: DiffFit (Xie et al. 2023, ``xie2023difffit``): only the bias terms, the normalisation layers, the
  class embedding and newly added scale factors ``gamma`` train. ``gamma`` (initialised to 1, one per channel)
  multiplies the residual branch of every block: the output of each ResNet block's second convolution (UNets) and of
  each transformer block's attention and feed-forward layers (DiT and the transformers inside SD's UNet), so
  ``x + gamma * f(x)``, the paper's ``x + gamma * Block(x)``. The scale factors are forward hooks of the library's
  hook layer (:mod:`dmlab.hooks`), so ``copy.deepcopy`` of a DiffFit model drops them: rebuild a copy with
  :func:`load_adapter_state` (or ``dmlab.zoo.load``).
* ``"sara"``: SaRA (Hu et al. 2025, ``hu2025sara``): the *ineffective* weights, those whose magnitude lies below a
  threshold ``theta`` (chosen so that a fraction ``fraction`` of all conv/linear weights fall below it), are
  re-trained as a sparse update ``W0 + scatter(delta)`` (only ``delta`` is a parameter: the optimizer keeps state for
  the selected entries alone, the paper's unstructural back-propagation), with the nuclear-norm penalty
  ``lambda * sum ||Delta W||_*`` on each matrix's update (``Delta W`` reshaped to ``[out, in * k * k]``) that keeps
  it low rank, and the progressive schedule: after half the steps the update is merged and the entries that are
  *still* below ``theta`` are selected and trained for the second half.

Every method except ``"full"`` also trains the class embedding (``extra_trainable``), which a model needs to learn
new classes at all; the count of trainable parameters includes it.

:func:`training_memory` measures what one training step holds in memory on any device: the activations autograd
saves for the backward pass (counted through ``torch.autograd.graph.saved_tensors_hooks``, each storage once, the
model's own weights excluded) plus the trainable parameters, their gradients and Adam's two moments.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import Handle, add_hook

__all__ = ["METHODS", "Adapted", "adapt", "finetune", "FinetuneResult", "sara_masks", "nuclear_penalty",
           "training_memory", "ddpm_loss", "count_trainable", "merge", "adapter_state", "load_adapter_state"]

METHODS = ("full", "lora", "difffit", "sara")
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


@dataclass
class Adapted:
    """A model prepared for one fine-tuning method.

    ``model`` runs the adapted forward; ``params`` are the tensors the optimizer trains; ``penalty()`` is the
    method's regulariser (0 for all but SaRA); ``handle`` removes hooks the method added (DiffFit's scale factors);
    ``info`` holds the method's settings and counts."""

    method: str
    model: nn.Module
    params: list
    penalty: Callable[[], Tensor] = lambda: torch.zeros(())  # noqa: E731
    handle: Handle | None = None
    info: dict = field(default_factory=dict)
    stage: Callable[[int], None] | None = None

    @property
    def trainable(self) -> int:
        """Number of trained scalars."""
        return sum(p.numel() for p in self.params)


def count_trainable(model: nn.Module) -> int:
    """Number of parameters of ``model`` that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _class_embedding(model: nn.Module) -> list:
    """The class-embedding parameters of a diffusers UNet (``class_embedding``) or DiT (``...class_embedder``)."""
    out = []
    for name, p in model.named_parameters():
        if "class_embedding" in name or "class_embedder" in name:
            out.append(p)
    return out


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------- DiffFit
def _difffit_sites(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, channels)`` of the residual branches DiffFit scales: ResNet blocks' ``conv2`` and
    transformer blocks' ``attn1`` / ``attn2`` / ``ff``."""
    sites = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls == "ResnetBlock2D":
            sites.append((f"{name}.conv2", mod.conv2, mod.conv2.out_channels))
        elif cls == "BasicTransformerBlock":
            for sub in ("attn1", "attn2", "ff"):
                m = getattr(mod, sub, None)
                if m is not None:
                    width = m.to_out[0].out_features if sub != "ff" else m.net[-1].out_features
                    sites.append((f"{name}.{sub}", m, width))
    return sites


def _difffit(model: nn.Module) -> Adapted:
    _freeze(model)
    params = []
    for mod in model.modules():
        if isinstance(mod, _NORMS):
            params += [p for p in mod.parameters(recurse=False)]
    for name, p in model.named_parameters():
        if name.endswith(".bias") and all(p is not q for q in params):
            params.append(p)
    params += [p for p in _class_embedding(model) if all(p is not q for q in params)]
    sites = _difffit_sites(model)
    if not sites:
        raise ValueError("DiffFit found no residual block to scale (ResnetBlock2D or BasicTransformerBlock); "
                         "it adapts diffusers UNets and DiTs")
    handle = Handle("difffit", model)
    gammas = nn.ParameterDict()
    for i, (name, mod, width) in enumerate(sites):
        p0 = next(model.parameters())
        g = nn.Parameter(torch.ones(width, dtype=p0.dtype, device=p0.device))
        gammas[str(i)] = g

        def scale(m, args, kwargs, out, g=g):
            shape = (1, -1, 1, 1) if out.ndim == 4 else (1, 1, -1)
            return out * g.to(out.dtype).view(shape)
        add_hook(mod, scale, handle, pre=False)
    model.difffit_gammas = gammas  # saved with the model's state dict; removed with the handle
    handle.on_remove(lambda: delattr(model, "difffit_gammas"))
    for p in params:
        p.requires_grad_(True)
    params += list(gammas.values())
    return Adapted("difffit", model, params, handle=handle,
                   info={"scaled_branches": len(sites), "gamma_params": sum(g.numel() for g in gammas.values())})


# ----------------------------------------------------------------------------------------------- LoRA
def _lora(model: nn.Module, rank: int, alpha: float | None, target_modules, init_seed: int) -> Adapted:
    from peft import LoraConfig, inject_adapter_in_model

    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(target_modules),
                     lora_dropout=0.0, init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: make it a function of the seed
        torch.manual_seed(init_seed)
        model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    cls = _class_embedding(model)
    for p in cls:
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    return Adapted("lora", model, params, info={"rank": rank, "lora_params": sum(p.numel() for p in params)
                                                - sum(p.numel() for p in cls)})


# ----------------------------------------------------------------------------------------------- SaRA
def _sara_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv / linear layers whose weights SaRA may re-train (class embedding and I/O convs excluded)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.ndim >= 2 and "class_embed" not in name:
            out.append((name, mod))
    return out


def sara_masks(model: nn.Module, fraction: float) -> tuple[dict, float]:
    """``({layer name: bool mask of ineffective weights}, theta)``: the weights with ``|w| < theta``, where
    ``theta`` is the ``fraction``-quantile of all conv/linear weight magnitudes (Hu et al. 2025, Sec. 3.2)."""
    if not 0 < fraction < 1:
        raise ValueError(f"SaRA's fraction of re-trained weights must lie in (0, 1), got {fraction!r}")
    targets = _sara_targets(model)
    mags = torch.cat([m.weight.detach().abs().flatten().float() for _, m in targets])
    theta = float(torch.quantile(mags, fraction)) if mags.numel() <= 16_000_000 else float(
        mags.kthvalue(max(1, int(fraction * mags.numel()))).values)
    return {n: m.weight.detach().abs() < theta for n, m in targets}, theta


class _SparseDelta(nn.Module):
    """``W -> W + scatter(delta, mask)``: a parametrization whose only parameter is the masked entries' update."""

    def __init__(self, mask: Tensor, dtype, device):
        super().__init__()
        self.register_buffer("index", mask.flatten().nonzero().flatten().to(device), persistent=False)
        self.delta = nn.Parameter(torch.zeros(self.index.numel(), dtype=dtype, device=device))

    def full(self, like: Tensor) -> Tensor:
        return torch.zeros(like.numel(), dtype=like.dtype, device=like.device).index_add(
            0, self.index, self.delta.to(like.dtype)).view_as(like)

    def forward(self, w: Tensor) -> Tensor:
        return w + self.full(w)


def nuclear_penalty(deltas: list[tuple[_SparseDelta, tuple]]) -> Tensor:
    """``sum ||Delta W||_*`` over the SaRA layers, each update reshaped to ``[out, in * k * k]``."""
    total = torch.zeros(())
    for sd, shape in deltas:
        if sd.index.numel() == 0:
            continue
        dw = sd.full(torch.empty(shape, dtype=sd.delta.dtype)).reshape(shape[0], -1).float()
        total = total + torch.linalg.matrix_norm(dw, ord="nuc")
    return total


def _sara(model: nn.Module, fraction: float, nuclear: float) -> Adapted:
    from torch.nn.utils import parametrize

    _freeze(model)
    layers = dict(_sara_targets(model))
    state: dict = {}

    def select():
        masks, theta = sara_masks(model, fraction) if "theta" not in state else (
            {n: m.weight.detach().abs() < state["theta"] for n, m in layers.items()}, state["theta"])
        state["theta"] = theta
        state["parts"] = []
        for n, m in layers.items():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
                m.weight.requires_grad_(False)
            sd = _SparseDelta(masks[n], m.weight.dtype, m.weight.device)
            parametrize.register_parametrization(m, "weight", sd)
            state["parts"].append((sd, tuple(m.weight.shape)))
        return [sd.delta for sd, _ in state["parts"]]

    deltas = select()
    cls = _class_embedding(model)
    for p in cls:
        p.requires_grad_(True)
    adapted = Adapted("sara", model, deltas + cls, info={"fraction": fraction, "nuclear": nuclear})
    adapted.info.update(theta=state["theta"], stage1=sum(d.numel() for d in deltas))

    def penalty():
        return nuclear * nuclear_penalty(state["parts"]) if nuclear > 0 else torch.zeros(())

    def restage(stage: int) -> None:
        """Progressive adjustment: merge the update and select the weights still below theta."""
        new = select()
        adapted.params[:] = new + cls
        adapted.info[f"stage{stage}"] = sum(d.numel() for d in new)

    adapted.penalty, adapted.stage = penalty, restage
    return adapted


def merge(adapted: Adapted) -> nn.Module:
    """The adapted network as a plain module (SaRA's parametrizations merged into the weights; LoRA and DiffFit
    stay as they are, their extra layers/hooks are part of the forward)."""
    from torch.nn.utils import parametrize

    for m in adapted.model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return adapted.model


# ----------------------------------------------------------------------------------------------- interface
def adapt(model: nn.Module, method: str, *, rank: int = 4, alpha: float | None = None,
          target_modules=("conv1", "conv2", "time_emb_proj"), fraction: float = 0.05, nuclear: float = 1e-3,
          init_seed: int = 0, copy_model: bool = True) -> Adapted:
    """Prepare ``model`` (a deep copy unless ``copy_model=False``) for fine-tuning with ``method``.

    Args:
        method: ``"full"``, ``"lora"`` (``rank``, ``alpha`` (default ``rank``), ``target_modules`` as peft takes
            them; ``init_seed`` seeds the random ``A``), ``"difffit"`` or ``"sara"`` (``fraction`` of weights
            re-trained, ``nuclear`` penalty weight).
    """
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers UNet or DiT), got {type(model).__name__}")
    model = copy.deepcopy(model) if copy_model else model
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Adapted("full", model, list(model.parameters()))
    if method == "lora":
        return _lora(model, rank, alpha, target_modules, init_seed)
    if method == "difffit":
        return _difffit(model)
    return _sara(model, fraction, nuclear)


def ddpm_loss(model: nn.Module, batch: dict) -> Tensor:
    """The DDPM eps-prediction loss of a diffusers model on a :func:`dmlab.train.ddpm_batch`: class-conditional
    (``batch["y"]``) or text-conditional (``batch["encoder_hidden_states"]``, Stable Diffusion's UNet)."""
    cond = ({"encoder_hidden_states": batch["encoder_hidden_states"]} if "encoder_hidden_states" in batch
            else {"class_labels": batch["y"]})
    out = model(batch["xt"], timestep=batch["t"], **cond)
    out = out.sample if hasattr(out, "sample") else out
    return F.mse_loss(out[:, : batch["x0"].shape[1]], batch["eps"])


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the adapted model (merged, eval mode), trained-parameter count, the loss
    curve, seconds, and the method's info."""

    model: nn.Module
    method: str
    trainable: int
    losses: list
    seconds: float
    info: dict


def finetune(model: nn.Module, method: str, x0: Tensor, labels: Tensor, alphas_cumprod: Tensor, *, steps: int,
             lr: float, seed: int, batch_size: int = 32, p_uncond: float = 0.1, null_class: int = 10,
             regularizer=None, **method_kw) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on ``(x0, labels)`` with ``method`` for ``steps`` Adam steps at ``lr`` (constant
    after no warmup) through :func:`dmlab.train.fit`. Every draw comes from ``torch.Generator().manual_seed(seed)``
    (the same batches for every method at one seed). SaRA's progressive schedule splits the steps into two halves
    (one ``fit`` call each, the generator carried on). ``regularizer(model, batch) -> Tensor``, if given, is added
    to the loss (e.g. :class:`dmlab.guidance.StepVariationRegularizer`). Returns a :class:`FinetuneResult`."""
    from .train import FitConfig, ddpm_batch, fit

    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if regularizer is not None and not callable(regularizer):
        raise TypeError("regularizer must be a callable (model, batch) -> Tensor, e.g. "
                        "dmlab.guidance.StepVariationRegularizer()")
    ad = adapt(model, method, init_seed=seed, **method_kw)
    gen = torch.Generator().manual_seed(seed)

    def data(g):
        return ddpm_batch(x0, alphas_cumprod, batch_size, g, labels=labels, p_uncond=p_uncond,
                          null_class=null_class)

    def loss(b):
        out = ddpm_loss(ad.model, b) + ad.penalty()
        return out if regularizer is None else out + regularizer(ad.model, b)

    phases = [steps] if ad.stage is None else [steps // 2, steps - steps // 2]
    losses, seconds = [], 0.0
    for k, n in enumerate(phases):
        if k:
            ad.stage(k + 1)
        res = fit(loss, ad.model, FitConfig(steps=n, lr=lr, optimizer="adam", log_every=max(1, n)),
                  generator=gen, data=data, params=list(ad.params))
        losses += res.losses
        seconds += res.seconds
    trainable = max([ad.info.get("stage1", 0), ad.info.get("stage2", 0)]) + sum(
        p.numel() for p in _class_embedding(ad.model)) if method == "sara" else ad.trainable
    model_out = merge(ad)
    for p in model_out.parameters():
        p.requires_grad_(False)
    return FinetuneResult(model_out.eval(), method, trainable, losses, seconds, dict(ad.info))


def training_memory(adapted: Adapted, batch: dict, *, optimizer_moments: int = 2) -> dict:
    """Bytes one training step holds beyond the frozen weights: ``activations`` (tensors autograd saves for the
    backward pass, each storage once, model weights excluded), ``trainable`` (the trained tensors), ``grads`` (same
    size) and ``optimizer`` (Adam's ``optimizer_moments`` moments). Measured by running the step's forward under
    ``torch.autograd.graph.saved_tensors_hooks``; works on any device."""
    weights = {p.untyped_storage().data_ptr() for p in adapted.model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in weights and key not in seen:
            seen.add(key)
            total[0] += st.nbytes()
        return t

    adapted.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = ddpm_loss(adapted.model, batch) + adapted.penalty()
    del value
    adapted.model.eval()
    tb = sum(p.numel() * p.element_size() for p in adapted.params)
    return {"activations": total[0], "trainable": tb, "grads": tb, "optimizer": optimizer_moments * tb,
            "total": total[0] + (2 + optimizer_moments) * tb}


# ----------------------------------------------------------------------------------------------- storage
def adapter_state(method: str, base: nn.Module, tuned: nn.Module) -> dict:
    """The tensors that turn ``base`` into ``tuned`` (small for the parameter-efficient methods): LoRA's and
    DiffFit's trained tensors by name; SaRA's sparse update as ``index`` (int32) and ``value`` per layer; for full
    fine-tuning the whole update ``tuned - base`` in float16 (half the bytes; the loader adds it in float32)."""
    bsd = base.state_dict()
    out = {}
    if method == "full":
        for k, v in tuned.state_dict().items():
            if v.dtype.is_floating_point:
                out[k] = (v - bsd[k]).to(torch.float16)
    elif method == "sara":
        for k, v in tuned.state_dict().items():
            if v.dtype.is_floating_point:
                d = (v - bsd[k]).flatten()
                idx = d.nonzero().flatten()
                if idx.numel():
                    out[f"{k}::index"] = idx.to(torch.int32)
                    out[f"{k}::value"] = d[idx].contiguous()
    else:
        for k, v in tuned.state_dict().items():
            b = bsd.get(k.replace(".base_layer.", "."))  # peft keeps the frozen layer as base_layer
            if b is None or not torch.equal(v, b):
                out[k] = v.detach().contiguous()
    return out


def load_adapter_state(method: str, base: nn.Module, state: dict, **method_kw) -> nn.Module:
    """Rebuild the tuned model from ``base`` and :func:`adapter_state`'s tensors (``base`` is modified)."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; use one of {', '.join(METHODS)}")
    with torch.no_grad():
        if method in ("full", "sara"):
            sd = base.state_dict()
            for k, v in sd.items():
                if method == "full" and k in state:
                    v.add_(state[k].to(v.dtype))
                elif method == "sara" and f"{k}::index" in state:
                    v.view(-1).index_add_(0, state[f"{k}::index"].long(), state[f"{k}::value"].to(v.dtype))
            return base.eval()
        ad = adapt(base, method, copy_model=False, **method_kw)
        missing = [k for k in state if k not in ad.model.state_dict()]
        if missing:
            raise ValueError(f"stored {method} tensors do not fit the model: {missing[:3]}")
        ad.model.load_state_dict(state, strict=False)
        for p in ad.model.parameters():
            p.requires_grad_(False)
        return ad.model.eval()
