"""``sd_tiny``: a text-to-image latent diffusion model on digits, assembled as a real ``StableDiffusionPipeline``.

The parts are Stable Diffusion's classes at toy size (Rombach et al. 2022, latent diffusion):

* ``AutoencoderKL`` (16x16x1 digits <-> 8x8x4 latents), trained first with an MSE + small KL loss; its
  ``scaling_factor`` is set to 1/std of the training latents (SD's 0.18215 came from the same recipe).
* ``CLIPTextModel`` built from a config, with a CLIP BPE tokenizer written locally (:func:`write_tokenizer`):
  every word of the prompt vocabulary is one token. Unlike SD (frozen pretrained CLIP) the text encoder is trained
  jointly with the UNet, as GLIDE trains its text transformer (Nichol et al. 2022): nothing pretrained exists here.
* ``UNet2DConditionModel`` with SD's layout (cross-attention down/up blocks around a plain lowest-resolution block),
  eps-prediction on SD's discrete "scaled_linear" schedule (betas 0.00085..0.012, 1000 steps), prompts dropped to ""
  with probability ``p_uncond`` for classifier-free guidance (Ho & Salimans 2022).

Prompts name the digit, e.g. "a handwritten seven", "the number 7" (:data:`TEMPLATES`). The pipeline is saved with
``save_pretrained`` and loads offline with ``StableDiffusionPipeline.from_pretrained(folder)``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from .recipes import MAX_LENGTH, SD_SCHEDULE, TEMPLATES, Recipe

__all__ = [
    "prompt",
    "write_tokenizer",
    "build_parts",
    "train_pipeline",
    "save_pipeline",
    "generate",
    "measure_pipeline",
    "pipeline_cost",
]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"


def prompt(label: int, template: int = 0) -> str:
    """The prompt for digit ``label`` with template ``template`` (0: "a handwritten seven")."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label must be a digit 0..9, got {label}")
    return TEMPLATES[template].format(word=WORDS[int(label)], num=int(label))


def _vocab_and_merges():
    """A CLIP BPE vocabulary in which every prompt word is one token: characters (and ``char</w>``) as a fallback,
    then for each word the chain of merges that builds it from left to right."""
    words = sorted({w for t in TEMPLATES for w in t.replace("{word}", "").replace("{num}", "").split()} | set(WORDS))
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = [BOS, EOS, UNK] + chars + [c + "</w>" for c in chars]
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merged = cur + nxt
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            if merged not in vocab:
                vocab.append(merged)
            cur = merged
    return vocab, merges, words


def write_tokenizer(folder: str | pathlib.Path):
    """Write ``vocab.json``, ``merges.txt`` and the configs of a word-level CLIP BPE tokenizer to ``folder`` and
    load it with ``CLIPTokenizer.from_pretrained`` (the files work with transformers 4.x and 5.x). Checks that every
    vocabulary word is a single token."""
    from transformers import CLIPTokenizer

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges, words = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        dict(special, tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH, do_lower_case=True)))
    tok = CLIPTokenizer.from_pretrained(folder)
    for w in words:
        ids = tok(w).input_ids
        if len(ids) != 3:
            raise RuntimeError(f"tokenizer splits {w!r} into {tok.convert_ids_to_tokens(ids)}; fix the merges")
    return tok


