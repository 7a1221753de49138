"""Consistency and few-step students (chapter 25): one-step distillation of an ODE coupling, consistency distillation
with an ODE or SDE teacher step and an adversarial term, and data-free bootstrapping.

* :func:`distill_pairs` - regress a one-step student on a teacher's noise-sample pairs ``(eps, T(eps))`` (Luhman &
  Luhman 2021; the second stage of InstaFlow, :cite:`liu2024instaflow`, whose first stage is *reflow*: the pairs
  come from a 2-rectified flow, :func:`dmlab.samplers.rectify.train_rectified` and ``ode_coupling``).
* :func:`consistency_distill` - consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2): the
  student's consistency function ``f(x, sigma)`` at ``x_n = x0 + sigma_n z`` must match its own (stop-gradient)
  value at the teacher's one-step estimate of ``x_{n+1}``. ``solver="ode"`` takes a DDIM (Euler) teacher step;
  ``solver="sde"`` takes the stochastic DDIM(``eta``) step of SCott (:cite:`liu2025scott`), and
  ``adversarial > 0`` adds SCott's non-saturating GAN term on the student's one-step outputs.
* :func:`boot_distill` - BOOT (:cite:`gu2024boot`): a student ``g(eps, sigma)`` that maps *noise alone* to the
  teacher's ODE state at any ``sigma``, trained by bootstrapping (``g(eps, sigma_{n+1})`` matches one teacher DDIM
  step from ``g(eps, sigma_n)``, stop-gradient) in BOOT's signal parameterisation ``y = x_sigma - sigma eps``; no
  training data at all.
* :func:`sample_consistency` - multistep consistency sampling (Song et al. 2023, Alg. 1).
* :func:`rrcm_finetune` - rRCM (:cite:`lei2025robust`): a classifier fine-tuned on noisy inputs so that points of
  the *same* diffusion trajectory ``x0 + sigma_n eps`` and ``x0 + sigma_{n+1} eps`` have matching representations
  (instance discrimination, InfoNCE) while it classifies both; one forward pass then "denoises and classifies".
  ``contrastive=False`` is Gaussian noise augmentation (Cohen et al. 2019) with the same draws.
* :func:`certify` - randomised smoothing (Cohen, Rosenfeld & Kolter 2019, CERTIFY): Monte-Carlo votes of a base
  classifier under Gaussian noise, a Clopper-Pearson lower bound on the top class's probability and the certified
  L2 radius ``sigma Phi^-1(p_A)``; :func:`denoised_classifier` is the base classifier of denoised smoothing
  (Carlini et al. 2023): a diffusion denoiser's one- or few-step estimate of ``x0``, then the classifier.

Every student is trained by :func:`dmlab.train.fit`; every draw of a training run comes from its generator. The
students are ordinary dmlab denoisers ``S(x, sigma, **cond)`` (:func:`dmlab.zoo.toy.toy_denoiser` for flat data, a
diffusers UNet behind :class:`dmlab.denoisers.DiscreteVPDenoiser` at full scale), so every sampler runs them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..denoisers import as_sigma, bcast
from ..samplers.rectify import TimeMLP
from ..samplers.sde import ancestral_step
from ..train import FitConfig, FitResult, fit

__all__ = ["consistency_fn", "ConsistencyModel", "sample_consistency", "teacher_step", "distill_pairs",
           "consistency_distill", "Discriminator", "BootStudent", "boot_distill", "train_ring_students",
           "load_ring_students", "RingStudents", "ring_teacher", "flow_grid", "RING_METHODS", "SOLVERS",
           "clopper_pearson_lower", "certify", "CentroidHead", "certified_accuracy", "denoised_classifier",
           "trajectory_infonce", "rrcm_finetune"]

SOLVERS = ("ode", "sde")


# ----------------------------------------------------------------------------------------------- students
def consistency_fn(student: Callable, x: Tensor, sigma, *, sigma_min: float = 0.002,
                   cond: dict | None = None) -> Tensor:
    """The consistency function ``f(x, sigma) = x - (sigma - sigma_min) / sigma * (x - S(x, sigma))``.

    It is one DDIM (Euler) step of the student's denoiser ``S`` from ``sigma`` to ``sigma_min``, so the boundary
    condition ``f(x, sigma_min) = x`` holds exactly for any network (Song et al. 2023 use ``c_skip``/``c_out`` with
    the same property), and at ``sigma >> sigma_min`` ``f`` is ``S``'s clean estimate.
    """
    sigma = as_sigma(sigma, x)
    if (sigma < sigma_min).any():
        raise ValueError(f"consistency_fn needs sigma >= sigma_min = {sigma_min:g}")
    c = bcast((sigma - sigma_min) / sigma, x)
    return x - c * (x - student(x, sigma, **(cond or {})))


class ConsistencyModel:
    """A student seen as a dmlab denoiser whose output is its consistency function (no gradients)."""

    def __init__(self, student: Callable, sigma_min: float = 0.002):
        self.student, self.sigma_min = student, float(sigma_min)

    @torch.no_grad()
    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        return consistency_fn(self.student, x, sigma, sigma_min=self.sigma_min, cond=cond)


@torch.no_grad()
def sample_consistency(model: Callable, x: Tensor, sigmas: Tensor, *, cond: dict | None = None,
                       generator: torch.Generator | None = None, sigma_min: float = 0.002) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): ``x0 = f(x, sigma_i)``, then re-noise
    ``x = x0 + sqrt(sigma_{i+1}^2 - sigma_min^2) z`` for the next sigma (the last entry, 0, is not evaluated).

    ``model`` is a student denoiser (wrapped in :func:`consistency_fn`); ``x`` starts at ``sigmas[0] * eps``.
    One network call per positive sigma: ``len(sigmas) - 1`` NFE.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).tolist()
    if len(sig) < 2 or sig[-1] != 0 or any(b >= a for a, b in zip(sig, sig[1:])):
        raise ValueError("sigmas must decrease strictly and end with 0 (e.g. [sigma_max, 0] for one step)")
    if len(sig) > 2 and generator is None:
        raise TypeError("multistep consistency sampling re-noises: pass generator=torch.Generator")
    f = ConsistencyModel(model, sigma_min)
    for i, s in enumerate(sig[:-1]):
        x0 = f(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device), **(cond or {}))
        if i + 2 < len(sig):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = x0 + math.sqrt(max(sig[i + 1] ** 2 - sigma_min ** 2, 0.0)) * z
    return x0


class Discriminator(nn.Module):
    """A small MLP critic ``D(x) -> logit`` for flat data (SCott's adversarial term at tiny scale)."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1).float())[:, 0]


def _module_of(student, module) -> nn.Module:
    if module is None:
        module = student if isinstance(student, nn.Module) else getattr(student, "net", None)
    if not isinstance(module, nn.Module):
        raise TypeError("the student must be an nn.Module or hold one in .net (toy_denoiser), or pass module= (the "
                        "nn.Module whose parameters the student uses, e.g. the UNet inside a DiscreteVPDenoiser)")
    return module


def _check_common(sigmas, steps, batch, generator):
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (every draw of the training run comes from it)")
    for name, v in (("steps", steps), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if sigmas is not None:
        s = torch.as_tensor(sigmas, dtype=torch.float64)
        if s.ndim != 1 or len(s) < 2 or not (s[1:] < s[:-1]).all():
            raise ValueError("sigmas must be a 1-D strictly decreasing schedule of length >= 2 (e.g. "
                             "schedules.karras(18, 0.002, 80))")
        return s
    return None


# ----------------------------------------------------------------------------------------------- one-step
def distill_pairs(student: Callable, noise: Tensor, x0: Tensor, *, sigma_max: float, steps: int = 1000,
                  batch: int = 256, lr: float = 2e-3, sigma_min: float = 0.002, module: nn.Module | None = None,
                  generator: torch.Generator) -> FitResult:
    """One-step distillation on pairs: minimise ``|f(sigma_max eps, sigma_max) - x0|^2`` over pairs ``(eps, x0)``.

    With the pairs of a diffusion teacher's ODE this is Luhman & Luhman (2021); with the pairs of a 2-rectified flow
    it is InstaFlow's distillation stage (:cite:`liu2024instaflow`, which uses LPIPS for images; L2 here). Adam with
    cosine decay through :func:`dmlab.train.fit`.
    """
    _check_common(None, steps, batch, generator)
    if not (isinstance(noise, Tensor) and isinstance(x0, Tensor)) or noise.shape != x0.shape:
        raise ValueError("noise and x0 must be tensors of the same shape [N, ...] (the teacher's pairs)")
    module = _module_of(student, module)
    e_all, x_all = noise.float(), x0.float()

    def draw(g):
        i = torch.randint(len(x_all), (batch,), generator=g)
        return e_all[i], x_all[i]

    def loss(b):
        e, x = b
        s = torch.full((e.shape[0],), float(sigma_max))
        out = consistency_fn(student, sigma_max * e, s, sigma_min=sigma_min)
        return (out - x).pow(2).flatten(1).sum(1).mean()

    return fit(loss, module, FitConfig(steps=steps, lr=lr, schedule="cosine"), generator=generator, data=draw)


# ----------------------------------------------------------------------------------------------- consistency
def teacher_step(teacher: Callable, x: Tensor, sigma: Tensor, sigma_next: Tensor, *, eta: float = 0.0,
                 z: Tensor | None = None, cond: dict | None = None) -> Tensor:
    """One DDIM(``eta``) step of ``teacher`` from ``sigma`` to ``sigma_next`` (per-sample ``[B]`` sigmas).

    ``eta = 0`` is the ODE step (DDIM = Euler in sigma); ``eta > 0`` is the stochastic step SCott uses
    (:cite:`liu2025scott`): ``x' = D + sigma_down (x - D) / sigma + sigma_up z`` with
    :func:`dmlab.samplers.sde.ancestral_step`. Both are first-order steps: with an exact teacher they keep the mean
    and reach the noised law at ``sigma_next`` as the step shrinks.
    """
    d = teacher(x, sigma, **(cond or {}))
    down, up = ancestral_step(sigma, sigma_next, eta)
    out = d + bcast(down / sigma, x) * (x - d)
    if eta > 0:
        if z is None:
            raise ValueError("a stochastic teacher step (eta > 0) needs its noise z")
        out = out + bcast(up, x) * z
    return out


def consistency_distill(student: Callable, teacher: Callable, data: Callable, sigmas: Tensor, *,
                        solver: str = "ode", eta: float = 1.0, adversarial: float = 0.0,
                        discriminator: nn.Module | None = None, steps: int = 1000, batch: int = 256,
                        lr: float = 2e-3, module: nn.Module | None = None, sigma_min: float | None = None,
                        generator: torch.Generator) -> FitResult:
    """Consistency distillation of ``teacher`` into ``student`` (Song et al. 2023, Alg. 2; SCott variants).

    Each step draws data ``x0 = data(generator, batch)`` (a tensor, or ``(x0, cond)``), an index ``n`` of the
    decreasing schedule ``sigmas`` (``sigmas[-1] = sigma_min > 0``) and ``x_n = x0 + sigma_n z``; the teacher steps
    to ``x_{n+1}`` (``solver="ode"``: DDIM; ``"sde"``: DDIM(``eta``), :func:`teacher_step`) and the loss is
    ``|f(x_n, sigma_n) - sg f(x_{n+1}, sigma_{n+1})|^2`` with the student's *current* weights as the stop-gradient
    target (iCT's choice, Song & Dhariwal 2024, instead of an EMA). With ``adversarial = lambda > 0`` SCott's GAN
    term is added: the ``discriminator`` learns real ``x0`` against the student's ``f(x_n, sigma_n)`` (softplus
    losses) and the student gets ``lambda * softplus(-D(f))`` through a frozen copy of the critic's weights, so one
    optimizer trains both (simultaneous gradient play).
    """
    s = _check_common(sigmas, steps, batch, generator)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {SOLVERS}")
    if not callable(teacher) or not callable(data):
        raise TypeError("teacher must be a denoiser D(x, sigma) and data a callable data(generator, n) -> x0")
    if s[-1] <= 0:
        raise ValueError("the consistency schedule must end at sigma_min > 0 (drop the final 0)")
    if adversarial < 0 or (adversarial > 0 and not isinstance(discriminator, nn.Module)):
        raise ValueError("adversarial must be >= 0, and > 0 needs discriminator= (an nn.Module x -> logit)")
    smin = float(s[-1]) if sigma_min is None else float(sigma_min)
    mod = _module_of(student, module)
    model = nn.ModuleDict({"student": mod, "disc": discriminator}) if adversarial > 0 else mod
    eta_ = eta if solver == "sde" else 0.0

    def draw(g):
        got = data(g, batch)
        x0, cond = got if isinstance(got, tuple) else (got, {})
        n = torch.randint(len(s) - 1, (batch,), generator=g)
        z = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)  # drawn on the CPU: same bits anywhere
        xi = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        return {"x0": x0, "n": n, "z": z, "xi": xi, **cond}

    def loss(b):
        b = dict(b)
        x0, n, z, xi = b.pop("x0"), b.pop("n"), b.pop("z"), b.pop("xi")
        hi, lo = s[n.cpu()].to(x0), s[n.cpu() + 1].to(x0)
        x_hi = x0 + bcast(hi, x0) * z
        with torch.no_grad():
            x_lo = teacher_step(teacher, x_hi, hi, lo, eta=eta_, z=xi, cond=b)
            target = consistency_fn(student, x_lo, lo, sigma_min=smin, cond=b)
        pred = consistency_fn(student, x_hi, hi, sigma_min=smin, cond=b)
        out = (pred - target).pow(2).flatten(1).sum(1).mean()
        if adversarial > 0:
            frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
            g_logit = torch.func.functional_call(discriminator, frozen, (pred,))
            d_loss = nn.functional.softplus(-discriminator(x0)).mean() + \
                nn.functional.softplus(discriminator(pred.detach())).mean()
            out = out + adversarial * nn.functional.softplus(-g_logit).mean() + d_loss
        return out

    return fit(loss, model, FitConfig(steps=steps, lr=lr, schedule="cosine"), generator=generator, data=draw)


# ----------------------------------------------------------------------------------------------- BOOT
class BootStudent(nn.Module):
    """BOOT's student ``g(eps, sigma)`` = the teacher's ODE state at ``sigma`` started from ``sigma_max * eps``.

    It predicts the *signal* ``y = x_sigma - sigma eps`` (BOOT's Signal-ODE, :cite:`gu2024boot`, in the VE
    convention): ``y = (1 - sigma / sigma_max) F(eps, t)``, ``t = 2 atan(sigma) / pi``, so ``g(eps, sigma_max) =
    sigma_max eps`` holds exactly; ``g(eps, 0) = y`` is the one-step sample.
    """

    def __init__(self, dim: int, sigma_max: float, width: int = 64):
        super().__init__()
        if not sigma_max > 0:
            raise ValueError(f"sigma_max must be positive, got {sigma_max!r}")
        self.net, self.sigma_max = TimeMLP(dim, width), float(sigma_max)

    def signal(self, eps: Tensor, sigma) -> Tensor:
        sigma = as_sigma(sigma, eps)
        ef = eps.reshape(eps.shape[0], -1)
        out = self.net(ef, torch.atan(sigma) / (math.pi / 2)).to(eps.dtype)
        return (bcast(1 - sigma / self.sigma_max, ef) * out).reshape(eps.shape)

    def forward(self, eps: Tensor, sigma) -> Tensor:
        """``x_sigma = y + sigma eps``."""
        return self.signal(eps, sigma) + bcast(as_sigma(sigma, eps), eps) * eps

    @torch.no_grad()
    def sample(self, eps: Tensor) -> Tensor:
        """The one-step sample ``g(eps, 0)``."""
        return self.signal(eps, torch.zeros(eps.shape[0], dtype=eps.dtype))


def boot_distill(student: BootStudent, teacher: Callable, sigmas: Tensor, *, shape: tuple, steps: int = 1000,
                 batch: int = 256, lr: float = 2e-3, generator: torch.Generator) -> FitResult:
    """BOOT (:cite:`gu2024boot`): data-free bootstrapped distillation of the teacher's ODE.

    Each step draws only noise ``eps`` (``[batch, *shape]``) and an index ``n`` of ``sigmas`` (decreasing from
    ``student.sigma_max``, ending at 0); the target is one teacher DDIM step from the student's own (stop-gradient)
    state ``g(eps, sigma_n)`` to ``sigma_{n+1}``, written as a signal ``y* = x_{n+1} - sigma_{n+1} eps``; the loss
    is ``|y(eps, sigma_{n+1}) - y*|^2``. Since ``y* = (1 - r) D + r y(eps, sigma_n)`` with ``r = sigma_{n+1} /
    sigma_n < 1``, an error of the student's state shrinks along the bootstrap. No data sample is ever drawn.
    """
    s = _check_common(sigmas, steps, batch, generator)
    if not isinstance(student, BootStudent):
        raise TypeError("student must be a BootStudent (noise and sigma in, ODE state out)")
    if abs(float(s[0]) - student.sigma_max) > 1e-9 * student.sigma_max or s[-1] != 0:
        raise ValueError("sigmas must start at student.sigma_max and end at 0")
    if not callable(teacher):
        raise TypeError("teacher must be a denoiser D(x, sigma)")
    shape = tuple(shape)

    def draw(g):
        return torch.randn((batch, *shape), generator=g), torch.randint(len(s) - 1, (batch,), generator=g)

    def loss(b):
        eps, n = b
        hi, lo = s[n].to(eps), s[n + 1].to(eps)
        with torch.no_grad():
            x_hi = student(eps, hi)
            x_lo = teacher_step(teacher, x_hi, hi, lo)
            y_star = x_lo - bcast(lo, eps) * eps
        return (student.signal(eps, lo) - y_star).pow(2).flatten(1).sum(1).mean()

    return fit(loss, student, FitConfig(steps=steps, lr=lr, schedule="cosine"), generator=generator, data=draw)


# ----------------------------------------------------------------------------------------------- chapter 25's students
RING_KEYS = ("seeds", "steps", "batch", "hidden", "lr", "sigma_max", "sigma_min", "n_pairs", "teacher_heun_steps",
             "reflow_euler_steps", "cd_n", "eta", "adversarial")
RING_METHODS = ("direct", "rf2", "reflow", "cd_ode", "cd_sde", "scott", "boot")


def ring_teacher():
    """The chapter's exact teacher: the 8-Gaussian ring of :func:`dmlab.data.toy_gmm8_params` (float64)."""
    from ..data import toy_gmm8_params
    from ..exact import GMMDenoiser

    return GMMDenoiser(*toy_gmm8_params(dtype=torch.float64))


def flow_grid(n: int, sigma_max: float) -> Tensor:
    """``n`` Euler steps uniform in the linear path's time ``t = sigma / (1 + sigma)``, as sigmas (ending at 0)."""
    t = torch.linspace(sigma_max / (1 + sigma_max), 0, n + 1, dtype=torch.float64)
    return t / (1 - t)


def _ring_modules(cfg: dict) -> dict:
    """Fresh modules of one seed, by method (their init is overwritten by the loaded or trained weights)."""
    from ..zoo.toy import ToyMLP

    mods = {m: ToyMLP(2, cfg["hidden"], 3) for m in ("direct", "reflow", "cd_ode", "cd_sde", "scott")}
    mods["rf2"] = TimeMLP(2, cfg["hidden"])
    mods["boot"] = BootStudent(2, cfg["sigma_max"], cfg["hidden"])
    return mods


def _wrap(method: str, module: nn.Module):
    from ..denoisers import EDMPrecond, FlowDenoiser

    module.eval()
    if method == "rf2":
        return FlowDenoiser(lambda x, timestep: module(x, timestep))
    if method == "boot":
        return module
    return EDMPrecond(module, sigma_data=1.0)


def _ring_config(config) -> dict:
    if not isinstance(config, dict) or set(RING_KEYS) - set(config):
        raise ValueError(f"config must be the ring_students recipe's model dict with keys {RING_KEYS} "
                         "(dmlab.zoo.get_recipe('ring_students').model)")
    return dict(config)


def train_ring_students(config: dict, *, progress: bool = False) -> tuple[dict, dict]:
    """Train every student of chapter 25 on the exact 8-Gaussian ring, for each seed (the zoo recipe
    ``ring_students``; ``config`` is its model dict). Per seed ``s`` one generator (seed ``2500 + s``) draws
    everything, in this order:

    * ``direct``: :func:`distill_pairs` on ``n_pairs`` pairs of the exact teacher's ODE (Heun, 40 steps);
    * ``rf2``: a 2-rectified flow (:func:`dmlab.samplers.rectify.train_rectified`, flow form) on the same pairs;
    * ``reflow``: :func:`distill_pairs` on ``n_pairs`` fresh pairs of ``rf2``'s ODE (Euler, 20 steps): InstaFlow;
    * ``cd_ode`` / ``cd_sde`` / ``scott``: :func:`consistency_distill` with the DDIM step, the DDIM(``eta``) step,
      and the DDIM(``eta``) step plus the adversarial term (``adversarial``), on true samples of the ring;
    * ``boot``: :func:`boot_distill` (noise only).

    Every student is a :class:`~dmlab.zoo.toy.ToyMLP` of the same size behind EDM preconditioning (BOOT's and
    ``rf2``'s a :class:`~dmlab.samplers.rectify.TimeMLP` of the same width and depth), trained for ``steps`` steps
    of ``batch`` with Adam. Returns ``(state dict with keys "method.seed.param", log)``.
    """
    from ..samplers.ode import sample_euler
    from ..samplers.rectify import ode_coupling, train_rectified
    from ..schedules import karras
    from ..zoo.toy import toy_denoiser

    cfg = _ring_config(config)
    teacher, smax, smin = ring_teacher(), float(cfg["sigma_max"]), float(cfg["sigma_min"])
    kw = dict(steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"])
    cd_sig = karras(cfg["cd_n"], smin, smax)[:-1]
    state, log = {}, {"final_loss": {}}
    for seed in cfg["seeds"]:
        g = torch.Generator().manual_seed(2500 + int(seed))

        def student():
            return toy_denoiser(2, cfg["hidden"], 3, seed=int(torch.randint(2 ** 31, (1,), generator=g)))

        mods, losses = {}, {}
        e, x = ode_coupling(teacher, torch.randn(cfg["n_pairs"], 2, generator=g, dtype=torch.float64),
                            karras(cfg["teacher_heun_steps"], smin, smax))
        st = student()
        losses["direct"] = distill_pairs(st, e, x, sigma_max=smax, sigma_min=smin, generator=g, **kw).losses
        mods["direct"] = st.net
        rf2 = train_rectified(e, x, form="flow", steps=cfg["steps"], batch=cfg["batch"], width=cfg["hidden"],
                              lr=cfg["lr"], generator=g)
        mods["rf2"] = rf2.net
        e2, x2 = ode_coupling(rf2, torch.randn(cfg["n_pairs"], 2, generator=g, dtype=torch.float64),
                              flow_grid(cfg["reflow_euler_steps"], smax), solver=sample_euler)
        st = student()
        losses["reflow"] = distill_pairs(st, e2, x2, sigma_max=smax, sigma_min=smin, generator=g, **kw).losses
        mods["reflow"] = st.net

        def data(gen, n):
            return teacher.sample(n, gen).float()

        for name, extra in (("cd_ode", {"solver": "ode"}), ("cd_sde", {"solver": "sde", "eta": cfg["eta"]}),
                            ("scott", {"solver": "sde", "eta": cfg["eta"], "adversarial": cfg["adversarial"]})):
            st = student()
            if name == "scott":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=g)))
                    extra = dict(extra, discriminator=Discriminator(2, cfg["hidden"]))
            losses[name] = consistency_distill(st, teacher, data, cd_sig, generator=g, **extra, **kw).losses
            mods[name] = st.net
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=g)))
            bs = BootStudent(2, smax, cfg["hidden"])
        losses["boot"] = boot_distill(bs, teacher, karras(cfg["cd_n"], smin, smax), shape=(2,), generator=g,
                                      **kw).losses
        mods["boot"] = bs
        for m, mod in mods.items():
            for k, v in mod.state_dict().items():
                state[f"{m}.{seed}.{k}"] = v.detach().float().contiguous()
        log["final_loss"][str(seed)] = {m: float(sum(v[-50:]) / len(v[-50:])) for m, v in losses.items()}
        if progress:
            print(f"ring students, seed {seed}: done", flush=True)
    return state, log


