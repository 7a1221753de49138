"""Quality, bits, bytes and FLOPs of post-training quantization and pruning on the digit zoo.

    OMP_NUM_THREADS=1 python benchmarks/compression.py                     # both tables (~3 minutes, shared CPU)
    OMP_NUM_THREADS=1 python benchmarks/compression.py --only quantization # quantization | pruning
    OMP_NUM_THREADS=1 python benchmarks/compression.py --quick             # fewer samples, shorter fine-tunes

Protocol: same weights, sampler (Euler = DDIM with eta 0 on the model's discrete timesteps), steps, noise and labels
for every row; PSNR to the un-compressed sample from the same noise; digits-FD against the test digits, with its
real-vs-real floor at the same n; class accuracy. Calibration inputs come from a separate full-precision run.

Quantization (``unet_l``; papers 82, 20, 56, 42, 52): **CPU wall time is not meaningful for fake quantization**
(simulating integer arithmetic in float adds work), so the table reports bits and model bytes; its trivial
competitor is the smaller model ``unet_s`` in fp32 at similar bytes.
Pruning (``dit_l``; papers 22, 48, 4, 61, 60): FLOP speed-up from FlopCounterMode (skipped units and sliced heads
do no arithmetic); trivial competitors: the same sampler with fewer steps at matched FLOPs, and ``dit_s``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import dmlab  # noqa: E402
from dmlab import accelerators as acc  # noqa: E402
from dmlab import bench, metrics, samplers, schedules, zoo  # noqa: E402
from dmlab.accelerators.pruning_masks import mask_sites  # noqa: E402
from dmlab.accelerators.quantization import TEMPORAL_PATTERNS, model_bytes  # noqa: E402
from dmlab.data import load_digits  # noqa: E402


class Bench:
    """Fixed noise, labels and schedule for one model; ``row(name, samples, **columns)`` adds a measured row."""

    def __init__(self, name: str, n: int, steps: int, gen: torch.Generator, clf):
        self.den, self.net = zoo.load_denoiser(name)
        self.n, self.steps, self.gen, self.clf = n, steps, gen, clf
        self.labels = torch.arange(n) % 10
        self.noise = torch.randn(n, 1, 8, 8, generator=gen)
        self.sig = self.schedule(steps)
        self.base = self.sample()
        self.rows: list[dict] = []

    def schedule(self, k: int):
        return schedules.discrete(k, self.den.sigmas_train, dtype=torch.float32)

    def sample(self, den=None, sig=None):
        s = self.sig if sig is None else sig
        return samplers.sample_euler(den or self.den, self.noise * s[0], s, cond={"class_labels": self.labels})

    def calibration(self, scheme: str = "uniform", n: int = 256, samples: int = 64, noise=None):
        x = (torch.randn(samples, 1, 8, 8, generator=self.gen) if noise is None else noise) * self.sig[0]
        return acc.calibration_set(self.den, x, self.sig, n=n, scheme=scheme,
                                   cond={"class_labels": torch.arange(len(x)) % 10}, generator=self.gen)

    def row(self, name: str, x, **cols) -> dict:
        r = {"configuration": name, **cols, "psnr": bench.psnr(x, self.base),
             "fd": metrics.digits_fd(x, classifier=self.clf),
             "acc": metrics.class_accuracy(x, self.labels, classifier=self.clf)}
        self.rows.append(r)
        print(f"  {name}  ({time.strftime('%H:%M:%S')})", file=sys.stderr)
        return r


def quantization(args, gen, clf) -> None:
    b = Bench("unet_l", args.n, args.steps, gen, clf)
    nz = torch.randn(64, 1, 8, 8, generator=gen)
    cal = {s: b.calibration(s, noise=nz) for s in ("first", "uniform", "normal")}

    def q(name, cfg, c=None, tune=None):
        with acc.apply_quantization(b.net, cfg, c) as h:
            if tune:
                acc.quest_finetune(h, c, select=tune, steps=args.finetune, lr=3e-4, generator=gen)
            b.row(name, b.sample(), bits=cfg.label, MB=h.stats["bytes"] / 1e6)

    b.row("unet_l fp32", b.base, bits="W32A32", MB=model_bytes(b.net) / 1e6)
    den_s, unet_s = zoo.load_denoiser("unet_s")
    b.row("unet_s fp32 (smaller model, trivial competitor)", b.sample(den_s), bits="W32A32", MB=model_bytes(unet_s) / 1e6)
    q("W8 weights (min-max)", acc.QuantConfig(8, None))
    q("W4 weights (min-max)", acc.QuantConfig(4, None))
    q("W4 weights (MSE-clipped)", acc.QuantConfig(4, None, weight_range="mse"))
    names = dict(first="t=T only", uniform="Q-Diffusion", normal="PTQ4DM")
    for draw in range(args.draws):  # the calibration draw is a source of variance: repeat with fresh noise
        c = cal if draw == 0 else {s: b.calibration(s, noise=nz) for nz in [torch.randn(64, 1, 8, 8, generator=gen)]
                                   for s in names}
        for s in names:
            q(f"A6, calibrated '{s}' ({names[s]}), draw {draw + 1}", acc.QuantConfig(None, 6), c[s])
    q("W8A8, PTQ4DM calibration", acc.QuantConfig(8, 8), cal["normal"])
    only = dict(weight_bits=None, act_bits=4, layers=("up_blocks.*.conv_shortcut",))
    q("A4 decoder shortcuts only", acc.QuantConfig(**only), cal["uniform"])
    q("A4 decoder shortcuts only, split (Q-Diffusion)", acc.QuantConfig(**only, split_shortcut=True), cal["uniform"])
    tib = dict(weight_bits=4, act_bits=4, layers=TEMPORAL_PATTERNS)
    q("W4A4 time embedding only", acc.QuantConfig(**tib), cal["uniform"])
    q("W4A4 time embedding only, TFMQ-DM", acc.QuantConfig(**tib, temporal="tfmq"), cal["uniform"])
    w4a4 = acc.QuantConfig(4, 4, split_shortcut=True, per_step_acts=True)
    q("W4A4 (split, per-step ranges)", w4a4, cal["uniform"])
    q(f"W4A4 + QuEST selective fine-tune ({args.finetune} steps)", w4a4, cal["uniform"], "quest")
    q(f"W4A4 + fine-tune all layers ({args.finetune} steps)", w4a4, cal["uniform"], "all")
    floor = metrics.digits_fd_floor(args.n, generator=gen, classifier=clf, repeats=3)
    print(f"\n=== Quantization of unet_l: {args.n} samples, {args.steps} DDIM steps; digits-FD floor {floor:.2f}")
    print("    bytes: weights at b bits + fp32 scale and int32 zero point per channel; CPU wall time is not reported"
          " (fake quantization is slower than float on a CPU)")
    print(bench.format_table(b.rows, ["configuration", "bits", "MB", "psnr", "fd", "acc"], digits=2))
    print(f"    temporal-feature cache (paper 42) for {args.steps} steps: "
          f"{acc.quantization.temporal_cache_bytes(b.net, args.steps) / 1e6:.2f} MB")


def pruning(args, gen, clf) -> None:
    b = Bench("dit_l", args.n, args.steps, gen, clf)
    x1, t1, y1 = torch.randn(1, 1, 8, 8, generator=gen), torch.tensor([500]), torch.tensor([3])
    flops = lambda net=b.net: bench.count_flops(lambda: net(x1, t1, class_labels=y1))  # noqa: E731
    f0, p0 = flops(), sum(p.numel() for p in b.net.parameters())

    def fewer(speedup):
        k = bench.matched_steps(args.steps, speedup)
        b.row(f"dit_l, {k} steps (fewer steps, matched FLOPs)", b.sample(sig=b.schedule(k)),
              flop_speedup=args.steps / k, MParams=p0 / 1e6)

    b.row(f"dit_l, {args.steps} steps", b.base, flop_speedup=1.0, MParams=p0 / 1e6)
    units = acc.prunable_units(b.net, x1, t1, class_labels=y1)
    cal = b.calibration(n=64, samples=32)
    scores = {c: acc.unit_scores(b.net, units, c, calibration=cal, generator=gen,
                                 sample=lambda: samplers.sample_euler(b.den, b.noise[:50] * b.sig[0], b.sig,
                                                                      cond={"class_labels": b.labels[:50]}))
              for c in ("output", "ld", "magnitude", "random")}
    half = len(units) // 2
    for c, sc in scores.items():
        with acc.apply_layer_pruning(b.net, acc.LayerPruneConfig(acc.select_units(sc, half))) as h:
            r = b.row(f"{half} of {len(units)} blocks removed, {c} criterion", b.sample(), flop_speedup=f0 / flops(),
                      MParams=(p0 - h.stats["params_removed"]) / 1e6)
    fewer(r["flop_speedup"])
    den_s, dit_s = zoo.load_denoiser("dit_s")
    b.row("dit_s (small model)", b.sample(den_s), flop_speedup=f0 / flops(dit_s),
          MParams=sum(p.numel() for p in dit_s.parameters()) / 1e6)
    x_train, y_train = load_digits("train")
    teacher, chosen = copy.deepcopy(b.net), acc.select_units(scores["output"], half)
    for name, kw in {"plain KD": dict(normalized=False), "normalized KD (LAPTOP-Diff)": {},
                     "progressive (A-SDM)": dict(progressive=True), "spectral KD (Spectral Diffusion)": dict(spectral=True)}.items():
        with acc.apply_layer_pruning(b.net, acc.LayerPruneConfig(chosen)) as h:
            acc.distill_pruned(h, teacher, x_train, sigmas_train=b.den.sigmas_train, cond={"class_labels": y_train},
                               steps=args.distill, batch_size=32, lr=3e-4, generator=gen, **kw)
            b.row(f"{half} removed + {args.distill} steps {name}", b.sample(), flop_speedup=f0 / flops(),
                  MParams=(p0 - h.stats["params_removed"]) / 1e6)
    sig4, sites = b.schedule(4), mask_sites(b.net)
    for obj in ("e2e", "local"):
        sc, _ = acc.learn_masks(b.den, b.noise[:16] * sig4[0], sig4, cond={"class_labels": b.labels[:16]},
                                steps=args.masks, objective=obj, generator=gen)
        masks = acc.threshold_masks(sc, sites, 0.2)
        with acc.apply_masks(b.net, masks) as h:
            r = b.row(f"EcoDiff masks, 20% of head/FFN params, {obj} objective", b.sample(),
                      flop_speedup=f0 / flops(acc.pruning_masks.sliced_copy(b.net, masks)), MParams=(p0 - h.stats["params_off"]) / 1e6)
    fewer(r["flop_speedup"])
    floor = metrics.digits_fd_floor(args.n, generator=gen, classifier=clf, repeats=3)
    print(f"\n=== Pruning of dit_l: {args.n} samples, {args.steps} DDIM steps; digits-FD floor {floor:.2f}")
    print(bench.format_table(b.rows, ["configuration", "flop_speedup", "MParams", "psnr", "fd", "acc"], digits=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("quantization", "pruning"))
    ap.add_argument("--quick", action="store_true", help="50 samples, 10-step fine-tunes")
    ap.add_argument("--n", type=int, default=100, help="samples per row")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps of the baseline")
    args = ap.parse_args(argv)
    args.finetune, args.distill, args.masks, args.draws = (10, 10, 10, 1) if args.quick else (30, 40, 25, 3)
    if args.quick:
        args.n = min(args.n, 50)
    torch.set_num_threads(1)
    _, gen = dmlab.setup(seed=0)
    clf = zoo.load("classifier")
    t0 = time.time()
    if args.only in (None, "quantization"):
        quantization(args, gen, clf)
    if args.only in (None, "pruning"):
        pruning(args, gen, clf)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
