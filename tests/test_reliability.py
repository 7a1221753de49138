"""A battery of bad inputs across the public API: each one must end in a clear dmlab error whose message names the
fix (a ValueError/TypeError, or a documented dmlab error class, matched on a phrase) or in the documented correct
result (finite, and as accurate in half precision as in float32). Calls into samplers, accelerators, probes and zoo
are read-only. ``test_battery_score`` reports the fraction of clear-or-correct cases over the whole battery;
``test_nothing_written_outside`` checks that running it changes nothing on disk outside the repository and the
temporary directories.

Cases that still fail are marked ``xfail(strict=True)`` with the owner in the reason, so that fixing one makes its
xfail fail and the mark gets removed.
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
import re
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable
from unittest import mock

import pytest
import torch

from dmlab import claims, data, denoisers, exact, hub, likelihood, metrics, schedules
from dmlab import scale as scale_mod
from dmlab.tools import notebooks

REPO = pathlib.Path(__file__).resolve().parents[1]
CLEAR = (ValueError, TypeError)


# ----------------------------------------------------------------------------------------------- fixtures (cheap)
def _g():
    return torch.Generator().manual_seed(0)


def _gmm():
    return exact.GMMDenoiser(torch.ones(2), torch.tensor([[-2.0, 0], [2, 0]]), torch.full((2,), 0.3))


def _emp(labels=True):
    d = torch.randn(10, 2, generator=_g())
    return exact.EmpiricalDenoiser(d, torch.arange(10) % 2 if labels else None)


def _x(b=4, d=2, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(b, d, generator=_g())).to(dtype)


def _close(a, b, rtol):
    a, b = a.double(), b.double()
    return bool(torch.isfinite(a).all()) and float((a - b).norm() / b.norm().clamp_min(1e-12)) <= rtol


class _TinyNet(torch.nn.Module):
    """An eps/v/x0 'network' with one parameter, called as model(x, timestep=t)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=dtype))

    def forward(self, x, timestep=None, **cond):
        return x * self.w * 0.5


def _vp(dtype=torch.float32, pred="epsilon"):
    ac = torch.cumprod(1 - schedules.betas_for(1000), 0)
    return denoisers.DiscreteVPDenoiser(_TinyNet(dtype), ac, prediction_type=pred)


def _half_vs_f64(fn_half, fn_64, rtol):
    """A half-precision call against the float64 one on the same inputs: finite and within rtol."""
    return _close(fn_half(), fn_64(), rtol)


@contextlib.contextmanager
def _env(**kv):
    with mock.patch.dict(os.environ):
        for k, v in kv.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield


def _full_after_tiny():
    """setup() at tiny scale, then at full scale in the same kernel: the second unsets what the first set."""
    import huggingface_hub.constants as hc

    before = hc.HF_HUB_OFFLINE
    try:
        with _env(HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None, DMLAB_SCALE=None), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale_mod.setup(0, deterministic=False)
            was = os.environ.get("HF_HUB_OFFLINE")
            sc, _ = scale_mod.setup(0, scale="full", deterministic=False)
            return was == "1" and "HF_HUB_OFFLINE" not in os.environ and not hub._offline() and sc.full
    finally:
        hc.HF_HUB_OFFLINE = before
        scale_mod._SET_BY_SETUP.clear()


def _hub_online_unreachable():
    """No HF_HUB_OFFLINE and no network: the loader fails in seconds with one message (the probe is stubbed so
    that the test never touches a network that happens to be there)."""
    with _env(HF_HUB_OFFLINE=None), mock.patch.object(hub, "_offline", lambda: False), \
            mock.patch.object(hub, "_reachable", lambda *a, **k: False), \
            mock.patch.object(hub, "_cached", lambda *a, **k: False):
        hub.load_sd("1.5", device="cpu", require_gpu=False)


def _sd_tiny_dir():
    from dmlab.zoo import store

    return str(store.zoo_dir() / "sd_tiny")


def _tmp_notebook(text="{}"):
    d = tempfile.mkdtemp()
    p = pathlib.Path(d) / "01_x.ipynb"
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------------------------- case table
@dataclass
class Case:
    module: str
    name: str
    fn: Callable[[], Any]
    match: str | None = None  # expect an error whose message matches (case-insensitive)
    check: Callable[[Any], bool] | None = None  # or expect a result this accepts
    exc: tuple = CLEAR
    xfail: str | None = None  # owner and reason, for cases outside this branch's files

    @property
    def id(self):
        return f"{self.module}:{self.name}"


CASES: list[Case] = []


def bad(module, name, fn, match, *, exc=CLEAR, xfail=None):
    CASES.append(Case(module, name, fn, match=match, exc=exc, xfail=xfail))


def good(module, name, fn, check, *, xfail=None):
    CASES.append(Case(module, name, fn, check=check, xfail=xfail))


def finite(r):
    return bool(torch.isfinite(r).all())


S10 = schedules.karras(10)
X = _x()
NAN = float("nan")
INF = float("inf")

# denoisers -------------------------------------------------------------------------------------------------------
bad("denoisers", "sigma negative", lambda: denoisers.as_sigma(-1.0, X), "non-negative")
bad("denoisers", "sigma nan", lambda: denoisers.as_sigma(NAN, X), "finite")
bad("denoisers", "sigma wrong batch", lambda: denoisers.as_sigma(torch.ones(3), X), r"shape \[B\] = \[4\]")
bad("denoisers", "x without batch dim", lambda: denoisers.as_sigma(1.0, torch.tensor(1.0)), "batch dimension")
bad("denoisers", "x not a tensor", lambda: denoisers.as_sigma(1.0, [1.0, 2.0]), "torch.Tensor")
bad("denoisers", "x integer", lambda: denoisers.as_sigma(1.0, torch.ones(2, 2, dtype=torch.long)), "floating")
bad("denoisers", "sigma 1e5 for float16 x", lambda: denoisers.as_sigma(torch.full((4,), 1e5, dtype=torch.float64),
                                                                        X.half()), "float16.*float32")
bad("denoisers", "float16 sigma already inf", lambda: denoisers.as_sigma(torch.full((4,), INF).half(), X.half()),
    "overflowed.*float32")
bad("denoisers", "EDM net not callable", lambda: denoisers.EDMPrecond("unet"), "callable")
bad("denoisers", "EDM sigma_data 0", lambda: denoisers.EDMPrecond(lambda x, c: x, sigma_data=0), "positive")
good("denoisers", "EDM float16 at sigma 1000", lambda: _half_vs_f64(
    lambda: denoisers.EDMPrecond(lambda x, c: torch.tanh(x))(_x(scale=1000).half(), 1000.0),
    lambda: denoisers.EDMPrecond(lambda x, c: torch.tanh(x))(_x(scale=1000).half().double(), 1000.0), 2e-3), bool)
