"""Early exit: stop a diffusion transformer half-way when a small head says the rest would change little.

Tang et al., "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for Accelerating Diffusion Model Generation"
(arXiv 2309.17074; v3 retitled AdaDiff; paper 53). After each transformer block ``i`` a light **exit head** turns the
hidden tokens into a noise prediction and a **timestep-aware uncertainty estimation module (UEM)** predicts how wrong
that prediction is, ``u_i = sigmoid(w_i . [LN(mean_tokens(h_i)), silu(c)])`` with ``c`` the model's own
timestep+class embedding. At inference the sample leaves at the first block with ``u_i < threshold``.

Training (:func:`train_exit_heads`) follows the paper's two losses on top of a **frozen** backbone:

* the uncertainty loss ``(u_i - tanh(|g_i(h_i) - y|))^2``: the UEM regresses the (tanh-squashed) mean absolute error
  of exit ``i``;
* the uncertainty-aware layer-wise loss ``(1 + (1 - u_i)) ||g_i(h_i) - y||^2``: every exit learns the output, the
  ones the UEM deems reliable more strongly (``u_i`` is detached here so the two losses do not fight).

Two differences from the paper, said plainly: the target ``y`` is the full model's own output (self-distillation;
the paper fine-tunes the backbone jointly against the true noise), so the frozen backbone, and with it the
``threshold = 0`` output, stays bit for bit the original; and the heads are initialised from the model's final
layer (``norm_out``, ``proj_out_1``, ``proj_out_2``) plus a zero-initialised residual adapter. The official code is
an anonymous link only; this is a re-implementation from the paper text.

Only layer-stacked transformers can stop half-way: ``DiTTransformer2DModel`` (and a ``DiTPipeline`` or dmlab adapter
holding one). A UNet's decoder needs the skip features of every encoder level, so it raises a ``TypeError`` pointing
at feature caching instead.

``handle.stats``: ``calls`` (root calls), ``samples`` (sample-calls: the batch size summed over calls), ``exits``
(samples that left before the last block), ``exit_rate`` (= exits / samples), ``blocks_run`` (blocks evaluated,
summed over samples), ``mean_depth`` (= blocks_run / samples), ``depth_counts`` (list: how many samples stopped after
1, 2, ..., n_layers blocks) and ``per_call`` (list of ``(timestep, mean depth)``, one per call, for per-timestep
plots).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..anatomy import require_dit as _require_dit, resolve_model
from ..hooks import Handle, active_handles, capture, claim, patch_forward

__all__ = ["EarlyExitConfig", "ExitHeads", "apply_early_exit", "train_exit_heads", "exit_heads_for",
           "save_exit_heads", "load_exit_heads", "block_outputs", "EXIT_RECIPE", "build_exit_heads"]

#: How the committed exit heads ``dit_l_exit`` were trained (CPU, 1 thread): :func:`build_exit_heads`.
EXIT_RECIPE = {"base": "dit_l", "steps": 600, "batch_size": 128, "lr": 2e-3, "p_uncond": 0.1, "seed": 0,
               "data": "load_digits('train')"}


# ----------------------------------------------------------------------------------------------- model checks
def _dims(model: nn.Module) -> tuple[int, int, int]:
    """``(n_layers, width, tokens-out width p*p*out_channels)`` of a DiT."""
    return len(model.transformer_blocks), model.proj_out_2.in_features, model.proj_out_2.out_features


# ----------------------------------------------------------------------------------------------- heads
class _ExitHead(nn.Module):
    """``h -> proj_out_2(LN(h + A h) (1 + scale(c)) + shift(c))``: the DiT final layer with its own weights and a
    zero-initialised residual adapter ``A``."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.adapter = nn.Linear(width, width)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)
        self.proj_out_1 = nn.Linear(width, 2 * width)
        self.proj_out_2 = nn.Linear(width, out)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        h = h + self.adapter(h)
        shift, scale = self.proj_out_1(F.silu(c)).chunk(2, dim=1)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out_2(h)