class RingStudents(dict):
    """``{method: [student per seed]}``; ``.to("cpu")`` is the zoo's device hook (these toys run on the CPU)."""

    def to(self, device) -> "RingStudents":
        if torch.device(device).type != "cpu":
            raise ValueError("the ring students are 2-D CPU toys; load them with device='cpu'")
        return self


def load_ring_students(state: dict, config: dict) -> RingStudents:
    """``{method: [denoiser per seed]}`` from a :func:`train_ring_students` state dict (the zoo entry's weights):
    EDM-preconditioned students (sample them with :func:`sample_consistency`), ``rf2`` as a flow denoiser, and
    ``boot`` as a :class:`BootStudent` (``.sample(eps)``)."""
    cfg = _ring_config(config)
    out = RingStudents({m: [] for m in RING_METHODS})
    for seed in cfg["seeds"]:
        for m, mod in _ring_modules(cfg).items():
            pre = f"{m}.{seed}."
            sd = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
            missing = set(mod.state_dict()) - set(sd)
            if missing:
                raise ValueError(f"ring students: no weights for {m}, seed {seed} ({sorted(missing)[:3]}); retrain "
                                 "with `python -m dmlab.zoo train ring_students`")
            mod.load_state_dict(sd, strict=False)
            out[m].append(_wrap(m, mod))
    return out


