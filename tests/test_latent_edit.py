"""Tests of dmlab.latent_edit (the asymmetric decoder of Zhu et al. 2023) on config-built AutoencoderKLs."""
import pytest
import torch

from dmlab import latent_edit as le


def _vae(channels=3, blocks=(8, 16)):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(blocks)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4,
                         block_out_channels=list(blocks), down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, layers_per_block=1, norm_num_groups=4,
                         sample_size=16).eval()


def _randomise_heads(dec):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for h in dec.branch.heads:
            h.weight.copy_(0.1 * torch.randn(h.weight.shape, generator=g))


def test_untrained_branch_is_the_original_decoder():
    """The full-scale path (SD-style 3-channel AutoencoderKL, as hub.load_sd's vae): zero-initialised heads give
    the original decoder exactly, with and without a mask."""
    vae = _vae()
    dec = le.AsymmetricDecoder(vae)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    m = le.random_box_masks(2, 16, generator=g, grid=2)
    with torch.no_grad():
        ref = vae.decode(z).sample
        assert torch.equal(dec(z), ref)
        assert torch.allclose(dec(z, x, m), ref, atol=1e-6)
    assert [f for _, f in dec.levels] == [2, 1, 1]


def test_branch_acts_only_outside_the_mask_and_not_at_all_when_fully_masked():
    vae = _vae(channels=1)
    dec = le.AsymmetricDecoder(vae, width=8)
    _randomise_heads(dec)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 8, 8, generator=g)
    x = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    ones = torch.ones(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(dec(z, x, ones), dec(z))  # generation: nothing known, branch silent
        m = le.random_box_masks(3, 16, generator=g, grid=2)
        assert not torch.allclose(dec(z, x, m), dec(z))
        # the masked pixels of the source never reach the output
        x2 = x * (1 - m) + m * torch.rand(3, 1, 16, 16, generator=g)
        assert torch.equal(dec(z, x, m), dec(z, x2, m))


def test_masks_and_edits():
    g = torch.Generator().manual_seed(3)
    m = le.random_box_masks(50, 16, generator=g, grid=2, p_full=0.2)
    assert m.shape == (50, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
    cells = le.downsample_mask(m, 2)
    assert torch.equal(cells.repeat_interleave(2, -1).repeat_interleave(2, -2), m)  # latent-aligned boxes
    full = m.flatten(1).all(1)
    assert 0 < int(full.sum()) < 50
    a, b = torch.zeros(50, 4, 8, 8), torch.ones(50, 4, 8, 8)
    assert torch.equal(le.edit_latents(a, b, m), cells.expand(-1, 4, -1, -1))
    x = torch.zeros(1, 1, 4, 4)
    r = torch.zeros(1, 1, 4, 4)
    r[..., :2, :] = 1
    y = x.clone()
    y[..., :2, :] = 0.5  # error only inside the region
    assert le.region_mse(y, x, r).item() == pytest.approx(0.25)
    assert le.region_mse(y, x, 1 - r).item() == 0
    assert le.region_psnr(y, x, 1 - r).item() == pytest.approx(10 * torch.log10(torch.tensor(4e8)).item())


def test_errors_name_the_fix():
    vae = _vae(channels=1)
    dec = le.AsymmetricDecoder(vae)
    with pytest.raises(ValueError, match="both image and mask"):
        dec(torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        dec(torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 16, 16), torch.zeros(1, 2, 16, 16))
    with pytest.raises(TypeError, match="AutoencoderKL"):
        le.AsymmetricDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.Generator"):
        le.random_box_masks(2, 16, generator=0)
    with pytest.raises(ValueError, match="multiple of grid"):
        le.random_box_masks(2, 15, generator=torch.Generator(), grid=2)


def test_training_step_moves_the_branch_and_is_seeded():
    vae = _vae(channels=1)
    x = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    a = le.train_asymmetric(vae, x, steps=3, batch=4, lr=1e-2, seed=0, width=8)
    b = le.train_asymmetric(vae, x, steps=3, batch=4, lr=1e-2, seed=0, width=8)
    wa = a["asym"].branch.heads[0].weight
    assert wa.abs().sum() > 0  # the zero heads were trained
    assert torch.equal(wa, b["asym"].branch.heads[0].weight)
    assert torch.equal(a["plain"].branch.heads[0].weight, torch.zeros_like(wa))  # control: branch untouched