class _UEM(nn.Module):
    """DeeDiff's timestep-aware uncertainty estimation module: ``sigmoid(w . [LN(mean_tokens(h)), silu(c)] + b)``."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(2 * width, 1)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return torch.sigmoid(self.linear(torch.cat([self.norm(h.mean(1)), F.silu(c)], dim=-1))).squeeze(-1)


class ExitHeads(nn.Module):
    """Exit heads and UEMs after blocks ``1 .. n_layers - 1`` of a DiT (DeeDiff, Tang et al. 2023).

    ``heads[i]`` / ``uems[i]`` sit after block ``i + 1`` (1-based depth ``i + 1``). Kept outside the model: applying
    early exit never changes the model's ``state_dict``. Build one for a model with :func:`exit_heads_for`.
    """

    def __init__(self, n_layers: int, width: int, out: int):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"early exit needs a model with >= 2 transformer blocks, got {n_layers}")
        self.n_layers, self.width, self.out = n_layers, width, out
        self.heads = nn.ModuleList(_ExitHead(width, out) for _ in range(n_layers - 1))
        self.uems = nn.ModuleList(_UEM(width) for _ in range(n_layers - 1))

    def config(self) -> dict:
        return {"n_layers": self.n_layers, "width": self.width, "out": self.out}

    def uncertainty(self, depth: int, h: Tensor, c: Tensor) -> Tensor:
        """``u [B]`` of the exit after block ``depth`` (1-based)."""
        return self.uems[depth - 1](h, c)

    def output(self, depth: int, h: Tensor, c: Tensor) -> Tensor:
        """Output tokens ``[B, N, p*p*C]`` of the exit after block ``depth`` (1-based)."""
        return self.heads[depth - 1](h, c)

    def check(self, model: nn.Module) -> None:
        got = _dims(model)
        if got != (self.n_layers, self.width, self.out):
            raise ValueError(f"these exit heads were built for a DiT with (layers, width, out) = "
                             f"{(self.n_layers, self.width, self.out)}, the model has {got}; build heads for it with "
                             f"exit_heads_for(model) and train them with train_exit_heads")


def exit_heads_for(model: Any) -> ExitHeads:
    """Untrained exit heads for a DiT, each initialised from the model's final layer (``proj_out_1/2``) with a zero
    adapter, and UEMs with default initialisation (DeeDiff, Tang et al. 2023)."""
    model = resolve_model(model, method="exit_heads_for")
    _require_dit(model)
    heads = ExitHeads(*_dims(model))
    p = next(model.parameters())
    heads.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        for hd in heads.heads:
            hd.proj_out_1.load_state_dict(model.proj_out_1.state_dict())
            hd.proj_out_2.load_state_dict(model.proj_out_2.state_dict())
    return heads


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EarlyExitConfig:
    """DeeDiff early exit (Tang et al. 2023).

    ``heads``: trained :class:`ExitHeads` for the model (:func:`train_exit_heads` or :func:`load_exit_heads`).
    ``threshold``: a sample leaves after the first block whose predicted uncertainty is ``< threshold``
    (``u`` approximates ``tanh`` of the exit's mean absolute error against the full model); ``0`` never exits (a
    no-op, bit-identical to the model). ``min_depth``: the earliest block after which a sample may leave
    (1 .. n_layers - 1). ``per_sample``: each sample leaves on its own (the batch shrinks block by block); with
    ``False`` the whole batch leaves together when the batch-mean uncertainty is below the threshold (needed together
    with diffusers' caching hooks, which store per-module outputs of the whole batch).
    """

    heads: ExitHeads
    threshold: float = 0.0
    min_depth: int = 1
    per_sample: bool = True

    def __post_init__(self):
        if not isinstance(self.heads, ExitHeads):
            raise TypeError(f"heads must be ExitHeads (exit_heads_for(model), then train_exit_heads or "
                            f"load_exit_heads), got {type(self.heads).__name__}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1] (0 never exits; the uncertainty u lies in (0, 1)), "
                             f"got {t!r}")
        n = self.heads.n_layers
        if isinstance(self.min_depth, bool) or not isinstance(self.min_depth, int) or not 1 <= self.min_depth < n:
            raise ValueError(f"min_depth must be an int in 1..{n - 1} (exits sit after blocks 1..{n - 1} of this "
                             f"{n}-block model), got {self.min_depth!r}")
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"per_sample must be True or False, got {self.per_sample!r}")


# ----------------------------------------------------------------------------------------------- forward
def _batch(v: Any, b: int) -> Any:
    """``v`` with a batch dimension of ``b`` (a 0-d or 1-element tensor is expanded), or ``v`` itself."""
    if isinstance(v, Tensor) and v.ndim <= 1 and v.numel() == 1 and b != 1:
        return v.reshape(1).expand(b)
    return v


def _take(v: Any, idx: Tensor) -> Any:
    return v[idx] if isinstance(v, Tensor) and v.ndim >= 1 else v


def _unpatchify(tokens: Tensor, p: int, c: int) -> Tensor:
    """``[B, N, p*p*C] -> [B, C, H, W]`` exactly as diffusers' DiT does (square token grids)."""
    hw = int(tokens.shape[1] ** 0.5)
    x = tokens.reshape(-1, hw, hw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(-1, c, hw * p, hw * p)


def _exit_forward(model: nn.Module, cfg: EarlyExitConfig, stats: dict, hidden_states: Tensor, timestep=None,
                  class_labels=None, cross_attention_kwargs=None, return_dict: bool = True):
    """DiTTransformer2DModel.forward with exits (same operations in the same order when nobody exits)."""
    heads, thr = cfg.heads, float(cfg.threshold)
    blocks = model.transformer_blocks
    n_layers, p, c_out = len(blocks), model.config.patch_size, model.out_channels
    h = model.pos_embed(hidden_states)
    b = h.shape[0]
    cond = blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
    out = None
    active: Tensor | None = None  # indices into the batch of the samples still running (None: all of them)
    t_act, y_act, c_act = timestep, class_labels, cond
    depth_of = torch.full((b,), n_layers, dtype=torch.long)
    for i, block in enumerate(blocks):
        h = block(h, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, timestep=t_act,
                  cross_attention_kwargs=cross_attention_kwargs, class_labels=y_act)
        depth = i + 1
        if depth < cfg.min_depth or depth >= n_layers:
            continue
        u = heads.uncertainty(depth, h, c_act)
        leave = u < thr if cfg.per_sample else (u.mean() < thr).expand_as(u)
        if not bool(leave.any()):
            continue
        if out is None:
            if cfg.per_sample and b > 1 and any(getattr(o, "batch_state", False)
                                                for o in active_handles(model).values()):
                raise RuntimeError("per-sample early exit shrinks the batch inside the network, which diffusers' "
                                   "caching hooks on the blocks (TaylorSeer, FirstBlockCache, ...) cannot follow; "
                                   "use EarlyExitConfig(..., per_sample=False) together with them")
            out = h.new_zeros(b, h.shape[1], heads.out)
            active = torch.arange(b, device=h.device)
            t_act, y_act = _batch(t_act, b), _batch(y_act, b)
        idx = active[leave]
        out[idx] = heads.output(depth, h[leave], c_act[leave])
        depth_of[idx.cpu()] = depth
        keep = ~leave
        active, h, c_act = active[keep], h[keep], c_act[keep]
        t_act, y_act = _take(t_act, keep), _take(y_act, keep)
        if active.numel() == 0:
            break
    if active is None or active.numel():
        shift, scale = model.proj_out_1(F.silu(c_act)).chunk(2, dim=1)
        h = model.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        h = model.proj_out_2(h)
        if out is None:
            out = h
        else:
            out[active] = h
    output = _unpatchify(out, p, c_out)
    stats["samples"] += b
    stats["exits"] += int((depth_of < n_layers).sum())
    stats["blocks_run"] += int(depth_of.sum())
    for d in depth_of.tolist():
        stats["depth_counts"][d - 1] += 1
    stats["exit_rate"] = stats["exits"] / stats["samples"]
    stats["mean_depth"] = stats["blocks_run"] / stats["samples"]
    t = timestep.max() if isinstance(timestep, Tensor) and timestep.numel() else timestep
    stats["per_call"].append((float(t) if t is not None else math.nan, float(depth_of.double().mean())))
    if not return_dict:
        return (output,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=output)


def apply_early_exit(model_or_pipeline: Any, config: EarlyExitConfig) -> Handle:
    """DeeDiff early exit (Tang et al. 2023) on a DiT: see the module docstring for the mechanism and ``stats``.

    ``threshold = 0`` is a no-op (the model's own forward runs, bit for bit). Raises ``TypeError`` for models that
    cannot stop half-way (UNets), ``ValueError`` for heads built for another model, ``RuntimeError`` when early exit
    is already applied to this model.
    """
    if not isinstance(config, EarlyExitConfig):
        raise TypeError(f"config must be an EarlyExitConfig, got {type(config).__name__}")
    model = resolve_model(model_or_pipeline, method="apply_early_exit")
    _require_dit(model)
    config.heads.check(model)
    h = Handle("early_exit", model, {"calls": 0, "samples": 0, "exits": 0, "exit_rate": 0.0, "blocks_run": 0,
                                     "mean_depth": 0.0, "depth_counts": [0] * config.heads.n_layers, "per_call": []})
    claim(model, "early_exit", h, excludes=("first_block_cache", "mag_cache"),
          why="early exit skips the last blocks, which First Block Cache and MagCache need to run at every full call "
              "(they cache the residual of the whole block stack)")
    n_layers = config.heads.n_layers

    def wrapper(call_next, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None,
                return_dict=True, **kwargs):
        if kwargs:
            raise TypeError(f"early exit does not know the arguments {sorted(kwargs)}")
        h.stats["calls"] += 1
        if config.threshold == 0:  # the no-op: the model's own forward
            b = hidden_states.shape[0]
            h.stats["samples"] += b
            h.stats["blocks_run"] += b * n_layers
            h.stats["depth_counts"][-1] += b
            h.stats["mean_depth"] = h.stats["blocks_run"] / h.stats["samples"]
            t = timestep.max() if isinstance(timestep, Tensor) and timestep.numel() else timestep
            h.stats["per_call"].append((float(t) if t is not None else math.nan, float(n_layers)))
            return call_next(hidden_states, timestep=timestep, class_labels=class_labels,
                             cross_attention_kwargs=cross_attention_kwargs, return_dict=return_dict)
        return _exit_forward(model, config, h.stats, hidden_states, timestep, class_labels, cross_attention_kwargs,
                             return_dict)

    patch_forward(model, wrapper, h)
    return h


# ----------------------------------------------------------------------------------------------- training
def block_outputs(model: nn.Module, x: Tensor, timestep: Tensor, **cond) -> tuple[list[Tensor], Tensor, Tensor]:
    """``(hidden states after every block, conditioning embedding c, final output tokens)`` of one DiT call, by
    a :func:`dmlab.hooks.capture` of the blocks (no patching). The final tokens are ``proj_out_2``'s output (before unpatchify)."""
    hs: list[Tensor] = []
    final: list[Tensor] = []
    blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    with capture(model, blocks, detach=False, sink=hs), capture(model, "proj_out_2", detach=False, sink=final):
        model(x, timestep=timestep, **cond)
    c = model.transformer_blocks[0].norm1.emb(timestep, cond.get("class_labels"), hidden_dtype=hs[0].dtype)
    return hs, c, final[0]


def train_exit_heads(model: Any, x0: Tensor, labels: Tensor, sigmas_train: Tensor, *, generator: torch.Generator,
                     heads: ExitHeads | None = None, steps: int = 400, batch_size: int = 128, lr: float = 2e-3,
                     p_uncond: float = 0.1, null_class: int = 10, progress: bool = False) -> tuple[ExitHeads, dict]:
    """Train DeeDiff exit heads and UEMs (Tang et al. 2023) on a frozen DiT; return ``(heads, log)``.

    Each step draws ``batch_size`` training images ``x0`` (with ``labels``; replaced by ``null_class`` with
    probability ``p_uncond``, as the zoo models were trained), a DDPM timestep ``t`` uniform over the training
    schedule ``sigmas_train`` (e.g. ``denoiser.sigmas_train``) and noise, all from ``generator``, and runs the frozen
    model once. Loss per exit ``i``: ``(2 - u_i) mse(g_i, y) + (u_i - tanh(mae(g_i, y)))^2`` with ``y`` the full
    model's output tokens (the module docstring says why). AdamW, cosine learning-rate decay (:func:`dmlab.train.fit`). ``log`` has the loss
    curve (every 10 steps), the final per-exit error and seconds.
    """
    model = resolve_model(model, method="train_exit_heads")
    _require_dit(model)
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"steps and batch_size must be ints >= 1, got {steps!r}, {batch_size!r}")
    if x0.shape[0] != labels.shape[0]:
        raise ValueError(f"x0 and labels must have the same length, got {x0.shape[0]} and {labels.shape[0]}")
    heads = heads if heads is not None else exit_heads_for(model)
    heads.check(model)
    dev = next(model.parameters()).device
    ac = (1 / (1 + sigmas_train.detach().double().cpu() ** 2)).float()
    c_in = model.config.in_channels
    from ..train import FitConfig, ddpm_batch, fit

    req = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)

    def draw(g):
        b = ddpm_batch(x0, ac, batch_size, g, labels=labels, p_uncond=p_uncond, null_class=null_class)
        return b["xt"], b["t"], b["y"]

    def loss_of(b):
        xt, t, y = b
        with torch.no_grad():
            hs, c, target = block_outputs(model, xt.to(dev), t.to(dev), class_labels=y.to(dev))
        loss = 0.0
        for d in range(1, heads.n_layers):
            g = heads.output(d, hs[d - 1], c)
            u = heads.uncertainty(d, hs[d - 1], c)
            # the eps channels only, not DiT's learned-variance channels
            err = (g - target).reshape(*g.shape[:2], -1, model.out_channels)[..., :c_in]
            mse = err.pow(2).flatten(1).mean(1)
            mae = err.abs().flatten(1).mean(1)
            loss = loss + ((2 - u.detach()) * mse).mean() + (u - torch.tanh(mae.detach())).pow(2).mean()
        return loss / (heads.n_layers - 1)

    cfg = FitConfig(steps=steps, lr=lr, optimizer="adamw", schedule="cosine", log_every=10, progress=progress,
                    desc="exit heads")
    try:
        res = fit(loss_of, heads, cfg, generator=generator, data=draw)
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    log = {"loss": [(s, v) for s, v in enumerate(res.losses) if s % 10 == 0 or s == steps - 1], "steps": steps,
           "batch_size": batch_size, "lr": lr, "train_seconds": round(res.seconds, 1)}
    return heads, log


