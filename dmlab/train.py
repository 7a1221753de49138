"""One training loop for the whole library, on 🤗 accelerate: :func:`fit`.

Every training procedure in dmlab (the zoo's recipes, toy denoisers, exit heads, linear-attention distillation,
pruning and quantization fine-tuning, mask learning, subspace and rectified-flow fits) is a *loss* and a *data*
function handed to :func:`fit`; the optimizer, learning-rate schedule, gradient accumulation, clipping, mixed
precision, EMA of the weights, loss log, tqdm bar, checkpoint/resume and data parallelism live here once.

* ``data(generator) -> batch`` draws a whole (global) batch: every random number of a step (rows, timesteps,
  noise, label dropout) comes from the one ``torch.Generator``, so a run is a function of its seed. ``loss(batch)``
  is deterministic given the batch. Without ``data``, ``loss(generator)`` draws its own batch (one process only).
* Data parallel (``accelerate launch ...``): each process draws the same global batch from the same generator,
  keeps its contiguous shard (``batch_size / num_processes`` rows), and the gradients are averaged across processes
  before the step, so ``N`` processes follow the single-process run up to floating-point summation order.
* Checkpoint/resume: ``run=`` names a folder (:func:`run_dir`: keyed by the recipe's hash and the training code's
  hash, under the checkout's ``.cache/runs`` or ``$DMLAB_CACHE/runs``, never a home cache). Every
  ``checkpoint_every`` steps accelerate's ``save_state`` writes the optimizer, weights, EMA and generator, and a
  manifest records the step, the loss log and each file's sha256. A later call with the same folder verifies the
  manifest (key and hashes) before ``load_state`` and says on stderr that it resumes; a resumed run ends with the
  same weights as an uninterrupted one.

The EMA follows the DDPM codebases: ``decay_t = min(ema, (1 + t) / (10 + t))`` (Ho et al. 2020's released code;
Karras et al. 2022 discuss the averaging length). The learning rate is linear warmup then cosine decay to 0
(Loshchilov & Hutter 2017) or constant.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["FitConfig", "FitResult", "fit", "ddpm_batch", "run_dir", "code_hash", "runs_root", "EMA", "lr_at",
           "RunStateError", "process_info", "split_between_processes", "gather_tensors"]

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16", "fp16")


class RunStateError(ValueError):
    """A saved training state does not match its manifest (changed key, corrupted or missing file)."""


@dataclass(frozen=True)
class FitConfig:
    """How :func:`fit` optimises.

    Args:
        steps: optimizer steps in the run.
        lr, optimizer (``"adam"`` or ``"adamw"``), weight_decay, betas: the optimizer.
        schedule: ``"cosine"`` (linear ``warmup`` then cosine decay to 0) or ``"constant"`` (after the warmup).
        ema: EMA decay of the weights (``None``: no EMA); with ``ema_warmup`` the decay ramps as
            ``min(ema, (1 + t) / (10 + t))``. When set, the model holds the EMA weights when ``fit`` returns.
        grad_clip: max global gradient norm (``None``: no clipping).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (accelerate's autocast and, for fp16, loss scaling).
        grad_accum: micro-batches per optimizer step (each a fresh ``data`` draw; the loss is averaged).
        log_every: the loss curve keeps the mean loss of every ``log_every`` steps.
        checkpoint_every: save the state every that many steps when a ``run`` folder is given (0: only at the end).
        progress, desc: a tqdm bar and its label.
    """

    steps: int
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    schedule: str = "constant"
    warmup: int = 0
    ema: float | None = None
    ema_warmup: bool = True
    grad_clip: float | None = None
    mixed_precision: str = "no"
    grad_accum: int = 1
    log_every: int = 50
    checkpoint_every: int = 0
    progress: bool = False
    desc: str = "fit"

    def __post_init__(self):
        for name in ("steps", "warmup", "grad_accum", "log_every", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name in ("grad_accum", "log_every") else 0):
                raise ValueError(f"FitConfig.{name} must be an int >= {1 if name in ('grad_accum', 'log_every') else 0}, "
                                 f"got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"FitConfig.lr must be > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"FitConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FitConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"FitConfig.mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.ema is not None and not 0 <= self.ema < 1:
            raise ValueError(f"FitConfig.ema must lie in [0, 1) or be None, got {self.ema!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"FitConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")


@dataclass
class FitResult:
    """What :func:`fit` returns: ``steps`` done (``complete`` when all), ``losses`` (one per step, the mean over
    micro-batches and processes), ``curve`` (``[[step, mean loss of the last log_every steps], ...]``),
    ``seconds`` (summed over resumed sessions), ``resumed_from`` (the step a saved state was loaded at, or 0),
    and ``ema`` (the EMA state dict, or ``None``)."""

    steps: int
    complete: bool
    losses: list = field(default_factory=list)
    curve: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    ema: dict | None = None

    def log(self) -> dict:
        """A JSON-able summary (what the zoo writes as ``train_log.json``)."""
        return {"steps": self.steps, "complete": self.complete, "train_seconds": round(self.seconds, 1),
                "curve": [[s, round(v, 6)] for s, v in self.curve]}


def lr_at(step: int, config: FitConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine
    decay to 0 at ``steps`` (``schedule="cosine"``) or constant after the warmup."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "constant":
        return config.lr
    frac = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


class EMA:
    """Exponential moving average of a module's state dict (floating tensors averaged, others copied)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True, skip: Callable[[str], bool] | None = None):
        self.module, self.decay, self.warmup, self.skip = module, decay, warmup, skip
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.count = 0

    @torch.no_grad()
    def update(self) -> None:
        t = self.count
        decay = min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point and not (self.skip and self.skip(k)):
                self.shadow[k].lerp_(v, 1 - decay)
            else:
                self.shadow[k].copy_(v)
        self.count += 1

    def reset(self) -> None:
        """Restart the average from the current weights (e.g. at a phase switch)."""
        self.shadow = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.count = 0

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "count": torch.tensor(self.count)}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd["shadow"].items():
            self.shadow[k].copy_(v)
        self.count = int(sd["count"])

    def copy_to(self, module: nn.Module | None = None) -> None:
        (module or self.module).load_state_dict(self.shadow)