bad("denoisers", "VP increasing alphas_cumprod", lambda: denoisers.DiscreteVPDenoiser(
    _TinyNet(), torch.linspace(0.01, 0.99, 10)), "decrease.*flip")
bad("denoisers", "VP alphas_cumprod with 0", lambda: denoisers.DiscreteVPDenoiser(
    _TinyNet(), torch.linspace(0.99, 0.0, 10)), r"\(0, 1\].*clamp")
bad("denoisers", "VP alphas_cumprod nan", lambda: denoisers.DiscreteVPDenoiser(
    _TinyNet(), torch.tensor([0.9, NAN, 0.1])), "finite")
bad("denoisers", "VP alphas_cumprod 2-D", lambda: denoisers.DiscreteVPDenoiser(_TinyNet(), torch.ones(5, 2)), "1-D")
bad("denoisers", "VP unknown prediction_type", lambda: denoisers.DiscreteVPDenoiser(
    _TinyNet(), torch.linspace(0.99, 0.01, 10), prediction_type="eps"), "prediction_type")
bad("denoisers", "VP model not callable", lambda: denoisers.DiscreteVPDenoiser(3, torch.linspace(.9, .1, 5)),
    "callable")
for _pred in ("epsilon", "v_prediction", "sample"):
    good("denoisers", f"VP {_pred} float16 at sigma 1000", lambda p=_pred: _half_vs_f64(
        lambda: _vp(torch.float16, p)(_x(scale=1000).half(), 1000.0),
        lambda: _vp(torch.float64, p)(_x(scale=1000).half().double(), 1000.0), 2e-3), bool)
bad("denoisers", "flow model not callable", lambda: denoisers.FlowDenoiser(None), "callable")
good("denoisers", "flow float16 at sigma 5000", lambda: _half_vs_f64(
    lambda: denoisers.FlowDenoiser(lambda x, timestep: 0.5 * x)(_x(scale=5000).half(), 5000.0),
    lambda: denoisers.FlowDenoiser(lambda x, timestep: 0.5 * x)(_x(scale=5000).half().double(), 5000.0), 2e-3), bool)
bad("denoisers", "cfg batched 0-d uncond", lambda: denoisers.cfg(_emp(), 2.0, {"class_labels": torch.tensor(1)},
                                                                 batched=True), "batch dimension")
bad("denoisers", "cfg batched cond of wrong batch", lambda: denoisers.cfg(
    _emp(), 2.0, {"class_labels": torch.full((4,), -1)}, batched=True)(X, 1.0, class_labels=torch.zeros(3).long()),
    "batch size")
bad("denoisers", "cfg uncond not a dict", lambda: denoisers.cfg(_emp(), 2.0, -1), "dict")
bad("denoisers", "cfg scale a string", lambda: denoisers.cfg(_emp(), "high", {}), "scale must be a number")
bad("denoisers", "cfg scale nan", lambda: denoisers.cfg(_emp(), NAN, {}), "finite")
bad("denoisers", "cfg cond keys differ", lambda: denoisers.cfg(_emp(), 2.0, {"class_labels": torch.full((4,), -1)})(
    X, 1.0), "must match")
good("denoisers", "cfg float16 at sigma 1e4", lambda: _half_vs_f64(
    lambda: denoisers.cfg(_emp(), 3.0, {"class_labels": torch.full((4,), -1)})(
        _x(scale=1e4).half(), 1e4, class_labels=torch.zeros(4).long()),
    lambda: denoisers.cfg(_emp(), 3.0, {"class_labels": torch.full((4,), -1)})(
        _x(scale=1e4).half().double(), 1e4, class_labels=torch.zeros(4).long()), 2e-3), bool)
bad("denoisers", "clamp lo >= hi", lambda: denoisers.clamp(_gmm(), 1.0, -1.0), "lo < hi")
bad("denoisers", "clamp of a non-callable", lambda: denoisers.clamp("D"), "callable")
bad("denoisers", "switch_at_sigma negative", lambda: denoisers.switch_at_sigma(_gmm(), _gmm(), -1.0), ">= 0")
bad("denoisers", "switch_at_sigma non-callable", lambda: denoisers.switch_at_sigma(_gmm(), None, 1.0), "callable")
good("denoisers", "recording float16 at sigma 1e5 (exact denoiser)", lambda: finite(
    denoisers.RecordingDenoiser(_gmm())(_x().half(), torch.full((4,), 1e5, dtype=torch.float64))), bool)
bad("denoisers", "net_output of an int", lambda: denoisers.net_output(42), "cannot read a tensor")

# exact -----------------------------------------------------------------------------------------------------------
M2 = torch.tensor([[-2.0, 0], [2, 0]])
bad("exact", "GMM nan means", lambda: exact.GMMDenoiser(torch.ones(2), M2 * NAN, torch.full((2,), .3)), "finite")
bad("exact", "GMM inf covs", lambda: exact.GMMDenoiser(torch.ones(2), M2, torch.tensor([.3, INF])), "finite")
bad("exact", "GMM nan covs", lambda: exact.GMMDenoiser(torch.ones(2), M2, torch.tensor([.3, NAN])), "finite")
bad("exact", "GMM means 1-D", lambda: exact.GMMDenoiser(torch.ones(2), torch.ones(2), torch.ones(2)), r"\[K, d\]")
bad("exact", "GMM no components", lambda: exact.GMMDenoiser(torch.ones(0), torch.empty(0, 2), torch.ones(0)),
    "K >= 1")
bad("exact", "GMM weights shape", lambda: exact.GMMDenoiser(torch.ones(3), M2, torch.full((2,), .3)),
    "weights must have shape")
bad("exact", "GMM negative weight", lambda: exact.GMMDenoiser(torch.tensor([1., -1]), M2, torch.full((2,), .3)),
    "non-negative")
bad("exact", "GMM asymmetric cov", lambda: exact.GMMDenoiser(torch.ones(1), M2[:1], torch.tensor([[[1., .5], [0, 1]]])),
    "symmetric")
bad("exact", "GMM non-PSD cov", lambda: exact.GMMDenoiser(torch.ones(1), M2[:1], torch.tensor([[-1.0, 0.5]])),
    "positive semi-definite")
bad("exact", "GMM shape mismatch", lambda: exact.GMMDenoiser(torch.ones(2), M2, torch.full((2,), .3), shape=(3,)),
    "does not hold")
