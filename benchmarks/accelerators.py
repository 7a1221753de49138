"""Speed/quality tables of the training-free accelerators on the digit zoo.

    OMP_NUM_THREADS=1 python benchmarks/accelerators.py                 # every table
    OMP_NUM_THREADS=1 python benchmarks/accelerators.py --only caching  # caching | transformer | tstitch | peer

Testbed (:class:`dmlab.accelerators.Testbed`): same weights, sampler (Euler = DDIM with eta 0 on the model's
discrete timesteps), steps, noise and labels for the baseline and every method; FLOP ratio from FlopCounterMode;
wall-time ratio from interleaved 1-thread pairs (median [min-max]); PSNR to the baseline sample from the same noise;
digits-FD against the test digits, with its real-vs-real floor at the same n; class accuracy. Every table has the
row "same sampler, fewer steps, matched FLOPs".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import dmlab  # noqa: E402
from dmlab import accelerators as acc  # noqa: E402
from dmlab import bench, metrics, zoo  # noqa: E402
from dmlab.zoo.evaluate import balanced_labels  # noqa: E402


def header(title: str, p: acc.Testbed, floor: float) -> None:
    print(f"\n=== {title}\n    {len(p.labels)} samples, {p.n_steps} Euler (DDIM) steps, digits-FD floor at this n: "
          f"{floor:.2f}; wall = interleaved 1-thread pairs, median [min-max]")


def finish(p: acc.Testbed, matched: list[float], time_rows: bool, pairs: int) -> None:
    done = set()
    for s in matched:
        k = bench.matched_steps(p.n_steps, s)
        if k not in done and k != p.n_steps:
            done.add(k)
            p.fewer_steps(s, time=time_rows, pairs=pairs, group="fewer steps")
    print(p.table.text())
    ratio = [f"{r['configuration']}: {r['wall'] / r['flop_speedup']:.2f}" for r in p.table.rows
             if isinstance(r.get("wall"), float) and r["flop_speedup"] > 1.05]
    print("wall speed-up / FLOP bound (target >= 0.9 for caching): " + "; ".join(ratio))


def caching(args, gen, clf, floor):
    den, unet = zoo.load_denoiser("unet_l")
    p = acc.Testbed(den, unet, balanced_labels(args.n // 10), generator=gen, n_steps=args.steps,
                     classifier=clf, title="feature caching on unet_l")
    header("Feature caching on unet_l (UNet2DModel, 32-64-64, 2 layers per block)", p, floor)
    p.measure("baseline", group="baseline")
    keys = acc.caching.dense_early_keys(args.steps, args.steps // 2)
    configs = [
        ("DeepCache I=2", lambda m: acc.apply_deepcache(m, acc.DeepCacheConfig(2))),
        ("DeepCache I=3", lambda m: acc.apply_deepcache(m, acc.DeepCacheConfig(3))),
        ("DeepCache I=5", lambda m: acc.apply_deepcache(m, acc.DeepCacheConfig(5))),
        ("DeepCache I=3 branch 1", lambda m: acc.apply_deepcache(m, acc.DeepCacheConfig(3, branch=1))),
        ("encoder propagation I=2", lambda m: acc.apply_encoder_propagation(m, acc.EncoderPropagationConfig(2))),
        ("encoder propagation I=3", lambda m: acc.apply_encoder_propagation(m, acc.EncoderPropagationConfig(3))),
        (f"encoder propagation {len(keys)} dense-early keys",
         lambda m: acc.apply_encoder_propagation(m, acc.EncoderPropagationConfig(key_steps=keys))),
        ("inheritance: block up_blocks.0, I=2", lambda m: acc.apply_feature_inheritance(
            m, acc.FeatureInheritanceConfig(("up_blocks.0",), "block", interval=2))),
        ("inheritance: layer up_blocks.*.resnets.0, I=2", lambda m: acc.apply_feature_inheritance(
            m, acc.FeatureInheritanceConfig(("up_blocks.*.resnets.0",), "layer", interval=2))),
        ("inheritance: unit up_blocks.*.resnets.*.conv1, I=2", lambda m: acc.apply_feature_inheritance(
            m, acc.FeatureInheritanceConfig(("up_blocks.*.resnets.*.conv1",), "unit", interval=2))),
    ]
    matched = []
    for name, apply in configs:
        r = p.measure(name, apply=apply, time=True, pairs=args.pairs, group=name.split(" ")[0])
        matched.append(r["flop_speedup"])
    finish(p, matched, True, args.pairs)


def transformer(args, gen, clf, floor):
    den, dit = zoo.load_denoiser("dit_l")
    p = acc.Testbed(den, dit, balanced_labels(args.n // 10), generator=gen, n_steps=args.steps,
                     classifier=clf, title="transformer caches on dit_l")
    header("Transformer caches on dit_l (DiTTransformer2DModel, 6 blocks)", p, floor)
    p.measure("baseline", group="baseline")
    ratios = acc.calibrate_mag_ratios(dit, lambda: p.sample(n=2))
    configs = [
        ("FirstBlockCache 0.1", lambda m: acc.apply_first_block_cache(m, 0.1)),
        ("FirstBlockCache 0.2", lambda m: acc.apply_first_block_cache(m, 0.2)),
        ("TaylorSeer I=2", lambda m: acc.apply_taylorseer(m, 2)),
        ("TaylorSeer I=3", lambda m: acc.apply_taylorseer(m, 3)),
        ("MagCache 0.06", lambda m: acc.apply_mag_cache(m, ratios, threshold=0.06)),
        ("MagCache 0.12", lambda m: acc.apply_mag_cache(m, ratios, threshold=0.12)),
        ("PAB skip 2", lambda m: acc.apply_pab(m, 2)),
        ("inheritance: blocks 1-5 residual, I=2", lambda m: acc.apply_feature_inheritance(
            m, acc.FeatureInheritanceConfig(tuple(f"transformer_blocks.{i}" for i in range(1, 6)), "block",
                                            interval=2, reuse="residual"))),
    ]
    matched = []
    for name, apply in configs:
        r = p.measure(name, apply=apply, time=True, pairs=args.pairs, group=name.split(" ")[0])
        matched.append(r["flop_speedup"])
    finish(p, matched, True, args.pairs)


def tstitch(args, gen, clf, floor):
    for small, large in (("unet_s", "unet_l"), ("dit_s", "dit_l")):
        ds, ms = zoo.load_denoiser(small)
        dl, ml = zoo.load_denoiser(large)
        p = acc.Testbed(dl, ml, balanced_labels(args.n // 10), generator=gen, n_steps=args.steps,
                         classifier=clf, title=f"T-Stitch {small} -> {large}", others=((ds, ms),))
        header(f"T-Stitch: {small} for the first fraction r of the steps, then {large}", p, floor)
        p.measure(f"{large} only (r=0)", group="T-Stitch")
        matched = []
        for r in (0.2, 0.4, 0.6, 0.8, 1.0):
            row = p.measure(f"r={r:.1f}", denoiser=acc.tstitch(ds, dl, p.sigmas, r), time=r in (0.4, 1.0),
                            pairs=args.pairs, group="T-Stitch")
            matched.append(row["flop_speedup"])
        for r in (0.4, 0.6):
            p.measure(f"reversed: {large} first, {small} last {r:.0%}",
                      denoiser=acc.tstitch(ds, dl, p.sigmas, r, first="large"), group="reversed")
        finish(p, matched[:3], False, args.pairs)


def peer(args, gen, clf, floor):
    try:
        import DeepCache
    except ImportError:
        print("\n(peer table skipped: pip install DeepCache)")
        return
    if "sd_tiny" not in zoo.names():
        print("\n(peer table skipped: zoo model sd_tiny not registered)")
        return
    pipe = zoo.load("sd_tiny")
    kw = dict(prompt=["a handwritten " + w for w in ("zero", "one", "two", "three", "four", "five", "six", "seven")], num_inference_steps=args.steps, guidance_scale=3.0, output_type="np")

    def run():
        return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    print(f"\n=== Peer: the DeepCache package (DeepCacheSDHelper) vs dmlab.apply_deepcache on the zoo latent pipeline "
          f"sd_tiny, {args.steps} DDIM steps, 8 images")
    import copy

    base = run()
    rows = []
    for interval in (2, 3, 5):
        helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()
        ref = run()
        helper.disable()
        with acc.apply_deepcache(pipe, acc.DeepCacheConfig(interval)):
            ours = run()
        pa, pb = copy.deepcopy(pipe), copy.deepcopy(pipe)  # the package on one copy, ours on the other
        ha = DeepCache.DeepCacheSDHelper(pipe=pa)
        ha.set_params(cache_interval=interval, cache_branch_id=0)
        ha.enable()
        go = lambda p: p(generator=torch.Generator().manual_seed(0), **kw).images  # noqa: E731
        with acc.apply_deepcache(pb, acc.DeepCacheConfig(interval)):
            t_pkg = bench.time_pair(run, lambda: go(pa), pairs=args.pairs)
            t_ours = bench.time_pair(lambda: go(pa), lambda: go(pb), pairs=max(args.pairs, 5))
        ha.disable()
        rows.append({"configuration": f"interval {interval}", "identical": bool((ours == ref).all()),
                     "max |ours - package|": float(abs(ours - ref).max()), "package speed-up": str(t_pkg),
                     "ours vs package": str(t_ours), "psnr to baseline": bench.psnr(torch.as_tensor(ours),
                                                                                   torch.as_tensor(base), data_range=1.0)})
    print(bench.format_table(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="samples per configuration (a multiple of 10)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved timing pairs")
    ap.add_argument("--only", default="caching,transformer,tstitch,peer")
    a = ap.parse_args(argv)
    _, gen = dmlab.setup(seed=0)
    clf = zoo.load("classifier")
    floor = metrics.digits_fd_floor(a.n, generator=torch.Generator().manual_seed(0), classifier=clf, repeats=3)
    t0 = time.perf_counter()
    for part in a.only.split(","):
        {"caching": caching, "transformer": transformer, "tstitch": tstitch, "peer": peer}[part.strip()](a, gen, clf, floor)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
