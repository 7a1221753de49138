"""The recipes of the zoo: what each model is and how it is trained (one frozen dataclass each).

All pixel models work on scikit-learn's 8x8 digits in ``[-1, 1]`` (:func:`dmlab.data.load_digits`). 8x8 and not the
bilinear 16x16: the upsampled images carry no extra information and cost 4x the FLOPs per step (measured on
a 2-core CPU, 1 thread, batch 128: UNet (32, 64, 64) 172 ms/step at 8x8 against 570 ms/step at 16x16), which would
cut the affordable training steps by 3x inside the 15-minute recipe budget.

Diffusion models are trained with the DDPM loss (Ho et al. 2020): eps-prediction on a discrete VP schedule
(diffusers ``DDPMScheduler``, linear betas 1e-4..0.02, 1000 steps, saved with the model), class labels dropped to a
"null" class with probability ``p_uncond`` for classifier-free guidance (Ho & Salimans 2022), AdamW, a linear warmup
then cosine decay, and an exponential moving average of the weights (the EMA weights are what is saved).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

__all__ = ["TrainConfig", "Recipe", "classifier_rows", "get_recipe"]

N_CLASSES = 10
NULL_CLASS = N_CLASSES  # the extra class id that means "no label" (classifier-free guidance)

# sd_tiny: prompts, the tokenizer/text-encoder length, and Stable Diffusion's discrete schedule
TEMPLATES = ("a handwritten {word}", "the digit {word}", "the number {num}", "a picture of a {word}", "{word}")
MAX_LENGTH = 16  # tokenizer.model_max_length == text encoder max_position_embeddings
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                    "prediction_type": "epsilon", "clip_sample": False}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every recipe."""

    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    ema: float = 0.999
    p_uncond: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0 <= self.ema < 1 or not 0 <= self.p_uncond < 1:
            raise ValueError("ema and p_uncond must lie in [0, 1)")


