"""DeepCache reuse-call overhead on the zoo's unet_l: wall speed-up / FLOP speed-up of the patched route
(``shortcut=False``: the whole ``UNet2DModel.forward`` with the cached modules patched) and of the direct shallow
branch (default), side by side in one run; interleaved 1-thread pairs (``dmlab.bench``), median of pairs.

    OMP_NUM_THREADS=1 python benchmarks/deepcache_shortcut.py --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import dmlab  # noqa: E402
from dmlab import accelerators as acc  # noqa: E402
from dmlab import zoo  # noqa: E402
from dmlab.accelerators.caching import apply_deepcache  # noqa: E402
from dmlab.zoo.evaluate import balanced_labels  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="samples (a multiple of 10)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--intervals", default="2,3,5")
    a = ap.parse_args(argv)
    _, gen = dmlab.setup(seed=0)
    torch.set_num_threads(1)
    den, unet = zoo.load_denoiser("unet_l")
    p = acc.Testbed(den, unet, balanced_labels(a.n // 10), generator=gen, n_steps=a.steps, title="DeepCache routes")
    p.measure("baseline")
    ratios: dict = {}
    for rep in range(a.repeats):
        for interval in (int(i) for i in a.intervals.split(",")):
            for shortcut in (False, True):
                cfg = acc.DeepCacheConfig(interval)
                r = p.measure(f"I={interval} shortcut={shortcut} #{rep}", time=True, pairs=a.pairs,
                              apply=lambda m, c=cfg, s=shortcut: apply_deepcache(m, c, shortcut=s))
                ratios.setdefault((interval, shortcut), []).append(r["wall"] / r["flop_speedup"])
                print(f"I={interval} {'direct ' if shortcut else 'patched'} flop x{r['flop_speedup']:.3f} "
                      f"wall x{r['wall']:.3f} ratio {ratios[(interval, shortcut)][-1]:.3f}", flush=True)
    print(f"\nwall speed-up / FLOP speed-up, median of {a.repeats} runs of {a.pairs} interleaved pairs each")
    for (interval, shortcut), v in sorted(ratios.items()):
        route = "direct shallow branch" if shortcut else "patched forward (before)"
        print(f"  I={interval} {route:26s} {statistics.median(v):.3f}  runs: {', '.join(f'{x:.3f}' for x in v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