bad("exact", "GMM x wrong dim", lambda: _gmm()(torch.randn(4, 3), 1.0), "data dimension")
bad("exact", "GMM x integer", lambda: _gmm()(torch.ones(4, 2, dtype=torch.long), 1.0), "floating")
bad("exact", "GMM conditioning", lambda: _gmm()(X, 1.0, class_labels=torch.zeros(4).long()), "no conditioning")
bad("exact", "GMM sample n=0", lambda: _gmm().sample(0), "positive int")
bad("exact", "GMM sample generator int", lambda: _gmm().sample(4, generator=0), "torch.Generator")
bad("exact", "empirical empty data", lambda: exact.EmpiricalDenoiser(torch.empty(0, 2)), "N >= 1")
bad("exact", "empirical data a list", lambda: exact.EmpiricalDenoiser([[0.0, 1.0]]), "tensor of shape")
bad("exact", "empirical nan data", lambda: exact.EmpiricalDenoiser(torch.tensor([[0.0, NAN]])), "finite")
bad("exact", "empirical integer data", lambda: exact.EmpiricalDenoiser(torch.ones(3, 2, dtype=torch.long)),
    "floating")
bad("exact", "empirical chunk 0", lambda: exact.EmpiricalDenoiser(torch.randn(3, 2), chunk=0), "chunk")
bad("exact", "empirical labels shape", lambda: exact.EmpiricalDenoiser(torch.randn(3, 2), torch.zeros(2).long()),
    r"shape \[N\]")
bad("exact", "empirical negative labels", lambda: exact.EmpiricalDenoiser(torch.randn(3, 2), -torch.ones(3).long()),
    "non-negative")
bad("exact", "empirical class_labels wrong batch", lambda: _emp()(X, 1.0, class_labels=torch.zeros(3).long()),
    "one entry per sample")
bad("exact", "empirical float class_labels", lambda: _emp()(X, 1.0, class_labels=torch.tensor([.7, 1.2, 0, 1])),
    "integer class indices")
bad("exact", "empirical class_labels out of range", lambda: _emp()(X, 1.0, class_labels=torch.full((4,), 5)),
    "must lie in")
bad("exact", "empirical class_labels without labels", lambda: _emp(False)(X, 1.0, class_labels=torch.zeros(4).long()),
    "without labels")
bad("exact", "empirical unknown cond", lambda: _emp()(X, 1.0, text=torch.zeros(4)), "only class_labels")
bad("exact", "empirical score at sigma 0", lambda: _emp().score(X, 0.0), "sigma > 0")
bad("exact", "empirical log_prob at sigma 0", lambda: _emp().log_prob(X, 0.0), "sigma > 0")
bad("exact", "empirical labels asked, none", lambda: _emp(False).sample(3, return_labels=True), "no labels")
bad("exact", "reference_ode increasing", lambda: exact.reference_ode(_gmm(), X, S10.flip(0)), "strictly decreasing")
bad("exact", "reference_ode empirical to 0", lambda: exact.reference_ode(_emp(), X, S10), "singular at sigma = 0")
good("exact", "GMM float16 at sigma 1e4", lambda: _half_vs_f64(
    lambda: _gmm()(_x(scale=1e4).half(), 1e4), lambda: _gmm()(_x(scale=1e4).half().double(), 1e4), 2e-3), bool)
good("exact", "GMM bfloat16 at sigma 0.002", lambda: _half_vs_f64(
    lambda: _gmm()(_x(scale=2).bfloat16(), 0.002), lambda: _gmm()(_x(scale=2).bfloat16().double(), 0.002), 1e-2), bool)
good("exact", "empirical score float16 at sigma 300", lambda: _half_vs_f64(
    lambda: _emp().score(_x(scale=300).half(), 300.0), lambda: _emp().score(_x(scale=300).half().double(), 300.0),
    2e-3), bool)
good("exact", "GMM score float16 at sigma 0.01", lambda: _half_vs_f64(
    lambda: _gmm().score(_x(scale=2).half(), 0.01), lambda: _gmm().score(_x(scale=2).half().double(), 0.01), 2e-3),
    bool)
good("exact", "empirical float16 sigma below float16's range", lambda: _half_vs_f64(
    lambda: _emp()(_x().half(), 1e-8), lambda: _emp()(_x().half().double(), 1e-8), 2e-3), bool)

# schedules -------------------------------------------------------------------------------------------------------
bad("schedules", "karras 0 steps", lambda: schedules.karras(0), "positive int")
bad("schedules", "karras float steps", lambda: schedules.karras(10.0), "positive int")
bad("schedules", "karras bool steps", lambda: schedules.karras(True), "positive int")
bad("schedules", "karras sigma_min 0", lambda: schedules.karras(10, 0.0, 80.0), "0 < sigma_min < sigma_max")
bad("schedules", "karras swapped range", lambda: schedules.karras(10, 80.0, 1.0), "0 < sigma_min < sigma_max")
bad("schedules", "karras infinite max", lambda: schedules.karras(10, 0.002, INF), "< inf")
bad("schedules", "karras rho 0", lambda: schedules.karras(10, rho=0), "rho")
bad("schedules", "karras sigma_min a string", lambda: schedules.karras(10, "0.002"), "must be a number")
bad("schedules", "karras float16 underflow", lambda: schedules.karras(10, 1e-8, 80, dtype=torch.float16),
    "float16.*float32")
bad("schedules", "karras float16 overflow", lambda: schedules.karras(10, 0.002, 1e5, dtype=torch.float16),
    "float16.*float32")
bad("schedules", "log_uniform bfloat16 merges sigmas", lambda: schedules.log_uniform(
    2000, 0.002, 80, dtype=torch.bfloat16), "bfloat16.*repeated")
bad("schedules", "karras integer dtype", lambda: schedules.karras(10, dtype=torch.int64), "floating")
good("schedules", "karras float16 on the EDM grid", lambda: schedules.karras(10, dtype=torch.float16),
     lambda s: finite(s) and schedules.check_schedule(s) is s)
bad("schedules", "vp_linear t_min 0", lambda: schedules.vp_linear(10, t_min=0), "t_min")
bad("schedules", "vp_cosine t_max 1", lambda: schedules.vp_cosine(10, t_max=1.0), "infinite at t = 1")
bad("schedules", "reversed schedule", lambda: schedules.check_schedule(S10.flip(0)), r"increases.*flip\(0\)")
bad("schedules", "reversed without zero", lambda: schedules.check_schedule(S10[:-1].flip(0)), r"flip\(0\)")
bad("schedules", "no final zero", lambda: schedules.check_schedule(torch.tensor([3.0, 2.0, 1.0])), "append_zero")
bad("schedules", "schedule a list", lambda: schedules.check_schedule([3.0, 0.0]), "torch.Tensor")
bad("schedules", "schedule 2-D", lambda: schedules.check_schedule(S10[None]), "1-D")
bad("schedules", "schedule with nan", lambda: schedules.check_schedule(torch.tensor([3.0, NAN, 0.0])), "finite")
bad("schedules", "float16 schedule with inf", lambda: schedules.check_schedule(
    torch.tensor([1e5, 1.0, 0.0]).half()), "float16 holds")
