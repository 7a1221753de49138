"""Distribution-matching distillation: one-step generators trained against a teacher's score (chapter 26).

* **DMD / DMD2** (Yin et al. 2024, ``yin2024improved``): a one-step generator ``G(z) = D_G(sigma_g z, sigma_g)``
  is pushed along the difference of two scores of its noised samples ``x_t = G(z) + sigma eps``: the *real* score
  (the frozen teacher) and the *fake* score (a denoiser trained online, by denoising score matching, on the
  generator's own samples). In denoiser units the update direction is

  ``grad = (D_fake(x_t, sigma) - D_real(x_t, sigma)) / mean|G(z) - D_real(x_t, sigma)|``

  (the per-sample normalisation of DMD), applied through the surrogate ``0.5 |x - sg(x - grad)|^2``. DMD2 drops the
  regression loss of DMD, updates the fake score several times per generator step (the two-time-scale update
  rule, ``critic_ratio``) and adds a non-saturating GAN term whose discriminator is a small head on the fake-score
  network's features, trained on noised real vs generated samples (``gan_weight``).
* **SIM** (Luo et al. 2024, ``luo2024onestep``): score implicit matching minimises a general score divergence
  ``E_t E_{x_t ~ p_G} d(s_G(x_t) - s_real(x_t))``. Its gradient theorem replaces the intractable dependence of
  ``s_G`` on the generator by the surrogate loss ``-d'(y)^T (s_fake(x_t) - grad log q(x_t | x_0))`` with
  ``y = s_fake - s_real`` evaluated at ``x_t = G(z) + sigma eps`` (network weights frozen, gradients through
  ``x_t``). With the pseudo-Huber distance ``d(y) = sqrt(|y|^2 + c^2) - c``, ``d'(y) = y / sqrt(|y|^2 + c^2)``.
  Written in denoiser units (``y = D_fake - D_real``, score weight ``sigma^2``) the loss is
  ``-d'(y)^T (D_fake(x_t) - G(z))``; with ``d = |.|^2`` it is SiD's loss (Zhou et al. 2024). The paper's training
  code is not public; this is a re-implementation from the paper's text.
* **MMD-DDM** (Aiello et al. 2023, ``aiello2023fast``), :func:`mmd_finetune`: the few-step sampler is
  differentiated end to end and the denoiser fine-tuned to lower an unbiased MMD (:func:`mmd_finetune_loss`)
  between generated and real samples in a feature space.

Every run goes through :func:`dmlab.train.fit` (one Adam over the generator, the fake score and the discriminator
head: on critic-only steps the generator has no gradient and Adam leaves it alone, so ``critic_ratio`` fake-score
steps are taken per generator step). :func:`grid_cells` / :func:`grid_tv` judge 2-D generators exactly against a
Gaussian mixture: the total variation between the histogram of the samples and the mixture's exact cell masses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..denoisers import as_sigma, bcast

__all__ = ["OneStep", "ToyFeatures", "MatchingConfig", "METHODS", "sample_sigmas", "dmd_direction",
           "dmd_loss", "sim_loss", "fake_score_loss", "gan_losses", "distill", "grid_cells", "grid_masses",
           "grid_tv", "mmd_finetune_loss", "MMDConfig", "differentiable", "mmd_finetune"]

METHODS = ("dmd", "sim")


class OneStep(nn.Module):
    """A one-step generator ``G(z) = denoiser(sigma_g z, sigma_g, **cond)`` (DMD's generator is the teacher's
    denoiser evaluated at the largest noise level). ``module`` holds the trainable weights the denoiser calls."""

    def __init__(self, denoiser: Callable, module: nn.Module, sigma: float):
        super().__init__()
        if not callable(denoiser):
            raise TypeError("denoiser must be callable as D(x, sigma, **cond)")
        if not isinstance(module, nn.Module):
            raise TypeError("module must be the nn.Module whose weights the denoiser uses (e.g. denoiser.net)")
        if not float(sigma) > 0:
            raise ValueError(f"sigma must be the generator's positive noise level (e.g. sigma_max), got {sigma!r}")
        self.denoiser, self.module, self.sigma = denoiser, module, float(sigma)

    def forward(self, z: Tensor, **cond) -> Tensor:
        return self.denoiser(z * self.sigma, self.sigma, **cond)


class ToyFeatures(nn.Module):
    """Features of a toy fake-score denoiser (``EDMPrecond(ToyMLP)``) for DMD2's GAN head: the last hidden layer
    of the MLP at the preconditioned input, then a linear logit. The head's own weights live here; the features
    are the fake-score network's (shared, as in DMD2). The head is initialised from ``seed``."""

    def __init__(self, fake, *, seed: int = 0):
        super().__init__()
        net = getattr(fake, "net", None)
        if net is None or not hasattr(net, "_embed") or not hasattr(net, "net"):
            raise TypeError("ToyFeatures needs a toy denoiser (dmlab.zoo.toy.toy_denoiser); for other networks "
                            "pass gan_head=None and gan_weight=0")
        self.fake = fake
        with torch.random.fork_rng(devices=[]):  # initialised from seed, the global stream untouched
            torch.manual_seed(seed)
            self.head = nn.Linear(net.net[-1].in_features, 1)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        net = self.fake.net
        _, _, c_in, c_noise = self.fake.coefficients(as_sigma(sigma, x))
        h = net.net[:-1](net._embed(bcast(c_in, x) * x, c_noise))
        return self.head(h)[:, 0]


