"""Read what a frozen network computes: forward hooks that record named submodules, and diffusion features.

* :func:`capture` - a context manager (and handle) over ``register_forward_hook`` that records the outputs of named
  submodules. It never edits the model: the hooks return ``None`` (so the output is bit-identical) and every hook is
  removed when the block ends, also when an exception is raised inside it (CONVENTIONS §1.5).
* :func:`extract_features` - the DIFT / SD-DINO recipe (Tang et al. 2023; Zhang et al. 2023, paper 10): noise a clean
  input to one sigma, make *one* denoiser call, read the hooked blocks, average over ``ensemble`` noise draws.
  Works for any denoiser wrapping a diffusers ``UNet2DModel``, ``UNet2DConditionModel`` (pass ``cond=
  {"encoder_hidden_states": ...}``) or ``DiTTransformer2DModel`` (token outputs are reshaped to a grid).
* :func:`vit_features` - the same for a ViT encoder such as ``transformers.Dinov2Model`` (DINOv2, Oquab et al. 2024):
  patch tokens of a layer reshaped to a ``[B, D, H/p, W/p]`` grid, CLS and register tokens dropped.
"""
from __future__ import annotations

import difflib
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["Capture", "capture", "extract_features", "vit_features", "tokens_to_grid", "as_tensor_output"]


def as_tensor_output(out) -> Tensor:
    """The hidden state in a module's output: the tensor itself, ``out[0]`` of a tuple/list (diffusers down blocks
    return ``(hidden, res_samples)``, transformers layers ``(hidden, attn)``), ``.sample`` or ``.last_hidden_state``
    of an output object."""
    if isinstance(out, Tensor):
        return out
    for attr in ("sample", "last_hidden_state"):
        v = getattr(out, attr, None)
        if isinstance(v, Tensor):
            return v
    if isinstance(out, (tuple, list)) and out:
        return as_tensor_output(out[0])
    if isinstance(out, dict) and out:
        return as_tensor_output(next(iter(out.values())))
    raise TypeError(f"cannot read a tensor from a module output of type {type(out).__name__}")