bad("schedules", "schedule not monotone", lambda: schedules.check_schedule(torch.tensor([3.0, 1.0, 2.0, 0.0])),
    "strictly decreasing")
bad("schedules", "schedule negative", lambda: schedules.check_schedule(torch.tensor([3.0, -1.0, 0.0])),
    "non-negative")
bad("schedules", "schedule too short", lambda: schedules.check_schedule(torch.tensor([0.0])), "step")
bad("schedules", "betas_for 1 step", lambda: schedules.betas_for(1), ">= 2")
bad("schedules", "betas_for unknown", lambda: schedules.betas_for(beta_schedule="cosine"), "squaredcos_cap_v2")
bad("schedules", "alphas_cumprod 0", lambda: schedules.sigmas_from_alphas_cumprod(torch.tensor([0.9, 0.0])),
    r"\(0, 1\]")
bad("schedules", "ddpm_timesteps too many", lambda: schedules.ddpm_timesteps(2000), "exceeds")
bad("schedules", "ddpm_timesteps spacing", lambda: schedules.ddpm_timesteps(10, spacing="uniform"), "unknown spacing")
bad("schedules", "discrete reversed train sigmas", lambda: schedules.discrete(
    10, schedules.train_sigmas().flip(0)), "increasing with it")
good("schedules", "alpha_sigma_t float16 at sigma 1000", lambda: schedules.alpha_sigma_t(
    torch.tensor([1000.0]).half()), lambda r: finite(r[0]) and abs(r[0].item() - 1e-3) < 1e-5 and abs(r[1].item() - 1)
     < 1e-3)

# metrics ---------------------------------------------------------------------------------------------------------
F = torch.randn(20, 3, generator=_g())
F_NAN = F.clone()
F_NAN[3, 1] = NAN
bad("metrics", "frechet nan features", lambda: metrics.frechet_distance(F_NAN, F), "NaN or inf in 1 of 20 rows")
bad("metrics", "frechet widths differ", lambda: metrics.frechet_distance(F, F[:, :2]), "widths differ")
bad("metrics", "frechet one row", lambda: metrics.frechet_distance(F[:1], F), "N >= 2")
bad("metrics", "frechet a list", lambda: metrics.frechet_distance(F.tolist(), F), "torch.Tensor")
good("metrics", "frechet float16 features", lambda: (metrics.frechet_distance(F.half(), F[:10].half()),
                                                    metrics.frechet_distance(F.half().float(), F[:10].half().float())),
     lambda r: math.isfinite(r[0]) and abs(r[0] - r[1]) < 1e-9)
bad("metrics", "kid inf features", lambda: metrics.kid(F * INF, F), "NaN or inf")
bad("metrics", "mmd nan samples", lambda: metrics.mmd(F_NAN, F), "NaN or inf")
bad("metrics", "mmd zero bandwidth", lambda: metrics.mmd(F, F, bandwidths=[0.0]), "bandwidths")
bad("metrics", "mmd identical points", lambda: metrics.mmd(torch.ones(5, 2), torch.ones(5, 2)), "bandwidths")
bad("metrics", "mse shapes", lambda: metrics.mse(F, F[:5]), "shapes differ")
bad("metrics", "pck shape", lambda: metrics.pck(F, F, size=8), r"\[\.\.\., 2\]")
bad("metrics", "pck alpha 0", lambda: metrics.pck(F[:, :2], F[:, :2], alpha=0, size=8), "alpha")
bad("metrics", "pck size 0", lambda: metrics.pck(F[:, :2], F[:, :2], size=0), "size must be positive")
bad("metrics", "gmm_log_prob dims", lambda: metrics.gmm_log_prob(F, torch.ones(2), M2, torch.eye(2).repeat(2, 1, 1)),
    "dimension")
bad("metrics", "gmm_log_prob nan x", lambda: metrics.gmm_log_prob(F_NAN[:, :2], torch.ones(2), M2,
                                                                 torch.eye(2).repeat(2, 1, 1)), "NaN or inf")
bad("metrics", "gmm_nll nan covs", lambda: metrics.gmm_nll(F[:, :2], torch.ones(2), M2,
                                                          torch.eye(2).repeat(2, 1, 1) * NAN), "finite")
bad("metrics", "gmm_mode_stats covs shape", lambda: metrics.gmm_mode_stats(F[:, :2], torch.ones(2), M2, torch.eye(2)),
    r"covs \[K, D, D\]")
bad("metrics", "gmm_kl n 0", lambda: metrics.gmm_kl((torch.ones(2), M2, torch.eye(2).repeat(2, 1, 1)),
                                                    (torch.ones(2), M2, torch.eye(2).repeat(2, 1, 1)), n=0,
                                                    generator=_g()), "positive int")
bad("metrics", "gmm_kl no generator", lambda: metrics.gmm_kl((), (), n=10, generator=None), "torch.Generator")
bad("metrics", "digits_real_like label 11", lambda: metrics.digits_real_like(torch.tensor([1, 11]), generator=_g()),
    "0..9")
bad("metrics", "digits_real_like no generator", lambda: metrics.digits_real_like(torch.tensor([1]), generator=None),
    "torch.Generator")
bad("metrics", "digits_fd_floor n 1", lambda: metrics.digits_fd_floor(1, generator=_g()), "n must be in")
bad("metrics", "digits_features nan images", lambda: metrics.digits_features(
    torch.full((2, 1, 8, 8), NAN), classifier=_FakeClf()), "NaN or inf pixels")
bad("metrics", "class_accuracy float labels", lambda: metrics.class_accuracy(
    torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 2.0]), classifier=_FakeClf()), "integer digit classes")
bad("metrics", "classifier without features", lambda: metrics.digits_features(torch.zeros(2, 1, 8, 8),
                                                                               classifier=object()), ".features")


class _FakeClf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.lin(x.flatten(1))


# likelihood ------------------------------------------------------------------------------------------------------
bad("likelihood", "sigma_min 0", lambda: likelihood.log_likelihood(_gmm(), X, sigma_min=0.0), "0 < sigma_min")
bad("likelihood", "sigma_max inf", lambda: likelihood.log_likelihood(_gmm(), X, sigma_max=INF), "< inf")
bad("likelihood", "hutchinson without generator", lambda: likelihood.log_likelihood(_gmm(), X, hutchinson=2),
    "torch.Generator")
bad("likelihood", "hutchinson negative", lambda: likelihood.log_likelihood(_gmm(), X, hutchinson=-1), "hutchinson")
bad("likelihood", "nan data", lambda: likelihood.log_likelihood(_gmm(), X * NAN), "finite")
bad("likelihood", "denoiser not callable", lambda: likelihood.log_likelihood("D", X), "callable")

