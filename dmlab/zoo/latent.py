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

import json
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import nn

from .recipes import MAX_LENGTH, SD_SCHEDULE, TEMPLATES, Recipe

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
    save it as a ``StableDiffusionPipeline`` to ``folder``. Resumable like :func:`dmlab.zoo.train.train`."""
    from tqdm.auto import tqdm

    from ..data import load_digits
    from .train import _load_state, _lr_at, _save_state, run_dir

    tc, ex = recipe.train, recipe.extra
    tok_dir = (state_dir or run_dir(recipe)) / "tokenizer"
    tok = write_tokenizer(tok_dir)
    parts = build_parts(recipe, len(tok), tok).to(device).train()
    x_all, y_all = load_digits("train", size=recipe.size)
    x_all, y_all = x_all.to(device), y_all.to(device)
    ids_all, ids_empty = (t.to(device) for t in _prompt_ids(tok))
    opts = {"opt_vae": torch.optim.AdamW(parts["vae"].parameters(), lr=ex["vae_lr"]),
            "opt_unet": torch.optim.AdamW(list(parts["unet"].parameters()) + list(parts["text_encoder"].parameters()),
                                          lr=tc.lr, weight_decay=tc.weight_decay)}
    ema = {k: v.detach().clone() for k, v in parts.state_dict().items()}
    gen = torch.Generator().manual_seed(tc.seed)
    state_dir = state_dir or run_dir(recipe)
    meta = _load_state(state_dir, parts, ema, opts, gen, device) if resume else None
    step, elapsed, curve = (meta["step"], meta["train_seconds"], meta["curve"]) if meta else (0, 0.0, [])
    n_vae, total = ex["vae_steps"], ex["vae_steps"] + tc.steps
    end = total if stop_after is None else min(total, stop_after)
    ac = None
    scale = meta.get("scaling_factor") if meta else None
    window, t0 = [], time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=recipe.name, disable=not progress, mininterval=2.0)
    while step < end:
        idx = torch.randint(0, x_all.shape[0], (tc.batch_size,), generator=gen).to(device)
        x0, y = x_all[idx], y_all[idx]
        if step < n_vae:  # ---- phase 1: the autoencoder
            for g in opts["opt_vae"].param_groups:
                g["lr"] = ex["vae_lr"] * min(1.0, (step + 1) / 50)
            post = parts["vae"].encode(x0).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
            rec = parts["vae"].decode(z).sample
            loss = F.mse_loss(rec, x0) + ex["kl_weight"] * post.kl().mean() / x0[0].numel()
            opt = opts["opt_vae"]
        else:  # ---- phase 2: UNet + text encoder on scaled latents
            if scale is None or ac is None:
                ac, scale = _phase2_setup(parts, x_all, scale)
                if step == n_vae:  # the EMA of the denoiser starts from the weights at the phase switch
                    ema = {k: v.detach().clone() for k, v in parts.state_dict().items()}
            for g in opts["opt_unet"].param_groups:
                g["lr"] = _lr_at(step - n_vae, recipe)
            with torch.no_grad():
                post = parts["vae"].encode(x0).latent_dist
                z0 = scale * (post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device))
            B = z0.shape[0]
            t = torch.randint(0, 1000, (B,), generator=gen)
            tmpl = torch.randint(0, len(TEMPLATES), (B,), generator=gen).to(device)
            drop = (torch.rand(B, generator=gen) < tc.p_uncond).to(device)
            eps = torch.randn(z0.shape, generator=gen).to(device)
            ids = torch.where(drop[:, None], ids_empty[None], ids_all[y, tmpl])
            a = ac[t].view(-1, 1, 1, 1).to(device)
            z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
            hidden = parts["text_encoder"](ids)[0]
            loss = F.mse_loss(parts["unet"](z_t, t.to(device), encoder_hidden_states=hidden).sample, eps)
            opt = opts["opt_unet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= n_vae:
            with torch.no_grad():
                decay = min(tc.ema, (1 + step - n_vae) / (10 + step - n_vae))
                for k, v in parts.state_dict().items():
                    if k.startswith("vae."):
                        ema[k].copy_(v)
                    elif v.dtype.is_floating_point:
                        ema[k].lerp_(v, 1 - decay)
                    else:
                        ema[k].copy_(v)
        step += 1
        window.append(loss.item())
        if step % 50 == 0 or step == n_vae or step == total:
            curve.append([step, sum(window) / len(window)])
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
            window = []
        bar.update(1)
        if step % tc.checkpoint_every == 0 or step == end or step == n_vae:
            _save_state(state_dir, parts, ema, opts, gen,
                        {"step": step, "train_seconds": elapsed + time.perf_counter() - t0, "curve": curve,
                         "config_hash": recipe.config_hash, "recipe": recipe.name, "scaling_factor": scale})
    bar.close()
    elapsed += time.perf_counter() - t0
    if step < total:
        return None  # interrupted on purpose (stop_after): the state is saved, nothing to assemble yet
    if scale is None:
        _, scale = _phase2_setup(parts, x_all, None)
    parts.load_state_dict(ema)
    log = {"config_hash": recipe.config_hash, "steps": step, "complete": True, "train_seconds": round(elapsed, 1),
           "device": str(device), "torch_threads": torch.get_num_threads(), "vae_steps": n_vae,
           "scaling_factor": scale, "curve": [[s, round(v, 6)] for s, v in curve]}
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


