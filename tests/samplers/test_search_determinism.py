"""The solver search and the DPM-Solver-v3 statistics give the same bits at 1 and 2 intra-op threads.

Chapter 5 prints searched solvers and v3 statistics computed in the run (no cache); nbval compares them exactly,
so a result that depended on the thread count (a reduction split differently) would make CI flaky.
"""
import functools
import math

import pytest
import torch

from dmlab import data, exact, schedules
from dmlab.samplers import compare, search, v3


def _gmm():
    return exact.GMMDenoiser(torch.tensor([0.3, 0.3, 0.4]),
                             torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=torch.float64),
                             torch.stack([torch.tensor([[0.3, 0.05], [0.05, 0.2]]), 0.4 * torch.eye(2),
                                          0.25 * torch.eye(2)]).double())


def _at_threads(n: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@functools.lru_cache(maxsize=None)
def _digits_problem():
    """Denoiser, start and exact reference (computed once, at the default thread count)."""
    digits, _ = data.load_digits("train")
    emp = exact.EmpiricalDenoiser(digits)
    train = schedules.train_sigmas()
    lo, hi = float(train[0]), float(train[-1])
    g = torch.Generator().manual_seed(3)
    refs = compare.References(emp, torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64))
    return emp, refs.start(hi), refs(hi, lo), lo, hi


@functools.lru_cache(maxsize=None)
def _gmm_problem():
    gmm = _gmm()
    g = torch.Generator().manual_seed(4)
    refs = compare.References(gmm, torch.randn(16, 2, generator=g, dtype=torch.float64))
    return gmm, refs.start(20.0), refs(20.0, 0.002), 0.002, 20.0


def _digits_search():
    emp, x, ref, lo, hi = _digits_problem()
    return search.search_solver(emp, x, nfe=5, sigma_min=lo, sigma_max=hi, reference=ref, n_candidates=6,
                                population=4, reduce="gmean", seed=5)


def _gmm_search():
    gmm, x, ref, lo, hi = _gmm_problem()
    return search.search_solver(gmm, x, nfe=5, sigma_min=lo, sigma_max=hi, reference=ref, n_candidates=12,
                                population=8, seed=5)


@pytest.mark.parametrize("run", [_gmm_search, _digits_search], ids=["gmm", "digits"])
def test_search_same_bits_at_1_and_2_threads(run):
    spec1, err1 = _at_threads(1, run)
    spec2, err2 = _at_threads(2, run)
    assert spec1 == spec2
    assert err1.hex() == err2.hex()          # the same float, bit for bit
    assert math.isfinite(err1)


def test_v3_statistics_same_bits_at_1_and_2_threads():
    digits, _ = data.load_digits("train")
    emp = exact.EmpiricalDenoiser(digits)

    def est():
        g = torch.Generator().manual_seed(7)
        return v3.estimate_statistics(emp, digits, lam_min=-5.0, lam_max=4.0, n_lam=6, n_samples=16,
                                      generator=g)

    a, b = _at_threads(1, est), _at_threads(2, est)
    for name in ("lam", "l", "s", "b"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert torch.equal(ta, tb), name
        assert torch.isfinite(ta).all()
