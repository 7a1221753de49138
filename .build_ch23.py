"""Build notebooks/23_efficient_finetuning.ipynb (cell ids stable)."""
import nbformat as nbf

cells = []


def md(cid, text):
    c = nbf.v4.new_markdown_cell(text.strip("\n"))
    c.id = cid
    cells.append(c)


def code(cid, text, tags=None):
    c = nbf.v4.new_code_cell(text.strip("\n"))
    c.id = cid
    if tags:
        c.metadata["tags"] = tags
    cells.append(c)


md("c000", r"""
# 23. Efficient fine-tuning: LoRA, DiffFit, SaRA

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dmlab-book/dmlab/blob/main/notebooks/23_efficient_finetuning.ipynb)

*Runs in about a minute on a laptop CPU at tiny scale (the default); the full-scale cell needs a GPU
(`DMLAB_SCALE=full`).*  
*Papers:* DiffFit (57), SaRA (5), KIND (45), slight corruption in pre-training (9)
""")

code("c001", r"""
# Setup: on Colab this installs dmlab; elsewhere it only seeds and configures.
import sys
if "google.colab" in sys.modules:
    %pip install -q "dmlab[all] @ git+https://github.com/dmlab-book/dmlab@main"
import dmlab
SCALE, gen = dmlab.setup(seed=0)
print(SCALE)
""", tags=["nbval-ignore-output", "hide-input"])

md("c002", r"""
## 1. One benchmark: a model of digits 0-4 learns digits 5-9

Fine-tuning a pretrained diffusion model on a new domain is the commonest thing done with one. Full fine-tuning
updates every weight $W$; the parameter-efficient methods train a small set of tensors and leave the rest frozen:

* **LoRA** {cite:p}`hu2022lora` adds a low-rank update to chosen layers, $W + \frac{\alpha}{r} B A$ with
  $A \in \mathbb{R}^{r \times d_\text{in}}$, $B \in \mathbb{R}^{d_\text{out} \times r}$, $B = 0$ at the start.
  We inject it with 🤗 `peft` into the ResNet convolutions and time projections.
* **DiffFit** {cite:p}`xie2023difffit` trains only the bias terms, the normalisation layers, the class embedding,
  and new per-channel scale factors $\gamma$ (initialised to 1) on every residual branch:
  $x + \gamma \odot f(x)$.
* **SaRA** {cite:p}`hu2025sara` re-trains the pretrained model's *ineffective* weights, those with
  $|w| < \theta$, as a sparse update $W_0 + \Delta$ with $\Delta$ supported on that set, and adds a nuclear-norm
  penalty $\lambda \sum_l \lVert \Delta W_l \rVert_*$ that keeps each layer's update low rank. Its progressive
  schedule merges the update halfway and then re-selects the weights that are *still* below $\theta$.

The benchmark: `unet_src`, the zoo's small class-conditional UNet (the network of `unet_s`) trained on digits 0-4
only, is adapted to digits 5-9 (the target domain) by each method with **the same budget**: the same optimizer
steps, batch size and training batches (one data generator per seed, shared by the methods), three training
seeds each. Every method except full fine-tuning also trains the class embedding, without which no method could
name a new class. LoRA's rank is set so that LoRA and SaRA train about the same number of parameters; the
learning rate of each method was chosen from two values by the training loss of a short pilot run. The adapted
models are zoo entries (`ft_<method>_s<seed>`: the stored update on top of `unet_src`, verified by sha256); this
chapter loads and measures them.

We report target quality (the zoo classifier's accuracy on the target digits, KID with its interval, digits-FD
beside its floor), **retained source quality** (accuracy on digits 0-4 after adaptation: what was forgotten),
trainable parameters and the memory a training step holds.
""")