def _check_layers(model: nn.Module, layers) -> list[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the network, not its Denoiser wrapper), "
                        f"got {type(model).__name__}")
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty; name at least one submodule, e.g. 'down_blocks.1' (see model.named_modules())")
    if not all(isinstance(n, str) for n in layers):
        raise TypeError("layers must be submodule names (str), as listed by model.named_modules()")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has duplicates: {layers}")
    names = dict(model.named_modules())
    for n in layers:
        if n not in names:
            close = difflib.get_close_matches(n, [k for k in names if k], n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                "; list the names with [n for n, _ in model.named_modules()]"
            raise ValueError(f"{type(model).__name__} has no submodule named {n!r}{hint}")
    return layers


class Capture:
    """Records the outputs of named submodules while active; returned by :func:`capture`.

    ``outputs[name]`` is the hidden state of the *last* call of that module (detached; tuple outputs give their first
    element); with ``keep_all=True`` ``history[name]`` lists every call's output. ``calls[name]`` counts the calls.
    ``remove()`` (or leaving the ``with`` block) removes every hook; it is idempotent.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], *, keep_all: bool = False, detach: bool = True):
        self.layers = _check_layers(model, layers)
        self.model, self.keep_all, self.detach = model, bool(keep_all), bool(detach)
        self.outputs: dict[str, Tensor] = {}
        self.history: dict[str, list[Tensor]] = {n: [] for n in self.layers}
        self.calls: dict[str, int] = {n: 0 for n in self.layers}
        self._handles = []
        modules = dict(model.named_modules())
        try:
            for n in self.layers:
                self._handles.append(modules[n].register_forward_hook(self._hook(n)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, name: str) -> Callable:
        def hook(module, args, out):
            h = as_tensor_output(out)
            h = h.detach().clone() if self.detach else h
            self.outputs[name] = h
            self.calls[name] += 1
            if self.keep_all:
                self.history[name].append(h)
            return None  # never replace the output

        return hook

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.outputs:
            raise KeyError(f"{name!r} has not run yet (captured: {sorted(self.outputs)}); call the model inside the block")
        return self.outputs[name]

    def clear(self) -> None:
        """Forget what was recorded (the hooks stay)."""
        self.outputs.clear()
        for n in self.layers:
            self.history[n].clear()
            self.calls[n] = 0

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook this capture installed (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def capture(model: nn.Module, layers, *, keep_all: bool = False, detach: bool = True) -> Capture:
    """Record the outputs of ``model``'s submodules named in ``layers`` (names from ``model.named_modules()``).

    >>> with capture(unet, ["down_blocks.1", "mid_block"]) as cap:
    ...     unet(x, timestep=t)
    >>> cap["mid_block"].shape

    Hooks are forward hooks that return ``None``, so the model's output is unchanged bit for bit; they are removed
    when the block ends, also on an exception. A misspelt name raises ``ValueError`` with the closest names
    (difflib). Used by the feature probes of papers 10, 33, 35 and 54.
    """
    return Capture(model, layers, keep_all=keep_all, detach=detach)


# ----------------------------------------------------------------------------------------------- token grids
def tokens_to_grid(tokens: Tensor, height: int, width: int, *, n_prefix: int = 0) -> Tensor:
    """``[B, n_prefix + height*width, D]`` tokens -> ``[B, D, height, width]`` (prefix tokens such as CLS and
    registers are dropped); row-major patch order, as ViT/DINOv2 and diffusers' DiT patchify. The token-to-grid step
    of SD-DINO's DINOv2 branch (paper 10)."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape [B, N, D], got {tuple(tokens.shape)}")
    B, N, D = tokens.shape
    if N - n_prefix != height * width:
        raise ValueError(f"{N} tokens minus {n_prefix} prefix tokens do not fill a {height}x{width} grid; "
                         f"check the patch size and the number of CLS/register tokens")
    return tokens[:, n_prefix:].transpose(1, 2).reshape(B, D, height, width)


def _grid_of(h: Tensor, x: Tensor) -> Tensor:
    """A DiT block's ``[B, N, D]`` tokens on the grid of image ``x`` ``[B, C, H, W]``; other outputs unchanged."""
    if h.ndim != 3 or x.ndim != 4:
        return h
    H, W = x.shape[-2:]
    N = h.shape[1]
    p2 = H * W / N
    p = round(p2 ** 0.5)
    if p < 1 or p * p * N != H * W or H % p or W % p:
        return h
    return tokens_to_grid(h, H // p, W // p)


def _repeat_cond(cond: dict, k: int, batch: int) -> dict:
    """Repeat every batch-shaped tensor of ``cond`` ``k`` times along dim 0 (ensemble batching)."""
    out = {}
    for name, v in cond.items():
        if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == batch:
            out[name] = v.repeat(k, *([1] * (v.ndim - 1)))
        else:
            out[name] = v
    return out


@torch.no_grad()
def extract_features(denoiser: Callable, net: nn.Module, x0: Tensor, sigma, layers, *, ensemble: int = 1,
                     generator: torch.Generator | None = None, cond: dict | None = None,
                     batch_ensemble: bool = True) -> dict[str, Tensor]:
    """Diffusion features of clean inputs: noise to ``sigma``, one denoiser call, read the hooked blocks.

    The DIFT recipe (Tang et al. 2023) used by SD-DINO (Zhang et al. 2023, paper 10) and the linear probes of
    "Diffusion models beat GANs on image classification" (Mukhopadhyay et al. 2023, paper 54):
    ``x = x0 + sigma * eps``, ``denoiser(x, sigma, **cond)`` once, ``f = mean_{eps} block(x)`` over ``ensemble``
    independent draws of ``eps`` (all from ``generator``). ``net`` is the network inside ``denoiser`` whose
    submodules ``layers`` name (e.g. ``"up_blocks.1"`` of a ``UNet2DModel``; ``"transformer_blocks.2"`` of a DiT,
    whose ``[B, N, D]`` tokens come back as a ``[B, D, H/p, W/p]`` grid). ``sigma`` is in the VE convention of
    :mod:`dmlab.denoisers` (``DiscreteVPDenoiser`` turns it into the network's timestep). ``sigma = 0`` reads the
    clean input. With ``batch_ensemble`` the draws run as one batch of ``ensemble * B``.

    Returns ``{layer: [B, ...]}`` (float, on the network's device).
    """
    if not callable(denoiser):
        raise TypeError("denoiser must be callable: D(x, sigma, **cond), e.g. DiscreteVPDenoiser(unet, alphas_cumprod)")
    if not isinstance(x0, Tensor) or x0.ndim < 2:
        raise ValueError("x0 must be a tensor of clean inputs [B, ...] (images [B, C, H, W])")
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble must be an int >= 1 (the number of noise draws averaged), got {ensemble!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. the one dmlab.setup returns)")
    if cond is not None and not isinstance(cond, dict):
        raise TypeError("cond must be a dict of keyword arguments, e.g. {'encoder_hidden_states': emb}")
    from ..denoisers import as_sigma, bcast

    sig = as_sigma(sigma, x0)  # raises on negative / non-finite sigma
    layers = _check_layers(net, layers)
    cond = dict(cond or {})
    B = x0.shape[0]
    eps = torch.randn((ensemble, *x0.shape), generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    sums: dict[str, Tensor] = {}
    with capture(net, layers) as cap:
        if batch_ensemble:
            x = (x0[None] + bcast(sig, x0)[None] * eps).reshape(ensemble * B, *x0.shape[1:])
            denoiser(x, sig.repeat(ensemble), **_repeat_cond(cond, ensemble, B))
            for n in layers:
                h = _grid_of(cap[n], x)
                sums[n] = h.reshape(ensemble, B, *h.shape[1:]).float().sum(0)
        else:
            for e in range(ensemble):
                denoiser(x0 + bcast(sig, x0) * eps[e], sig, **cond)
                for n in layers:
                    h = _grid_of(cap[n], x0).float()
                    sums[n] = h if n not in sums else sums[n] + h
    return {n: s / ensemble for n, s in sums.items()}


@torch.no_grad()
def vit_features(model: nn.Module, pixel_values: Tensor, layers, *, patch_size: int | None = None,
                 n_prefix: int | None = None) -> dict[str, Tensor]:
    """Patch-token features of a ViT (e.g. ``transformers.Dinov2Model``, DINOv2 of Oquab et al. 2024, the second
    extractor of SD-DINO, paper 10) reshaped to ``[B, D, H/p, W/p]``.

    ``layers`` name submodules such as ``"encoder.layer.11"`` or ``"layernorm"``. The patch size and the number of
    prefix tokens (1 CLS + ``num_register_tokens``) are read from ``model.config`` unless given. The image sides must
    be multiples of the patch size.
    """
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
        raise ValueError("pixel_values must be images [B, C, H, W]")
    cfg = getattr(model, "config", None)
    p = patch_size or getattr(cfg, "patch_size", None)
    if not p:
        raise ValueError("pass patch_size (the model has no config.patch_size)")
    if n_prefix is None:
        n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    H, W = pixel_values.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} must be a multiple of the patch size {p}; resize or crop first")
    layers = _check_layers(model, layers)
    with capture(model, layers) as cap:
        model(pixel_values)
        return {n: tokens_to_grid(cap[n], H // p, W // p, n_prefix=n_prefix).float() for n in layers}