class _GeneratorState:
    """A torch.Generator as a checkpointable object (accelerate's ``register_for_checkpointing``)."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def state_dict(self) -> dict:
        return {"state": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["state"])


class _Params:
    """Free tensors (not in a module) as a checkpointable object."""

    def __init__(self, params: list[Tensor]):
        self.params = params

    def state_dict(self) -> dict:
        return {str(i): p.detach() for i, p in enumerate(self.params)}

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(sd[str(i)])


# ----------------------------------------------------------------------------------------------- run folders
def runs_root() -> pathlib.Path | None:
    """Where resumable run states live: ``$DMLAB_CACHE/runs``, else ``<checkout>/.cache/runs`` when dmlab runs
    from a git checkout, else ``None`` (no resumable state: nothing is written to a home cache)."""
    if os.environ.get("DMLAB_CACHE"):
        return pathlib.Path(os.environ["DMLAB_CACHE"]) / "runs"
    root = pathlib.Path(__file__).resolve().parents[1]
    if (root / ".git").exists() and (root / "dmlab").is_dir():
        return root / ".cache" / "runs"
    return None


def code_hash(*objs) -> str:
    """sha256 (16 hex digits) of the source files that define a training run: this module and the modules of
    ``objs`` (functions, classes or modules). A change to the training code gives a new run folder."""
    files = {pathlib.Path(__file__).resolve()}
    for o in objs:
        mod = inspect.getmodule(o) if not inspect.ismodule(o) else o
        f = getattr(mod, "__file__", None)
        if f:
            files.add(pathlib.Path(f).resolve())
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_dir(name: str, recipe_hash: str, *code: Any) -> pathlib.Path | None:
    """The run folder of recipe ``name``: ``<runs_root()>/<name>-<recipe hash>-<code hash of code>``, or ``None``
    when there is no place for run state (installed package without ``$DMLAB_CACHE``)."""
    root = runs_root()
    return None if root is None else root / f"{name}-{recipe_hash}-{code_hash(*code)}"


def _sha(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_files(folder: pathlib.Path) -> dict:
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_manifest(run: pathlib.Path, key: str) -> dict | None:
    """The verified manifest of a saved state, ``None`` when there is none; :class:`RunStateError` when it does not
    verify."""
    path = run / "fit.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    fix = f"delete {run} (or pass a fresh run folder) to start from step 0"
    if meta.get("key") != key:
        raise RunStateError(f"the saved state in {run} belongs to another run ({meta.get('key')!r}, this run is "
                            f"{key!r}); {fix}")
    got = _manifest_files(run / "state")
    if got != meta["files"]:
        bad = sorted(set(got.items()) ^ set(meta["files"].items()))
        raise RunStateError(f"the saved state in {run} does not match its manifest ({bad[0][0]} differs); {fix}")
    return meta


# ----------------------------------------------------------------------------------------------- processes
def _accelerator(mixed_precision: str):
    """An ``Accelerator`` for this call (its process state is shared; a change of precision resets it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=mixed_precision)
    except ValueError:
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision)