@dataclass(frozen=True)
class MatchingConfig:
    """A distribution-matching run.

    Args:
        method: ``"dmd"`` (DMD's KL gradient) or ``"sim"`` (score implicit matching, pseudo-Huber).
        steps: generator updates; the fake score takes ``critic_ratio`` updates per generator update (DMD2's
            two-time-scale rule; the fit runs ``steps * critic_ratio`` optimizer steps).
        batch: samples per update. lr, betas: Adam for all networks.
        sigma_min, sigma_max: noise levels of the matching loss, drawn log-uniform in ``[sigma_min, sigma_max]``.
        gan_weight: weight of DMD2's non-saturating GAN term in the generator loss (0: none).
        huber_c: the pseudo-Huber constant ``c`` of SIM (data units, per sample).
        warmup_critic: critic-only steps before the first generator update (the fake score starts untrained).
    """

    method: str = "dmd"
    steps: int = 300
    critic_ratio: int = 5
    batch: int = 256
    lr: float = 1e-3
    betas: tuple = (0.0, 0.99)
    sigma_min: float = 0.02
    sigma_max: float = 10.0
    gan_weight: float = 0.0
    huber_c: float = 0.03
    warmup_critic: int = 100
    sim_normalise: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for k in ("steps", "critic_ratio", "batch"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MatchingConfig.{k} must be a positive int, got {v!r}")
        if isinstance(self.warmup_critic, bool) or not isinstance(self.warmup_critic, int) or self.warmup_critic < 0:
            raise ValueError(f"MatchingConfig.warmup_critic must be an int >= 0, got {self.warmup_critic!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.gan_weight < 0 or not self.huber_c > 0 or not self.lr > 0:
            raise ValueError("gan_weight must be >= 0, huber_c and lr > 0")

    @property
    def fit_steps(self) -> int:
        return self.warmup_critic + self.steps * self.critic_ratio


def sample_sigmas(n: int, generator: torch.Generator, sigma_min: float, sigma_max: float,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` noise levels log-uniform in ``[sigma_min, sigma_max]``."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp().to(dtype)


def _noised(x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    return x + bcast(sigma, x) * eps


def dmd_direction(x: Tensor, xt: Tensor, sigma: Tensor, real: Callable, fake: Callable, **cond) -> Tensor:
    """DMD's update direction in data units: ``(D_fake - D_real) / mean|x - D_real|`` per sample (Yin et al.
    2024a, eq. 7-8: the KL gradient ``s_fake - s_real`` scaled by ``sigma^2`` and normalised). No gradient."""
    with torch.no_grad():
        d_real = real(xt, sigma, **cond).to(x.dtype)
        d_fake = fake(xt, sigma, **cond).to(x.dtype)
        w = (x - d_real).abs().flatten(1).mean(1).clamp_min(1e-8)
        return (d_fake - d_real) / bcast(w, x)


def dmd_loss(x: Tensor, sigma: Tensor, eps: Tensor, real: Callable, fake: Callable, **cond) -> Tensor:
    """DMD's generator surrogate ``0.5 mean |x - sg(x - grad)|^2``, whose gradient in ``x`` is ``grad``
    (:func:`dmd_direction`) divided by the number of elements."""
    grad = dmd_direction(x, _noised(x.detach(), sigma, eps), sigma, real, fake, **cond)
    return 0.5 * ((x - (x - grad).detach()) ** 2).mean()


def sim_loss(x: Tensor, sigma: Tensor, eps: Tensor, real: Callable, fake: Callable, *, c: float = 0.03,
             normalise: bool = False, **cond) -> Tensor:
    """SIM's generator loss with the pseudo-Huber distance (Luo et al. 2024, sec. 3.2-3.3), in denoiser units:
    ``mean_i -d'(y_i)^T (D_fake(x_t) - x)_i`` with ``y = D_fake(x_t) - D_real(x_t)``, ``x_t = x + sigma eps``,
    ``d'(y) = y / sqrt(|y|^2 + c^2)``. The networks' weights must be frozen by the caller (they get no step from
    this loss); the gradient flows into the generator through ``x`` and ``x_t``."""
    xt = _noised(x, sigma, eps)
    d_real = real(xt, sigma, **cond).to(x.dtype)
    d_fake = fake(xt, sigma, **cond).to(x.dtype)
    y = (d_fake - d_real).flatten(1)
    dprime = y / (y.pow(2).sum(1, keepdim=True) + c ** 2).sqrt()
    per = -(dprime * (d_fake - x).flatten(1)).sum(1)
    if normalise:  # DMD's per-sample weight 1 / mean|x - D_real| (no gradient)
        per = per / (x - d_real).detach().abs().flatten(1).mean(1).clamp_min(1e-8)
    return per.mean() / y.shape[1]


def fake_score_loss(fake: Callable, x: Tensor, sigma: Tensor, eps: Tensor, **cond) -> Tensor:
    """Denoising score matching of the fake score on (detached) generator samples, EDM-weighted
    ``lambda = 1/sigma^2 + 1`` (Karras et al. 2022 with ``sigma_data = 1``)."""
    x = x.detach()
    err = ((fake(_noised(x, sigma, eps), sigma, **cond) - x) ** 2).flatten(1).mean(1)
    return ((1 / sigma ** 2 + 1) * err).mean()


def gan_losses(head: ToyFeatures, x_fake: Tensor, x_real: Tensor, sigma: Tensor, eps: Tensor,
               eps_real: Tensor) -> tuple[Tensor, Tensor]:
    """DMD2's GAN terms on noised samples: ``(discriminator loss, generator loss)``, non-saturating
    (``softplus(-D(real)) + softplus(D(fake))`` and ``softplus(-D(fake))``). The discriminator loss sees detached
    fakes; the generator loss sees the discriminator (head and fake-score features) through frozen weights: it
    gets no step from it."""
    d_loss = (nn.functional.softplus(-head(_noised(x_real, sigma, eps_real), sigma))
              + nn.functional.softplus(head(_noised(x_fake.detach(), sigma, eps), sigma))).mean()
    with _frozen(head), _frozen(head.fake.net):
        logit = head(_noised(x_fake, sigma, eps), sigma)
    return d_loss, nn.functional.softplus(-logit).mean()


def distill(generator: OneStep, real: Callable, fake: Callable, fake_module: nn.Module, config: MatchingConfig,
            *, generator_seed: torch.Generator, latent_shape: tuple, real_sample: Callable | None = None,
            gan_head: nn.Module | None = None, cond_sample: Callable | None = None, progress: bool = False):
    """Train ``generator`` by distribution matching against the frozen teacher ``real`` (a denoiser), with the
    online fake score ``fake`` (a denoiser whose weights are ``fake_module``). Returns :class:`dmlab.train.FitResult`.

    ``latent_shape`` is one latent's shape; ``real_sample(n, generator)`` draws real data for DMD2's GAN term
    (needed when ``config.gan_weight > 0``, with ``gan_head``, e.g. :class:`ToyFeatures`); ``cond_sample(n,
    generator) -> dict`` draws conditioning (e.g. class labels) for both networks. Every draw uses
    ``generator_seed``.
    """
    from ..train import FitConfig, fit

    if not isinstance(config, MatchingConfig):
        raise TypeError(f"config must be a MatchingConfig, got {type(config).__name__}")
    if not isinstance(generator, OneStep):
        raise TypeError("generator must be a OneStep (the one-step generator wrapper)")
    if not isinstance(fake_module, nn.Module):
        raise TypeError("fake_module must be the nn.Module of the fake score's weights")
    if config.gan_weight > 0 and (real_sample is None or gan_head is None):
        raise ValueError("the GAN term (gan_weight > 0) needs real_sample(n, generator) and a gan_head")
    if not isinstance(generator_seed, torch.Generator):
        raise TypeError("generator_seed must be a torch.Generator: every draw of the run goes through it")
    modules = {"generator": generator.module, "fake": fake_module}
    if gan_head is not None and config.gan_weight > 0:
        modules["head"] = gan_head.head
    model = nn.ModuleDict(modules)
    p0 = next(fake_module.parameters())
    dtype, device = p0.dtype, p0.device
    B, step = config.batch, [0]

    def data(g):  # every draw on the CPU from g, then moved to the networks' device
        shape = (B, *latent_shape)
        out = {"z": torch.randn(shape, generator=g, dtype=dtype),
               "s_fake": sample_sigmas(B, g, config.sigma_min, config.sigma_max, dtype),
               "e_fake": torch.randn(shape, generator=g, dtype=dtype),
               "s_gen": sample_sigmas(B, g, config.sigma_min, config.sigma_max, dtype),
               "e_gen": torch.randn(shape, generator=g, dtype=dtype)}
        if config.gan_weight > 0:
            out["real"] = real_sample(B, g).to(dtype)
            out["e_real"] = torch.randn(shape, generator=g, dtype=dtype)
        out = {k: v.to(device) for k, v in out.items()}
        out["cond"] = cond_sample(B, g) if cond_sample is not None else {}
        return out

    def before(i):
        step[0] = i

    def loss(b):
        cond = b["cond"]
        i = step[0]
        gen_step = i >= config.warmup_critic and (i - config.warmup_critic) % config.critic_ratio == 0
        x = generator(b["z"], **cond)
        total = fake_score_loss(fake, x, b["s_fake"], b["e_fake"], **cond)
        if config.gan_weight > 0:
            d_loss, g_loss = gan_losses(gan_head, x, b["real"], b["s_fake"], b["e_fake"], b["e_real"])
            total = total + config.gan_weight * d_loss
        if gen_step:
            if config.method == "dmd":
                total = total + dmd_loss(x, b["s_gen"], b["e_gen"], real, fake, **cond)
            else:
                with _frozen(fake_module):
                    total = total + sim_loss(x, b["s_gen"], b["e_gen"], real, fake, c=config.huber_c,
                                              normalise=config.sim_normalise, **cond)
            if config.gan_weight > 0:
                _, g_loss = gan_losses(gan_head, x, b["real"], b["s_gen"], b["e_gen"], b["e_real"])
                total = total + config.gan_weight * g_loss
        return total

    cfg = FitConfig(steps=config.fit_steps, lr=config.lr, betas=tuple(config.betas), optimizer="adam",
                    log_every=50, progress=progress, desc=f"distill-{config.method}")
    return fit(loss, model, cfg, generator=generator_seed, data=data, before_step=before)


class _frozen:
    """Temporarily stop gradients into a module's weights (they still flow through its inputs)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------- exact judge
def grid_cells(x: Tensor, lim: float, bins: int) -> Tensor:
    """The cell index ``[N]`` of each 2-D point on a ``bins x bins`` grid over ``[-lim, lim]^2``; points outside
    go to the overflow cell ``bins**2``."""
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must be 2-D points [N, 2], got {getattr(x, 'shape', type(x))}")
    if not lim > 0 or isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError("lim must be positive and bins a positive int")
    ij = ((x.double() + lim) / (2 * lim) * bins).floor().long()
    inside = ((ij >= 0) & (ij < bins)).all(1) & torch.isfinite(x).all(1)
    return torch.where(inside, ij[:, 0].clamp(0, bins - 1) * bins + ij[:, 1].clamp(0, bins - 1),
                       torch.full_like(ij[:, 0], bins * bins))


def grid_masses(gmm, lim: float, bins: int) -> Tensor:
    """Exact probability of each cell of :func:`grid_cells` (and of the overflow cell, last) under a 2-D Gaussian
    mixture with diagonal covariances (``dmlab.exact.GMMDenoiser``): products of normal CDF differences."""
    covs = gmm.covs
    if gmm.dim != 2 or not torch.allclose(covs, torch.diag_embed(torch.diagonal(covs, dim1=1, dim2=2))):
        raise ValueError("grid_masses needs a 2-D mixture with diagonal covariances")
    edges = torch.linspace(-lim, lim, bins + 1, dtype=torch.float64)
    std = torch.diagonal(covs, dim1=1, dim2=2).sqrt()  # [K, 2]
    cdf = torch.special.ndtr((edges[None, None, :] - gmm.means[:, :, None]) / std[:, :, None])  # [K, 2, E]
    p = cdf[..., 1:] - cdf[..., :-1]  # [K, 2, bins]
    cells = torch.einsum("k,ki,kj->ij", gmm.weights, p[:, 0], p[:, 1]).reshape(-1)
    return torch.cat([cells, (1 - cells.sum()).clamp_min(0)[None]])


def grid_tv(cells: Tensor, masses: Tensor) -> Tensor:
    """Total variation ``0.5 sum |q_hat - p|`` between the histogram of ``cells`` (``[N]`` or ``[S, N]``: one
    value per row) and the exact cell masses ``p`` (:func:`grid_masses`)."""
    cells = cells[None] if cells.ndim == 1 else cells
    k = masses.numel()
    counts = torch.zeros(cells.shape[0], k, dtype=torch.float64)
    counts.scatter_add_(1, cells.long(), torch.ones_like(cells, dtype=torch.float64))
    q = counts / cells.shape[1]
    return 0.5 * (q - masses[None]).abs().sum(1)


# ----------------------------------------------------------------------------------------------- MMD-DDM
def mmd_finetune_loss(fx: Tensor, fy: Tensor, *, bandwidths=(0.5, 1.0, 2.0)) -> Tensor:
    """MMD-DDM's loss (Aiello et al. 2023, eq. 6): the unbiased squared MMD between features ``fx`` of generated
    samples (differentiable) and ``fy`` of real ones, with a sum of RBF kernels whose widths are ``bandwidths``
    times the median pairwise distance of the pooled (detached) features."""
    if fx.ndim != 2 or fy.ndim != 2 or fx.shape[1] != fy.shape[1] or fx.shape[0] < 2 or fy.shape[0] < 2:
        raise ValueError(f"features must be [N, F] and [M, F] with N, M >= 2, got {tuple(fx.shape)}, "
                         f"{tuple(fy.shape)}")
    z = torch.cat([fx, fy.to(fx.dtype)])
    d2 = torch.cdist(z, z).pow(2)
    n, m = fx.shape[0], fy.shape[0]
    off = ~torch.eye(n + m, dtype=torch.bool, device=z.device)
    med = d2.detach()[off].median().clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (2 * b ** 2 * med)) for b in bandwidths)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean())


@dataclass(frozen=True)
class MMDConfig:
    """An MMD-DDM fine-tuning run: ``steps`` optimizer steps of ``batch`` generated and ``batch`` real samples,
    Adam at ``lr``; ``bandwidths`` of :func:`mmd_finetune_loss`."""

    steps: int = 100
    batch: int = 256
    lr: float = 1e-4
    bandwidths: tuple = (0.5, 1.0, 2.0)

    def __post_init__(self):
        for k in ("steps", "batch"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"MMDConfig.{k} must be an int >= 2, got {v!r}")
        if not self.lr > 0 or not self.bandwidths or min(self.bandwidths) <= 0:
            raise ValueError("MMDConfig needs lr > 0 and positive bandwidths")


def differentiable(sampler: Callable) -> Callable:
    """The registry sampler without its ``torch.no_grad`` wrapper (the same update), so that a loss on its output
    reaches the denoiser's weights (MMD-DDM back-propagates through the whole few-step chain)."""
    return getattr(sampler, "__wrapped__", sampler)


def mmd_finetune(denoiser: Callable, module: nn.Module, sampler: Callable, sigmas: Tensor, config: MMDConfig, *,
                 generator_seed: torch.Generator, latent_shape: tuple, real_sample: Callable,
                 features: Callable | None = None, cond_sample: Callable | None = None):
    """MMD-DDM (Aiello et al. 2023): fine-tune ``module`` (the weights of ``denoiser``) so that ``sampler`` on the
    fixed schedule ``sigmas`` (a few steps) produces samples whose ``features`` have a low MMD to real ones.

    Each step draws ``x_T = sigmas[0] z``, runs the sampler differentiably (:func:`differentiable`), and minimises
    :func:`mmd_finetune_loss` between ``features(samples)`` and ``features(real_sample(batch, generator))``
    (``features`` default: the flattened samples). Through :func:`dmlab.train.fit`; returns its ``FitResult``.
    """
    from ..train import FitConfig, fit

    if not isinstance(config, MMDConfig):
        raise TypeError(f"config must be an MMDConfig, got {type(config).__name__}")
    if not callable(sampler) or not callable(real_sample):
        raise TypeError("sampler (a registry sampler function) and real_sample(n, generator) must be callable")
    if not isinstance(module, nn.Module):
        raise TypeError("module must be the nn.Module of the denoiser's weights")
    feat = features if features is not None else (lambda x: x.flatten(1))
    run = differentiable(sampler)
    p0 = next(module.parameters())

    def data(g):
        out = {"z": torch.randn((config.batch, *latent_shape), generator=g, dtype=p0.dtype),
               "real": real_sample(config.batch, g).to(p0.dtype)}
        out = {k: v.to(p0.device) for k, v in out.items()}
        out["cond"] = cond_sample(config.batch, g) if cond_sample is not None else {}
        return out

    def loss(b):
        x = run(denoiser, b["z"] * float(sigmas[0]), sigmas, cond=b["cond"] or None)
        return mmd_finetune_loss(feat(x), feat(b["real"]).detach(), bandwidths=config.bandwidths)

    cfg = FitConfig(steps=config.steps, lr=config.lr, optimizer="adam", log_every=10, desc="mmd-ddm")
    return fit(loss, module, cfg, generator=generator_seed, data=data)