# ----------------------------------------------------------------------------------------------- storage
def save_exit_heads(heads: ExitHeads, name: str, *, base: str, recipe: dict, log: dict, root=None) -> dict:
    """Register trained exit heads in the zoo (``data/zoo/<name>/``; :mod:`dmlab.accelerators._assets`)."""
    from ._assets import save_adapter

    return save_adapter(name, heads, kind="exit_heads", base=base, config=heads.config(), recipe=recipe,
                        description=f"DeeDiff exit heads and UEMs for {base} (paper 53)", log=log, root=root)


def load_exit_heads(name: str, *, device: str = "cpu", root=None) -> ExitHeads:
    """Exit heads registered with :func:`save_exit_heads`, after checking their sha256 (``FileNotFoundError`` if
    absent: train them with :func:`build_exit_heads`); ``heads.info`` is their registry entry."""
    from ._assets import load_adapter

    state, config, entry = load_adapter(name, kind="exit_heads", root=root)
    heads = ExitHeads(**config)
    heads.load_state_dict(state)
    heads.info = entry  # the registry entry: recipe, params, training steps and seconds
    return heads.to(device).eval()


def build_exit_heads(name: str | None = "dit_l_exit", recipe: dict | None = None, *, steps: int | None = None,
                     root=None, progress: bool = False, device: str = "cpu") -> ExitHeads:
    """Train exit heads with ``recipe`` (default :data:`EXIT_RECIPE`) on its zoo base model and, when ``name`` is
    given, register them under that name (the training log is kept as ``heads.train_log``). ``steps`` overrides the
    recipe's step count (a quick stand-in when the committed heads are missing; it is then not saved)."""
    from .. import zoo
    from ..data import load_digits

    recipe = dict(EXIT_RECIPE if recipe is None else recipe)
    den, model = zoo.load_denoiser(recipe["base"], root=root, device=device)
    x0, y0 = load_digits("train")
    heads, log = train_exit_heads(model, x0, y0, den.sigmas_train,
                                  generator=torch.Generator().manual_seed(recipe["seed"]),
                                  steps=steps or recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                                  p_uncond=recipe["p_uncond"], progress=progress)
    log.update(torch_threads=torch.get_num_threads(), device=device)
    if name is not None and steps is None:
        save_exit_heads(heads, name, base=recipe["base"], recipe=recipe, log=log, root=root)
    heads.train_log = log
    return heads