def process_info() -> tuple[int, int]:
    """``(process index, number of processes)`` of this run (``(0, 1)`` outside ``accelerate launch``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    s = _partial_state()
    return s.process_index, s.num_processes


def _partial_state():
    """accelerate's process state; on a machine without an accelerator (or with ``ACCELERATE_USE_CPU``) the
    processes are CPU processes (gloo), as ``accelerate launch --cpu`` and ``Accelerator()`` make them."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def split_between_processes(n: int) -> range:
    """The indices ``0..n-1`` this process handles (contiguous, sizes differing by at most one; all of them on
    one process): accelerate's ``split_between_processes``."""
    rank, world = process_info()
    if world == 1:
        return range(n)
    with _partial_state().split_between_processes(list(range(n))) as mine:
        return range(mine[0], mine[-1] + 1) if mine else range(0)


def gather_tensors(x: Tensor) -> Tensor:
    """Concatenate every process's ``x`` (in process order, along dim 0; shards may differ in length); ``x`` itself
    on one process."""
    rank, world = process_info()
    if world == 1:
        return x
    from accelerate.utils import gather_object

    return torch.cat([t for t in gather_object([x.cpu()])])


def _shard(batch: Any, rank: int, world: int) -> Any:
    """This process's contiguous slice of every tensor in ``batch`` whose leading size is the batch size."""
    if world == 1:
        return batch
    sizes = [t.shape[0] for t in _leaves(batch) if isinstance(t, Tensor) and t.ndim > 0]
    if not sizes:
        raise ValueError("data-parallel fit needs data() to return tensors with a leading batch dimension")
    n = max(sizes)
    if n % world:
        raise ValueError(f"the global batch of {n} rows does not split over {world} processes; use a batch size "
                         f"divisible by {world}")
    k = n // world

    def cut(v):
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n:
            return v[rank * k:(rank + 1) * k]
        if isinstance(v, dict):
            return {a: cut(b) for a, b in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(cut(b) for b in v)
        return v
    return cut(batch)


def _leaves(v):
    if isinstance(v, dict):
        for b in v.values():
            yield from _leaves(b)
    elif isinstance(v, (list, tuple)):
        for b in v:
            yield from _leaves(b)
    else:
        yield v


def _reduce_grads(params: list[Tensor], world: int) -> None:
    """Average gradients over processes (one all-reduce of the flattened gradients)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(p).clone()
        i += g.numel()


def _mean_across(x: float, world: int) -> float:
    if world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


# ----------------------------------------------------------------------------------------------- batches
def ddpm_batch(x0: Tensor, alphas_cumprod: Tensor, batch_size: int, generator: torch.Generator, *,
               labels: Tensor | None = None, p_uncond: float = 0.0, null_class: int = 10) -> dict:
    """One DDPM training batch (Ho et al. 2020, Alg. 1), every draw from ``generator`` in this order: rows ``idx`` of
    ``x0``, timesteps ``t`` uniform over ``alphas_cumprod``, noise ``eps``, and (with ``labels``) the label dropout to
    ``null_class`` with probability ``p_uncond`` (classifier-free guidance training, Ho & Salimans 2022).

    Returns ``{"idx", "x0", "t", "eps", "ac", "xt"}`` (``ac = alpha_bar_t`` shaped to broadcast, ``xt = sqrt(ac) x0 +
    sqrt(1 - ac) eps``) and ``"y"`` with labels."""
    idx = torch.randint(0, x0.shape[0], (batch_size,), generator=generator)
    t = torch.randint(0, alphas_cumprod.numel(), (batch_size,), generator=generator)
    x = x0[idx]
    eps = torch.randn(x.shape, generator=generator)
    out = {"idx": idx, "x0": x, "t": t, "eps": eps}
    if labels is not None:
        drop = torch.rand(batch_size, generator=generator) < p_uncond
        out["y"] = torch.where(drop, torch.full_like(labels[idx], null_class), labels[idx])
    ac = alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
    out["ac"], out["xt"] = ac, ac.sqrt() * x + (1 - ac).sqrt() * eps
    return out


# ----------------------------------------------------------------------------------------------- the loop
class _FinishedText:
    """A progress bar that prints one line when it closes (``desc: n/total steps, loss ...``): what a chapter
    executed for the book stores, instead of a widget whose text fallback reads ``0%``."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", disable: bool = False):
        self.total, self.n, self.desc, self.disable, self.postfix = total, initial, desc, disable, {}

    def update(self, k: int = 1):
        self.n += k

    def set_postfix(self, **kw):
        self.postfix = kw

    def close(self):
        if not self.disable:
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc or 'training'}: {self.n}/{self.total} steps{extra}", file=sys.stderr, flush=True)
            self.disable = True