code("c003", r"""
import json
import torch, matplotlib.pyplot as plt
from dmlab import zoo, metrics, claims, finetuning
from dmlab.data import load_digits
from dmlab.train import ddpm_batch
from dmlab.zoo.evaluate import sample_digits
from dmlab.zoo.recipes import FT_METHODS, FT_STEPS, FT_BATCH
from dmlab.zoo.train import training_alphas_cumprod

clf = zoo.load("classifier")
src_den, src = zoo.load_denoiser("unet_src")
METHODS, SEEDS = list(FT_METHODS), (0, 1, 2)
print(f"unet_src: {sum(p.numel() for p in src.parameters()):,} params, trained on "
      f"digits {zoo.get_recipe('unet_src').extra['classes']}")
print(f"budget: {FT_STEPS} Adam steps x batch {FT_BATCH} on the train digits 5-9")
for m, (cfg, lr) in FT_METHODS.items():
    kw = {k: v for k, v in cfg.items() if k != "method"}
    print(f"  {m:8s} lr {lr:g}" + (f"  {kw}" if kw else ""))
""")

md("c004", r"""
## 2. DiffFit and SaRA, step by step

`finetuning.adapt(model, method)` returns the adapted copy, the list of tensors the optimizer trains, and the
method's regulariser. At initialisation every adapted model computes exactly what the source model computes (LoRA's
$B = 0$, DiffFit's $\gamma = 1$, SaRA's $\Delta = 0$): the first check below. The table lists what each method
trains.
""")

code("c005", r"""
# NBVAL_CHECK_OUTPUT
g = torch.Generator().manual_seed(0)
xp, tp = torch.randn(10, 1, 8, 8, generator=g), torch.full((10,), 400)
yp = torch.arange(10)
with torch.no_grad():
    ref_out = src(xp, tp, class_labels=yp).sample
kw_of = {m: {k: v for k, v in c.items() if k != "method"} for m, (c, _) in FT_METHODS.items()}
adapted = {m: finetuning.adapt(src, m, **kw_of[m]) for m in METHODS}
n_full = adapted["full"].trainable
print(f"{'method':8s} {'trainable':>9s} {'of full':>8s}  max |adapted - source| at init")
for m, ad in adapted.items():
    with torch.no_grad():
        gap = (ad.model(xp, tp, class_labels=yp).sample - ref_out).abs().max()
    print(f"{m:8s} {ad.trainable:9,d} {ad.trainable / n_full:8.2%}  {float(gap):.1e}")
dfit = adapted["difffit"]
groups = {"bias": 0, "norm": 0, "class embedding": 0, "gamma": 0}
for name, p in dfit.model.named_parameters():
    if p.requires_grad:
        key = ("gamma" if "gammas" in name else "class embedding" if "class_emb" in name
               else "norm" if "norm" in name else "bias")
        groups[key] += p.numel()
print("DiffFit trains:", ", ".join(f"{k} {v:,}" for k, v in groups.items()),
      f"({dfit.info['scaled_branches']} scaled residual branches)")
""")

md("c006", r"""
**Why "ineffective" weights?** SaRA's premise is that the smallest weights of a pretrained model barely affect its
output, so they are free capacity. We test it on `unet_src`: set to zero the weights below $\theta$ (the fraction
SaRA re-trains), or the same number of weights chosen at random, and measure how far the source model's
prediction moves on noisy digits 0-4 (relative change of $\hat\epsilon$, three draws of which weights are random).
""")

code("c007", r"""
# NBVAL_CHECK_OUTPUT
frac = kw_of["sara"]["fraction"]
masks, theta = finetuning.sara_masks(src, frac)
xs0, ys0 = load_digits("train")
sel = ys0 < 5
b0 = ddpm_batch(xs0[sel], training_alphas_cumprod(), 256, torch.Generator().manual_seed(1),
                labels=ys0[sel])


def eps_change(masks_):
    import copy
    m2 = copy.deepcopy(src)
    with torch.no_grad():
        for name, mod in m2.named_modules():
            if name in masks_:
                mod.weight[masks_[name]] = 0
        a = src(b0["xt"], b0["t"], class_labels=b0["y"]).sample
        b = m2(b0["xt"], b0["t"], class_labels=b0["y"]).sample
    return float((b - a).norm() / a.norm())


small = eps_change(masks)
rand = []
for s in range(3):
    gr = torch.Generator().manual_seed(10 + s)
    rand.append(eps_change({n: torch.rand(m.shape, generator=gr) < m.float().mean()
                            for n, m in masks.items()}))
n_sel = sum(int(m.sum()) for m in masks.values())
print(f"theta = {theta:.1e}: {n_sel:,} weights ({frac:.0%} of conv/linear weights)")
print(f"relative change of eps-hat, smallest weights zeroed: {small:.4f}")
print(f"same number of random weights zeroed (3 draws): "
      f"{min(rand):.3f} .. {max(rand):.3f}")
""")