# claims ----------------------------------------------------------------------------------------------------------
IV = claims.Interval(0.5, 0.1, 0.9, seeds=3)
bad("claims", "interval low > high", lambda: claims.Interval(0.5, 0.9, 0.1), "low <= high")
bad("claims", "interval nan", lambda: claims.Interval(NAN, 0.1, 0.9), "not NaN")
bad("claims", "bootstrap no generator", lambda: claims.bootstrap(lambda a: 0.0, torch.ones(5), generator=None),
    "torch.Generator")
bad("claims", "bootstrap n_boot 10", lambda: claims.bootstrap(lambda a: 0.0, torch.ones(5), generator=_g(),
                                                              n_boot=10), "n_boot")
bad("claims", "bootstrap no data", lambda: claims.bootstrap(lambda a: 0.0, generator=_g()), "at least one array")
bad("claims", "paired unpaired shapes", lambda: claims.paired_bootstrap(torch.ones(5), torch.ones(6), generator=_g()),
    "paired")
bad("claims", "paired inf values", lambda: claims.paired_bootstrap(torch.tensor([1.0, INF, 2]), generator=_g()),
    "inf/NaN")
bad("claims", "paired one sample", lambda: claims.paired_bootstrap(torch.ones(1), generator=_g()), "n >= 2")
bad("claims", "decide a float", lambda: claims.decide(0.3), "Interval")
bad("claims", "decide better=up", lambda: claims.decide(IV, better="up"), "'higher' or 'lower'")
bad("claims", "record paper 0", lambda: claims.record(0, "x", status="demonstrated", display=False), "1..82")
bad("claims", "record empty claim", lambda: claims.record(3, " ", status="demonstrated", display=False),
    "one sentence")
bad("claims", "record unknown status", lambda: claims.record(3, "x", status="true", display=False), "unknown status")
bad("claims", "record nan value", lambda: claims.record(3, "x", status="demonstrated", value=NAN, display=False),
    "finite number")
bad("claims", "record 1 seed", lambda: claims.record(3, "x", diff=claims.Interval(0.5, 0.1, 0.9), display=False),
    "seeds")
good("claims", "decide on the rule", lambda: (claims.decide(IV), claims.decide(IV, threshold=1.0),
                                              claims.decide(IV, threshold=0.5)),
     lambda r: r == ("holds", "does-not-hold", "unresolved"))

# hub -------------------------------------------------------------------------------------------------------------
bad("hub", "unknown SD version", lambda: hub.load_sd("3.0", device="cpu", require_gpu=False), "version")
bad("hub", "unknown scheduler", lambda: hub.load_sd(scheduler="pndm", device="cpu", require_gpu=False),
    "scheduler must be")
bad("hub", "unknown DINOv2 size", lambda: hub.load_dinov2("giant"), "size")
bad("hub", "empty repo_id", lambda: hub.resolve("", family="sd", probe_file="x", device="cpu", require_gpu=False),
    "repo_id")
bad("hub", "missing local folder", lambda: hub.load_sd(repo_id="/nonexistent/dmlab/sd", device="cpu",
                                                       require_gpu=False), "not a directory")
bad("hub", "folder that is not a model", lambda: hub.load_sd(repo_id=tempfile.mkdtemp(), device="cpu",
                                                             require_gpu=False), "holds no model_index.json")
bad("hub", "folder of another model type", lambda: hub.load_dit(repo_id=_sd_tiny_dir(), device="cpu",
                                                                require_gpu=False), "could not load the local folder")
bad("hub", "integer dtype", lambda: hub.load_sd(repo_id=_sd_tiny_dir(), device="cpu", require_gpu=False,
                                                dtype=torch.int8), "floating torch.dtype")
bad("hub", "offline and not cached", lambda: hub.resolve("org/never-cached", family="sd", probe_file="x",
                                                         device="cpu", require_gpu=False),
    "HF_HUB_OFFLINE=1.*Colab", exc=(hub.HubUnavailableError,))
bad("hub", "no network, no HF_HUB_OFFLINE", _hub_online_unreachable, "not reachable within 3 s",
    exc=(hub.HubUnavailableError,))
if not torch.cuda.is_available():
    bad("hub", "no GPU", lambda: hub.load_sd("1.5"), "no GPU is visible", exc=(hub.HubUnavailableError,))

# scale -----------------------------------------------------------------------------------------------------------
bad("scale", "negative seed", lambda: scale_mod.seed_everything(-1), "seed")
bad("scale", "float seed", lambda: scale_mod.seed_everything(1.5), "seed")
bad("scale", "unknown scale", lambda: scale_mod.get_scale("huge"), "DMLAB_SCALE")
bad("scale", "Scale with an unknown name", lambda: scale_mod.Scale("medium"), "unknown scale")
good("scale", "full setup after tiny unsets HF_HUB_OFFLINE", _full_after_tiny, bool)

# data ------------------------------------------------------------------------------------------------------------
bad("data", "digits split", lambda: data.load_digits("val"), "'train', 'test' or 'all'")
bad("data", "digits size", lambda: data.load_digits(size=12), "8 or 16")
bad("data", "digits dtype", lambda: data.load_digits(dtype=torch.int64), "floating")
bad("data", "toy unknown", lambda: data.toy_2d("moons", 10, generator=_g()), "valid names")
bad("data", "toy negative n", lambda: data.toy_2d("gmm8", -1, generator=_g()), ">= 0")
bad("data", "toy no generator", lambda: data.toy_2d("gmm8", 10, generator=None), "torch.Generator")
bad("data", "image unknown", lambda: data.load_image("lena"), "lena")
bad("data", "image size 0", lambda: data.load_image("camera", size=0), "positive")
bad("data", "patches too large", lambda: data.image_patches(2, size=4096, generator=_g()), "exceeds")
bad("data", "warp integer image", lambda: data.warp_pair(torch.zeros(1, 8, 8, dtype=torch.uint8), generator=_g()),
    "floating")
bad("data", "warp scale range", lambda: data.warp_pair(torch.zeros(1, 8, 8), generator=_g(), scale_range=(0, 1)),
    "scale_range")

# tools -----------------------------------------------------------------------------------------------------------
bad("tools", "check_conventions outside repo", lambda: notebooks.check_conventions(_tmp_notebook()),
    "outside the repository")
bad("tools", "check_conventions missing file", lambda: notebooks.check_conventions(REPO / "notebooks/99_none.ipynb"),
    "no notebook")
bad("tools", "make_notebook bad cell kind", lambda: notebooks.make_notebook(
    REPO / "notebooks/98_never_written.ipynb", "t", [("py", "x")], papers="", time_tiny="", time_full=""),
    "cell kind")


