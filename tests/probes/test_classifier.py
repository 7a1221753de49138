"""Diffusion Classifier (paper 33) and linear probes (paper 54): exact answers on Gaussian mixtures, the adaptive
schedule, shared noise, bad inputs."""
import math

import pytest
import torch

from dmlab.exact import GMMDenoiser
from dmlab.probes.classifier import (ClassConditional, classifier_sigmas, diffusion_classify, label_conds,
                                     linear_probe, pooled_features, probe_grid, prune_table, round_indices)


@pytest.fixture(scope="module")
def mixture():
    """Three classes in 2-D: a two-component mixture and two correlated Gaussians (overlapping)."""
    comps = [GMMDenoiser(torch.tensor([0.5, 0.5]), torch.tensor([[-1.5, 0.0], [0.0, 1.5]]),
                         torch.tensor([[[0.3, 0.1], [0.1, 0.4]], [[0.2, 0.0], [0.0, 0.2]]]).double()),
             GMMDenoiser(torch.ones(1), torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.5, -0.2], [-0.2, 0.3]]]).double()),
             GMMDenoiser(torch.ones(1), torch.tensor([[0.0, -1.0]]), (0.6 * torch.eye(2))[None].double())]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([c.sample(15, g) for c in comps])
    logp = torch.stack([c.log_prob(x, 0.0) for c in comps], 1)
    return ClassConditional(comps), x, logp


def test_paper_grid_and_rounds():
    from dmlab import schedules
    from dmlab.denoisers import DiscreteVPDenoiser

    D = DiscreteVPDenoiser(lambda x, timestep: x, torch.cumprod(1 - schedules.betas_for(1000), 0))
    s = classifier_sigmas(D, 50)
    assert torch.allclose(s, D.sigmas_train[list(range(10, 1000, 20))])
    assert round_indices(500, 50) == list(range(5, 500, 10))
    assert round_indices(4, 4) == [0, 1, 2, 3]
    ls = classifier_sigmas(None, 4, sigma_min=1.0, sigma_max=math.e ** 4).log()
    assert torch.allclose(ls, torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64))


def test_elbo_weighting_recovers_exact_log_likelihood_ratios(mixture):
    """With the exact class-conditional denoiser, -dim * ELBO score = log p(x|c) + const (I-MMSE identity)."""
    D, x, logp = mixture
    sig = classifier_sigmas(None, 64, sigma_min=1e-3, sigma_max=1e3)
    r = diffusion_classify(D, x, label_conds(3), n_samples=(64,), to_keep=(1,), sigmas=sig, n_trials=64,
                           weighting="elbo", generator=torch.Generator().manual_seed(1))
    ll = r.log_likelihood()
    err = (ll - ll[:, :1]) - (logp - logp[:, :1])
    spread = (logp - logp[:, :1]).abs().mean()
    assert spread > 3                      # the classes are far from equally likely at most points
    assert err.abs().mean() < 0.05 * spread
    assert (r.pred == logp.argmax(1)).double().mean() >= 0.95  # the Bayes classifier (equal priors)
    assert r.nfe == 3 * 64 * 64 and (r.n_evals == 64 * 64).all()


def test_shared_noise_reduces_variance(mixture):
    D, x, _ = mixture
    sig = classifier_sigmas(None, 16, sigma_min=1e-2, sigma_max=1e2)
    g = torch.Generator().manual_seed(2)
    spread = {}
    for shared in (True, False):
        runs = [diffusion_classify(D, x[:12], label_conds(3), n_samples=(16,), to_keep=(1,), sigmas=sig,
                                   n_trials=2, weighting="elbo", shared_noise=shared, generator=g).log_likelihood()
                for _ in range(6)]
        gaps = torch.stack([r - r[:, :1] for r in runs])
        spread[shared] = gaps.std(0)[:, 1:].mean().item()
    assert spread[True] < 0.6 * spread[False]


def test_adaptive_schedule_prunes_and_replays(mixture):
    D, x, _ = mixture
    sig = classifier_sigmas(None, 16, sigma_min=1e-2, sigma_max=1e2)
    full = diffusion_classify(D, x, label_conds(3), n_samples=(16,), to_keep=(1,), sigmas=sig, n_trials=2,
                              generator=torch.Generator().manual_seed(5))
    ad = diffusion_classify(D, x, label_conds(3), n_samples=(4, 16), to_keep=(2, 1), sigmas=sig, n_trials=2,
                            generator=torch.Generator().manual_seed(5))
    # 4 grid sigmas for 3 classes, then 12 more for the 2 kept: NFE counted per image
    assert ad.nfe == (3 * 4 + 2 * 12) * 2 and full.nfe == 3 * 16 * 2
    assert ((ad.n_evals == 32).sum(1) == 2).all() and ((ad.n_evals == 8).sum(1) == 1).all()
    rp = prune_table(full, (4, 16), (2, 1))
    assert torch.equal(rp.pred, ad.pred) and rp.nfe == ad.nfe
    assert torch.equal(rp.table.isnan(), ad.table.isnan())
    torch.testing.assert_close(rp.table.nan_to_num(0), ad.table.nan_to_num(0), rtol=0, atol=1e-12)
    # the pruned class always lost the first round
    first = prune_table(full, (4,), (3,))
    lost = ad.n_evals.argmin(1)
    assert (first.scores.gather(1, lost[:, None]).squeeze(1) >= first.scores.min(1).values).all()