md("c008", r"""
**Memory of a training step.** What a method saves is mostly optimizer state and gradients of the trained tensors;
the activations autograd keeps for the backward pass depend on where the trained tensors sit.
`finetuning.training_memory` counts both on any device: the saved activations through
`torch.autograd.graph.saved_tensors_hooks` (each storage once, frozen weights excluded) and the trained tensors
with their gradients and Adam's two moments. It is exact for one step at the benchmark's batch size.
""")

code("c009", r"""
# NBVAL_CHECK_OUTPUT
xt_all, yt_all = load_digits("train")
tsel = yt_all >= 5
bm = ddpm_batch(xt_all[tsel], training_alphas_cumprod(), FT_BATCH,
                torch.Generator().manual_seed(0), labels=yt_all[tsel], p_uncond=0.1)
mem = {m: finetuning.training_memory(ad, bm) for m, ad in adapted.items()}
print(f"{'method':8s} {'activations':>11s} {'params+grads+Adam':>17s} {'total':>9s}  (KiB)")
for m, r in mem.items():
    opt = r["trainable"] + r["grads"] + r["optimizer"]
    print(f"{m:8s} {r['activations'] / 1024:11.0f} {opt / 1024:17.0f} "
          f"{r['total'] / 1024:9.0f}")
""")

md("c010", r"""
## 3. The measured table

Each adapted model (3 methods' seeds) samples the target digits 5-9 and the source digits 0-4, 20 per class,
with Heun's sampler at 10 steps. All methods of one training seed start from the same noise, so the differences
between methods are paired per sample, and the intervals are two-stage bootstraps over the three training seeds
and the samples (`dmlab.claims`). KID and digits-FD compare the target samples with the 180 held-out test digits
5-9; the FD floor is real train digits drawn with the same class balance and scored the same way
(`metrics.digits_real_like`). The source model itself is the first row: it has never seen a 5.
""")

code("c011", r"""
# NBVAL_CHECK_OUTPUT
K = 20
tgt_y = torch.arange(5, 10).repeat_interleave(K)
src_y = torch.arange(0, 5).repeat_interleave(K)
xtest, ytest = load_digits("test")
ref = metrics.digits_features(xtest[ytest >= 5], clf)
boot = torch.Generator().manual_seed(0)  # the bootstrap's own generator


@torch.no_grad()
def evaluate(den, seed):
    y = torch.cat([tgt_y, src_y])
    x = sample_digits(den, y, generator=torch.Generator().manual_seed(100 + seed),
                      n_steps=10)
    ok = (clf(x.clamp(-1, 1)).argmax(1) == y).double()
    f = metrics.digits_features(x[: len(tgt_y)], clf)
    return {"x": x, "t_ok": ok[: len(tgt_y)], "s_ok": ok[len(tgt_y):],
            "kid": metrics.kid_terms(f, ref), "fd": metrics.frechet_distance(f, ref)}


R = {"source": [evaluate(src_den, s) for s in SEEDS]}
trainable = {"source": 0}
for m in METHODS:
    R[m] = []
    for s in SEEDS:
        den, model = zoo.load_denoiser(f"ft_{m}_s{s}")
        R[m].append(evaluate(den, s))
    trainable[m] = zoo.info(f"ft_{m}_s0")["trainable"]
floor = sum(
    metrics.frechet_distance(metrics.digits_features(
        metrics.digits_real_like(tgt_y, generator=torch.Generator().manual_seed(s)),
        clf), ref) for s in SEEDS) / len(SEEDS)


def stack(m, key):
    return torch.stack([r[key] for r in R[m]])


S = {m: {k: claims.paired_bootstrap(stack(m, k), generator=boot)
         for k in ("t_ok", "s_ok", "kid")} for m in R}
print(f"{'':8s} {'trainable':>9s} {'target acc':>19s} {'source acc':>19s} "
      f"{'target KID':>19s} {'FD':>5s}")
for m in R:
    fd = sum(r["fd"] for r in R[m]) / len(SEEDS)
    print(f"{m:8s} {trainable[m]:9,d} {claims.fmt(S[m]['t_ok']):>19s} "
          f"{claims.fmt(S[m]['s_ok']):>19s} {claims.fmt(S[m]['kid']):>19s} {fd:5.1f}")
print(f"digits-FD floor (real digits, same n and classes): {floor:.1f}; "
      f"n = {len(tgt_y)} target + {len(src_y)} source samples x {len(SEEDS)} seeds")
""")