# samplers (read-only) --------------------------------------------------------------------------------------------
def _sampler(name):
    from dmlab import samplers

    return getattr(samplers, name)


def _fp32_denoiser(x, sigma, **cond):
    return _gmm()(x.float(), sigma.float() if torch.is_tensor(sigma) else sigma)


bad("samplers", "reversed schedule", lambda: _sampler("sample_euler")(_gmm(), X, S10.flip(0)), "flip")
bad("samplers", "schedule a list", lambda: _sampler("sample_heun")(_gmm(), X, S10.tolist()), "torch.Tensor")
good("samplers", "dpmpp_2m one step is a DDIM step (order lowered, as diffusers does)",
     lambda: (_sampler("sample_dpmpp_2m")(_gmm(), X, schedules.karras(1)),
              _sampler("sample_ddim")(_gmm(), X, schedules.karras(1))),
     lambda r: torch.allclose(r[0], r[1], atol=1e-6))
bad("samplers", "float16 x, sigma 1e5", lambda: _sampler("sample_euler")(_gmm(), _x().half(),
                                                                        schedules.karras(10, 0.002, 1e5)), "float16")
good("samplers", "euler float16 sigma_max 1e4", lambda: _sampler("sample_euler")(
    _gmm(), _x(16, scale=1e4).half(), schedules.karras(10, 0.002, 1e4)), finite)
bad("samplers", "denoiser output shape", lambda: _sampler("sample_euler")(lambda x, s, **c: x[:, :1] * 0, X, S10),
    "shape")
good("samplers", "pc float16", lambda: _sampler("sample_pc")(_gmm(), _x(16, scale=80).half(), schedules.karras(50),
                                                             generator=_g()), finite)
good("samplers", "ddpm float16 small sigma_min", lambda: _sampler("sample_ddpm")(
    _gmm(), _x(16, scale=80).half(), schedules.karras(20, 1e-4, 80), generator=_g()), finite)
good("samplers", "euler_maruyama float16 sigma_max 1e3", lambda: _sampler("sample_euler_maruyama")(
    _gmm(), _x(16, scale=1e3).half(), schedules.karras(20, 0.002, 1e3), generator=_g()), finite)
good("samplers", "ddim with a float32 denoiser on float16 x", lambda: _sampler("sample_ddim")(
    _fp32_denoiser, _x(scale=80).half(), S10), lambda r: r.dtype == torch.float16 and finite(r))
good("samplers", "euler keeps x's dtype with a float32 denoiser", lambda: _sampler("sample_euler")(
    _fp32_denoiser, _x(scale=80).half(), S10), lambda r: r.dtype == torch.float16)
bad("samplers", "denoiser not callable", lambda: _sampler("sample_euler")("D", X, S10), "callable")


# accelerators, probes (read-only) --------------------------------------------------------------------------------
def _acc(name):
    """A public accelerator name, or a helper from its home module ("caching.dense_early_keys")."""
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module("dmlab.accelerators" + ("." + module if module else "")), attr)


def _probe(name):
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module("dmlab.probes" + ("." + module if module else "")), attr)


bad("accelerators", "tstitch fraction 1.5", lambda: _acc("tstitch")(_gmm(), _gmm(), S10, 1.5), "fraction")
bad("accelerators", "tstitch first", lambda: _acc("tstitch")(_gmm(), _gmm(), S10, 0.4, first="big"), "first")
bad("accelerators", "matched model missing", lambda: __import__("dmlab.hooks").hooks.count_calls(42), "model")
bad("accelerators", "DeepCache interval 0", lambda: _acc("DeepCacheConfig")(interval=0), "interval")
bad("accelerators", "QuantConfig 3 bits", lambda: _acc("QuantConfig")(weight_bits=0), "bits")
bad("accelerators", "tiled tile 0", lambda: _acc("tiled")(_gmm(), 0), "tile")
bad("accelerators", "select_units k negative", lambda: _acc("select_units")({"a": 1.0}, -1), "k")
bad("accelerators", "dense_early_keys too many", lambda: _acc("caching.dense_early_keys")(10, 20), "n_keys")
bad("accelerators", "pareto unknown column", lambda: _acc("pareto_front")([{"a": 1}], x="flop_speedup", y="fd"),
    "flop_speedup")
bad("probes", "mle_dimension k 0", lambda: _probe("mle_dimension")(torch.randn(20, 3, generator=_g()), k=0), "k")
bad("probes", "energy_distance widths", lambda: _probe("energy_distance")(F, F[:, :2]), "dimension|shape|width")
bad("probes", "tokens_to_grid mismatch", lambda: _probe("capture.tokens_to_grid")(torch.randn(1, 10, 4), 3, 3), "3")
bad("probes", "label_conds 0 classes", lambda: _probe("classifier.label_conds")(0), "n_classes")
bad("probes", "classifier_sigmas n 0", lambda: _probe("classifier_sigmas")(n=0), "n")
bad("probes", "divergence method", lambda: _probe("divergence")(X, X, method="magic"), "method")
bad("probes", "score_of non-callable", lambda: _probe("score_of")("D"), "callable")
bad("probes", "subspace_distance shapes", lambda: _probe("subspace_distance")(torch.randn(2, 4, 1), torch.randn(3, 4, 2)),
    "shape")


# zoo (read-only) -------------------------------------------------------------------------------------------------
def _zoo(name):
    from dmlab import zoo

    return getattr(zoo, name)


bad("zoo", "unknown model", lambda: _zoo("load")("unet_nonexistent"), "unknown zoo model.*registered: ")
bad("zoo", "name not a str", lambda: _zoo("load")(42), "name")
bad("zoo", "info unknown", lambda: _zoo("info")("nope"), "unknown zoo model.*registered: ")
bad("zoo", "recipe unknown", lambda: _zoo("get_recipe")("nope"), "recipe|registry|unknown")
bad("zoo", "root as str", lambda: _zoo("names")(root="/nonexistent/zoo"), "root|registry")
bad("zoo", "DiT class label 11", lambda: _zoo("load_denoiser")("dit_l")[0](torch.zeros(1, 1, 8, 8), 1.0,
                                                                          class_labels=torch.tensor([11])), "class")
bad("zoo", "UNet class label -1", lambda: _zoo("load_denoiser")("unet_s")[0](torch.zeros(1, 1, 8, 8), 1.0,
                                                                            class_labels=torch.tensor([-1])), "class")


# diffusers scheduler adapter, noise-schedule options -------------------------------------------------------------
def _adapter(solver="dpmpp_2m", src=None, **kw):
    from dmlab.samplers.diffusers_compat import as_diffusers_scheduler

    return as_diffusers_scheduler(solver, src, **kw)


def _diffusers(cls_name, **cfg):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls_name)(**cfg)


