"""One table per kind of zoo entry: how to build, load, train and evaluate it.

Every zoo entry has a ``kind``; each kind is one :class:`Kind` record in :data:`KINDS` (instead of ``if kind == ...``
branches spread over the zoo's files):

* ``classifier`` - the digit classifier (the digits-FD feature network);
* ``unet``, ``dit`` - class-conditional diffusers models on 8x8 digits;
* ``sd`` - the text-to-image ``StableDiffusionPipeline`` (``sd_tiny``);
* ``exit_heads`` - DeeDiff exit heads and uncertainty modules for a zoo DiT (paper 53);
* ``linear_attention`` - LinFusion linear-attention modules distilled into a zoo DiT (paper 2);
* ``finetune`` - a zoo model fine-tuned by full fine-tuning, LoRA, DiffFit or SaRA, stored as the update on top of
  its base (:mod:`dmlab.finetuning`, chapter 23);
* ``ring_students`` - chapter 25's few-step students of the 8-Gaussian ring;
* ``rrcm_s*`` / ``noiseaug_s*`` (kind ``robust_classifier``) - chapter 25's noise-robust digit classifiers (paper 65);
* ``kd_student`` - a zoo DiT with blocks removed, distilled from it (:mod:`dmlab.distill.architecture`, chapter 27);
* ``maskgit`` - a patch VQ and a masked-token transformer (:mod:`dmlab.masked_tokens`, chapter 27).
* ``invdiff`` - InvDiff's lightweight guidance modules on a biased zoo model, and their baselines
  (:mod:`dmlab.debias`, chapter 22).
* ``latent_edit`` - asymmetric decoders of ``sd_tiny`` and their plain control (:mod:`dmlab.latent_edit`, chapter 33).
* ``speedup`` - SpeedUpNet cross-attention adapters of ``sd_tiny`` and a fine-tuned copy of it (:mod:`dmlab.distill.speedup`,
  chapter 24).
* ``pretraining`` - chapter 23's class-conditional toys of the exact triads: clean, label-corrupted and CEP-trained
  models (paper 9) and KIND against LoRA transfers (paper 45) (:mod:`dmlab.pretraining`).

Adapters (exit heads, linear attention, finetune, kd_student) name their ``base`` zoo model in ``recipe.extra["base"]``; their registry entry records a
fingerprint of the base's weight files, so a retrained base is detected before the adapter is used.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Kind", "KINDS", "kind_of", "ADAPTER_KINDS"]


@dataclass(frozen=True)
class Kind:
    """What the zoo does with entries of one kind.

    ``load(folder, entry, root)`` returns the object ``zoo.load`` gives; ``train(recipe, folder, device, resume,
    progress)`` trains the recipe and saves it to ``folder``; ``cost(obj, recipe)`` gives ``params`` and
    ``flops_per_call``; ``evaluate(name, root)`` measures the registry's metrics; ``denoiser`` marks diffusion
    models (``zoo.load_denoiser``); ``single_network`` marks kinds trained by :func:`dmlab.zoo.train.train`."""

    name: str
    load: Callable[[pathlib.Path, dict, Any], Any]
    train: Callable[..., pathlib.Path]
    cost: Callable[[Any, Any], dict]
    evaluate: Callable[[str, Any], dict]
    denoiser: bool = False
    single_network: bool = False
    adapter: bool = False


# ----------------------------------------------------------------------------------------------- loaders
def _load_classifier(folder, entry, root):
    from safetensors.torch import load_file

    from .nets import DigitClassifier

    model = DigitClassifier(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def _load_diffusers(cls_name):
    def load(folder, entry, root):
        import diffusers

        return getattr(diffusers, cls_name).from_pretrained(folder, local_files_only=True).eval()
    return load


def _load_sd(folder, entry, root):
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    from diffusers import StableDiffusionPipeline

    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()  # no "Loading pipeline components" widgets in the chapters
    tlog.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    finally:
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_exit_heads(folder, entry, root):
    from safetensors.torch import load_file

    from ..accelerators.early_exit import ExitHeads

    heads = ExitHeads(**json.loads((folder / "config.json").read_text()))
    heads.load_state_dict(load_file(str(folder / "model.safetensors")))
    heads.info = entry
    return heads.eval()


def _load_linear(folder, entry, root):
    from safetensors.torch import load_file

    from ..accelerators.linear_attention import linear_attention_for
    from .registry import load

    config = json.loads((folder / "config.json").read_text())
    mods = linear_attention_for(load(entry["base"], root=root), mid_dim=config.get("mid_dim"))
    mods.load_state_dict(load_file(str(folder / "model.safetensors")))
    mods.info = entry
    return mods.eval()


# ----------------------------------------------------------------------------------------------- training
def _train_single(recipe, folder, device="cpu", resume=True, progress=True):
    from .train import save_model, train

    model, log = train(recipe, device=device, resume=resume, progress=progress)
    return save_model(recipe, model, log, folder)


def _train_sd(recipe, folder, device="cpu", resume=True, progress=True):
    from .latent import train_pipeline

    return train_pipeline(recipe, folder, device=device, resume=resume, progress=progress)


def _state_entry_loader(module: str, fn: str):
    """The ``load`` of a chapter's toy entry: ``module.fn(state_dict, model_config)`` on the entry's
    ``model.safetensors`` and ``config.json`` (the module is imported when the entry is loaded)."""
    def load(folder, entry, root):
        import importlib

        from safetensors.torch import load_file

        build = getattr(importlib.import_module(module, __package__), fn)
        return build(load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text()))
    return load


def _write_weights(folder: pathlib.Path, state: dict, config: dict) -> None:
    """Empty ``folder`` of files, then write ``model.safetensors`` (``state``) and ``config.json`` (``config``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file():
            old.unlink()
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")


def _write_log(folder: pathlib.Path, log: dict) -> None:
    (folder / "train_log.json").write_text(json.dumps(log, sort_keys=True) + "\n")


def _train_adapter(builder: str):
    def train(recipe, folder, device="cpu", resume=True, progress=True):
        from ..accelerators import early_exit, linear_attention

        fn = {"exit_heads": early_exit.build_exit_heads, "linear_attention": linear_attention.build_linear_attention}
        module = fn[builder](None, adapter_recipe_dict(recipe), device=device)
        module = module.cpu().eval()
        _write_weights(folder, module.state_dict(), module.config())
        _write_log(folder, dict(module.train_log, config_hash=recipe.config_hash))
        return folder
    return train


def adapter_recipe_dict(recipe) -> dict:
    """The flat settings dict the accelerator builders take (``EXIT_RECIPE``-style) from an adapter ``Recipe``."""
    tc = recipe.train
    return dict(recipe.extra, steps=tc.steps, batch_size=tc.batch_size, lr=tc.lr, p_uncond=tc.p_uncond, seed=tc.seed,
                data="load_digits('train')")


# ----------------------------------------------------------------------------------------------- cost, metrics
def _cost_network(obj, recipe) -> dict:
    from .evaluate import flops_per_call

    return {"params": sum(p.numel() for p in obj.parameters()),
            "flops_per_call": flops_per_call(obj, recipe.kind, recipe.size)}


def _cost_sd(obj, recipe) -> dict:
    from .latent import pipeline_cost

    return pipeline_cost(obj)


def _cost_adapter(obj, recipe) -> dict:
    return {"params": sum(p.numel() for p in obj.parameters())}


def _eval_classifier(name, root):
    from .evaluate import measure_classifier

    return measure_classifier()


def _eval_digits(name, root):
    from .evaluate import measure_digits_model

    return measure_digits_model(name)


def _eval_sd(name, root):
    from .latent import measure_pipeline
    from .registry import load

    return measure_pipeline(load(name, root=root))


def _eval_adapter(name, root):
    """The adapter's final training loss, read from its (verified) training log."""
    from .registry import fetch, get_entry

    folder = fetch(name, get_entry(name, root), root)
    log = json.loads((folder / "train_log.json").read_text())
    return {"final_train_loss": round(float(log["loss"][-1][1]), 6), "train_steps": log["steps"]}


# ----------------------------------------------------------------------------------------------- chapter 23
def _finetune_kw(model_cfg: dict) -> tuple[str, dict]:
    kw = dict(model_cfg)
    kw.pop("smooth", None)  # a training-only setting (chapter 22's step-variation weight)
    return kw.pop("method"), kw


def _load_finetune(folder, entry, root):
    """A fine-tuned zoo model: the base model with the stored update applied (:mod:`dmlab.finetuning`)."""
    from safetensors.torch import load_file

    from ..finetuning import load_adapter_state
    from .registry import load

    method, kw = _finetune_kw(json.loads((folder / "config.json").read_text()))
    model = load_adapter_state(method, load(entry["base"], root=root), load_file(str(folder / "model.safetensors")),
                               **kw)
    model.info = entry
    return model


def _train_finetune(recipe, folder, device="cpu", resume=True, progress=True):
    """Fine-tune the base on the recipe's classes with :func:`dmlab.finetuning.finetune` and store the update."""
    import torch
    from ..data import load_digits
    from ..finetuning import adapter_state, finetune
    from .recipes import SCHEDULER_CONFIG
    from .registry import load
    from .train import training_alphas_cumprod

    method, kw = _finetune_kw(recipe.model)
    base = load(recipe.extra["base"])
    x, y = load_digits("train", size=recipe.size)
    if "bias" in recipe.extra:  # chapter 22 (InvDiff): digits with an edge bar correlated with their parity
        from ..debias import biased_digits

        x, y, _ = biased_digits("train", size=recipe.size, **recipe.extra["bias"])
    keep = torch.isin(y, torch.tensor(recipe.extra["classes"]))
    tc = recipe.train
    reg = None
    if recipe.model.get("smooth"):
        from ..guidance import StepVariationRegularizer

        reg = StepVariationRegularizer(recipe.model["smooth"], seed=tc.seed)
    res = finetune(base, method, x[keep], y[keep], training_alphas_cumprod(), steps=tc.steps, lr=tc.lr,
                   seed=tc.seed, batch_size=tc.batch_size, p_uncond=tc.p_uncond, regularizer=reg, **kw)
    state = adapter_state(method, base, res.model)
    _write_weights(folder, state, recipe.model)
    from diffusers import DDPMScheduler

    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder)
    rebuilt = _load_finetune(folder, {"base": recipe.extra["base"]}, None)
    with torch.no_grad():
        probe = torch.randn(16, 1, recipe.size, recipe.size, generator=torch.Generator().manual_seed(0))
        t, c = torch.full((16,), 500), torch.arange(16) % 10
        gap = float((rebuilt(probe, t, class_labels=c).sample - res.model(probe, t, class_labels=c).sample).abs().max())
    n = max(1, tc.steps // 10)
    curve = [[i + n, sum(res.losses[i:i + n]) / n] for i in range(0, len(res.losses) - n + 1, n)]
    log = {"config_hash": recipe.config_hash, "steps": tc.steps, "train_seconds": round(res.seconds, 1),
           "device": str(device), "trainable": res.trainable, "loss": curve, "info": res.info,
           "stored_vs_trained_max_abs_output_gap": gap}
    _write_log(folder, log)
    return folder


def _cost_finetune(obj, recipe) -> dict:
    from .store import zoo_dir

    log = json.loads((zoo_dir() / recipe.name / "train_log.json").read_text())
    return {"params": sum(p.numel() for p in obj.parameters()), "trainable": log["trainable"]}


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("classifier", _load_classifier, _train_single, _cost_network, _eval_classifier, single_network=True),
    Kind("unet", _load_diffusers("UNet2DModel"), _train_single, _cost_network, _eval_digits, denoiser=True,
         single_network=True),
    Kind("dit", _load_diffusers("DiTTransformer2DModel"), _train_single, _cost_network, _eval_digits, denoiser=True,
         single_network=True),
    Kind("sd", _load_sd, _train_sd, _cost_sd, _eval_sd, denoiser=True),
    Kind("exit_heads", _load_exit_heads, _train_adapter("exit_heads"), _cost_adapter, _eval_adapter, adapter=True),
    Kind("linear_attention", _load_linear, _train_adapter("linear_attention"), _cost_adapter, _eval_adapter,
         adapter=True),
    # chapter 23: efficient fine-tuning (full / LoRA / DiffFit / SaRA updates of a zoo model)
    Kind("finetune", _load_finetune, _train_finetune, _cost_finetune, _eval_adapter, denoiser=True, adapter=True),
]}
# ----------------------------------------------------------------------------------------------- chapter 25
_load_ring_students = _state_entry_loader("..distill.consistency", "load_ring_students")


