"""Encoder/decoder feature drift (paper 35): exact values of the measures, and a hooked run changes nothing."""
import pytest
import torch

from dmlab.probes.drift import adjacent_mse, feature_drift, fnorm_curve, relative_change, unet_blocks


def test_measures_exact():
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    const = torch.stack([f0] * 6)
    assert relative_change(const).abs().max() == 0 and adjacent_mse(const).abs().max() == 0
    fn = fnorm_curve(const)
    assert torch.allclose(fn, fn[:1].expand(6)) and fn.std() == 0
    a = 0.1
    geo = torch.stack([(1 + a) ** s * f0 for s in range(5)])
    torch.testing.assert_close(relative_change(geo), torch.full((4,), a, dtype=torch.float64))
    # MSE between steps s-1 and s: ((1+a)^s - (1+a)^(s-1))^2 * mean(f0^2)
    expect = torch.tensor([((1 + a) ** s - (1 + a) ** (s - 1)) ** 2 for s in range(1, 5)], dtype=torch.float64)
    torch.testing.assert_close(adjacent_mse(geo), expect * f0.square().mean())
    # F-norm of the channel mean, averaged over the batch
    torch.testing.assert_close(fnorm_curve(geo)[0], f0.mean(1).flatten(1).norm(dim=1).mean())
    # a list of per-step tensors works too; token outputs [S, B, N, D] average their feature dimension
    assert torch.equal(relative_change(list(geo)), relative_change(geo))
    tok = torch.randn(3, 2, 7, 5, generator=g)
    torch.testing.assert_close(fnorm_curve(tok), tok.double().mean(3).norm(dim=2).mean(1))


def test_bad_histories():
    with pytest.raises(ValueError, match="at least 2 steps"):
        relative_change(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"\[S, B"):
        adjacent_mse(torch.zeros(4))
    with pytest.raises(TypeError, match="list of tensors"):
        fnorm_curve([])


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DModel

    from dmlab import schedules
    from dmlab.denoisers import DiscreteVPDenoiser

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4).eval()
    return DiscreteVPDenoiser(net, torch.cumprod(1 - schedules.betas_for(1000), 0)), net


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_feature_drift_on_a_unet_changes_nothing(unet):
    from dmlab import samplers, schedules

    D, net = unet
    assert unet_blocks(net) == {"encoder": ["down_blocks.0", "down_blocks.1", "mid_block"],
                                "decoder": ["up_blocks.0", "up_blocks.1"]}
    x = 10 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sig = schedules.karras(6, 0.02, 10.0)
    ref = samplers.sample_euler(D, x, sig)
    rep = feature_drift(D, net, x, sig)
    assert _hooks(net) == 0
    assert torch.equal(rep.x, ref)
    assert rep.calls == 6
    for b in ["down_blocks.0", "mid_block", "up_blocks.1"]:
        assert rep.relative[b].shape == (5,) and rep.fnorm[b].shape == (6,) and (rep.relative[b] > 0).all()
    rows = rep.summary()
    assert [r["block"] for r in rows] == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    g = rep.group_mean("rel_change")
    assert set(g) == {"encoder", "decoder"} and all(v > 0 for v in g.values())
    # a Heun step calls the network twice: the history has one entry per call
    rep2 = feature_drift(D, net, x, sig, sampler=samplers.sample_heun, layers={"enc": ["mid_block"]})
    assert rep2.calls == 2 * 6 - 1 and _hooks(net) == 0


def test_bad_networks_and_layers(unet):
    D, net = unet
    with pytest.raises(TypeError, match="diffusers UNet"):
        unet_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="did you mean"):
        feature_drift(D, net, torch.zeros(1, 1, 8, 8), torch.tensor([1.0, 0.0]), layers={"e": ["mid_blok"]})
    with pytest.raises(ValueError, match="non-empty"):
        feature_drift(D, net, torch.zeros(1, 1, 8, 8), torch.tensor([1.0, 0.0]), layers={"e": []})
    assert _hooks(net) == 0