def _begin_at(solver, k, n=10):
    """The issue's reproducer: set_timesteps(n), set_begin_index(k), step to the end."""
    s = _adapter(solver)
    s.set_timesteps(n)
    s.set_begin_index(k)
    x = _x()
    for t in s.timesteps[k:]:
        x = s.step(0.1 * x, t, x).prev_sample
    return x


for _solver in ("dpmpp_2m", "dpmpp_3m", "dpm_solver_multistep", "dpm_solver", "unipc", "deis"):
    good("adapter", f"{_solver} begin index with 1 step left", lambda s=_solver: _begin_at(s, 9), finite)
good("adapter", "dpm_solver begin index with 2 steps left", lambda: _begin_at("dpm_solver", 8), finite)
bad("adapter", "begin index past the end", lambda: _begin_at("unipc", 10), "begin index")
good("adapter", "rescale_betas_zero_snr kept", lambda: (
    _adapter("dpmpp_2m", _diffusers("DPMSolverMultistepScheduler", rescale_betas_zero_snr=True)).alphas_cumprod,
    _diffusers("DPMSolverMultistepScheduler", rescale_betas_zero_snr=True).alphas_cumprod),
    lambda r: float((r[0] - r[1]).abs().max()) < 1e-6)
good("adapter", "from_config keeps rescale_betas_zero_snr and timestep_spacing", lambda: _adapter().from_config(
    _diffusers("DDIMScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing").config),
    lambda r: r.config.rescale_betas_zero_snr and r.config.timestep_spacing == "trailing"
    and float(r.alphas_cumprod[-1]) > 0)
good("adapter", "timestep_spacing of the source kept", lambda: _adapter(
    "ddim", _diffusers("DDIMScheduler", timestep_spacing="leading", steps_offset=1), schedule="discrete"),
    lambda r: (r.config.timestep_spacing, r.config.steps_offset) == ("leading", 1))
bad("adapter", "flow-matching source scheduler", lambda: _adapter(
    "dpmpp_2m", _diffusers("FlowMatchEulerDiscreteScheduler")), "flow-matching")
bad("adapter", "from_config of a flow-matching config", lambda: _adapter().from_config(
    _diffusers("FlowMatchEulerDiscreteScheduler").config), "flow-matching")
bad("adapter", "EDM source scheduler", lambda: _adapter("unipc", _diffusers("EDMEulerScheduler")), "EDM")
bad("adapter", "continuous timesteps", lambda: _adapter("unipc", _diffusers(
    "EulerDiscreteScheduler", timestep_type="continuous", prediction_type="v_prediction")), "continuous")
bad("adapter", "unknown timestep_spacing", lambda: _adapter("ddim", timestep_spacing="even"), "timestep_spacing")
bad("denoisers", "VP from a flow-matching scheduler", lambda: denoisers.DiscreteVPDenoiser.from_scheduler(
    _TinyNet(), _diffusers("FlowMatchEulerDiscreteScheduler")), "flow-matching")
good("denoisers", "VP from a zero-SNR DDIM config dict", lambda: denoisers.DiscreteVPDenoiser.from_scheduler(
    _TinyNet(), dict(_diffusers("DDIMScheduler", rescale_betas_zero_snr=True).config)),
    lambda d: 4000 < d.sigma_max < 1e5)
bad("schedules", "trained_betas with 1", lambda: schedules.vp_alphas_cumprod(trained_betas=[0.1, 1.0]), "(0, 1)")
bad("schedules", "rescale_betas_zero_snr a string", lambda: schedules.vp_alphas_cumprod(rescale_betas_zero_snr="yes"),
    "True or False")


# half precision: every update in float32 ---------------------------------------------------------------------------
def _gmm8():
    g = torch.Generator().manual_seed(0)
    return exact.GMMDenoiser(torch.ones(4), 2 * torch.randn(4, 8, generator=g), torch.full((4,), 0.3))


def _half_sampler(name, dtype, smax=80.0, **kw):
    """(half run, float64 run on the same noise) of a registry sampler on the 8-D mixture."""
    from dmlab.samplers.registry import REGISTRY

    s = schedules.karras(12, 0.002, smax)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)) * s[0]
    return REGISTRY[name](_gmm8(), x.to(dtype), s, **kw), REGISTRY[name](_gmm8(), x.to(dtype).double(), s, **kw)


for _name, _dt, _smax, _tol in (("hb", torch.float16, 1e4, 0.01), ("ghvb", torch.bfloat16, 1e4, 0.03),
                                ("interpolant", torch.float16, 80.0, 0.01), ("interpolant", torch.bfloat16, 1e4, 0.03),
                                ("dpmpp_3m", torch.bfloat16, 80.0, 0.03), ("unipc", torch.float16, 1e4, 0.01)):
    good("samplers", f"{_name} {str(_dt)[6:]} sigma_max {_smax:g} within {_tol:.0%} of float64",
         lambda n=_name, d=_dt, m=_smax: _half_sampler(n, d, m),
         lambda r, d=_dt, t=_tol: r[0].dtype == d and _close(r[0], r[1], t))
good("samplers", "dpm_solver_v3 float16", lambda: _half_sampler(
    "dpm_solver_v3", torch.float16, statistics=_sampler_v3_trivial()), lambda r: _close(r[0], r[1], 0.01))
good("samplers", "dmcmc float16 finite", lambda: _sampler_dmcmc()(
    _gmm8(), (80 * torch.randn(8, 8, generator=_g())).half(), schedules.karras(12), generator=_g()),
    lambda r: r.dtype == torch.float16 and finite(r))


def _sampler_v3_trivial():
    from dmlab.samplers.v3 import Statistics

    return Statistics.trivial(shape=(8,))


def _sampler_dmcmc():
    from dmlab.samplers.mcmc import sample_dmcmc

    return sample_dmcmc


# zoo registry and CLI (temporary roots only) -----------------------------------------------------------------------
def _tmp_zoo(registry_text=None, entry_files=None):
    """A temporary zoo root holding a copy of the classifier and a registry (text, or the classifier's entry with
    ``entry_files``)."""
    import json
    import shutil

    from dmlab.zoo import store

    root = pathlib.Path(tempfile.mkdtemp()) / "zoo"
    shutil.copytree(store.zoo_dir() / "classifier", root / "classifier")
    if registry_text is None:
        entry = dict(store.read_registry()["classifier"])
        if entry_files is not None:
            entry["files"] = entry_files(entry["files"])
        registry_text = json.dumps({"classifier": entry})
    (root / "registry.json").write_text(registry_text)
    return root


def _bytes_off(files):
    return {k: dict(v, bytes=v["bytes"] + 1) for k, v in files.items()}


def _cli(*argv):
    """(exit status, stderr lines) of ``python -m dmlab.zoo ...`` run in-process."""
    import io

    from dmlab.zoo.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as ex:
            code = ex.code
    return code, err.getvalue().strip().splitlines()