@dataclass(frozen=True)
class Recipe:
    """One zoo entry: ``kind`` (a key of :data:`dmlab.zoo.kinds.KINDS`: ``classifier``, ``unet``, ``dit``, ``sd``,
    ``exit_heads``, ``linear_attention``), its network config and training."""

    name: str
    kind: str
    description: str
    model: dict
    train: TrainConfig
    size: int = 8
    extra: dict = field(default_factory=dict)  # classifier: {"train_rows": "even"} (see CLASSIFIER_ROWS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def config_hash(self) -> str:
        """sha256 (first 16 hex digits) of the canonical JSON of everything that defines the trained weights."""
        d = self.to_dict()
        d.pop("description")
        d["train"].pop("checkpoint_every")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_steps(self, steps: int, **train) -> "Recipe":
        """The same recipe with another step count (smoke tests and quick pilots)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, steps=steps, **train))


def classifier_rows(split_rows: str, n: int):
    """Rows of the digits train split the classifier learns from (``"even"``: 0, 2, 4, ...) and the held-back rows
    (``"odd"``) that the digits-FD floor draws from: real digits the feature network never saw, like the test digits,
    so the floor is not inflated by the classifier fitting its own training images more tightly."""
    if split_rows not in ("even", "odd"):
        raise ValueError(f"split_rows must be 'even' or 'odd', got {split_rows!r}")
    return slice(0 if split_rows == "even" else 1, n, 2)


def _unet(block_out_channels, layers_per_block) -> dict:
    n = len(block_out_channels)
    return {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": list(block_out_channels),
            "layers_per_block": layers_per_block, "down_block_types": ["DownBlock2D"] * n,
            "up_block_types": ["UpBlock2D"] * n, "num_class_embeds": N_CLASSES + 1, "norm_num_groups": 8}


def _dit(width, layers, heads) -> dict:
    return {"num_attention_heads": heads, "attention_head_dim": width // heads, "in_channels": 1, "out_channels": 2,
            "num_layers": layers, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": N_CLASSES + 1}


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("classifier", "classifier",
           "digit classifier (small CNN); its 64-d penultimate features are the digits-FD feature space",
           {"widths": [32, 64, 128], "features": 64},
           TrainConfig(steps=1500, batch_size=128, lr=2e-3, weight_decay=1e-4, warmup=50, ema=0.99, p_uncond=0.0),
           extra={"train_rows": "even"}),
    Recipe("unet_s", "unet", "class-conditional UNet2DModel, small (T-Stitch's small model)",
           _unet((16, 32, 32), 1), TrainConfig(steps=3000, lr=2e-3)),
    Recipe("unet_l", "unet", "class-conditional UNet2DModel, large (DeepCache target, T-Stitch's large model)",
           _unet((32, 64, 64), 2), TrainConfig(steps=3000, lr=1e-3)),
    Recipe("dit_s", "dit", "class-conditional DiTTransformer2DModel, small (patch 2: 16 tokens)",
           _dit(64, 4, 4), TrainConfig(steps=3000, lr=2e-3)),
    Recipe("dit_l", "dit", "class-conditional DiTTransformer2DModel, large (patch 2: 16 tokens)",
           _dit(128, 6, 4), TrainConfig(steps=3000, lr=2e-3)),
]}


RECIPES["sd_tiny"] = Recipe(
    "sd_tiny", "sd", "text-to-image latent diffusion (StableDiffusionPipeline: AutoencoderKL + UNet2DConditionModel "
                     "+ CLIPTextModel) on 16x16 digits with prompts such as 'a handwritten seven'",
    {"vae": {"in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64], "layers_per_block": 1,
             "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
             "latent_channels": 4, "norm_num_groups": 8, "sample_size": 16},
     "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64, 64],
              "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 64,
              "attention_head_dim": 8, "norm_num_groups": 8},
     "text_encoder": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}},
    TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup=100),
    size=16, extra={"vae_steps": 500, "vae_lr": 1e-3, "kl_weight": 1e-3})


# Chapter 23 (efficient fine-tuning): the source-domain model, unet_s's network trained on digits 0-4 only.
RECIPES["unet_src"] = Recipe(
    "unet_src", "unet", "class-conditional UNet2DModel (unet_s's network) trained on digits 0-4 only: the source "
                        "domain of the fine-tuning benchmark (chapter 23)",
    _unet((16, 32, 32), 1), TrainConfig(steps=2000, lr=2e-3), extra={"classes": [0, 1, 2, 3, 4]})

# Chapter 23: the source model adapted to digits 5-9 by four methods at a matched budget (same steps, batch, data
# draws per seed), three training seeds each (kind "finetune"; model = the method and its settings).
FT_STEPS, FT_BATCH = 300, 32
FT_METHODS = {"full": ({"method": "full"}, 1e-3), "lora": ({"method": "lora", "rank": 2}, 1e-2),
              "difffit": ({"method": "difffit"}, 1e-2), "sara": ({"method": "sara", "fraction": 0.06, "nuclear": 1e-4}, 1e-2)}
for _m, (_cfg, _lr) in FT_METHODS.items():
    for _s in range(3):
        RECIPES[f"ft_{_m}_s{_s}"] = Recipe(
            f"ft_{_m}_s{_s}", "finetune", f"unet_src fine-tuned on digits 5-9 by {_m} (seed {_s}, chapter 23)",
            dict(_cfg), TrainConfig(steps=FT_STEPS, batch_size=FT_BATCH, lr=_lr, warmup=0, ema=0.0, p_uncond=0.1,
                                    seed=_s, checkpoint_every=10 ** 6),
            extra={"base": "unet_src", "classes": [5, 6, 7, 8, 9]})

# Chapter 22 (Smooth Diffusion, paper 63): unet_s fine-tuned on all digits with and without the step-wise
# variation regulariser, same steps, batch, data draws and learning rate per seed, three training seeds each.
SMOOTH_STEPS = 100
for _w, _tag in ((10.0, "on"), (0.0, "off")):
    for _s in range(3):
        RECIPES[f"smooth_{_tag}_s{_s}"] = Recipe(
            f"smooth_{_tag}_s{_s}", "finetune", f"unet_s fine-tuned on all digits, step-variation regulariser "
                                              f"weight {_w} (seed {_s}, chapter 22)",
            {"method": "full", "smooth": _w}, TrainConfig(steps=SMOOTH_STEPS, batch_size=32, lr=3e-4, warmup=0,
                                                          ema=0.0, p_uncond=0.1, seed=_s, checkpoint_every=10 ** 6),
            extra={"base": "unet_s", "classes": list(range(10))})


# Adapters: trained on a frozen zoo model named by extra["base"] (their network is derived from the base).
RECIPES["dit_l_exit"] = Recipe(
    "dit_l_exit", "exit_heads", "DeeDiff exit heads and UEMs for dit_l (paper 53)", {},
    TrainConfig(steps=600, batch_size=128, lr=2e-3, warmup=0, ema=0.0, p_uncond=0.1), extra={"base": "dit_l"})
RECIPES["dit_l_linear"] = Recipe(
    "dit_l_linear", "linear_attention", "LinFusion linear attention distilled into dit_l (paper 2)", {},
    TrainConfig(steps=500, batch_size=64, lr=1e-3, warmup=0, ema=0.0, p_uncond=0.1),
    extra={"base": "dit_l", "mid_dim": None, "w_eps": 1.0, "w_kd": 0.5, "w_feat": 0.5})


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a zoo name is a string such as 'unet_l', got {type(name).__name__}")
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


# Chapter 25: every student of the consistency chapter on the exact 8-Gaussian ring (7 methods x 3 seeds, small MLPs).
RECIPES["ring_students"] = Recipe(
    "ring_students", "ring_students", "chapter 25's one- and few-step students of the exact 8-Gaussian ring: direct "
    "and reflow (InstaFlow) distillation, consistency distillation with ODE/SDE teacher steps and SCott's "
    "adversarial term, BOOT; 3 training seeds each",
    {"seeds": [0, 1, 2], "steps": 2000, "batch": 256, "hidden": 64, "lr": 2e-3, "sigma_max": 20.0,
     "sigma_min": 0.002, "n_pairs": 3000, "teacher_heun_steps": 40, "reflow_euler_steps": 20, "cd_n": 18,
     "eta": 0.5, "adversarial": 0.3},
    TrainConfig(steps=2000, batch_size=256, lr=2e-3, warmup=0, ema=0.0, p_uncond=0.0), size=2)


# Chapter 24: guidance distillation on the exact class-conditional ring (teacher, full and LoRA stage-1 students,
# progressive students; 3 training seeds, small MLPs).
RECIPES["guided_students"] = Recipe(
    "guided_students", "guided_students", "chapter 24's guidance-distilled students of the exact class-conditional "
    "8-Gaussian ring: a class-conditional teacher, w-conditioned one-pass students (full copy and LoRA), and two "
    "rounds of progressive distillation (8 -> 4 -> 2 steps); 3 training seeds each",
    {"seeds": [0, 1, 2], "hidden": 64, "depth": 3, "teacher_steps": 2000, "steps": 1500, "pd_steps": 800,
     "batch": 256, "lr": 2e-3, "lora_rank": 4, "w_range": [1.0, 4.0], "sigma_min": 0.002, "sigma_max": 20.0,
     "grid_steps": 8, "p_uncond": 0.2},
    TrainConfig(steps=1500, batch_size=256, lr=2e-3, warmup=0, ema=0.0, p_uncond=0.2), size=2)


# Chapter 28 (super-resolution): per training seed, the YONOS-SR / AdcSR models (sr_s*) and the PASD ablation
# (pasd_s*) on 32x32 photo patches, x4 (dmlab.superres.train_sr_models).
# Every model diffuses the residual over bicubic, scaled to unit variance ((hr - bicubic) / 0.13), with a quarter of
# each batch at t = 1 (the one-step point).
SR_CONFIG = {"width": 16, "size": 32, "batch": 32, "lr": 2e-3, "steps_teacher": 250, "steps_student": 250,
             "steps_compress": 250, "keep": 0.5, "adversarial": 0.05, "steps_pasd": 300, "residual": 0.13,
             "one_step": 0.25}
for _s in range(3):
    RECIPES[f"sr_s{_s}"] = Recipe(
        f"sr_s{_s}", "superres", f"chapter 28's x4 SR models on photo patches (seed {_s}): YONOS-SR scale "
        "distillation against direct x4 training, AdcSR compression against the small net from scratch",
        dict(SR_CONFIG, part="sr", seed=_s), TrainConfig(steps=500, batch_size=32, lr=2e-3, warmup=0, ema=0.0,
                                                         p_uncond=0.0, seed=_s), size=32)
    RECIPES[f"pasd_s{_s}"] = Recipe(
        f"pasd_s{_s}", "superres", f"chapter 28's PASD ablation (seed {_s}): a latent-conditioned x4 SR model "
        "without and with the degradation-removal module and pixel-aware cross attention",
        dict(SR_CONFIG, part="pasd", seed=_s), TrainConfig(steps=300, batch_size=32, lr=2e-3, warmup=0, ema=0.0,
                                                           p_uncond=0.0, seed=_s), size=32)
# chapter 29: dense prediction on rendered scenes (Lotus / Marigold-style / PrimeDepth), one entry per training seed
for _s in range(3):
    RECIPES[f"dense_s{_s}"] = Recipe(
        f"dense_s{_s}", "dense", f"chapter 29's image-conditioned depth+normal nets on rendered 32x32 scenes, training "
        f"seed {_s}: Marigold-style eps-prediction, one-step x0 (Lotus-D), x0 + detail preserver (Lotus), and a "
        "PrimeDepth refiner on unet_l's frozen preimage; same data, steps, batch and width",
        {"seed": _s, "n_train": 768, "data_seed": 290, "size": 32, "steps": 800, "batch": 16, "lr": 4e-3,
         "width": 16, "frozen": "unet_l", "preimage_sigma": 0.1},
        TrainConfig(steps=800, batch_size=16, lr=4e-3, warmup=0, ema=0.0, p_uncond=0.0), size=32)
# chapter 29, DM-Calib: camera-image prediction against direct (f, cx, cy) regression, one entry per training seed
for _s in range(3):
    RECIPES[f"calib_s{_s}"] = Recipe(
        f"calib_s{_s}", "calib", f"chapter 29's intrinsics nets on rendered 32x32 scenes with random focal length and "
        f"principal point, training seed {_s}: a DenseNet predicting the camera image (incidence map, DM-Calib) and "
        "the same net regressing (f, cx, cy); same data, steps, batch and width",
        {"seed": _s, "n_train": 768, "data_seed": 430, "size": 32, "steps": 400, "batch": 16, "lr": 2e-3,
         "width": 16},
        TrainConfig(steps=400, batch_size=16, lr=2e-3, warmup=0, ema=0.0, p_uncond=0.0), size=32)
# chapter 29, DiffMatch: conditional flow diffusion against one-call flow regression (same net, data and budget),
# both conditioned on a local NCC cost volume and the correlation-argmax flow, one entry per training seed
MATCH_CONFIG = {"n_train": 384, "data_seed": 780, "size": 32, "p_flat": 0.4, "patch": 5, "radius": 4, "steps": 800,
                "batch": 16, "lr": 2e-3, "width": 10}
for _s in range(3):
    RECIPES[f"match_s{_s}"] = Recipe(
        f"match_s{_s}", "match", f"chapter 29's dense-matching nets on rendered 32x32 view pairs with exact flow, "
        f"training seed {_s}: a conditional diffusion model over the flow field (DiffMatch, x0-prediction) and the "
        "same net regressing the flow in one call; same pairs, steps, batch and width",
        dict(MATCH_CONFIG, seed=_s),
        TrainConfig(steps=MATCH_CONFIG["steps"], batch_size=16, lr=2e-3, warmup=0, ema=0.0, p_uncond=0.0),
        size=32)
# Chapter 27 (architecture distillation, KOALA): dit_s with its two middle blocks removed, distilled from dit_s with
# output-only KD or output + feature KD at one site (self-attention, feed-forward or whole-block outputs); the same
# batches per seed for every site, three training seeds each (kind "kd_student").
KD_KEEP, KD_SITES, KD_STEPS, KD_BATCH = [0, 3], ("out", "attn", "ff", "block"), 300, 64
for _site in KD_SITES:
    for _s in range(3):
        RECIPES[f"koala_{_site}_s{_s}"] = Recipe(
            f"koala_{_site}_s{_s}", "kd_student",
            f"dit_s without blocks 1-2, distilled with {_site} KD (seed {_s}, chapter 27)",
            {"site": _site, "keep": list(KD_KEEP), "w_out": 1.0, "w_feat": 1.0},
            TrainConfig(steps=KD_STEPS, batch_size=KD_BATCH, lr=1e-3, warmup=0, ema=0.0, p_uncond=0.1, seed=_s,
                        checkpoint_every=10 ** 6),
            extra={"base": "dit_s"})

# Chapter 27 (Meissonic / MaskGIT): a masked-token transformer over a k-means patch VQ of the digits, dit_s's width
# and depth, three training seeds (kind "maskgit").
MASKGIT_MODEL = {"vocab": 128, "patch": 2, "kmeans_seed": 0, "kmeans_iters": 25, "width": 64, "depth": 4,
                 "heads": 4}
for _s in range(3):
    RECIPES[f"maskgit_s{_s}"] = Recipe(
        f"maskgit_s{_s}", "maskgit", f"masked generative transformer on patch-VQ digit tokens (seed {_s}, chapter 27)",
        dict(MASKGIT_MODEL), TrainConfig(steps=800, batch_size=128, lr=2e-3, warmup=50, ema=0.99, p_uncond=0.1,
                                         seed=_s, checkpoint_every=10 ** 6))
# Chapter 32: TSDiff's unconditional series model and the conditional competitor at the same budget (3 seeds each),
# and the Poseidon-style operators: pretrained on four PDE families, then fine-tuned to Allen-Cahn or trained from
# scratch on 2, 8, 32 trajectories at the same steps (3 seeds each). Kind "beyond" (dmlab.beyond.train_entry).
RECIPES["tsdiff_seasonal"] = Recipe(
    "tsdiff_seasonal", "beyond", "chapter 32: TSDiff unconditional 1-D diffusion models of synthetic seasonal series "
    "and conditional forecasters trained at the same budget (3 seeds each)",
    {"task": "tsdiff", "seeds": [0, 1, 2], "steps": 2000, "batch": 64, "lr": 2e-3, "hidden": 24, "n_train": 2000,
     "length": 48, "horizon": 12, "data_seed": 1000},
    TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup=50, ema=0.99, p_uncond=0.0), size=2)
RECIPES["poseidon_1d"] = Recipe(
    "poseidon_1d", "beyond", "chapter 32: time-conditioned 1-D operators pretrained with all2all pairs on heat, "
    "advection, wave and Burgers, fine-tuned to Allen-Cahn vs trained from scratch (3 seeds each)",
    {"task": "poseidon", "seeds": [0, 1, 2], "pretrain_families": ["heat", "advection", "wave", "burgers"],
     "n_per_family": 64, "data_seed": 300, "pretrain_steps": 1500, "batch": 64, "lr": 2e-3, "hidden": 16,
     "finetune_family": "allen_cahn", "finetune_n": [2, 8, 32], "finetune_data_seed": 500, "finetune_steps": 300,
     "finetune_batch": 32, "finetune_lr": 1e-3},
    TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup=50, ema=0.0, p_uncond=0.0), size=2)

# Chapter 32, paper 8 (stable neural SDEs): LSDE, LNSDE and GSDE classifiers of irregular two-class seasonal series,
# the neural ODE of the same drift and a GRU of about the same size, trained on 0/30/50/70 % missing points
# (3 seeds each).
RECIPES["sde_irregular"] = Recipe(
    "sde_irregular", "beyond", "chapter 32: stable neural SDE (LSDE, LNSDE, GSDE), neural ODE and GRU classifiers "
    "of irregularly sampled series, trained with 0-70 % of the points missing (3 seeds each)",
    {"task": "sde", "seeds": [0, 1, 2], "models": ["lsde", "lnsde", "gsde", "ode", "gru"], "steps": 1200,
     "batch": 32, "lr": 1e-2, "hidden": 16, "width": 32, "gru_hidden": 18, "n_train": 512, "length": 32,
     "data_seed": 800, "rates": [0.0, 0.3, 0.5, 0.7]},
    TrainConfig(steps=1200, batch_size=32, lr=1e-2, warmup=50, ema=0.0, p_uncond=0.0), size=2)


# Chapter 25, paper 65 (rRCM): the digit classifier fine-tuned on noisy digits for randomised smoothing, with rRCM's
# trajectory-consistency terms (rrcm_s*) or by plain Gaussian noise augmentation on the same draws (noiseaug_s*).
for _m in ("rrcm", "noiseaug"):
    for _s in range(3):
        RECIPES[f"{_m}_s{_s}"] = Recipe(
            f"{_m}_s{_s}", "robust_classifier",
            f"the zoo classifier fine-tuned on noisy digits ({'rRCM: cross-entropy + trajectory InfoNCE + consistency' if _m == 'rrcm' else 'Gaussian noise augmentation, same draws'}; seed {_s}, chapter 25)",
            {"widths": [32, 64, 128], "features": 64},
            TrainConfig(steps=400, batch_size=128, lr=1e-3, warmup=0, ema=0.0, p_uncond=0.0, seed=_s,
                        checkpoint_every=10 ** 6),
            extra={"base": "classifier", "contrastive": _m == "rrcm", "sigma_grid": [0.0, 1.0, 21], "lbd": 0.1,
                   "tau": 0.2, "eta": 5.0})


# Chapter 33 (latent spaces): asymmetric decoders for sd_tiny (Asymmetric VQGAN, paper 77): the decoder plus a
# conditional branch fed the masked source image, and the plain decoder fine-tuned at the same steps and batches
# (the control); encoder frozen; one training seed on this loaded machine (kind "latent_edit").
RECIPES["asym_decoder"] = Recipe(
    "asym_decoder", "latent_edit", "chapter 33: sd_tiny's VAE decoder with a conditional branch on the masked "
    "source image (Asymmetric VQGAN) and the plain decoder fine-tuned at the same budget (one training seed)",
    {"seeds": [0], "steps": 150, "batch": 32, "lr": 1e-3, "width": 16, "p_full": 0.25,
     "train_decoder": False},
    TrainConfig(steps=150, batch_size=32, lr=1e-3, warmup=0, ema=0.0, p_uncond=0.0), size=16,
    extra={"base": "sd_tiny"})


# Chapter 24, paper 6 (SpeedUpNet): cross-attention adapters of sd_tiny trained to reproduce classifier-free
# guidance with a negative prompt in one pass (three training seeds), and a LoRA fine-tune of sd_tiny on thick-stroke
# digits into which the same adapters are plugged untrained (kind "speedup"; dmlab.distill.speedup).
RECIPES["speedup_adapters"] = Recipe(
    "speedup_adapters", "speedup", "chapter 24: SpeedUpNet adapters on sd_tiny's cross-attention layers (one-pass "
    "guidance at w = 2 with empty or other-digit negative prompts; 3 training seeds) and a LoRA fine-tune of sd_tiny "
    "on thick-stroke digits (the transfer target)",
    {"seeds": [0, 1, 2], "steps": 300, "batch": 16, "lr": 3e-3, "w": 2.0, "p_empty_negative": 0.5,
     "ft_steps": 150, "ft_batch": 32, "ft_lr": 2e-3, "ft_rank": 4,
     "ft_targets": ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]},
    TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup=0, ema=0.0, p_uncond=0.0), size=16,
    extra={"base": "sd_tiny"})
# Chapter 23, paper 9 (slight label corruption, CEP): class-conditional MLPs on the exact 10-class triads, clean labels,
# 2.5/5/10 % corrupted labels, CEP-G and CEP-U (gamma = 1); same data, init, batches and steps per training seed.
RECIPES["corruption_gmm"] = Recipe(
    "corruption_gmm", "pretraining", "chapter 23's class-conditional toy models of the exact 10-class triads: clean "
    "labels, 2.5/5/10% of labels corrupted, and conditional embedding perturbation (CEP-G, CEP-U); 3 training seeds",
    {"seeds": [0, 1, 2], "n_per_class": 32, "data_seed": 90, "hidden": 32, "depth": 3, "steps": 1500, "batch": 256,
     "lr": 2e-3, "rates": [0.0, 0.025, 0.05, 0.1], "cep": {"cep_g": ["gaussian", 1.0], "cep_u": ["uniform", 1.0]}},
    TrainConfig(steps=1500, batch_size=256, lr=2e-3, warmup=0, ema=0.0, p_uncond=0.0), size=2,
    extra={"module": "pretraining", "train": "train_corruption_models", "load": "load_corruption_models"})

# Chapter 23, paper 45 (KIND): a plain class MLP and a KIND-decomposed one pre-trained on triads classes 0-4, then
# transferred to classes 5-9 by LoRA (plain) and by fresh tailors (KIND) at matched trainable parameters.
RECIPES["kind_gmm"] = Recipe(
    "kind_gmm", "pretraining", "chapter 23's KIND test: plain and KIND-decomposed class MLPs pre-trained on triads "
    "classes 0-4, transferred to classes 5-9 by LoRA and by KIND tailors at matched trainable parameters; 3 seeds",
    {"seeds": [0, 1, 2], "n_per_class": 32, "data_seed": 450, "hidden": 32, "depth": 3, "pre_steps": 1500,
     "steps": 600, "batch": 256, "lr": 5e-3, "pre_lr": 2e-3, "r_shared": 12, "r_class": 3, "lora_rank": 15,
     "source": [0, 1, 2, 3, 4], "target": [5, 6, 7, 8, 9]},
    TrainConfig(steps=2100, batch_size=256, lr=2e-3, warmup=0, ema=0.0, p_uncond=0.0), size=2,
    extra={"module": "pretraining", "train": "train_kind_models", "load": "load_kind_models"})
# Chapter 22 (InvDiff, paper 44): unet_s fine-tuned on digits with a white left-edge bar on 90 % of the even and
# 10 % of the odd digits (the biased model), and on it InvDiff's lightweight guidance modules trained from 200
# annotated rows per draw, with the group-balanced loss (reweighting), and from groups inferred without labels, at
# the same steps and batches (kind "invdiff", dmlab.debias.train_entry).
RECIPES["bias_full"] = Recipe(
    "bias_full", "finetune", "unet_s fine-tuned on digits whose left-edge bar follows the parity 90 % of the time "
                             "(chapter 22, InvDiff's biased model)",
    {"method": "full"}, TrainConfig(steps=300, batch_size=32, lr=1e-3, warmup=0, ema=0.0, p_uncond=0.1, seed=0,
                                    checkpoint_every=10 ** 6),
    extra={"base": "unet_s", "classes": list(range(10)), "bias": {"rate": 0.9, "seed": 0}})
RECIPES["invdiff_deltas"] = Recipe(
    "invdiff_deltas", "invdiff", "InvDiff guidance modules on bias_full (3 draws): invariant loss (lambda 1) and "
    "group reweighting (lambda 0) from 200 annotated rows, and the invariant loss on all rows with groups inferred "
    "without labels; same steps, batches and initial weights",
    {"base": "bias_full", "rate": 0.9, "data_seed": 0, "n_annotated": 200, "draws": [0, 1, 2],
     "methods": {"invdiff": {"lam": 1.0, "groups": "annotated"}, "reweight": {"lam": 0.0, "groups": "annotated"},
                 "inferred": {"lam": 1.0, "groups": "inferred"}}, "steps": 400, "batch": 64, "lr": 2e-3,
     "width": 16},
    TrainConfig(steps=400, batch_size=64, lr=2e-3, warmup=0, ema=0.0, p_uncond=0.0), extra={"base": "bias_full"})
