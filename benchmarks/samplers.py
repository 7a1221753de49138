"""Samplers benchmark: per-step overhead against diffusers and accuracy at NFE = 10 on the exact digits denoiser.

    OMP_NUM_THREADS=1 python benchmarks/samplers.py            # ~2-4 minutes on a shared 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/samplers.py --quick    # fewer pairs, samples and search candidates

Table 1 (target <= 0.25x): per-step time of each dmlab solver / the diffusers scheduler of the same
algorithm on a 16x1x8x8 tensor with a model that costs nothing; median of interleaved per-pair ratios, one thread
(:func:`dmlab.samplers.compare.overhead_table`).

Table 2 (target <= 0.5x): error of the state at sigma_min = 0.01 after 10 denoiser evaluations from sigma_max =
157.4 (the range of diffusers' DDPM betas) against the exact PF-ODE (:func:`dmlab.exact.reference_ode`; the ODE of
the empirical denoiser is singular at sigma = 0, so states are compared at sigma_min and the final jump to D is
left out). "error" is the geometric mean over paths of the per-path RMS error (a path that ends on another training
image costs a bounded amount; their number is the "flips" column, "rms" the plain RMS). Every dmlab solver runs on three grids; diffusers' schedulers on their own grids and configurations.
The searched solver (USF, paper 19) is searched on other starting noises than those it is scored on.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing pairs, samples and search candidates")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import torch

    from dmlab import schedules
    from dmlab.data import load_digits
    from dmlab.exact import EmpiricalDenoiser
    from dmlab.samplers import compare, search, v3

    torch.set_num_threads(1)
    if not args.skip_overhead:
        t0 = time.time()
        tab = compare.overhead_table(n_steps=20, shape=(16, 1, 8, 8), pairs=5 if args.quick else 11)
        print(tab.text(3))
        worst = max(r["ratio"] for r in tab.rows)
        print(f"worst median ratio {worst:.3f} (target <= 0.25)  [{time.time() - t0:.0f} s]\n")

    if not args.skip_accuracy:
        t0 = time.time()
        x, _ = load_digits("train")
        den = EmpiricalDenoiser(x)
        train = schedules.train_sigmas()
        lo, hi = float(train[0]), float(train[-1])
        n = 32 if args.quick else 96
        noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        noise_search = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        stats = v3.estimate_statistics(den, x, lam_min=-math.log(hi), lam_max=-math.log(lo), n_lam=48,
                                       n_samples=128, generator=torch.Generator().manual_seed(2))
        ref_search = compare.References(den, noise_search)
        spec, _ = search.search_solver(den, ref_search.start(hi), nfe=10, sigma_min=lo, sigma_max=hi,
                                       reference=ref_search(hi, lo), n_candidates=120 if args.quick else 400,
                                       reduce="gmean")
        tab = compare.accuracy_table(den, noise, 10, sigma_min=lo, sigma_max=hi, stats=stats, spec=spec)
        print(tab.text(4))
        best = {lib: min((r for r in tab.rows if r["library"] == lib), key=lambda r: r["error"])
                for lib in ("dmlab", "diffusers")}
        for lib, r in best.items():
            print(f"best {lib:9s}: {r['configuration']:45s} error {r['error']:.4f}")
        print(f"ratio best dmlab / best diffusers = {best['dmlab']['error'] / best['diffusers']['error']:.3f} "
              f"(target <= 0.5)  [{time.time() - t0:.0f} s]")
        print(f"searched spec: orders {spec.orders}, predictions {spec.predictions}, correctors {spec.correctors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