def test_losses_and_identity_denoiser():
    """A denoiser that ignores the class gives identical scores for every class; l1/huber run."""
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    D = lambda x, s, class_labels: torch.zeros_like(x)  # noqa: E731
    for loss in ("l2", "l1", "huber"):
        r = diffusion_classify(D, x, label_conds(4), n_samples=(3,), to_keep=(1,), loss=loss,
                               sigmas=torch.tensor([0.5, 1.0, 2.0]), generator=torch.Generator().manual_seed(0))
        assert torch.allclose(r.scores, r.scores[:, :1].expand_as(r.scores))
    # D = 0 means eps_hat = x / sigma; the l2 error is its mean squared difference from eps
    g = torch.Generator().manual_seed(3)
    r = diffusion_classify(D, x, label_conds(2), n_samples=(1,), to_keep=(1,), sigmas=torch.tensor([2.0]),
                           generator=g)
    eps = torch.randn((5, 1, 1, 1, 1, 4, 4), generator=torch.Generator().manual_seed(3))[:, 0, 0, 0]
    expect = ((x + 2 * eps) / 2 - eps).square().flatten(1).mean(1).double()
    torch.testing.assert_close(r.scores[:, 0], expect, rtol=1e-6, atol=1e-7)


def test_bad_inputs(mixture):
    D, x, _ = mixture
    g = torch.Generator().manual_seed(0)
    sig = torch.tensor([0.5, 1.0])
    with pytest.raises(TypeError, match="generator"):
        diffusion_classify(D, x, label_conds(3), n_samples=(2,), sigmas=sig, generator=None)
    with pytest.raises(TypeError, match="one row per candidate"):
        diffusion_classify(D, x, {}, n_samples=(2,), sigmas=sig, generator=g)
    with pytest.raises(ValueError, match="same number of rows"):
        diffusion_classify(D, x, {"a": torch.zeros(3), "b": torch.zeros(2)}, n_samples=(2,), sigmas=sig, generator=g)
    with pytest.raises(ValueError, match="non-increasing"):
        diffusion_classify(D, x, label_conds(3), n_samples=(1, 2), to_keep=(1, 2), sigmas=sig, generator=g)
    with pytest.raises(ValueError, match="at least max"):
        diffusion_classify(D, x, label_conds(3), n_samples=(3,), sigmas=sig, generator=g)
    with pytest.raises(ValueError, match="increasing"):
        diffusion_classify(D, x, label_conds(3), n_samples=(2,), sigmas=sig.flip(0), generator=g)
    with pytest.raises(ValueError, match="loss"):
        diffusion_classify(D, x, label_conds(3), n_samples=(2,), sigmas=sig, loss="l3", generator=g)
    with pytest.raises(ValueError, match="weighting"):
        diffusion_classify(D, x, label_conds(3), n_samples=(2,), sigmas=sig, weighting="snr", generator=g)
    with pytest.raises(ValueError, match="sigma_min and"):
        classifier_sigmas(None, 10)
    r = diffusion_classify(D, x, label_conds(3), n_samples=(2,), sigmas=sig, generator=g)
    with pytest.raises(ValueError, match="weighting='elbo'"):
        r.log_likelihood()
    with pytest.raises(ValueError, match="exceeds"):
        prune_table(r, (4,), (1,))


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DModel

    from dmlab import schedules
    from dmlab.denoisers import DiscreteVPDenoiser

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4, num_class_embeds=3).eval()
    return DiscreteVPDenoiser(net, torch.cumprod(1 - schedules.betas_for(1000), 0)), net


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_classifier_and_probes_on_a_unet_leave_no_trace(tiny_unet):
    D, net = tiny_unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        ref = net(x, 10, class_labels=y).sample
    r = diffusion_classify(D, x, label_conds(3), n_samples=(2, 4), to_keep=(2, 1), generator=g)
    assert r.pred.shape == (6,) and r.nfe == 3 * 2 + 2 * 2
    f = pooled_features(D, net, x, 0.3, ["down_blocks.1", "up_blocks.1"], pool=2, generator=g,
                        cond={"class_labels": torch.full((6,), 2)}, batch_size=4)
    assert f["down_blocks.1"].shape == (6, 16 * 4) and f["up_blocks.1"].shape == (6, 8 * 4)
    acc = probe_grid(D, net, x, y, x, y, ["up_blocks.1"], [0.0, 0.5], generator=g,
                     cond_train={"class_labels": torch.full((6,), 2)}, cond_test={"class_labels": torch.full((6,), 2)})
    assert acc.shape == (1, 2) and ((acc >= 0) & (acc <= 1)).all()
    assert _hooks(net) == 0
    with torch.no_grad():
        assert torch.equal(net(x, 10, class_labels=y).sample, ref)


def test_linear_probe_separable_and_bad_shapes():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    f = torch.randn(40, 3, generator=g) + 4.0 * y[:, None]
    assert linear_probe(f[:30], y[:30], f[30:], y[30:]) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        linear_probe(f[:30], y[:29], f[30:], y[30:])
    with pytest.raises(ValueError, match="pool"):
        pooled_features(lambda x, s: x, torch.nn.Identity(), f, 0.1, [""], pool=0, generator=g)