# ----------------------------------------------------------------------------------------------- paper 65: rRCM
def clopper_pearson_lower(k: Tensor, n: int, alpha: float) -> Tensor:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound of a binomial proportion from ``k`` successes of ``n``
    (``0`` where ``k == 0``), as in Cohen et al. (2019)."""
    from scipy.stats import beta

    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive number of Monte-Carlo draws, got {n!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (e.g. 0.001), got {alpha!r}")
    k = torch.as_tensor(k, dtype=torch.float64)
    low = beta.ppf(alpha, k.clamp(min=1).numpy(), (n - k + 1).numpy())
    return torch.where(k > 0, torch.as_tensor(low, dtype=torch.float64), torch.zeros_like(k))


@torch.no_grad()
def _votes(base: Callable, x: Tensor, sigma: float, n: int, generator: torch.Generator, batch: int,
           n_classes: int) -> Tensor:
    """Class counts ``[B, n_classes]`` of ``base`` on ``n`` noisy copies of each image (noise drawn per image in
    order, so the counts do not depend on ``batch``)."""
    counts = torch.zeros(len(x), n_classes, dtype=torch.long)
    for i, xi in enumerate(x):
        eps = torch.randn((n,) + xi.shape, generator=generator, dtype=xi.dtype)  # drawn on the CPU
        noisy = xi + sigma * eps.to(xi.device)
        pred = torch.cat([base(noisy[j:j + batch]).argmax(1) for j in range(0, n, batch)])
        counts[i] = torch.bincount(pred.cpu(), minlength=n_classes)[:n_classes]
    return counts


def certify(base: Callable, x: Tensor, sigma: float, *, n0: int, n: int, alpha: float,
            generator: torch.Generator, batch: int = 4096, n_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Randomised smoothing's CERTIFY (Cohen et al. 2019, Alg. 1) of the smoothed classifier
    ``g(x) = argmax_c P(base(x + sigma eps) = c)`` at each image of ``x``.

    ``n0`` draws pick the top class ``c_A``; ``n`` fresh draws count it, ``p_A`` is its one-sided
    ``1 - alpha`` Clopper-Pearson lower bound, and the certified L2 radius is ``sigma Phi^-1(p_A)`` (abstain when
    ``p_A <= 1/2``). The largest radius ``n`` draws can certify is ``sigma Phi^-1(alpha^(1/n))``.

    Returns ``(pred, radius)``: ``pred [B]`` (``-1`` = abstain) and ``radius [B]`` (float64, ``-inf`` when
    abstaining). Every draw comes from ``generator``.
    """
    if not callable(base):
        raise TypeError("base must be callable: base(images) -> logits [B, n_classes]")
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError("x must be a batch of inputs [B, ...]")
    if not (isinstance(n0, int) and n0 >= 1):
        raise ValueError(f"n0 (selection draws) must be a positive int, got {n0!r}")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive noise level, got {sigma!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (a seeded one makes the certificate reproducible)")
    c_a = _votes(base, x, sigma, n0, generator, batch, n_classes).argmax(1)
    k = _votes(base, x, sigma, n, generator, batch, n_classes).gather(1, c_a[:, None])[:, 0]
    p_a = clopper_pearson_lower(k, n, alpha)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    ok = p_a > 0.5
    radius = torch.where(ok, sigma * normal.icdf(p_a.clamp(max=1 - 1e-12)), torch.tensor(-math.inf,
                                                                                           dtype=torch.float64))
    return torch.where(ok, c_a, torch.full_like(c_a, -1)), radius


def certified_accuracy(pred: Tensor, radius: Tensor, y: Tensor, radii) -> Tensor:
    """Per-image indicator ``[len(radii), B]`` (float) that the smoothed prediction is correct and certified at
    each radius of ``radii``: ``pred == y`` and ``radius >= r``. Its mean over images is the certified accuracy."""
    if not (pred.shape == radius.shape == y.shape):
        raise ValueError(f"pred, radius and y must have the same shape, got {tuple(pred.shape)}, "
                         f"{tuple(radius.shape)}, {tuple(y.shape)}")
    r = torch.as_tensor(radii, dtype=torch.float64).reshape(-1, 1)
    return ((pred == y)[None] & (radius[None] >= r)).double()


def denoised_classifier(denoiser: Callable, classifier: Callable, sigma: float, *, steps: int = 1,
                        cond: dict | None = None, sigma_min: float = 0.02) -> Callable:
    """Denoised smoothing's base classifier (Carlini et al. 2023): ``x = x0 + sigma eps`` -> the denoiser's
    estimate of ``x0`` -> ``classifier``. ``steps=1`` is one denoiser call (the ``x0`` prediction); ``steps > 1``
    follows the probability-flow ODE from ``sigma`` to 0 with Euler steps on a Karras grid (``steps`` calls).
    ``cond`` (e.g. ``{"class_labels": NULL}``; a 0-d tensor or one with a leading dimension of 1 is expanded to
    the batch) is passed to the denoiser."""
    from ..samplers.ode import sample_euler
    from ..schedules import karras

    if not (callable(denoiser) and callable(classifier)):
        raise TypeError("denoiser(x, sigma, **cond) and classifier(x) must be callables")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive int (denoiser calls), got {steps!r}")
    grid = torch.tensor([float(sigma), 0.0]) if steps == 1 else karras(steps, sigma_min, float(sigma))

    def base(x: Tensor) -> Tensor:
        c = {k: (v.expand(len(x), *v.shape[1:]) if isinstance(v, Tensor) and (v.ndim == 0 or len(v) == 1) else v)
             for k, v in (cond or {}).items()}  # one label / embedding serves the whole batch
        return classifier(sample_euler(denoiser, x, grid.to(x.device), cond=c))
    base.nfe = steps
    return base


class CentroidHead(nn.Module):
    """A nearest-centroid classifier on a feature map: logits are ``scale`` times the cosine similarity of
    ``features(x)`` to each class's mean feature over reference inputs ``x_ref`` (labels ``y_ref`` in
    ``0..n_classes-1``). At full scale ``features`` is DINOv2 on decoded latents, a base classifier for denoised
    smoothing without any training."""

    def __init__(self, features: Callable, x_ref: Tensor, y_ref: Tensor, scale: float = 10.0):
        super().__init__()
        if not callable(features):
            raise TypeError("features must be callable: features(x) -> [B, d]")
        y_ref = torch.as_tensor(y_ref)
        if len(y_ref) != len(x_ref):
            raise ValueError(f"x_ref and y_ref must have the same length, got {len(x_ref)} and {len(y_ref)}")
        self.features, self.scale = features, scale
        with torch.no_grad():
            f = nn.functional.normalize(features(x_ref).float(), dim=1)
        y = y_ref.to(f.device)
        self.register_buffer("centroids", nn.functional.normalize(
            torch.stack([f[y == c].mean(0) for c in range(int(y.max()) + 1)]), dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * nn.functional.normalize(self.features(x).float(), dim=1) @ self.centroids.T


def trajectory_infonce(za: Tensor, zb: Tensor, tau: float = 0.2) -> Tensor:
    """Symmetric InfoNCE between two views ``[B, d]``: row ``i`` of ``za`` must pick row ``i`` of ``zb`` (the
    adjacent point of the same trajectory) among the batch, by cosine similarity over temperature ``tau``."""
    if za.shape != zb.shape or za.ndim != 2:
        raise ValueError(f"za and zb must be paired features [B, d], got {tuple(za.shape)} and {tuple(zb.shape)}")
    logits = nn.functional.normalize(za, dim=1) @ nn.functional.normalize(zb, dim=1).T / tau
    target = torch.arange(len(za), device=za.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


def rrcm_finetune(classifier: nn.Module, x: Tensor, y: Tensor, sigmas: Tensor, *, steps: int, batch: int,
                  lr: float, generator: torch.Generator, contrastive: bool = True, lbd: float = 0.1,
                  tau: float = 0.2, eta: float = 5.0) -> FitResult:
    """Fine-tune ``classifier`` (a :class:`dmlab.zoo.nets.DigitClassifier`: ``features`` and ``head``) in place
    the rRCM way (:cite:`lei2025robust`, contrastive consistency + classification on noisy inputs).

    Each step draws images ``x0``, one noise ``eps`` per image and a level index ``n``, and forms two adjacent
    points of the same (variance-exploding) trajectory, ``x0 + sigma_n eps`` and ``x0 + sigma_{n+1} eps``. The
    loss is the cross-entropy on both views, plus ``lbd`` times :func:`trajectory_infonce` of their features
    (rRCM's contrastive pre-training objective) and ``eta`` times the consistency term
    ``KL(p(x0 + sigma_n eps) [stop-gradient] || p(x0 + sigma_{n+1} eps))`` of its fine-tuning stage.
    ``contrastive=False`` drops the InfoNCE term: Gaussian noise augmentation on exactly the same draws (the
    matched competitor). ``sigmas`` is an increasing grid of ``>= 2`` levels. Trained by
    :func:`dmlab.train.fit` (Adam, constant rate); every draw comes from ``generator``.
    """
    if not (hasattr(classifier, "features") and hasattr(classifier, "head")):
        raise TypeError("classifier must expose features(x) and head(z) (a dmlab DigitClassifier)")
    sigmas = torch.as_tensor(sigmas, dtype=x.dtype)
    if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas.diff() > 0).all()):
        raise ValueError("sigmas must be an increasing 1-D grid of >= 2 noise levels")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")

    def draw(g):
        i = torch.randint(len(x), (batch,), generator=g)
        n = torch.randint(len(sigmas) - 1, (batch,), generator=g)
        eps = torch.randn((batch,) + x.shape[1:], generator=g, dtype=x.dtype)
        return x[i], y[i], eps, bcast(sigmas[n], x[i]), bcast(sigmas[n + 1], x[i])

    def loss(b):
        x0, lab, eps, sa, sb = b
        za, zb = classifier.features(x0 + sa * eps), classifier.features(x0 + sb * eps)
        la, lb = classifier.head(za), classifier.head(zb)
        ce = 0.5 * (nn.functional.cross_entropy(la, lab) + nn.functional.cross_entropy(lb, lab))
        if not contrastive:
            return ce
        kl = nn.functional.kl_div(lb.log_softmax(1), la.detach().log_softmax(1), log_target=True,
                                  reduction="batchmean")  # the noisier point must predict like the cleaner one
        return ce + lbd * trajectory_infonce(za, zb, tau) + eta * kl

    classifier.train()
    return fit(loss, classifier, FitConfig(steps=steps, lr=lr), generator=generator, data=draw)
