"""Solver search in the unified space (paper 19): the spec reproduces named solvers, saves as plain JSON, and the
search finds a solver that beats the baselines on held-out starting points."""
import json

import pytest
import torch

from dmlab import samplers, schedules
from dmlab.denoisers import RecordingDenoiser
from dmlab.exact import reference_ode
from dmlab.samplers.search import SolverSpec, baseline_specs, sample_spec, search_solver, state_error


def test_named_solvers_are_points_of_the_space(smooth_gmm):
    x = 20 * torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = schedules.karras(10, 0.002, 20.0)
    n = 10
    spec = SolverSpec(s.tolist(), (3,) * n, ("data",) * n, (False,) * n)
    ref = samplers.sample_dpm_solver_multistep(smooth_gmm, x, s, order=3, solver_type="heun", lower_order_final=False)
    torch.testing.assert_close(sample_spec(smooth_gmm, x, spec=spec), ref, rtol=1e-12, atol=1e-12)
    spec = SolverSpec(s.tolist(), (2,) * n, ("noise",) * n, (False,) * n)
    ref = samplers.sample_deis(smooth_gmm, x, s, order=2, variant="logrho", lower_order_final=False)
    torch.testing.assert_close(sample_spec(smooth_gmm, x, spec=spec), ref, rtol=1e-12, atol=1e-12)
    rec = RecordingDenoiser(smooth_gmm)
    sample_spec(rec, x, spec=SolverSpec(s.tolist(), (2,) * n, ("data",) * n, (True,) * n))
    assert rec.nfe == n  # the corrector costs no NFE


def test_spec_is_plain_json_and_validated(tmp_path, smooth_gmm):
    spec = baseline_specs(5, 0.01, 10.0)["pc_2"]
    spec.save(tmp_path / "s.json")
    d = json.loads((tmp_path / "s.json").read_text())
    assert set(d) == {"sigmas", "orders", "predictions", "correctors", "name"}
    assert SolverSpec.load(tmp_path / "s.json") == spec
    with pytest.raises(ValueError, match="one entry per step"):
        SolverSpec([2.0, 1.0, 0.0], (1,), ("data", "data"), (False, False))
    with pytest.raises(ValueError, match="orders entries"):
        SolverSpec([2.0, 1.0, 0.0], (1, 4), ("data", "data"), (False, False))
    with pytest.raises(ValueError, match="strictly decreasing"):
        SolverSpec([1.0, 2.0, 0.0], (1, 1), ("data", "data"), (False, False))
    with pytest.raises(ValueError, match="own schedule"):
        sample_spec(smooth_gmm, torch.zeros(1, 2), schedules.karras(5), spec=spec)
    with pytest.raises(ValueError, match="nfe must be"):
        search_solver(smooth_gmm, torch.zeros(1, 2), nfe=1, sigma_min=0.01, sigma_max=10.0)


def test_search_beats_the_baselines_on_held_out_starts(smooth_gmm, tmp_path):
    nfe, lo, hi = 5, 0.002, 20.0
    x_search = hi * torch.randn(48, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_test = hi * torch.randn(48, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    spec, err = search_solver(smooth_gmm, x_search, nfe=nfe, sigma_min=lo, sigma_max=hi, n_candidates=80,
                              path=tmp_path / "best.json")
    assert SolverSpec.load(tmp_path / "best.json") == spec and spec.nfe == nfe + 1
    ref = reference_ode(smooth_gmm, x_test, torch.tensor([hi, lo], dtype=torch.float64))
    test_err = state_error(lambda d, x: sample_spec(d, x, spec=spec), smooth_gmm, x_test, ref)
    base = {k: state_error(lambda d, x: sample_spec(d, x, spec=b), smooth_gmm, x_test, ref)
            for k, b in baseline_specs(nfe, lo, hi).items()}
    assert test_err < min(base.values()) / 1.5, (test_err, base)