code("c012", r"""
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.9), dpi=110,
                               gridspec_kw={"width_ratios": [1.25, 1]})
rows = list(R)
grid = torch.zeros(len(rows) * 9, 10 * 9)  # 0 = white paper
for i, m in enumerate(rows):
    x = R[m][0]["x"]
    y = torch.cat([tgt_y, src_y])
    for d in range(10):
        img = x[(y == d).nonzero()[0, 0], 0].clamp(-1, 1)
        grid[i * 9:i * 9 + 8, d * 9:d * 9 + 8] = (img + 1) / 2
ax0.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
ax0.set_yticks([i * 9 + 4 for i in range(len(rows))], rows, fontsize=9)
ax0.set_xticks([d * 9 + 4 for d in range(10)], range(10), fontsize=9)
ax0.set_xlabel("class asked for (seed 0; 0-4 source, 5-9 target)")
for m, mk in zip(METHODS, "osD^"):
    for key, fill in (("t_ok", True), ("s_ok", False)):
        iv = S[m][key]
        ax1.errorbar(trainable[m], iv.estimate, yerr=[[iv.estimate - iv.low],
                     [iv.high - iv.estimate]], fmt=mk, ms=7, capsize=3,
                     mfc=None if fill else "white", color=f"C{METHODS.index(m)}",
                     label=f"{m}, {'target 5-9' if fill else 'source 0-4'}")
ax1.set_xscale("log")
ax1.set_xlabel("trainable parameters")
ax1.set_ylabel("class accuracy of samples")
ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
fig.tight_layout()
plt.show()
""")

md("c013", r"""
The image grid shows one sample per class for each model (training seed 0): the source model draws the digits it
knows and something else for 5-9. The right panel puts target accuracy (filled) and retained source accuracy
(hollow) against the number of trained parameters, with their 95% intervals over the three training seeds.

## 4. The claims

**DiffFit (57)** claims that tuning biases, norms, the class embedding and scale factors *reaches full
fine-tuning's quality* with a tiny fraction of the parameters. "Reaches" is a non-inferiority claim: we test
whether DiffFit's target class accuracy is within 5 points of full fine-tuning's (threshold $-0.05$ on the paired
difference), and keep the KID difference as a sub-claim.

**SaRA (5)** claims that re-training the ineffective weights *beats LoRA at the same parameter budget* and *keeps
more of the source*. The primary test is target KID (lower is better; it discriminates where accuracy saturates),
the sub-claim retained source accuracy, both paired per sample on the same noise.
""")

