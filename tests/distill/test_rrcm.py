"""Randomised smoothing, denoised smoothing and rRCM fine-tuning (chapter 25, paper 65)."""
import math

import pytest
import torch

from dmlab.distill import consistency as cm
from dmlab.zoo.nets import DigitClassifier


def constant(c, k=10):
    def f(x):
        out = torch.zeros(len(x), k)
        out[:, c] = 1.0
        return out
    return f


def test_clopper_pearson_lower_exact_values():
    low = cm.clopper_pearson_lower(torch.tensor([0, 64]), 64, 0.001)
    assert low[0] == 0.0
    assert abs(float(low[1]) - 0.001 ** (1 / 64)) < 1e-12  # Beta(alpha; n, 1) = alpha^(1/n)
    from scipy.stats import binomtest

    ref = binomtest(40, 64).proportion_ci(confidence_level=1 - 2 * 0.01, method="exact").low
    assert abs(float(cm.clopper_pearson_lower(torch.tensor([40]), 64, 0.01)[0]) - ref) < 1e-10
    with pytest.raises(ValueError, match="alpha"):
        cm.clopper_pearson_lower(torch.tensor([1]), 10, 1.5)


def test_certify_constant_classifier_gets_the_largest_radius():
    x = torch.zeros(5, 1, 8, 8)
    pred, rad = cm.certify(constant(3), x, 0.5, n0=4, n=64, alpha=0.001, generator=torch.Generator().manual_seed(0))
    assert pred.tolist() == [3] * 5
    best = 0.5 * torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.001 ** (1 / 64), dtype=torch.float64))
    assert torch.allclose(rad, best.expand(5), atol=1e-9)


def test_certify_reproducible_batch_independent_and_abstains():
    base = lambda x: torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], 1)  # noqa: E731  a coin flip at 0
    x = torch.zeros(6, 1, 4, 4)
    a = cm.certify(base, x, 1.0, n0=8, n=50, alpha=0.01, generator=torch.Generator().manual_seed(1), n_classes=2)
    b = cm.certify(base, x, 1.0, n0=8, n=50, alpha=0.01, generator=torch.Generator().manual_seed(1), n_classes=2,
                   batch=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0] == -1).all() and torch.isinf(a[1]).all()
    with pytest.raises(TypeError, match="Generator"):
        cm.certify(base, x, 1.0, n0=8, n=50, alpha=0.01, generator=None)


def test_certified_accuracy_indicator():
    pred, rad, y = torch.tensor([1, 2, -1]), torch.tensor([0.3, 0.1, -math.inf], dtype=torch.float64), torch.tensor([1, 1, 0])
    acc = cm.certified_accuracy(pred, rad, y, [0.0, 0.2, 0.5])
    assert acc.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="same shape"):
        cm.certified_accuracy(pred, rad, y[:2], [0.0])


def test_infonce_and_rrcm_finetune_matches_noise_augmentation_at_zero_weights():
    z = torch.eye(4)
    assert float(cm.trajectory_infonce(z, z, tau=0.01)) < 1e-6
    with pytest.raises(ValueError, match="paired"):
        cm.trajectory_infonce(z, z[:3])
    x, y = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 10
    grid = torch.linspace(0.0, 1.0, 5)
    nets = []
    for con in (False, True):
        torch.manual_seed(0)
        net = DigitClassifier(widths=(8, 8, 8), features=8)
        before = [p.detach().clone() for p in net.parameters()]
        cm.rrcm_finetune(net, x, y, grid, steps=3, batch=8, lr=1e-2, generator=torch.Generator().manual_seed(2),
                         contrastive=con, lbd=0.0, eta=0.0)
        assert any(not torch.equal(p, q) for p, q in zip(before, net.parameters()))
        nets.append(net)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):  # same draws; zero-weight terms change nothing
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="increasing"):
        cm.rrcm_finetune(nets[0], x, y, grid.flip(0), steps=1, batch=4, lr=1e-3, generator=torch.Generator())
    with pytest.raises(TypeError, match="features"):
        cm.rrcm_finetune(torch.nn.Linear(2, 2), x, y, grid, steps=1, batch=4, lr=1e-3, generator=torch.Generator())


def test_full_scale_path_on_a_config_built_unet():
    """The full-scale cell's path: a diffusers UNet behind DiscreteVPDenoiser denoises (one label expanded to the
    batch), a CentroidHead classifies, certify runs on the pair; one step equals head(D(x, sigma))."""
    from diffusers import DDPMScheduler, UNet2DModel

    from dmlab.denoisers import DiscreteVPDenoiser

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       num_class_embeds=11, norm_num_groups=4).eval()
    den = DiscreteVPDenoiser.from_scheduler(unet, DDPMScheduler(num_train_timesteps=100))
    ref = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    head = cm.CentroidHead(lambda z: z.flatten(1), ref, torch.tensor([0, 0, 0, 1, 1, 1]))
    cond = {"class_labels": torch.tensor([10])}
    base = cm.denoised_classifier(den, head, 0.5, cond=cond)
    x = ref[:3]
    with torch.no_grad():
        direct = head(den(x, torch.full((3,), 0.5), class_labels=torch.full((3,), 10)))
        assert torch.allclose(base(x), direct, atol=1e-6)
        assert cm.denoised_classifier(den, head, 0.5, steps=3, cond=cond)(x).shape == (3, 2)
    pred, rad = cm.certify(base, x, 0.5, n0=4, n=16, alpha=0.01, generator=torch.Generator().manual_seed(0),
                           n_classes=2)
    assert pred.shape == rad.shape == (3,) and set(pred.tolist()) <= {-1, 0, 1}
    with pytest.raises(ValueError, match="steps"):
        cm.denoised_classifier(den, head, 0.5, steps=0)
