"""SpeedUpNet: a plug-in adapter on the cross-attention layers that gives classifier-free guidance in one pass.

Chai et al. (2024), :cite:`chai2024speedupnet`: classifier-free guidance with a negative prompt ``c-`` samples with
``D(x, c-) + w (D(x, c+) - D(x, c-))``, two network calls per step. SpeedUpNet (SUN) adds to every cross-attention
layer of the text-to-image UNet a branch that reads *both* prompts and adds the offset the negative prompt causes
relative to the positive one; trained to reproduce the guided output, the UNet with the adapter needs one call per
step, and because the adapter is a separate set of weights it can be plugged into *fine-tuned* versions of the base
UNet without retraining.

* :class:`NegativeOffsetAdapter` -- the weights: per cross-attention layer ``l`` its own key and value projections
  ``K'_l, V'_l`` (initialised as copies of the layer's) and a gain ``g_l`` (initialised at zero). With the layer's
  query ``Q = to_q(h)``, the offset is the difference of two softmax attentions over the same query,
  ``delta_l = Attn(Q, K'_l c+, V'_l c+) - Attn(Q, K'_l c-, V'_l c-)`` (multi-head, as the layer's own), and the
  layer's output becomes ``to_out(Attn(Q, K c+, V c+)) + g_l (w - 1) W_out delta_l``. Both attentions are row-
  normalised over the same query (our reading of the paper's attention normalisation; no official code is public),
  so the offset is bounded by the range of the values and vanishes when the two prompts agree; ``w = 1`` is exactly
  the conditional model, as for guidance itself, and a fresh adapter (``g = 0``) is exactly the base UNet.
* :class:`SpeedUpStudent` -- the UNet with an adapter plugged in through the library's hook layer
  (:mod:`dmlab.hooks`; ``remove()`` restores the UNet bit for bit): ``student(x, sigma, w=w,
  encoder_hidden_states=pos, negative_hidden_states=neg)``, one network call. It has the signature of
  :class:`dmlab.distill.guidance.WStudent`, so :func:`dmlab.distill.guidance.guidance_distill` trains it (stage-1
  regression on the two-call guided teacher, the adapter's tensors only); ``student.teacher`` is the base UNet that
  ignores the negative prompt, and :func:`negative_uncond` turns the condition into the teacher's unconditional
  call, so ``GuidedTeacher(student.teacher, negative_uncond)`` is the two-call competitor on the same condition.
* :func:`train_speedup_entry` / :func:`load_speedup_entry` -- the zoo entry ``speedup_adapters`` on ``sd_tiny``:
  adapters of three training seeds, and a fine-tuned copy of the base UNet (LoRA, ``dmlab.finetuning``, on digits
  with thicker strokes) into which the same adapters are plugged unchanged.
* :func:`sd_speedup_distill` -- the full-scale path on a diffusers Stable Diffusion pipeline.

Not reproduced: the paper's Multi-Step Consistency (MSC) loss for 4-step sampling; the adapter here is trained by
the stage-1 regression alone. Every denoiser is in the VE convention of :mod:`dmlab.denoisers`.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..anatomy import cross_attention_names
from ..hooks import Handle, add_hook, input_tensor

__all__ = ["NegativeOffsetAdapter", "SpeedUpStudent", "negative_uncond", "SPEEDUP_KEYS", "thick_digits", "prompt_table",
           "train_speedup_entry", "load_speedup_entry", "SpeedUpEntry", "sd_speedup_distill"]


def _plain_linear(lin: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` copy of ``lin`` (of its base layer when a peft adapter wraps it)."""
    lin = getattr(lin, "base_layer", lin)
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        out.weight.copy_(lin.weight)
        if lin.bias is not None:
            out.bias.copy_(lin.bias)
    return out.to(lin.weight.device, lin.weight.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head softmax attention ``[B, N, C]`` (scale ``1/sqrt(C / heads)``, as diffusers' ``Attention``)."""
    b, n, c = q.shape
    split = lambda t: t.reshape(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)


class NegativeOffsetAdapter(nn.Module):
    """SpeedUpNet's adapter weights for the cross-attention layers ``layers`` of ``unet`` (default: every one,
    :func:`dmlab.anatomy.cross_attention_names`): per layer a key and a value projection (copies of the layer's)
    and a gain initialised at zero. The state dict does not hold the UNet, so one adapter plugs into any UNet with
    the same layer names and widths (a fine-tuned copy). See the module docstring for the offset it computes."""

    def __init__(self, unet: nn.Module, layers=None):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        names = list(cross_attention_names(unet) if layers is None else layers)
        if not names:
            raise ValueError("the network has no cross-attention layers (diffusers Attention modules named attn2); "
                             "SpeedUpNet needs a text-conditioned UNet such as Stable Diffusion's")
        mods = dict(unet.named_modules())
        bad = [n for n in names if n not in mods or not getattr(mods[n], "is_cross_attention", False)]
        if bad:
            raise ValueError(f"not cross-attention layers of this network: {bad[:3]}; use names from "
                             "dmlab.anatomy.cross_attention_names(unet)")
        self.layers = names
        self.heads = [int(mods[n].heads) for n in names]
        self.to_k = nn.ModuleList(_plain_linear(mods[n].to_k) for n in names)
        self.to_v = nn.ModuleList(_plain_linear(mods[n].to_v) for n in names)
        self.gain = nn.Parameter(torch.zeros(len(names), device=self.to_k[0].weight.device))

    def offset(self, i: int, q: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """``delta_i = Attn(q, K'_i pos, V'_i pos) - Attn(q, K'_i neg, V'_i neg)``, ``[B, N, C]`` (before
        ``to_out`` and the gain)."""
        k, v, h = self.to_k[i], self.to_v[i], self.heads[i]
        return _attend(q, k(pos), v(pos), h) - _attend(q, k(neg), v(neg), h)


def negative_uncond(cond: dict) -> dict:
    """The unconditional call of classifier-free guidance with a negative prompt: the condition's
    ``negative_hidden_states`` as the UNet's ``encoder_hidden_states`` (for
    :class:`dmlab.distill.guidance.GuidedTeacher` and :func:`dmlab.distill.guidance.guidance_distill`)."""
    if not isinstance(cond, dict) or "negative_hidden_states" not in cond:
        raise ValueError("the condition must hold negative_hidden_states (the negative prompt's text embeddings, "
                         "the same shape as encoder_hidden_states; the empty prompt's for plain guidance)")
    return {"encoder_hidden_states": cond["negative_hidden_states"]}


class SpeedUpStudent:
    """The UNet ``unet`` with the adapter ``adapter`` plugged into its cross-attention layers (forward hooks owned
    by ``self.handle``); ``wrap(unet)`` is the denoiser around it (``DiscreteVPDenoiser.from_scheduler(unet,
    scheduler)``).

    ``student(x, sigma, w=w, encoder_hidden_states=pos, negative_hidden_states=neg)``: one network call that
    approximates the guided ``D(x, neg) + w (D(x, pos) - D(x, neg))`` once trained. ``teacher(x, sigma, **cond)``
    is the plain UNet (adapter off, ``negative_hidden_states`` ignored). ``modules`` holds what trains (the
    adapter); the UNet's own weights are frozen. ``remove()`` unplugs the adapter.
    """

    calls_per_step = 1

    def __init__(self, unet: nn.Module, adapter: NegativeOffsetAdapter, wrap: Callable[[nn.Module], Callable]):
        if not isinstance(adapter, NegativeOffsetAdapter):
            raise TypeError("adapter must be a NegativeOffsetAdapter (dmlab.distill.speedup)")
        if not callable(wrap):
            raise TypeError("wrap must be callable: wrap(unet) -> denoiser D(x, sigma, **cond)")
        mods = dict(unet.named_modules()) if isinstance(unet, nn.Module) else {}
        missing = [n for n in adapter.layers if not getattr(mods.get(n), "is_cross_attention", False)]
        if missing:
            raise ValueError(f"the adapter does not fit this UNet: no cross-attention layers {missing[:3]}")
        for n, k in zip(adapter.layers, adapter.to_k):
            if getattr(mods[n].to_k, "in_features", k.in_features) != k.in_features or \
                    mods[n].to_q.out_features != k.out_features:
                raise ValueError(f"the adapter's layer {n} has widths {k.in_features}->{k.out_features}, the UNet's "
                                 "differ: an adapter plugs only into the UNet it was trained on or a fine-tuned "
                                 "copy of it")
        for n in adapter.layers:
            a = mods[n]
            if getattr(a, "residual_connection", False) or getattr(a, "rescale_output_factor", 1.0) != 1.0 or \
                    any(getattr(a, k, None) is not None for k in ("norm_cross", "group_norm", "spatial_norm")):
                raise ValueError(f"cross-attention {n} normalises its inputs or rescales its output; the adapter "
                                 "adds its offset after to_out and supports Stable Diffusion's plain layers only")
        p = next(unet.parameters())
        self.net, self.adapter = unet, adapter.to(p.device)
        self.denoiser = wrap(unet)
        self.modules = nn.ModuleDict({"adapter": self.adapter})
        self._neg: Tensor | None = None
        self._w: Tensor | None = None
        self.handle = Handle("speedup_adapter", unet)
        for i, name in enumerate(adapter.layers):
            add_hook(mods[name], self._hook(i), self.handle, pre=False, with_kwargs=True)

    def _hook(self, i: int):
        def fn(module, args, kwargs, out):
            if self._neg is None:
                return None
            h, pos = input_tensor(args, kwargs), kwargs.get("encoder_hidden_states")
            if h is None or h.ndim != 3 or pos is None:
                raise ValueError("SpeedUpNet expects cross-attention called as attn(hidden [B, N, C], "
                                 "encoder_hidden_states=[B, L, D]) (diffusers' BasicTransformerBlock)")
            d = self.adapter.offset(i, module.to_q(h), pos, self._neg.to(pos.dtype))
            d = d * (self.adapter.gain[i] * (self._w - 1)).view(-1, 1, 1).to(d.dtype)
            lin = module.to_out[0]  # to_out is affine: its bias cancels in lin(d) - lin(0)
            return out + (lin(d) - lin(torch.zeros_like(d[:1, :1])))
        return fn

    def __call__(self, x: Tensor, sigma, *, w, encoder_hidden_states: Tensor, negative_hidden_states: Tensor,
                 **cond) -> Tensor:
        from .guidance import _per_sample

        if not isinstance(negative_hidden_states, Tensor) or \
                negative_hidden_states.shape != encoder_hidden_states.shape:
            raise ValueError("negative_hidden_states must be a tensor shaped like encoder_hidden_states, got "
                             f"{getattr(negative_hidden_states, 'shape', type(negative_hidden_states).__name__)} "
                             f"and {tuple(encoder_hidden_states.shape)}")
        self._w, self._neg = _per_sample(w, x), negative_hidden_states
        try:
            return self.denoiser(x, sigma, encoder_hidden_states=encoder_hidden_states, **cond)
        finally:
            self._w = self._neg = None

    def teacher(self, x: Tensor, sigma, *, negative_hidden_states=None, w=None, **cond) -> Tensor:
        """The base denoiser, one call with the adapter off: ``D(x, sigma, **cond)`` (the conditional model; ``w``
        and the negative prompt are ignored)."""
        return self.denoiser(x, sigma, **cond)

    def remove(self) -> None:
        """Unplug the adapter (the UNet is restored bit for bit)."""
        self.handle.remove()

    def eval(self) -> "SpeedUpStudent":
        self.modules.eval()
        return self


# ----------------------------------------------------------------------------------------------- the zoo entry
SPEEDUP_KEYS = ("seeds", "steps", "batch", "lr", "w", "p_empty_negative", "ft_steps", "ft_batch", "ft_lr",
                "ft_rank", "ft_targets")


def _speedup_config(config) -> dict:
    if not isinstance(config, dict) or set(SPEEDUP_KEYS) - set(config):
        raise ValueError(f"config must be the speedup_adapters recipe's model dict with keys {SPEEDUP_KEYS} "
                         "(dmlab.zoo.get_recipe('speedup_adapters').model)")
    return dict(config)


def thick_digits(x: Tensor) -> Tensor:
    """Digits ``[B, 1, H, W]`` in ``[-1, 1]`` with thicker strokes (a 3x3 grey dilation): the new style the
    fine-tuned copy of ``sd_tiny`` learns."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError("x must be images [B, 1, H, W] in [-1, 1]")
    return F.max_pool2d(x, 3, stride=1, padding=1)


def prompt_table(pipe) -> tuple[Tensor, Tensor]:
    """Text embeddings of every (digit, template) prompt of ``sd_tiny`` (``pipe``) ``[10, T, L, D]`` (template 0:
    "a handwritten seven") and of the empty prompt ``[1, L, D]``."""
    from ..zoo.latent import prompt
    from ..zoo.recipes import MAX_LENGTH, TEMPLATES

    def enc(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    table = torch.stack([enc([prompt(c, t) for t in range(len(TEMPLATES))]) for c in range(10)])
    return table, enc([""])


def _latents(pipe, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([pipe.vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)]) \
            * pipe.vae.config.scaling_factor


def _finetune_thick(pipe, cfg, table, empty, x, y, progress):
    """LoRA fine-tune of a copy of ``pipe.unet`` on thick-stroke digits (DDPM loss, prompts as in ``sd_tiny``'s
    training, 10 % empty prompts)."""
    from ..finetuning import adapt, ddpm_loss
    from ..train import FitConfig, fit

    z0 = _latents(pipe, thick_digits(x))
    ac = pipe.scheduler.alphas_cumprod.float()
    ad = adapt(pipe.unet, "lora", rank=cfg["ft_rank"], target_modules=list(cfg["ft_targets"]), init_seed=2430)
    n_t = table.shape[1]

    def data(g):
        b = cfg["ft_batch"]
        idx = torch.randint(len(z0), (b,), generator=g)
        t = torch.randint(len(ac), (b,), generator=g)
        eps = torch.randn(b, *z0.shape[1:], generator=g)
        tmpl = torch.randint(n_t, (b,), generator=g)
        drop = torch.rand(b, generator=g) < 0.1
        a = ac[t].view(-1, 1, 1, 1)
        e = torch.where(drop.view(-1, 1, 1), empty, table[y[idx], tmpl])
        return {"x0": z0[idx], "t": t, "eps": eps, "xt": a.sqrt() * z0[idx] + (1 - a).sqrt() * eps,
                "encoder_hidden_states": e}

    res = fit(lambda b: ddpm_loss(ad.model, b), ad.model, FitConfig(steps=cfg["ft_steps"], lr=cfg["ft_lr"],
              optimizer="adam", log_every=max(1, cfg["ft_steps"] // 4), progress=progress, desc="thick LoRA"),
              generator=torch.Generator().manual_seed(2430), data=data, params=list(ad.params))
    ad.model.eval().requires_grad_(False)
    return ad.model, res


def _speedup_data(z0, y, table, empty, p_empty):
    """``data(g, n) -> (x0, cond)``: latents of train digits, their prompt (random template) and a negative prompt
    (empty with probability ``p_empty``, else a random other digit's prompt)."""
    n_t = table.shape[1]

    def data(g, n):
        idx = torch.randint(len(z0), (n,), generator=g)
        tp, tn = torch.randint(n_t, (n,), generator=g), torch.randint(n_t, (n,), generator=g)
        other = (y[idx] + torch.randint(1, 10, (n,), generator=g)) % 10
        empty_neg = torch.rand(n, generator=g) < p_empty
        neg = torch.where(empty_neg.view(-1, 1, 1), empty, table[other, tn])
        return z0[idx], {"encoder_hidden_states": table[y[idx], tp], "negative_hidden_states": neg}

    return data


def _wrap(scheduler):
    from ..denoisers import DiscreteVPDenoiser

    return lambda m: DiscreteVPDenoiser.from_scheduler(m, scheduler)


def train_speedup_entry(config: dict, *, progress: bool = False) -> tuple[dict, dict]:
    """Train the zoo entry ``speedup_adapters`` on ``sd_tiny`` (``config`` is the recipe's model dict).

    * per training seed ``s``: a fresh :class:`NegativeOffsetAdapter` on ``sd_tiny``'s UNet, trained by
      :func:`dmlab.distill.guidance.guidance_distill` (``steps`` x ``batch``, Adam at ``lr``, generator seed
      ``2440 + s``) to reproduce classifier-free guidance at weight ``w`` with a negative prompt: the empty prompt
      with probability ``p_empty_negative``, else another digit's prompt; data = latents of the train digits;
    * once: ``ft``, a rank-``ft_rank`` LoRA (``dmlab.finetuning.adapt``) of a copy of the UNet on ``ft_targets``,
      fine-tuned for ``ft_steps`` on :func:`thick_digits` (the adapters never see it), stored in float16.

    Returns ``(state dict "adapter.s{seed}.*" and "ft.*", log)``.
    """
    from ..data import load_digits
    from ..finetuning import adapter_state
    from ..zoo import load
    from .guidance import guidance_distill

    cfg = _speedup_config(config)
    pipe = load("sd_tiny")
    unet, sched = pipe.unet.requires_grad_(False), pipe.scheduler
    table, empty = prompt_table(pipe)
    x, y = load_digits("train", size=16)
    data = _speedup_data(_latents(pipe, x), y, table, empty, cfg["p_empty_negative"])
    state, log = {}, {"final_loss": {}, "seconds": {}}
    for s in cfg["seeds"]:
        st = SpeedUpStudent(unet, NegativeOffsetAdapter(unet), _wrap(sched))
        res = guidance_distill(st, st.teacher, data, negative_uncond, w_range=(cfg["w"], cfg["w"]),
                               sigma_range=(st.denoiser.sigma_min, st.denoiser.sigma_max), steps=cfg["steps"],
                               batch=cfg["batch"], lr=cfg["lr"], generator=torch.Generator().manual_seed(2440 + s))
        st.remove()
        state.update({f"adapter.s{s}.{k}": v.detach().clone().contiguous() for k, v in st.adapter.state_dict().items()})
        log["final_loss"][f"s{s}"] = float(sum(res.losses[-20:]) / len(res.losses[-20:]))
        log["seconds"][f"s{s}"] = round(res.seconds, 1)
        if progress:
            print(f"speedup adapter s{s}: loss {log['final_loss'][f's{s}']:.4f}, {res.seconds:.0f} s", flush=True)
    ft, res = _finetune_thick(pipe, cfg, table, empty, x, y, progress)
    state.update({f"ft.{k}": v.half().contiguous() for k, v in adapter_state("lora", unet, ft).items()})
    log["final_loss"]["ft"] = float(sum(res.losses[-20:]) / len(res.losses[-20:]))
    log["seconds"]["ft"] = round(res.seconds, 1)
    log["params"] = {"adapter": sum(p.numel() for p in st.adapter.parameters()),
                     "ft_lora": sum(v.numel() for k, v in state.items() if k.startswith("ft."))}
    return state, log


class SpeedUpEntry(dict):
    """``{"pipe": sd_tiny, "adapters": [NegativeOffsetAdapter per seed], "finetuned": the fine-tuned UNet}``;
    ``.to("cpu")`` is the zoo's device hook."""

    def to(self, device) -> "SpeedUpEntry":
        if torch.device(device).type != "cpu":
            raise ValueError("the speedup_adapters entry is a CPU toy; load it with device='cpu'")
        return self


def load_speedup_entry(state: dict, config: dict) -> SpeedUpEntry:
    """The adapters and the fine-tuned UNet of :func:`train_speedup_entry` from its state dict (the zoo entry's
    weights; ``sd_tiny`` is loaded from the zoo)."""
    from ..finetuning import load_adapter_state
    from ..zoo import load

    cfg = _speedup_config(config)
    pipe = load("sd_tiny")
    pipe.unet.requires_grad_(False)
    adapters = []
    for s in cfg["seeds"]:
        pre = f"adapter.s{s}."
        ad = NegativeOffsetAdapter(pipe.unet)
        sd = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
        if not sd:
            raise ValueError(f"speedup_adapters: no weights for seed {s}; retrain with "
                             "`python -m dmlab.zoo train speedup_adapters`")
        ad.load_state_dict(sd)
        adapters.append(ad.eval().requires_grad_(False))
    ft = load_adapter_state("lora", copy.deepcopy(pipe.unet), {k[3:]: v.float() for k, v in state.items()
                                                               if k.startswith("ft.")},
                            rank=cfg["ft_rank"], target_modules=list(cfg["ft_targets"]))
    return SpeedUpEntry(pipe=pipe, adapters=adapters, finetuned=ft)


# ----------------------------------------------------------------------------------------------- full scale
def sd_speedup_distill(pipe, prompts, negative_prompts=None, *, w: float = 7.5, n_steps: int = 20,
                       fast_steps: int = 4, train_steps: int = 400, batch: int = 2, lr: float = 1e-4,
                       unet_ft=None, generator: torch.Generator) -> dict:
    """SpeedUpNet on a diffusers Stable Diffusion pipeline (the chapter's full-scale path).

    The teacher is ``pipe.unet`` guided at ``w`` against ``negative_prompts`` (default: the empty prompt); its
    ``n_steps``-step Euler samples are the training latents (no dataset needed). A :class:`NegativeOffsetAdapter`
    on every cross-attention layer is trained by :func:`dmlab.distill.guidance.guidance_distill` for
    ``train_steps``, then the adapter samples in ``fast_steps`` steps (one call each) from the same noise as the
    teacher. With ``unet_ft`` (a fine-tuned UNet of the same architecture, e.g. a community SD 1.5 fine-tune) the
    *same* adapter is plugged into it, untrained, and compared with that UNet's own guided sampler. Returns
    ``{"adapter", "teacher_latents", "fast_latents", "losses"}`` (plus ``"ft_teacher_latents"``,
    ``"ft_fast_latents"``).
    """
    from ..samplers.ode import sample_euler
    from ..schedules import karras
    from .guidance import GuidedTeacher, guidance_distill

    if isinstance(prompts, str) or not len(prompts):
        raise TypeError("prompts must be a non-empty list of strings (one image per prompt)")
    n = len(prompts)
    negative_prompts = [""] * n if negative_prompts is None else list(negative_prompts)
    if len(negative_prompts) != n:
        raise ValueError(f"give one negative prompt per prompt ({n}), got {len(negative_prompts)}")
    dev = pipe.unet.device
    pos, neg = pipe.encode_prompt(list(prompts), dev, 1, True, negative_prompts)
    pipe.unet.requires_grad_(False)
    st = SpeedUpStudent(pipe.unet, NegativeOffsetAdapter(pipe.unet), _wrap(pipe.scheduler))
    smin, smax = st.denoiser.sigma_min, st.denoiser.sigma_max
    size = pipe.unet.config.sample_size
    noise = torch.randn(n, pipe.unet.config.in_channels, size, size, generator=generator).to(dev)
    cond = {"encoder_hidden_states": pos, "negative_hidden_states": neg, "w": torch.full((n,), float(w), device=dev)}
    grid, fast = karras(n_steps, smin, smax), karras(fast_steps, smin, smax)
    with torch.no_grad():
        lat = sample_euler(GuidedTeacher(st.teacher, negative_uncond), smax * noise, grid, cond=cond)

    def data(g, k):
        i = torch.randint(n, (k,), generator=g).to(dev)
        return lat[i], {"encoder_hidden_states": pos[i], "negative_hidden_states": neg[i]}

    res = guidance_distill(st, st.teacher, data, negative_uncond, w_range=(w, w), sigma_range=(smin, smax),
                           steps=train_steps, batch=batch, lr=lr, generator=generator)
    st.eval()
    out = {"adapter": st.adapter, "teacher_latents": lat, "losses": res.losses}
    with torch.no_grad():
        out["fast_latents"] = sample_euler(st, smax * noise, fast, cond=cond)
    st.remove()
    if unet_ft is not None:
        ft = SpeedUpStudent(unet_ft, st.adapter, _wrap(pipe.scheduler))
        with torch.no_grad():
            out["ft_teacher_latents"] = sample_euler(GuidedTeacher(ft.teacher, negative_uncond), smax * noise, grid,
                                                     cond=cond)
            out["ft_fast_latents"] = sample_euler(ft, smax * noise, fast, cond=cond)
        ft.remove()
    return out