code("c014", r"""
def paired(m, c, key):
    return claims.paired_bootstrap(stack(m, key), stack(c, key), generator=boot)


d57 = paired("difffit", "full", "t_ok")
rec57 = claims.record(
    57,
    "Tuning only the biases, norms, class embedding and added scale factors reaches "
    "the target quality of full fine-tuning with a small fraction of the trainable "
    "parameters",
    metric="target class accuracy (digits 5-9; non-inferiority margin 0.05)",
    method=f"DiffFit ({trainable['difffit']:,} params)",
    competitor=f"full fine-tuning ({trainable['full']:,} params)",
    value=S["difffit"]["t_ok"].estimate, competitor_value=S["full"]["t_ok"].estimate,
    diff=d57, threshold=-0.05, better="higher",
    note=f"same {FT_STEPS} steps x batch {FT_BATCH} and batches; DiffFit trains "
    f"{trainable['difffit'] / trainable['full']:.1%} of the parameters",
    trainable_ratio=trainable["difffit"] / trainable["full"])
k57 = paired("difffit", "full", "kid")
sub57 = claims.record(
    57, "DiffFit's target samples are no further from real target digits (KID) than "
    "full fine-tuning's",
    metric="target KID (per-sample terms)", method="DiffFit",
    competitor="full fine-tuning", value=S["difffit"]["kid"].estimate,
    competitor_value=S["full"]["kid"].estimate, diff=k57, threshold=0.0,
    better="lower", primary=False)
d5 = paired("sara", "lora", "kid")
rec5 = claims.record(
    5,
    "Re-training the small-magnitude (ineffective) weights with a nuclear-norm "
    "constraint and the progressive schedule adapts better than LoRA at the same "
    "budget",
    metric="target KID (digits 5-9, per-sample terms)",
    method=f"SaRA ({trainable['sara']:,} params)",
    competitor=f"LoRA rank {kw_of['lora']['rank']} ({trainable['lora']:,} params)",
    value=S["sara"]["kid"].estimate, competitor_value=S["lora"]["kid"].estimate,
    diff=d5, threshold=0.0, better="lower",
    note=f"same {FT_STEPS} steps x batch {FT_BATCH} and batches; target accuracy "
    f"SaRA {S['sara']['t_ok'].estimate:.2f} vs LoRA {S['lora']['t_ok'].estimate:.2f}")
s5 = paired("sara", "lora", "s_ok")
sub5 = claims.record(
    5, "SaRA keeps more of the source domain than LoRA",
    metric="source class accuracy after adaptation (digits 0-4)", method="SaRA",
    competitor="LoRA", value=S["sara"]["s_ok"].estimate,
    competitor_value=S["lora"]["s_ok"].estimate, diff=s5, threshold=0.0,
    better="higher", primary=False)
recs = [rec57, sub57, rec5, sub5]
""")

code("c015", r"""
# NBVAL_CHECK_OUTPUT
for name, d in (("DiffFit - full, target accuracy", d57), ("DiffFit - full, KID", k57),
                ("SaRA - LoRA, KID", d5), ("SaRA - LoRA, source accuracy", s5)):
    print(f"{name:32s} {claims.fmt(d):>26s}")
best_t = max(METHODS, key=lambda m: S[m]["t_ok"].estimate)
least_s = min(METHODS, key=lambda m: S[m]["s_ok"].estimate)
print(f"highest target accuracy: {best_t}")
print(f"lowest retained source accuracy: {least_s}")
""")

md("c015b", r"""
**Reading the records.** The intervals above decide both papers' primary claims, and the sub-claims say what
else moved; the last two lines name the method that learned the target digits best and the one that kept the
least of the source. Every method is trained on digits 5-9 only, so nothing but the restriction of what it may
change holds the source in place: the fewer or smaller the changes a method allows, the more it can keep, and the
less it can learn in the same steps. Where the interval straddles the threshold, this budget cannot separate the
two methods, and the record says `unresolved`.
""")

md("c016", r"""
**Wall time.** DiffFit also claims to train faster. The training seconds of each zoo entry are in its registry
entry; they were measured on a shared 2-core machine, one run at a time under changing load, so they are shown here
and not judged.
""")

code("c017", r"""
for m in METHODS:
    secs = [zoo.info(f"ft_{m}_s{s}")["train_seconds"] for s in SEEDS]
    print(f"{m:8s} train seconds per run (3 seeds, {FT_STEPS} steps): "
          + ", ".join(f"{t:.0f}" for t in secs))
""", tags=["nbval-ignore-output"])

md("c018", r"""
## 5. KIND and slight label corruption: not measured here

**KIND (45)** factorises each weight matrix by SVD, $W = U \Sigma V^\top$, and splits the factors into a
class-agnostic part (the *learngene*, shared) and a class-specific part, trained so that the agnostic part
transfers to new classes. Testing it needs a KIND-style pretraining of the source model as well as the transfer,
and **slight corruption in pre-training (9)** needs several pretrained models per condition (clean labels, a few
percent of labels corrupted, and conditional-embedding perturbation), three seeds each. Each of these models is
as large as `unet_src`, so nine more would exceed this chapter's artefact budget, and their pretraining did not fit
the time this chapter had. Both papers stay *planned*; the exercises sketch how to run them with the code above.

## 6. Full scale

With `DMLAB_SCALE=full` on a GPU the same `finetuning.adapt` builds the four methods on Stable Diffusion 1.5's
UNet (LoRA on the attention projections, as the papers do), and `training_memory` measures one training step of
each at 512x512 (64x64 latents) with a text prompt. The unit tests drive this path on a config-built
`UNet2DConditionModel`. This cell does not run in CI.
""")

