"""Post-training fake quantization of diffusion networks (W8A8, W4A8, W4A4, ...), reversible and composable.

:func:`apply_quantization` (``model_or_pipeline``, :class:`QuantConfig`, ``calibration``) wraps every ``nn.Conv2d``
and ``nn.Linear`` (attention matmuls stay in floating point) so that its **input activation** is quantized
per tensor and its **weight** per output channel with the uniform affine quantizers of
:mod:`dmlab.accelerators.quantizers`. The weights themselves are never written: the quantized copy is swapped in for
the duration of the layer's call, so :meth:`Handle.remove` restores the model bit for bit. The methods are options:

* **PTQ4DM** (Shang et al., CVPR 2023, arXiv 2211.15736; paper 82) and **Q-Diffusion**'s time-step-aware
  calibration (Li et al., ICCV 2023, arXiv 2302.04304; paper 20): which steps the calibration rows come from,
  :func:`dmlab.accelerators.quant_calibration.calibration_set` (``scheme="normal"`` / ``"uniform"``).
* **Split shortcut quantization** (Q-Diffusion, Sec. 3.3): the UNet decoder concatenates its features with the
  encoder's skip features, two groups with very different ranges; ``split_shortcut=True`` gives the two parts of the
  concatenated input of the up-block shortcut convolutions (and of their weights) their own quantizers.
* **TFMQ-DM** (Huang et al., CVPR 2024, arXiv 2311.16503; paper 56): the *temporal information block* (the
  time-embedding MLP and every layer that turns it into per-block features: ``time_emb_proj``, DiT's adaLN
  ``norm1.linear``) depends on ``t`` only, so ``temporal="tfmq"`` calibrates it on the *finite set* of sampler
  timesteps (one activation range per timestep; FSC) and picks its weight clipping by the error of the *temporal
  features* (a one-parameter stand-in for TIAR's reconstruction).
* **Temporal Feature Matters** (Huang et al., arXiv 2407.19547; paper 42): ``temporal="fp"`` keeps that block in full
  precision, which is exactly what its cache-based maintenance computes - a lookup table of full-precision temporal
  features over the finite set of timesteps; :func:`temporal_cache_bytes` is that table's size.
* **QuEST** (Wang et al., ICCV 2025, arXiv 2402.03666; paper 52): ``per_step_acts=True`` is its time-aware
  activation quantizer (a range per timestep); the selective fine-tuning is
  :func:`dmlab.accelerators.quest.quest_finetune`.

Re-implementations from the papers' text (no AdaRound/BRECQ block reconstruction here: ranges are min/max or
MSE-optimal clipping). Activation ranges are fitted on full-precision activations. ``handle.stats``: ``layers``
(quantized layers), ``weight_bits``, ``act_bits``, ``bytes`` (model bytes with quantized weights stored at
``weight_bits`` plus an fp32 scale and int32 zero point per channel), ``fp32_bytes``, ``split_layers``,
``temporal_layers``, ``calls`` (root calls), ``per_step_hits`` / ``per_step_misses`` (calls that found / did not
find their timestep in a per-timestep range table). ``handle.bypass()`` runs the same model in full precision for
a while (targets for fine-tuning, side-by-side comparisons).

CPU wall time is not meaningful for fake quantization (it adds work); report bits, bytes and quality.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..anatomy import resolve_model
from ..hooks import Handle, add_hook, claim, patch_forward, require_no_active
from .quant_calibration import CalibrationSet, _batch_size, select_rows, t_key
from .quantizers import SHRINK_GRID, check_bits, fake_quant, minmax_range, mse_shrink, qparams

__all__ = ["QuantConfig", "QuantHandle", "apply_quantization", "quant_layers", "temporal_layers",
           "temporal_cache_bytes", "model_bytes", "RANGES", "TEMPORAL_MODES", "TEMPORAL_PATTERNS"]

RANGES = ("minmax", "mse")
TEMPORAL_MODES = ("quantize", "tfmq", "fp")
#: layers of the temporal information block (depend on t, and on the class label where it is added to t's embedding)
TEMPORAL_PATTERNS = ("time_embedding.*", "*time_emb_proj", "*timestep_embedder.*", "*norm1.linear",
                     "*norm1_context.linear", "proj_out_1", "add_embedding.*")
#: the temporal layers whose outputs leave the block (what a cache of temporal features stores)
TEMPORAL_LEAVES = ("*time_emb_proj", "*norm1.linear", "*norm1_context.linear", "proj_out_1")
_MAX_VALUES = 4096  # values kept per call and quantizer for the MSE range search
_MAX_FIT = 8192     # at most this many of them (strided) enter one search


@dataclass(frozen=True)
class QuantConfig:
    """Fake quantization settings (see the module docstring).

    ``weight_bits`` / ``act_bits``: ints in 2..16, or None to keep that operand in floating point; both None is the
    no-op (nothing is patched). ``weight_range`` / ``act_range``: ``"minmax"`` or ``"mse"`` (MSE-optimal clipping;
    for weights it lowers the weight error but, measured on the zoo UNet, raises the output error at 4 bits, so
    weights default to min-max).
    ``per_step_acts``: one activation range per calibrated timestep (QuEST's time-aware quantizer; other timesteps
    fall back to the shared range). ``split_shortcut``: Q-Diffusion's split quantization of the decoder
    concatenations. ``temporal``: ``"quantize"`` (like every other layer), ``"tfmq"`` (TFMQ-DM) or ``"fp"``
    (paper 42's cached full-precision temporal features). ``layers``: fnmatch patterns of the layers to quantize
    (default all; e.g. ``TEMPORAL_PATTERNS`` to study one block in isolation); ``skip``: patterns kept in float.
    """

    weight_bits: int | None = 8
    act_bits: int | None = 8
    weight_range: str = "minmax"
    act_range: str = "mse"
    per_step_acts: bool = False
    split_shortcut: bool = False
    temporal: str = "quantize"
    skip: tuple[str, ...] = ()
    layers: tuple[str, ...] = ("*",)

    def __post_init__(self):
        check_bits(self.weight_bits, "weight_bits", allow_none=True)
        check_bits(self.act_bits, "act_bits", allow_none=True)
        for name in ("weight_range", "act_range"):
            if getattr(self, name) not in RANGES:
                raise ValueError(f"{name} must be one of {RANGES}, got {getattr(self, name)!r}")
        if self.temporal not in TEMPORAL_MODES:
            raise ValueError(f"temporal must be one of {TEMPORAL_MODES} ('tfmq' = TFMQ-DM, 'fp' = cached "
                             f"full-precision temporal features), got {self.temporal!r}")
        for name in ("skip", "layers"):
            v = getattr(self, name)
            v = (v,) if isinstance(v, str) else tuple(v)
            object.__setattr__(self, name, v)
            if not all(isinstance(p, str) and p for p in v) or (name == "layers" and not v):
                raise ValueError(f"{name} must be a tuple of layer-name patterns such as 'conv_in' or 'up_blocks.*', "
                                 f"got {v!r}")
        for flag in ("per_step_acts", "split_shortcut"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    @property
    def enabled(self) -> bool:
        """False for the no-op setting (both operands in floating point)."""
        return self.weight_bits is not None or self.act_bits is not None

    @property
    def label(self) -> str:
        """``"W4A8"``-style name (``"FP"`` for a float operand)."""
        w = f"W{self.weight_bits}" if self.weight_bits else "Wfp"
        a = f"A{self.act_bits}" if self.act_bits else "Afp"
        return w + a


# ----------------------------------------------------------------------------------------------- layer lookup
def _match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ``nn.Conv2d`` / ``nn.Linear`` layers fake quantization wraps, by qualified name (``""`` when the model
    itself is one)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def temporal_layers(model: nn.Module) -> list[str]:
    """Names of the layers of the temporal information block (TFMQ-DM): :data:`TEMPORAL_PATTERNS`."""
    return [n for n in quant_layers(model) if _match(n, TEMPORAL_PATTERNS)]


def _n_conditions(model: nn.Module) -> int:
    n = 1
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and ("class_emb" in name or "class_embedder" in name):
            n = max(n, m.num_embeddings)
    return n


def temporal_cache_bytes(model: nn.Module, n_timesteps: int, *, n_conditions: int | None = None,
                         bytes_per_value: int = 4) -> int:
    """Bytes of a table of full-precision temporal features (paper 42's cache-based maintenance): one entry per
    timestep of the sampler (and per class label where the label is added to the time embedding, as in the zoo's
    class-conditional models), each the outputs of every temporal leaf layer (``time_emb_proj``, adaLN
    ``norm1.linear``, ...)."""
    net = resolve_model(model, method="temporal_cache_bytes")
    if not isinstance(n_timesteps, int) or n_timesteps < 1:
        raise ValueError(f"n_timesteps must be an int >= 1 (the sampler's steps), got {n_timesteps!r}")
    width = sum(m.out_features for n, m in quant_layers(net).items()
                if isinstance(m, nn.Linear) and _match(n, TEMPORAL_LEAVES))
    nc = _n_conditions(net) if n_conditions is None else n_conditions
    return int(n_timesteps * nc * width * bytes_per_value)


def model_bytes(model: nn.Module, weight_bits: dict[str, int] | None = None, splits: dict[str, int] | None = None) -> int:
    """Bytes of the parameters when the weights of the layers in ``weight_bits`` (name -> bits) are stored at that
    many bits plus an fp32 scale and an int32 zero point per output channel (per part for split layers); everything
    else (biases, norms, embeddings, float layers) at its own element size."""
    net = resolve_model(model, method="model_bytes")
    weight_bits = weight_bits or {}
    splits = splits or {}
    mods = dict(net.named_modules())
    q = {id(mods[n].weight): (b, 2 if splits.get(n) else 1) for n, b in weight_bits.items()}
    total = 0
    for p in net.parameters():
        if id(p) in q:
            b, parts = q[id(p)]
            total += math.ceil(p.numel() * b / 8) + 8 * p.shape[0] * parts
        else:
            total += p.numel() * p.element_size()
    return int(total)


# ----------------------------------------------------------------------------------------------- one layer
class _Observer:
    """Min, max and a strided subsample of one quantizer's inputs (shared, and per timestep)."""

    def __init__(self):
        self.lo, self.hi, self.values = math.inf, -math.inf, []
        self.per_t: dict = {}

    @staticmethod
    def _update(rec, x: Tensor):
        f = x.detach().reshape(-1).float()
        rec[0] = min(rec[0], float(f.min()))
        rec[1] = max(rec[1], float(f.max()))
        step = max(1, f.numel() // _MAX_VALUES)
        rec[2].append(f[::step][:_MAX_VALUES].cpu())

    def add(self, x: Tensor, t, per_t: bool):
        rec = [self.lo, self.hi, self.values]
        self._update(rec, x)
        self.lo, self.hi = rec[0], rec[1]
        if per_t and t is not None:
            self._update(self.per_t.setdefault(t, [math.inf, -math.inf, []]), x)


class _QLayer:
    def __init__(self, name: str, module: nn.Module, w_bits, a_bits, temporal: bool):
        self.name, self.module, self.w_bits, self.a_bits, self.temporal = name, module, w_bits, a_bits, temporal
        self.split = 0
        self.w_alpha: list[Tensor] | None = None  # per part: shrink factors of the per-channel ranges
        self.a_shared: list | None = None         # per part: (scale, zero_point)
        self.a_table: dict = {}                   # t -> per part (scale, zero_point)
        self.obs: list[_Observer] = []
        self._wcache = None

    def parts(self, x: Tensor, dim: int = 1) -> list[Tensor]:
        return [x] if not self.split else [x.narrow(dim, 0, self.split), x.narrow(dim, self.split, x.shape[dim] - self.split)]

    def observe(self, x: Tensor, t, per_t: bool):
        ps = self.parts(x)
        while len(self.obs) < len(ps):
            self.obs.append(_Observer())
        for o, p in zip(self.obs, ps):
            o.add(p, t, per_t)

    def fit_acts(self, method: str):
        def qp(lo, hi, vals):
            lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
            if method == "mse":
                v = torch.cat(vals)
                a = mse_shrink(v[::max(1, v.numel() // _MAX_FIT)], self.a_bits, lo=lo_t, hi=hi_t)
                lo_t, hi_t = lo_t * a, hi_t * a
            return qparams(lo_t, hi_t, self.a_bits)

        self.a_shared = [qp(o.lo, o.hi, o.values) for o in self.obs]
        keys = set.intersection(*(set(o.per_t) for o in self.obs)) if self.obs else set()
        self.a_table = {t: [qp(*o.per_t[t]) for o in self.obs] for t in keys}
        self.obs = []

    def fit_weights(self, method: str, alpha: float | None = None):
        w = self.module.weight.detach()
        alphas = []
        for p in self.parts(w):
            if alpha is not None:
                alphas.append(torch.full((p.shape[0],), float(alpha)))
            elif method == "mse":
                alphas.append(mse_shrink(p, self.w_bits, per_channel=True))
            else:
                alphas.append(torch.ones(p.shape[0]))
        self.w_alpha = alphas

    def quant_weight(self, ste: bool) -> Tensor:
        w = self.module.weight
        key = (w._version, w.data_ptr())
        if not ste and self._wcache is not None and self._wcache[0] == key:
            return self._wcache[1]
        outs = []
        for p, a in zip(self.parts(w), self.w_alpha):
            lo, hi = minmax_range(p.float(), per_channel=True)
            a = a.to(device=p.device, dtype=torch.float32).reshape(lo.shape)
            s, z = qparams(lo * a, hi * a, self.w_bits)
            outs.append(fake_quant(p.float(), s, z, self.w_bits, ste=ste).to(p.dtype))
        wq = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        if not ste:
            self._wcache = (key, wq.detach())
        return wq

    def quant_act(self, x: Tensor, t, per_t: bool, ste: bool) -> Tensor:
        qps = self.a_table.get(t, self.a_shared) if per_t else self.a_shared
        outs = [fake_quant(p.float(), s, z, self.a_bits, ste=ste).to(p.dtype) for p, (s, z) in zip(self.parts(x), qps)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


# ----------------------------------------------------------------------------------------------- handle
class QuantHandle(Handle):
    """The :class:`~dmlab.accelerators.handle.Handle` of :func:`apply_quantization`, plus :meth:`bypass` and
    ``layers`` (name -> ``{"w_bits", "a_bits", "split", "temporal"}``)."""

    def __init__(self, name: str, model: nn.Module, config: QuantConfig):
        super().__init__(name, model)
        self.config = config
        self.layers: dict[str, dict] = {}
        self.state = {"enabled": True, "t": None}
        self._qlayers: dict[str, _QLayer] = {}

    @contextlib.contextmanager
    def bypass(self):
        """Run the wrapped model in full precision inside this block (nothing is removed)."""
        old = self.state["enabled"]
        self.state["enabled"] = False
        try:
            yield self
        finally:
            self.state["enabled"] = old


def _uniform_t(args, kwargs):
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, Tensor):
        if t.numel() == 0 or (t.numel() > 1 and not bool((t == t.reshape(-1)[0]).all())):
            return None
        return t_key(float(t.reshape(-1)[0]))
    try:
        return t_key(float(t)) if t is not None else None
    except (TypeError, ValueError):
        return None


def _skip_channels(up_block: nn.Module, args, kwargs) -> list[int]:
    res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
    if not isinstance(res, (tuple, list)):
        return []
    return [r.shape[1] for r in reversed(res) if isinstance(r, Tensor)]


# ----------------------------------------------------------------------------------------------- apply
def _calibrate(net: nn.Module, h: QuantHandle, cfg: QuantConfig, calib: CalibrationSet):
    """Observe activation ranges on the calibration calls (and, for TFMQ, the temporal layers on every timestep)."""
    hooks, cur = Handle("quant_calibration", net, alters_outputs=False), {"t": None, "observe": set(h._qlayers)}
    add_hook(net, lambda m, a, k: cur.__setitem__("t", _uniform_t(a, k)), hooks, pre=True)
    if cfg.split_shortcut:
        for bname, blk in net.named_modules():
            resnets = getattr(blk, "resnets", None)
            if "up_blocks" not in bname or bname.count(".") != 1 or resnets is None:
                continue

            def pre(m, a, k, bname=bname, resnets=resnets):
                for i, skip in enumerate(_skip_channels(m, a, k)[:len(resnets)]):
                    q = h._qlayers.get(f"{bname}.resnets.{i}.conv_shortcut")
                    if q is not None and q.module.in_channels > skip:
                        q.split = q.module.in_channels - skip
            add_hook(blk, pre, hooks, pre=True)
    tfmq_inputs: dict[str, list] = {}
    for name, q in h._qlayers.items():
        per_t = cfg.per_step_acts or (cfg.temporal == "tfmq" and q.temporal)

        def obs(m, a, q=q, per_t=per_t):
            if q.name in cur["observe"]:
                if q.a_bits:
                    q.observe(a[0], cur["t"], per_t)
                if cur.get("tfmq") and q.temporal:
                    tfmq_inputs.setdefault(q.name, []).append((cur["t"], a[0].detach().clone()))
        add_hook(q.module, obs, hooks, pre=True, with_kwargs=False)
    try:
        with torch.no_grad():
            for a, k in calib.calls:
                net(*a, **k)
            if cfg.temporal == "tfmq":  # finite-set calibration: every timestep the sampler visits
                cur["observe"], cur["tfmq"] = {n for n, q in h._qlayers.items() if q.temporal}, True
                for call in calib.trajectory:
                    a, k = select_rows(call, torch.arange(min(8, _batch_size(*call))))
                    net(*a, **k)
    finally:
        hooks.remove()
    return tfmq_inputs


@torch.no_grad()
def _tiar_alpha(q: _QLayer, inputs: list) -> float:
    """TFMQ-DM stand-in for temporal-information-aware reconstruction: the weight clipping factor with the smallest
    error of the layer's temporal features over the finite set of timesteps (inputs quantized as at run time)."""
    w, b = q.module.weight.detach(), q.module.bias
    best, best_a = math.inf, 1.0
    xs = [(q.quant_act(x, t, True, False) if q.a_bits else x, x) for t, x in inputs]
    lo, hi = minmax_range(w, per_channel=True)
    for a in SHRINK_GRID:
        s, z = qparams(lo * a, hi * a, q.w_bits)
        wq = fake_quant(w, s, z, q.w_bits)
        err = sum(float((F.linear(xq, wq, b) - F.linear(x, w, b)).pow(2).mean()) for xq, x in xs)
        if err < best:
            best, best_a = err, a
    return best_a


def apply_quantization(model_or_pipeline, config: QuantConfig, calibration: CalibrationSet | None = None) -> QuantHandle:
    """Fake-quantize a diffusers model (or a pipeline's ``.unet``/``.transformer``, or a dmlab adapter's ``.model``)
    in place until the returned handle is removed (Q-Diffusion, PTQ4DM, TFMQ-DM, Temporal Feature Matters, QuEST:
    see the module docstring).

    ``calibration`` (:func:`dmlab.accelerators.quant_calibration.calibration_set`) is required for activation
    quantization, ``split_shortcut`` and ``temporal="tfmq"``. Weight-only quantization needs none. Apply
    quantization before caching accelerators (calibration runs the network). Removing restores the model bit for
    bit; applying twice raises.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, e.g. QuantConfig(weight_bits=8, act_bits=8); got {type(config).__name__}")
    net = resolve_model(model_or_pipeline, method="apply_quantization")
    h = QuantHandle("quantization", net, config)
    claim(net, "quantization", h)
    h.stats.update(layers=0, weight_bits=config.weight_bits, act_bits=config.act_bits, split_layers=0,
                   temporal_layers=0, calls=0, per_step_hits=0, per_step_misses=0)
    fp32 = model_bytes(net)
    h.stats.update(bytes=fp32, fp32_bytes=fp32)
    if not config.enabled:
        return h
    try:
        layers = quant_layers(net)
        if not layers:
            raise TypeError(f"{type(net).__name__} has no nn.Conv2d / nn.Linear layers to quantize")
        for p in config.skip + (config.layers,):  # each skip pattern, and the layers patterns together, must match
            if not any(_match(n, (p,) if isinstance(p, str) else p) for n in layers):
                raise ValueError(f"layer pattern {p!r} matches no Conv2d/Linear layer; names look like "
                                 f"{list(layers)[:3]} (see dmlab.accelerators.quantization.quant_layers(model))")
        needs_calib = config.act_bits is not None or config.split_shortcut or config.temporal == "tfmq"
        if needs_calib and not isinstance(calibration, CalibrationSet):
            raise ValueError("activation quantization, split_shortcut and temporal='tfmq' need calibration inputs: pass "
                             "calibration=calibration_set(denoiser, x, sigmas) (dmlab.accelerators.quant_calibration), "
                             "or use weight-only quantization (act_bits=None)")
        temporal = set(temporal_layers(net))
        for n, m in layers.items():
            if not _match(n, config.layers) or _match(n, config.skip) or (config.temporal == "fp" and n in temporal):
                continue
            h._qlayers[n] = _QLayer(n, m, config.weight_bits, config.act_bits, n in temporal)
        if needs_calib:  # calibration runs the network: another handle would change what the ranges fit
            require_no_active(net, "quantization", "calibrates activation ranges by running the network")
        tfmq_inputs = _calibrate(net, h, config, calibration) if needs_calib else {}
        for q in h._qlayers.values():
            if q.a_bits:
                if not q.obs:
                    raise ValueError(f"layer {q.name} never ran during calibration; skip it (skip=({q.name!r},)) or "
                                     f"calibrate with inputs that reach it")
                q.fit_acts(config.act_range)
            if q.w_bits:
                alpha = _tiar_alpha(q, tfmq_inputs[q.name]) if (config.temporal == "tfmq" and q.temporal
                                                                 and q.name in tfmq_inputs
                                                                 and isinstance(q.module, nn.Linear)) else None
                q.fit_weights(config.weight_range, alpha)
        _install(net, h, config)
    except BaseException:
        h.remove()
        raise
    return h


def _install(net: nn.Module, h: QuantHandle, cfg: QuantConfig) -> None:
    state, stats = h.state, h.stats
    keys = set().union(*(q.a_table for q in h._qlayers.values()))

    def root_pre(m, a, k):
        stats["calls"] += 1
        if keys:
            state["t"] = _uniform_t(a, k)
            stats["per_step_hits" if state["t"] in keys else "per_step_misses"] += 1
    add_hook(net, root_pre, h, pre=True)
    for name, q in h._qlayers.items():
        per_t = cfg.per_step_acts or (cfg.temporal == "tfmq" and q.temporal)

        def wrapper(call_next, x, *args, q=q, per_t=per_t, **kwargs):
            if not state["enabled"]:
                return call_next(x, *args, **kwargs)
            ste = torch.is_grad_enabled()
            if q.a_bits:
                x = q.quant_act(x, state["t"], per_t, ste)
            if not q.w_bits:
                return call_next(x, *args, **kwargs)
            params = q.module._parameters
            original = params["weight"]
            params["weight"] = q.quant_weight(ste and original.requires_grad)  # swapped in for this call only
            try:
                return call_next(x, *args, **kwargs)
            finally:
                params["weight"] = original
        patch_forward(q.module, wrapper, h)
        h.layers[name] = {"w_bits": q.w_bits, "a_bits": q.a_bits, "split": q.split, "temporal": q.temporal}
    wb = {n: q.w_bits for n, q in h._qlayers.items() if q.w_bits}
    stats.update(layers=len(h._qlayers), split_layers=sum(1 for q in h._qlayers.values() if q.split),
                 temporal_layers=sum(1 for q in h._qlayers.values() if q.temporal),
                 bytes=model_bytes(net, wb, {n: q.split for n, q in h._qlayers.items()}))