def _one_line_2(r):
    return r[0] == 2 and len(r[1]) == 1 and r[1][0].startswith("python -m dmlab.zoo: error: ")


_ZERO_SHA = {"sha256": "0" * 64, "bytes": 1}
bad("zoo", "registry path with ..", lambda: _zoo("load")("classifier", root=_tmp_zoo(
    entry_files=lambda f: {"../../../ESCAPED": _ZERO_SHA})), "leave the zoo folder", exc=CLEAR)
bad("zoo", "registry absolute path", lambda: _zoo("names")(root=_tmp_zoo(
    entry_files=lambda f: {"/etc/passwd": _ZERO_SHA})), "leave the zoo folder")
bad("zoo", "malformed registry.json names the file", lambda: _zoo("names")(root=_tmp_zoo("{oops")),
    r"registry\.json is not valid JSON")
bad("zoo", "registry entry without files", lambda: _zoo("load")("classifier", root=_tmp_zoo(
    '{"classifier": {"kind": "classifier"}}')), "'files'")
bad("zoo", "registry file without bytes", lambda: _zoo("names")(root=_tmp_zoo(
    entry_files=lambda f: {k: {"sha256": v["sha256"]} for k, v in f.items()})), "bytes")
bad("zoo", "file size differs from bytes", lambda: _zoo("load")("classifier", root=_tmp_zoo(
    entry_files=_bytes_off)), "bytes, the registry says")
bad("zoo", "corrupted file under a custom root names that root", lambda: _zoo("load")("classifier", root=_tmp_zoo(
    entry_files=lambda f: {k: dict(v, sha256="0" * 64) for k, v in f.items()})), "--out .*zoo")
good("zoo", "downloads pinned to the release tag", lambda: _zoo("store").raw_url("registry.json"),
     lambda u: "/main/" not in u and f"/v{__import__('dmlab').__version__}/" in u)
good("cli", "train unknown name", lambda: _cli("train", "nonexistent"), _one_line_2)
good("cli", "register on an empty --out", lambda: _cli("register", "unet_s", "--out", tempfile.mkdtemp()),
     _one_line_2)
good("cli", "unknown command", lambda: _cli("frob"), _one_line_2)
good("cli", "train without a name", lambda: _cli("train"), _one_line_2)
good("cli", "--device cuda without a GPU", lambda: _cli("train", "unet_s", "--device", "cuda"),
     lambda r: torch.cuda.is_available() or _one_line_2(r))
good("cli", "--out is a file", lambda: _cli("register", "unet_s", "--out", str(_tmp_notebook())), _one_line_2)


# ----------------------------------------------------------------------------------------------- running a case
def outcome(c: Case) -> tuple[bool, str]:
    """(clear-or-correct, what happened)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = c.fn()
    except Exception as e:  # noqa: BLE001 - classifying every outcome is the point
        msg = f"{type(e).__name__}: {e}"
        if c.match is None:
            return False, f"raised {msg[:300]}"
        if not isinstance(e, c.exc):
            return False, f"wrong error type {msg[:300]}"
        if not re.search(c.match, str(e), flags=re.IGNORECASE | re.DOTALL):
            return False, f"message lacks {c.match!r}: {msg[:300]}"
        return True, msg[:120]
    if c.match is not None:
        return False, f"no error; returned {type(r).__name__}"
    ok = bool(c.check(r))
    return ok, "correct" if ok else f"wrong result {str(r)[:200]}"


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case):
    ok, what = outcome(case)
    assert ok, what


# ----------------------------------------------------------------------------------------------- whole battery
def _snapshot(root: pathlib.Path, depth: int) -> dict:
    out = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel = pathlib.Path(dirpath).relative_to(root)
        if len(rel.parts) >= depth:
            dirnames[:] = []
        for n in filenames + dirnames:
            p = pathlib.Path(dirpath) / n
            try:
                st = p.lstat()
            except OSError:
                continue
            # names only at the top level of shared directories (other processes touch their mtimes)
            out[str(rel / n)] = (st.st_size, st.st_mtime_ns) if n in filenames and depth > 1 else None
    return out


def test_battery_score_and_nothing_written_outside(monkeypatch, tmp_path, capsys):
    """Run every case once more with HOME pointed at an empty directory: the score is >= 95 %, and neither that
    home, the real ~/.cache, nor the repository's parent directory changed."""
    assert len(CASES) >= 100
    real_home = pathlib.Path(os.path.expanduser("~"))
    watched = {"~/.cache": (real_home / ".cache", 6), "~/.config/dmlab": (real_home / ".config" / "dmlab", 6),
               "home (top level)": (real_home, 1), "repository's parent": (REPO.parent, 1)}
    tmp = pathlib.Path(tempfile.gettempdir()).resolve()
    if REPO.parent.resolve() == tmp or tmp in REPO.parent.resolve().parents:
        del watched["repository's parent"]  # a checkout in the temp dir: other processes write there (allowed)
    before = {k: _snapshot(p, d) for k, (p, d) in watched.items()}
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    results = [(c, *outcome(c)) for c in CASES]
    monkeypatch.undo()
    by_module: dict[str, list] = {}
    for c, ok, what in results:
        by_module.setdefault(c.module, []).append((c, ok, what))
    n_ok = sum(ok for _, ok, _ in results)
    with capsys.disabled():
        print(f"\nreliability battery: {n_ok}/{len(results)} clear-or-correct ({100 * n_ok / len(results):.1f} %)")
        for m, rows in by_module.items():
            bad_rows = [r for r in rows if not r[1]]
            print(f"  {m}: {len(rows) - len(bad_rows)}/{len(rows)}")
            for c, _, what in bad_rows:
                print(f"    FAIL {c.name}: {what[:150]}" + (f"  [{c.xfail}]" if c.xfail else ""))
    # outcomes agree with the marks: an xfail case that now passes is reported by its own strict test
    unexpected = [c.id for c, ok, _ in results if not ok and not c.xfail]
    assert not unexpected, f"cases failing without an xfail mark: {unexpected}"
    # the >= 95 % goal is enforced once the other owners' cases (xfail) are fixed and their marks removed
    if not any(c.xfail for c, ok, _ in results if not ok):
        assert n_ok / len(results) >= 0.95, "score below 95 %"
    assert not any(fake_home.iterdir()), f"written under $HOME: {sorted(p.name for p in fake_home.rglob('*'))}"
    after = {k: _snapshot(p, d) for k, (p, d) in watched.items()}
    changed = {k: sorted(set(before[k].items()) ^ set(after[k].items()))[:10] for k in watched if before[k] != after[k]}
    assert not changed, f"files changed outside the repository during the battery: {changed}"