code("c019", r"""
if SCALE.full:  # SD 1.5: trainable parameters and memory of one training step
    from dmlab import hub

    sd = hub.load_sd("1.5", device=SCALE.device, dtype=torch.float32)
    ids = sd.tokenizer(["a photograph of a corgi"] * 2, padding="max_length",
                       max_length=sd.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        ctx = sd.text_encoder(ids.input_ids.to(SCALE.device))[0]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 64, 64, generator=g).to(SCALE.device)
    eps = torch.randn(2, 4, 64, 64, generator=g).to(SCALE.device)
    ac = sd.scheduler.alphas_cumprod[500].to(SCALE.device)
    batch = {"x0": x0, "eps": eps, "t": torch.tensor([500, 500], device=SCALE.device),
             "xt": ac.sqrt() * x0 + (1 - ac).sqrt() * eps, "encoder_hidden_states": ctx}
    full_kw = {"full": {}, "difffit": {}, "sara": {"fraction": 0.01},
               "lora": {"rank": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}}
    for m, kw in full_kw.items():
        ad = finetuning.adapt(sd.unet, m, **kw)
        r = finetuning.training_memory(ad, batch)
        print(f"{m:8s} trainable {ad.trainable:>12,d}  step memory "
              f"{r['total'] / 2**30:.2f} GiB (activations {r['activations'] / 2**30:.2f})")
        del ad
""")

md("c020", r"""
## Summary

The verdicts, printed from the claim records above:
""")

code("c021", r"""
# NBVAL_CHECK_OUTPUT
for rec in recs:
    kind = "primary" if rec.primary else "sub-claim"
    print(f"paper {rec.paper}, {kind} ({rec.status}): {rec.method} vs {rec.competitor}")
    print(f"  {rec.metric}: {claims.fmt(claims.Interval(**rec.diff))}")
""")

md("c022", r"""
- One interface, `dmlab.finetuning.adapt`, turns a diffusers model into any of four fine-tuning setups; training
  is one `dmlab.train.fit` call with the same batches for every method, and the adapted updates are small zoo
  entries (DiffFit's and LoRA's tensors, SaRA's sparse update) on top of the source model.
- The table of section 3 and the records above give the verdicts: whether DiffFit stays within the margin of full
  fine-tuning at a small fraction of its trainable parameters, and whether SaRA beats LoRA at a matched budget on
  target quality and on what the source keeps. Both verdicts are for this short, matched budget: with more steps
  every method would move, and the ranking may change (the first exercise).
- The memory table of section 2 shows where a parameter-efficient method saves: the optimizer state and gradients
  of the trained tensors. The activations saved for the backward pass do not shrink: they are the same network's
  activations, and SaRA's sparse parametrization adds the materialised weights.
- KIND (45) and slight label corruption (9) are described but not measured in this chapter.

## Exercises

1. Re-run `finetuning.finetune` for LoRA at ranks 1, 2 and 4 (three seeds each) and plot target KID against the
   trainable parameters. Where does SaRA's point fall on that curve?
2. Turn off SaRA's nuclear-norm penalty (`nuclear=0`) and its progressive schedule, and measure what each
   contributes to target quality and to retained source accuracy.
3. Slight corruption (paper 9): train three `unet_s`-size models with 0% and 5% of the labels replaced at random,
   and three with conditional-embedding perturbation (Gaussian noise added to the class embedding during
   training), with `dmlab.train.fit`; compare class accuracy and KID with intervals over the seeds.
""")

nb = nbf.v4.new_notebook()
nb.cells = cells
nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
               "language_info": {"name": "python"}}
nbf.write(nb, "notebooks/23_efficient_finetuning.ipynb")
print("written", len(cells), "cells")