def _train_ring_students(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from ..distill.consistency import train_ring_students

    t0 = time.time()
    state, log = train_ring_students(recipe.model, progress=progress)
    return _save_toy_entry(recipe, folder, state, log, time.time() - t0)


def _save_toy_entry(recipe, folder, state, log, seconds, steps=None):
    """Write a CPU toy entry (one state dict of every network, its model config and the training log; ``steps``
    defaults to the recipe's ``model["steps"]``)."""
    _write_weights(folder, state, recipe.model)
    log = dict(log, config_hash=recipe.config_hash, train_seconds=round(seconds, 1),
               steps=recipe.model["steps"] if steps is None else steps, device="cpu")
    _write_log(folder, log)
    return folder


def _cost_ring_students(obj, recipe) -> dict:
    from ..distill.consistency import _ring_modules

    import torch

    from ..bench import count_flops

    mods = _ring_modules(recipe.model)
    per_seed = sum(p.numel() for m in mods.values() for p in m.parameters())
    x = torch.zeros(1, 2)
    with torch.no_grad():  # one student call on one 2-D point (every student has the same MLP trunk)
        flops = count_flops(lambda: mods["direct"](x, torch.zeros(1)))
    return {"params": per_seed * len(recipe.model["seeds"]), "flops_per_call": int(flops)}


def _eval_ring_students(name, root):
    from .registry import fetch, get_entry

    folder = fetch(name, get_entry(name, root), root)
    log = json.loads((folder / "train_log.json").read_text())
    return {f"final_loss_{m}": round(sum(v[m] for v in log["final_loss"].values()) / len(log["final_loss"]), 6)
            for m in next(iter(log["final_loss"].values()))}


KINDS["ring_students"] = Kind("ring_students", _load_ring_students, _train_ring_students, _cost_ring_students,
                              _eval_ring_students)



# ----------------------------------------------------------------------------------------------- chapter 24
_load_guided_students = _state_entry_loader("..distill.guidance", "load_guided_students")


def _train_guided_students(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from ..bench import num_threads
    from ..distill.guidance import train_guided_students

    t0 = time.time()
    with num_threads(1):  # tiny MLPs: one thread is faster, and reproducible
        state, log = train_guided_students(recipe.model, progress=progress)
    return _save_toy_entry(recipe, folder, state, log, time.time() - t0)


def _cost_guided_students(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops
    from ..distill.guidance import ClassMLP

    cfg = recipe.model
    net = ClassMLP(2, cfg["hidden"], cfg["depth"], 4)
    with torch.no_grad():  # one teacher-network call on one 2-D point
        flops = count_flops(lambda: net(torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, dtype=torch.long)))
    per = sum(p.numel() for p in net.parameters())
    return {"params": per * (1 + 4 * len(cfg["seeds"])), "flops_per_call": int(flops)}


def _eval_guided_students(name, root):
    from .registry import fetch, get_entry

    folder = fetch(name, get_entry(name, root), root)
    log = json.loads((folder / "train_log.json").read_text())
    seeds = [v for k, v in log["final_loss"].items() if k != "teacher"]
    out = {"final_loss_teacher": round(log["final_loss"]["teacher"], 6)}
    out.update({f"final_loss_{m}": round(sum(v[m] for v in seeds) / len(seeds), 6) for m in seeds[0]})
    return out


KINDS["guided_students"] = Kind("guided_students", _load_guided_students, _train_guided_students,
                                _cost_guided_students, _eval_guided_students)


# ----------------------------------------------------------------------------------------------- chapter 28
def _load_superres(folder, entry, root):
    from safetensors.torch import load_file

    from ..superres import load_sr_models

    log = json.loads((folder / "train_log.json").read_text())
    return load_sr_models(load_file(str(folder / "model.safetensors")), log["configs"])


def _train_superres(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from ..superres import train_sr_models

    t0 = time.time()
    state, log = train_sr_models(recipe.model, recipe.model["seed"], progress=progress)
    _write_weights(folder, state, recipe.model)
    m = recipe.model
    steps = (2 * (m["steps_teacher"] + m["steps_student"] + m["steps_compress"]) if m["part"] == "sr"
             else 2 * m["steps_pasd"])  # optimizer steps over all models of the entry
    log = dict(log, config_hash=recipe.config_hash, train_seconds=round(time.time() - t0, 1), device="cpu",
               steps=steps)
    _write_log(folder, log)
    return folder


def _cost_superres(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops

    x = torch.zeros(1, 1, recipe.size, recipe.size)
    first = next(iter(obj.values()))
    with torch.no_grad():  # one call of the first saved model on one image
        flops = count_flops(lambda: first(x, x, torch.ones(1)))
    return {"params": sum(p.numel() for m in obj.values() for p in m.parameters()), "flops_per_call": int(flops)}


def _eval_superres(name, root):
    from .registry import fetch, get_entry

    folder = fetch(name, get_entry(name, root), root)
    log = json.loads((folder / "train_log.json").read_text())
    return {f"final_loss_{m}": v for m, v in log["final_loss"].items() if m != "teacher_x2"}


KINDS["superres"] = Kind("superres", _load_superres, _train_superres, _cost_superres, _eval_superres)


# ----------------------------------------------------------------------------------------------- chapter 29
_load_dense = _state_entry_loader("..dense", "load_dense_suite")


def _train_dense(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from ..dense import train_dense_suite
    from .registry import load_denoiser

    t0 = time.time()
    frozen = load_denoiser(recipe.model["frozen"]) if recipe.model.get("frozen") else None
    state, log = train_dense_suite(recipe.model, frozen, progress=progress)
    state = {k: v.contiguous() for k, v in state.items()}
    return _save_toy_entry(recipe, folder, state, {"final_loss": log}, time.time() - t0)


def _cost_dense(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops
    from ..dense import DenseNet

    net = DenseNet(width=recipe.model["width"])
    s = recipe.model["size"]
    with torch.no_grad():
        flops = count_flops(lambda: net(torch.zeros(1, 3, s, s), torch.zeros(1, 4, s, s), torch.zeros(1)))
    return {"params": sum(p.numel() for m in obj.values() for p in m.parameters()), "flops_per_call": int(flops)}


def _eval_dense(name, root):
    from .registry import fetch, get_entry

    folder = fetch(name, get_entry(name, root), root)
    log = json.loads((folder / "train_log.json").read_text())
    return {f"final_loss_{m}": v for m, v in log["final_loss"].items()}


KINDS["dense"] = Kind("dense", _load_dense, _train_dense, _cost_dense, _eval_dense)


_load_calib = _state_entry_loader("..dense", "load_calib_suite")


def _dense_suite_trainer(fn: str):
    """The ``train`` of a chapter-29 toy entry: ``dmlab.dense.<fn>(recipe.model, progress=...)`` returns
    ``(state_dict, final_losses)``, saved by :func:`_save_toy_entry`."""
    def train(recipe, folder, device="cpu", resume=True, progress=True):
        import time

        from .. import dense

        t0 = time.time()
        state, log = getattr(dense, fn)(recipe.model, progress=progress)
        state = {k: v.contiguous() for k, v in state.items()}
        return _save_toy_entry(recipe, folder, state, {"final_loss": log}, time.time() - t0)
    return train


_train_calib = _dense_suite_trainer("train_calib_suite")


def _cost_calib(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops

    s = recipe.model["size"]
    with torch.no_grad():
        flops = count_flops(lambda: obj["camera"](torch.zeros(1, 3, s, s), torch.zeros(1, 0, s, s),
                                                  torch.zeros(1, dtype=torch.long)))
    return {"params": sum(p.numel() for m in obj.values() for p in m.parameters()), "flops_per_call": int(flops)}


KINDS["calib"] = Kind("calib", _load_calib, _train_calib, _cost_calib, _eval_dense)


_load_match = _state_entry_loader("..dense", "load_match_suite")


_train_match = _dense_suite_trainer("train_match_suite")


def _cost_match(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops
    from ..dense import condition_channels

    s, c = recipe.model["size"], condition_channels(recipe.model["radius"])
    with torch.no_grad():  # one call of the diffusion net (the regression net is the same network)
        flops = count_flops(lambda: obj["diffusion"](torch.zeros(1, c, s, s), torch.zeros(1, 2, s, s),
                                                     torch.zeros(1, dtype=torch.long)))
    return {"params": sum(p.numel() for m in obj.values() for p in m.parameters()), "flops_per_call": int(flops)}


KINDS["match"] = Kind("match", _load_match, _train_match, _cost_match, _eval_dense)


ADAPTER_KINDS = tuple(k for k, v in KINDS.items() if v.adapter)


def kind_of(kind: str) -> Kind:
    """The :class:`Kind` record of ``kind``; ``ValueError`` naming the known kinds otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown zoo kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind]


# ----------------------------------------------------------------------------------------------- chapter 27
def _save_half(module, folder, config: dict, log: dict) -> None:
    """Weights in float16 (half the bytes; loaded back as float32), the config and the training log."""
    _write_weights(folder, {k: v.detach().half() for k, v in module.state_dict().items()}, config)
    _write_log(folder, log)


def _load_half(module, folder):
    from safetensors.torch import load_file

    module.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    return module.eval()


def _load_kd_student(folder, entry, root):
    """dit_s with blocks removed (:func:`dmlab.distill.architecture.remove_blocks`) and the stored weights."""
    from ..distill.architecture import remove_blocks
    from .registry import load

    cfg = json.loads((folder / "config.json").read_text())
    model = _load_half(remove_blocks(load(entry["base"], root=root), cfg["keep"]), folder)
    model.info = entry
    return model


def _train_kd_student(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    import torch
    from diffusers import DDPMScheduler

    from ..data import load_digits
    from ..distill.architecture import distill_student
    from .recipes import SCHEDULER_CONFIG
    from .registry import load
    from .train import training_alphas_cumprod

    x, y = load_digits("train", size=recipe.size)
    tc, m = recipe.train, recipe.model
    cpu0 = time.process_time()
    student, log = distill_student(load(recipe.extra["base"]), m["keep"], m["site"], x, y, training_alphas_cumprod(),
                                   steps=tc.steps, batch_size=tc.batch_size, lr=tc.lr, seed=tc.seed,
                                   p_uncond=tc.p_uncond, w_out=m["w_out"], w_feat=m["w_feat"])
    log.update(config_hash=recipe.config_hash, device=str(device), threads=torch.get_num_threads(),
               cpu_seconds=round(time.process_time() - cpu0, 1))
    _save_half(student, folder, recipe.model, log)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder)
    return folder


def _load_maskgit(folder, entry, root):
    import torch

    from ..masked_tokens import MaskedTokenTransformer, PatchVQ, TokenGenerator

    cfg = json.loads((folder / "config.json").read_text())
    size = cfg.get("size", 8)
    vq = PatchVQ(torch.zeros(cfg["vocab"], cfg["patch"] ** 2), cfg["patch"], size)
    tf = MaskedTokenTransformer(cfg["vocab"], vq.n_tokens, width=cfg["width"], depth=cfg["depth"], heads=cfg["heads"])
    gen = _load_half(TokenGenerator(vq, tf), folder)
    gen.info = entry
    return gen


def _train_maskgit(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    import torch
    from ..data import load_digits
    from ..masked_tokens import fit_token_generator

    x, y = load_digits("train", size=recipe.size)
    tc = recipe.train
    cpu0 = time.process_time()
    gen, log = fit_token_generator(x, y, recipe.model, steps=tc.steps, batch_size=tc.batch_size, lr=tc.lr,
                                   seed=tc.seed, p_uncond=tc.p_uncond, warmup=tc.warmup, ema=tc.ema)
    log.update(config_hash=recipe.config_hash, device=str(device), threads=torch.get_num_threads(),
               cpu_seconds=round(time.process_time() - cpu0, 1))
    _save_half(gen, folder, dict(recipe.model, size=recipe.size), log)
    return folder


def _cost_maskgit(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops

    tok = torch.zeros(1, obj.model.n_tokens, dtype=torch.long)
    with torch.no_grad():  # one transformer call (one decoding step) for one image
        flops = count_flops(lambda: obj.model(tok, torch.zeros(1, dtype=torch.long)))
    return {"params": sum(p.numel() for p in obj.model.parameters()), "flops_per_call": int(flops)}


KINDS["kd_student"] = Kind("kd_student", _load_kd_student, _train_kd_student, _cost_network, _eval_adapter,
                           denoiser=True, adapter=True)
KINDS["maskgit"] = Kind("maskgit", _load_maskgit, _train_maskgit, _cost_maskgit, _eval_adapter)
ADAPTER_KINDS = tuple(k for k, v in KINDS.items() if v.adapter)


# ----------------------------------------------------------------------------------------------- chapter 32
_load_beyond = _state_entry_loader("..beyond", "load_entry")


def _train_beyond(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from ..beyond import train_entry

    t0 = time.process_time()  # CPU seconds: the wall clock of a shared machine says little
    state, log = train_entry(recipe.model, progress=progress)
    return _save_toy_entry(recipe, folder, state, log, time.process_time() - t0, recipe.train.steps)


def _cost_beyond(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops

    models = [m for v in obj.values() for m in (v if isinstance(v, list) else [x for l in v.values() for x in l])]
    one = models[0]
    with torch.no_grad():
        if recipe.model["task"] == "tsdiff":
            flops = count_flops(lambda: one(torch.zeros(1, recipe.model["length"]), torch.zeros(1, dtype=torch.long)))
        elif recipe.model["task"] == "sde":
            L = recipe.model.get("length", 48)
            flops = count_flops(lambda: one(torch.zeros(1, L), torch.ones(1, L)))
        else:
            z = torch.zeros(1, 32)
            flops = count_flops(lambda: one(z, z, torch.zeros(1)))
    return {"params": sum(p.numel() for m in models for p in m.parameters()), "flops_per_call": int(flops)}


def _eval_beyond(name, root):
    from .registry import fetch, get_entry

    folder = fetch(name, get_entry(name, root), root)
    log = json.loads((folder / "train_log.json").read_text())
    groups: dict = {}
    for k, v in log["final_loss"].items():
        groups.setdefault(k.rsplit(".s", 1)[0], []).append(v)
    return {f"final_loss_{k}": round(sum(v) / len(v), 6) for k, v in groups.items()}


# time series (TSDiff, paper 49), PDE operators (Poseidon, paper 80) and neural SDE classifiers (stable neural
# SDEs, paper 8): several small models per entry
KINDS["beyond"] = Kind("beyond", _load_beyond, _train_beyond, _cost_beyond, _eval_beyond)


# ----------------------------------------------------------------------------------------------- chapter 25, paper 65
def _train_robust_classifier(recipe, folder, device="cpu", resume=True, progress=True):
    """Fine-tune a copy of the base classifier with :func:`dmlab.distill.consistency.rrcm_finetune`."""
    import copy

    import torch

    from ..data import load_digits
    from ..distill.consistency import rrcm_finetune
    from .registry import load

    ex, tc = recipe.extra, recipe.train
    model = copy.deepcopy(load(ex["base"]))
    x, y = load_digits("train")
    lo, hi, k = ex["sigma_grid"]
    res = rrcm_finetune(model, x, y, torch.linspace(lo, hi, k), steps=tc.steps, batch=tc.batch_size, lr=tc.lr,
                        generator=torch.Generator().manual_seed(tc.seed), contrastive=ex["contrastive"],
                        lbd=ex["lbd"], tau=ex["tau"], eta=ex["eta"])
    _write_weights(folder, model.state_dict(), recipe.model)
    _write_log(folder, {"config_hash": recipe.config_hash, "steps": tc.steps, "train_seconds": round(res.seconds, 1),
                        "device": "cpu", "loss": res.curve})
    return folder


def _eval_robust_classifier(name, root):
    import torch

    from ..data import load_digits
    from .registry import load

    model = load(name)
    x, y = load_digits("test")
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return {"test_accuracy_sigma0.5": round(float((model(noisy).argmax(1) == y).float().mean()), 4)}


KINDS["robust_classifier"] = Kind("robust_classifier", _load_classifier, _train_robust_classifier, _cost_network,
                                  _eval_robust_classifier)


# ----------------------------------------------------------------------------------------------- chapter 33
_load_latent_edit = _state_entry_loader("..latent_edit", "load_entry")


def _train_latent_edit(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from ..latent_edit import train_entry

    t0 = time.process_time()
    state, log = train_entry(recipe.model, progress=progress)
    return _save_toy_entry(recipe, folder, state, log, time.process_time() - t0, recipe.train.steps)


def _cost_latent_edit(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops

    d = obj["asym"][0]
    z, x, m = torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    with torch.no_grad():
        flops = count_flops(lambda: d(z, x, m))
    return {"params": sum(p.numel() for v in obj.values() for d in v for p in d.parameters()),
            "flops_per_call": int(flops)}


# asymmetric decoders of sd_tiny (Asymmetric VQGAN, paper 77)
KINDS["latent_edit"] = Kind("latent_edit", _load_latent_edit, _train_latent_edit, _cost_latent_edit, _eval_beyond)


# ----------------------------------------------------------------------------------------------- chapter 24, paper 6
_load_speedup = _state_entry_loader("..distill.speedup", "load_speedup_entry")


def _train_speedup(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from ..bench import num_threads
    from ..distill.speedup import train_speedup_entry

    t0 = time.process_time()
    with num_threads(1):  # reproducible, and fair to a shared machine
        state, log = train_speedup_entry(recipe.model, progress=progress)
    return _save_toy_entry(recipe, folder, state, log, time.process_time() - t0)


def _cost_speedup(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops
    from ..distill.speedup import SpeedUpStudent, _wrap, prompt_table

    pipe = obj["pipe"]
    st = SpeedUpStudent(pipe.unet, obj["adapters"][0], _wrap(pipe.scheduler))
    table, empty = prompt_table(pipe)
    with torch.no_grad():  # one adapter-plugged UNet call on one latent (the base call plus the adapter branch)
        flops = count_flops(lambda: st(torch.zeros(1, 4, 8, 8), torch.ones(1), w=2.0,
                                       encoder_hidden_states=table[:1, 0], negative_hidden_states=empty))
    st.remove()
    return {"params": sum(p.numel() for a in obj["adapters"] for p in a.parameters()), "flops_per_call": int(flops)}


def _eval_speedup(name, root):
    from .registry import fetch, get_entry

    folder = fetch(name, get_entry(name, root), root)
    log = json.loads((folder / "train_log.json").read_text())
    fl = log["final_loss"]
    seeds = [v for k, v in fl.items() if k != "ft"]
    return {"final_loss_adapter": round(sum(seeds) / len(seeds), 6), "final_loss_ft": round(fl["ft"], 6)}


KINDS["speedup"] = Kind("speedup", _load_speedup, _train_speedup, _cost_speedup, _eval_speedup, adapter=True)


# ------------------------------------------------------------------------------------------ chapter 23, papers 9, 45
def _load_pretraining(folder, entry, root):
    from .recipes import get_recipe

    fn = entry.get("recipe", {}).get("extra", {}).get("load") or get_recipe(folder.name).extra["load"]
    return _state_entry_loader("..pretraining", fn)(folder, entry, root)


def _train_pretraining(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from .. import pretraining
    from ..bench import num_threads

    t0 = time.process_time()
    with num_threads(1):  # tiny MLPs: one thread is faster, and reproducible
        state, log = getattr(pretraining, recipe.extra["train"])(recipe.model, progress=progress)
    return _save_toy_entry(recipe, folder, state, log, time.process_time() - t0, recipe.train.steps)


def _cost_pretraining(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops

    den = next(iter(obj.values()))[0]
    x, y = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        flops = count_flops(lambda: den(x, torch.ones(1), class_labels=y))
    return {"params": sum(p.numel() for v in obj.values() for d in v for p in d.net.parameters()),
            "flops_per_call": int(flops)}


# slight label corruption / CEP (paper 9) and KIND (paper 45) on the exact class-conditional triads
KINDS["pretraining"] = Kind("pretraining", _load_pretraining, _train_pretraining, _cost_pretraining, _eval_beyond)


# ----------------------------------------------------------------------------------------------- chapter 22 (InvDiff)
_load_invdiff = _state_entry_loader("..debias", "load_entry")


def _train_invdiff(recipe, folder, device="cpu", resume=True, progress=True):
    import time

    from ..debias import train_entry

    t0 = time.time()
    state, log = train_entry(recipe.model, progress=progress)
    return _save_toy_entry(recipe, folder, state, log, time.time() - t0)


def _cost_invdiff(obj, recipe) -> dict:
    import torch

    from ..bench import count_flops

    delta = next(iter(obj.values()))
    x, t, y = torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        flops = count_flops(lambda: delta(x, t, class_labels=y))
    return {"params": sum(p.numel() for d in obj.values() for p in d.parameters()), "flops_per_call": int(flops)}


KINDS["invdiff"] = Kind("invdiff", _load_invdiff, _train_invdiff, _cost_invdiff, _eval_beyond, adapter=True)