def build_parts(recipe: Recipe, vocab_size: int, tok) -> nn.ModuleDict:
    """Randomly initialised ``vae``, ``unet`` and ``text_encoder`` of the recipe (seeded, forked RNG)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    m = recipe.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        vae = AutoencoderKL(**m["vae"])
        text = CLIPTextModel(CLIPTextConfig(**m["text_encoder"], vocab_size=vocab_size,
                                            max_position_embeddings=MAX_LENGTH, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        unet = UNet2DConditionModel(**m["unet"])
    return nn.ModuleDict({"vae": vae, "unet": unet, "text_encoder": text})


def _prompt_ids(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every (label, template) prompt ``[10, T, L]`` and of the empty prompt ``[L]``."""
    ids = [[tok(prompt(c, t), padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
            for t in range(len(TEMPLATES))] for c in range(10)]
    empty = tok("", padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    return torch.tensor(ids), torch.tensor(empty)


def train_pipeline(recipe: Recipe, folder: pathlib.Path, *, device: str = "cpu", resume: bool = True,
                   progress: bool = True, stop_after: int | None = None, state_dir: pathlib.Path | None = None):
    """Train ``sd_tiny`` (VAE for ``extra['vae_steps']`` steps, then UNet + text encoder for ``train.steps``), then
    save it as a ``StableDiffusionPipeline`` to ``folder``. Two :func:`dmlab.train.fit` phases sharing one
    generator, each resumable like :func:`dmlab.zoo.train.train` (``stop_after`` counts the steps of both)."""
    import shutil

    from ..data import load_digits
    from ..train import fit, process_info
    from .train import fit_config, run_dir

    tc, ex = recipe.train, recipe.extra
    state_dir = state_dir or run_dir(recipe)
    if state_dir is None:  # no place for run state: the tokenizer goes next to the output
        state_dir = pathlib.Path(folder).with_name(pathlib.Path(folder).name + ".run")
    if not resume and process_info()[0] == 0:
        shutil.rmtree(state_dir, ignore_errors=True)
    tok_dir = state_dir / "tokenizer"
    tok = write_tokenizer(tok_dir)
    parts = build_parts(recipe, len(tok), tok).to(device)
    x_all, y_all = load_digits("train", size=recipe.size)
    ids_all, ids_empty = _prompt_ids(tok)
    gen = torch.Generator().manual_seed(tc.seed)
    n_vae = ex["vae_steps"]
    vm = recipe.model["vae"]
    zshape = (vm["latent_channels"], recipe.size // 2 ** (len(vm["block_out_channels"]) - 1))

    def vae_batch(g):
        idx = torch.randint(0, x_all.shape[0], (tc.batch_size,), generator=g)
        return {"x0": x_all[idx], "noise": torch.randn(tc.batch_size, zshape[0], zshape[1], zshape[1], generator=g)}

    def vae_loss(b):  # ---- phase 1: the autoencoder (MSE + small KL)
        x0 = b["x0"].to(device)
        post = parts["vae"].encode(x0).latent_dist
        rec = parts["vae"].decode(post.mean + post.std * b["noise"].to(device)).sample
        return F.mse_loss(rec, x0) + ex["kl_weight"] * post.kl().mean() / x0[0].numel()

    cfg1 = dataclasses.replace(fit_config(recipe, progress=progress, steps=n_vae, lr=ex["vae_lr"], ema=False),
                               optimizer="adamw", weight_decay=0.0, schedule="constant", warmup=50,
                               desc=f"{recipe.name} vae")
    r1 = fit(vae_loss, parts["vae"], cfg1, generator=gen, data=vae_batch, run=state_dir / "vae",
             run_key=recipe.config_hash, stop_after=stop_after)
    curve, seconds = list(r1.curve), r1.seconds
    if not r1.complete:
        return None  # interrupted on purpose (stop_after): the state is saved, nothing to assemble yet
    ac, scale = _phase2_setup(parts, x_all.to(device), None)
    parts["vae"].requires_grad_(False)
    denoiser = nn.ModuleDict({"unet": parts["unet"], "text_encoder": parts["text_encoder"]})

    def unet_batch(g):
        idx = torch.randint(0, x_all.shape[0], (tc.batch_size,), generator=g)
        B = tc.batch_size
        lat = torch.randn(B, zshape[0], zshape[1], zshape[1], generator=g)
        t = torch.randint(0, 1000, (B,), generator=g)
        tmpl = torch.randint(0, len(TEMPLATES), (B,), generator=g)
        drop = torch.rand(B, generator=g) < tc.p_uncond
        eps = torch.randn(B, zshape[0], zshape[1], zshape[1], generator=g)
        ids = torch.where(drop[:, None], ids_empty[None], ids_all[y_all[idx], tmpl])
        return {"x0": x_all[idx], "lat": lat, "t": t, "ids": ids, "eps": eps}

    def unet_loss(b):  # ---- phase 2: UNet + text encoder on scaled latents
        with torch.no_grad():
            post = parts["vae"].encode(b["x0"].to(device)).latent_dist
            z0 = scale * (post.mean + post.std * b["lat"].to(device))
        a = ac[b["t"]].view(-1, 1, 1, 1).to(device)
        eps = b["eps"].to(device)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        hidden = parts["text_encoder"](b["ids"].to(device))[0]
        return F.mse_loss(parts["unet"](z_t, b["t"].to(device), encoder_hidden_states=hidden).sample, eps)

    r2 = fit(unet_loss, denoiser, fit_config(recipe, progress=progress), generator=gen, data=unet_batch,
             run=state_dir / "unet", run_key=recipe.config_hash,
             stop_after=None if stop_after is None else stop_after - n_vae)
    curve += [[s + n_vae, v] for s, v in r2.curve]
    seconds += r2.seconds
    if not r2.complete:
        return None
    log = {"config_hash": recipe.config_hash, "steps": n_vae + r2.steps, "complete": True,
           "train_seconds": round(seconds, 1), "device": str(device), "torch_threads": torch.get_num_threads(),
           "processes": process_info()[1], "vae_steps": n_vae, "scaling_factor": scale,
           "curve": [[s, round(v, 6)] for s, v in curve]}
    if process_info()[0] != 0:
        return folder
    return save_pipeline(parts, tok_dir, scale, log, folder)


def _phase2_setup(parts, x_all, scale):
    """SD's discrete schedule and the latent scaling factor 1/std(latents) (computed once from the trained VAE)."""
    from ..schedules import betas_for

    s = SD_SCHEDULE
    ac = torch.cumprod(1 - betas_for(s["num_train_timesteps"], s["beta_start"], s["beta_end"],
                                     s["beta_schedule"]).double(), 0).float()
    if scale is None:
        with torch.no_grad():
            z = torch.cat([parts["vae"].encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
        scale = float(1 / z.float().std())
    return ac, scale


def save_pipeline(parts, tok_dir: pathlib.Path, scale: float, log: dict, folder: pathlib.Path) -> pathlib.Path:
    """Assemble the ``StableDiffusionPipeline`` and ``save_pretrained`` it (safetensors) with the tokenizer's
    vocab/merges files and the training log."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    parts = parts.to("cpu").eval()
    parts["vae"].register_to_config(scaling_factor=scale)
    sched = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                   tokenizer=CLIPTokenizer.from_pretrained(tok_dir), unet=parts["unet"],
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):  # transformers 4.x's slow CLIPTokenizer reads these
        shutil.copy(tok_dir / f, folder / "tokenizer" / f)
    (folder / "train_log.json").write_text(json.dumps(log) + "\n")
    return folder


@torch.no_grad()
def generate(pipe, labels, *, generator: torch.Generator, steps: int = 25, guidance: float = 2.0,
             template: int = 0, batch_size: int = 100) -> torch.Tensor:
    """Images ``[B, 1, 16, 16]`` in ``[-1, 1]`` from the pipeline for prompts naming ``labels`` (DDIM, CFG)."""
    out = []
    labels = [int(c) for c in labels]
    for i in range(0, len(labels), batch_size):
        prompts = [prompt(c, template) for c in labels[i:i + batch_size]]
        img = pipe(prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=guidance,
                   generator=generator, output_type="pt").images
        out.append(img.float().cpu() * 2 - 1)
    return torch.cat(out)


def measure_pipeline(pipe, *, n_per_class: int = 20, seed: int = 0, guidance: float = 2.0, steps: int = 25) -> dict:
    """How often the image shows the digit its prompt names (the zoo classifier as judge), and digits-FD against
    the 16x16 test digits with its real-vs-real floor at the same n."""
    from .. import metrics
    from ..data import load_digits
    from . import load
    from .evaluate import balanced_labels

    clf = load("classifier")
    y = balanced_labels(n_per_class)
    x = generate(pipe, y.tolist(), generator=torch.Generator().manual_seed(seed), steps=steps, guidance=guidance)
    ref = load_digits("test", size=16)[0]
    return {"prompt_accuracy": round(metrics.class_accuracy(x, y, classifier=clf), 4),
            "digits_fd": round(metrics.digits_fd(x, classifier=clf, reference=ref), 4),
            "digits_fd_floor": round(metrics.digits_fd_floor(len(y), generator=torch.Generator().manual_seed(seed),
                                                             classifier=clf, repeats=3, size=16), 4),
            "n_samples": len(y), "steps": steps, "guidance": guidance,
            "sampler": f"pipeline DDIM, {steps} steps, guidance {guidance}, prompt '{TEMPLATES[0]}', seed {seed}"}


def pipeline_cost(pipe) -> dict:
    """Parameters of each part and FLOPs of one UNet call (batch 1) and of one VAE decode."""
    from torch.utils.flop_counter import FlopCounterMode

    n = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder")}
    ids = pipe.tokenizer(prompt(7), padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        h = pipe.text_encoder(ids)[0]
        with FlopCounterMode(display=False) as fc:
            pipe.unet(torch.zeros(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=h)
        with FlopCounterMode(display=False) as fv:
            pipe.vae.decode(torch.zeros(1, 4, 8, 8))
    return {"params": sum(n.values()), "params_by_part": n, "flops_per_call": int(fc.get_total_flops()),
            "flops_vae_decode": int(fv.get_total_flops())}