def _progress_bar(*, total: int, initial: int, desc: str, disable: bool):
    """tqdm (a widget in Jupyter, text in a terminal); finished text when a chapter is executed for the book
    (``DMLAB_CI`` set by :func:`dmlab.tools.env.apply_ci_env`)."""
    if os.environ.get("DMLAB_CI"):
        return _FinishedText(total, initial, desc, disable)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=disable, mininterval=2.0)


def fit(loss: Callable[[Any], Tensor], model: nn.Module | None, config: FitConfig, *,
        generator: torch.Generator, data: Callable[[torch.Generator], Any] | None = None,
        params: list[Tensor] | None = None, run: str | os.PathLike | None = None, run_key: str = "",
        stop_after: int | None = None, before_step: Callable[[int], None] | None = None,
        extra_state: dict | None = None, ema_skip: Callable[[str], bool] | None = None) -> FitResult:
    """Minimise ``loss`` over the trainable parameters of ``model`` (or ``params``) for ``config.steps`` steps.

    Args:
        loss: ``loss(batch) -> scalar tensor`` (``loss(generator)`` when ``data`` is ``None``).
        model: the module trained (``requires_grad`` parameters, unless ``params`` is given); its EMA is kept when
            ``config.ema`` is set. Several models: an ``nn.ModuleDict`` of them. ``None`` with ``params`` for free
            tensors.
        config: a :class:`FitConfig`.
        generator: the run's ``torch.Generator`` (every draw of ``data``); saved and restored with the state.
        data: ``data(generator) -> batch`` (tensors, tuples or dicts of tensors with a leading batch dimension).
        params: the tensors to optimise (default: ``model``'s parameters that require grad).
        run: a folder for resumable state (:func:`run_dir`); ``run_key`` is what must match to reuse it.
        stop_after: end this session after that many total steps (an interrupted run: the state is saved).
        before_step: ``before_step(step)`` runs before each optimizer step (progressive schedules).
        extra_state: ``{name: object with state_dict/load_state_dict}`` saved and restored with the run.
        ema_skip: state-dict keys copied instead of averaged by the EMA.

    Returns a :class:`FitResult`. The model is left in eval mode (with the EMA weights when ``config.ema``).
    Every random draw of the run goes through ``generator``: diffusers' built-in class-label dropout (DiT's
    ``LabelEmbedding``, which would draw from the global RNG) is switched off while training.
    """
    if not isinstance(config, FitConfig):
        raise TypeError(f"config must be a dmlab.train.FitConfig, got {type(config).__name__}")
    if not callable(loss):
        raise TypeError("loss must be callable: loss(batch) -> scalar tensor")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator: every draw of the training run goes through it")
    if data is not None and not callable(data):
        raise TypeError("data must be callable: data(generator) -> batch")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if params is None:
        if model is None:
            raise ValueError("give the module to train (model=) or the tensors to optimise (params=)")
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError("nothing to train: params must be a non-empty list of tensors that require grad")
    if config.ema is not None and model is None:
        raise ValueError("FitConfig.ema needs the model whose weights are averaged (model=)")
    rank, world = process_info()
    if world > 1 and data is None:
        raise ValueError("data-parallel fit needs data(generator) -> batch, so that each process takes its shard")

    acc = _accelerator(config.mixed_precision)
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=lr_at(0, config), betas=tuple(config.betas), weight_decay=config.weight_decay)
    opt = acc.prepare_optimizer(opt, device_placement=False)
    ema = EMA(model, config.ema, config.ema_warmup, ema_skip) if config.ema is not None else None

    # ---- resume
    saved = {"generator": _GeneratorState(generator)}
    if model is not None:
        saved["model"] = model
    if model is None or any(all(p is not q for q in model.parameters()) for p in params):
        saved["params"] = _Params(params)
    if ema is not None:
        saved["ema"] = ema
    saved.update(extra_state or {})
    step, curve, losses, elapsed, resumed = 0, [], [], 0.0, 0
    run = pathlib.Path(run) if run is not None else None
    key = json.dumps({"key": run_key, "steps": config.steps}, sort_keys=True)
    if run is not None:
        meta = _read_manifest(run, key)
        if meta is not None:
            _load(acc, opt, saved, run / "state")
            step, curve, losses, elapsed = meta["step"], meta["curve"], meta["losses"], meta["seconds"]
            resumed = step
            if rank == 0:
                print(f"dmlab.train: resuming {config.desc} from step {step}/{config.steps} (state verified: {run})",
                      file=sys.stderr, flush=True)

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    window: list[float] = losses[len(losses) - (step % config.log_every):] if step % config.log_every else []
    bar = _progress_bar(total=config.steps, initial=step, desc=config.desc,
                        disable=not config.progress or rank != 0)
    if model is not None:
        model.train()
    # diffusers' LabelEmbedding (DiT) drops class labels in train mode with the *global* RNG: off during the run
    # (classifier-free label dropout comes from the batches, drawn with the run's generator)
    label_drop = [(m, m.dropout_prob) for m in (model.modules() if model is not None else ())
                  if type(m).__name__ == "LabelEmbedding" and getattr(m, "dropout_prob", 0) > 0]
    for m, _ in label_drop:
        m.dropout_prob = 0.0
    t0 = time.perf_counter()
    try:
        while step < end:
            if before_step is not None:
                before_step(step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, config)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(config.grad_accum):
                batch = data(generator) if data is not None else generator
                with torch.enable_grad(), acc.autocast():
                    value = loss(_shard(batch, rank, world))
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise TypeError(f"loss must return a scalar tensor, got {type(value).__name__}")
                with torch.enable_grad():
                    acc.backward(value / config.grad_accum if config.grad_accum > 1 else value)
                total += float(value.detach()) / config.grad_accum
            if world > 1:
                _reduce_grads(params, world)
                total = _mean_across(total, world)
            if config.grad_clip is not None:
                acc.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if ema is not None:
                ema.update()
            step += 1
            losses.append(total)
            window.append(total)
            if step % config.log_every == 0 or step == config.steps:
                curve.append([step, sum(window) / len(window)])
                bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
                window = []
            bar.update(1)
            if run is not None and ((config.checkpoint_every and step % config.checkpoint_every == 0)
                                    or step == end):
                _save(acc, opt, saved, run, key, {"step": step, "curve": curve, "losses": losses,
                                                  "seconds": elapsed + time.perf_counter() - t0})
    finally:
        bar.close()
        for m, p in label_drop:
            m.dropout_prob = p
        if model is not None:
            model.eval()
    elapsed += time.perf_counter() - t0
    if ema is not None:
        ema.copy_to()
    return FitResult(steps=step, complete=step >= config.steps, losses=losses, curve=curve, seconds=elapsed,
                     resumed_from=resumed, ema=ema.shadow if ema is not None else None)


def _register(acc, saved: dict) -> None:
    acc._custom_objects = []
    for obj in saved.values():
        acc.register_for_checkpointing(obj)


def _save(acc, opt, saved: dict, run: pathlib.Path, key: str, meta: dict) -> None:
    """accelerate ``save_state`` into ``run/state`` and the manifest (key, loss log, sha256 of every file)."""
    import shutil

    _register(acc, saved)
    if acc.is_main_process:
        (run / "fit.json").unlink(missing_ok=True)  # no manifest while the state is being rewritten
        if (run / "state").exists():
            shutil.rmtree(run / "state")
    acc.wait_for_everyone()
    acc.save_state(str(run / "state"), safe_serialization=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = run / "fit.json.tmp"
        tmp.write_text(json.dumps(dict(meta, key=key, files=_manifest_files(run / "state"))))
        tmp.replace(run / "fit.json")
    acc.wait_for_everyone()


def _load(acc, opt, saved: dict, folder: pathlib.Path) -> None:
    _register(acc, saved)
    acc.load_state(str(folder))
