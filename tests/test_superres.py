"""Tests of the super-resolution pairs (dmlab.data) and dmlab.superres (chapter 28)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dmlab import data
from dmlab import superres as sr


# ----------------------------------------------------------------------------------------------- degradation
def test_jpeg_quantise_matches_a_hand_written_dct_and_quality_100_is_nearly_lossless():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    # quality 100 = a table of ones: only the rounding of DCT coefficients, rms 1/sqrt(12) of a level
    assert (data.jpeg_quantise(x, 100) - x).pow(2).mean().sqrt() * 127.5 < 0.35
    # one block by hand: scipy's orthonormal DCT-II, rounding by the quality-50 table (the standard table itself)
    from scipy.fft import dctn, idctn
    blk = x[0, 0, :8, :8].numpy() * 127.5
    q = torch.tensor(data._JPEG_Q, dtype=torch.float64).reshape(8, 8).numpy()
    ref = idctn(torch.from_numpy(dctn(blk, norm="ortho") / q).round().numpy() * q, norm="ortho") / 127.5
    torch.testing.assert_close(data.jpeg_quantise(x, 50)[0, 0, :8, :8], torch.from_numpy(ref).clamp(-1, 1))
    low = (data.jpeg_quantise(x, 10) - x).pow(2).mean()
    assert low > (data.jpeg_quantise(x, 90) - x).pow(2).mean()
    with pytest.raises(ValueError, match=r"quality must lie in \[1, 100\]"):
        data.jpeg_quantise(x, 0)


def test_degrade_without_blur_noise_jpeg_is_box_downsampling_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    lr = data.degrade(hr, 4, generator=torch.Generator().manual_seed(0), blur=0.0, noise=0.0, jpeg=None)
    torch.testing.assert_close(lr, F.avg_pool2d(hr, 4))
    a = data.degrade(hr, 2, generator=torch.Generator().manual_seed(5))
    b = data.degrade(hr, 2, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    with pytest.raises(ValueError, match="divisible by scale"):
        data.degrade(hr, 3, generator=g)
    with pytest.raises(ValueError, match="noise must be"):
        data.degrade(hr, 2, generator=g, noise=(0.1, 0.0))
    with pytest.raises(TypeError, match="generator"):
        data.degrade(hr, 2, generator=0)


def test_sr_pairs_use_held_out_photos_and_are_reproducible():
    assert not set(data.SR_SPLITS["train"]) & set(data.SR_SPLITS["test"])
    hr, lr = data.sr_pairs("test", 10, size=16, scale=4, generator=torch.Generator().manual_seed(0))
    hr2, lr2 = data.sr_pairs("test", 10, size=16, scale=4, generator=torch.Generator().manual_seed(0))
    assert hr.shape == (10, 1, 16, 16) and lr.shape == (10, 1, 4, 4)
    assert torch.equal(hr, hr2) and torch.equal(lr, lr2)
    with pytest.raises(ValueError, match="split must be one of"):
        data.sr_pairs("val", 4, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------- models
def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return sr.SRNet(8, **kw).eval()


def test_prune_keep_one_is_the_same_function_and_half_is_narrower():
    m = _net()
    for p in m.parameters():  # non-trivial FiLM and output weights
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.1, 0.5, 1.0])
    full = sr.prune_srnet(m, 1.0)
    torch.testing.assert_close(full(x, x, t), m(x, x, t), rtol=0, atol=1e-6)
    half = sr.prune_srnet(m, 0.5)
    assert half.config["width"] == 4 and sum(p.numel() for p in half.parameters()) < \
        0.35 * sum(p.numel() for p in m.parameters())
    assert half(x, x, t).shape == x.shape
    with pytest.raises(ValueError, match="keep must be"):
        sr.prune_srnet(m, 0)
    with pytest.raises(TypeError, match="cond='concat'"):
        sr.prune_srnet(_net(cond="latent"), 0.5)


def test_paca_starts_as_identity_and_attends_over_all_pixels():
    torch.manual_seed(0)
    pa = sr.PixelAwareCrossAttention(4, 3)
    y, c = torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5)
    assert torch.equal(pa(y, c), y)
    torch.nn.init.normal_(pa.out.weight)
    out = pa(y, c)
    c2 = c.clone()
    c2[:, :, 4, 4] += 5.0  # one far-away condition pixel changes every output pixel (global attention)
    assert ((pa(y, c2) - out)[:, :, 0, 0].abs() > 0).all()
    with pytest.raises(ValueError, match="same spatial size"):
        pa(y, torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="paca=True needs cond='latent'"):
        sr.SRNet(8, paca=True)


def test_one_step_sampler_is_one_call_at_t1_and_ddim_reaches_a_perfect_denoiser_target():
    m = _net(cond="concat")
    lr_up = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(lr_up.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = m(noise, lr_up, torch.ones(2)).clamp(-1, 1)
    assert torch.equal(sr.sample_sr(m, lr_up, 1, noise=noise), one)
    target = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) - 0.5

    class Oracle(torch.nn.Module):  # predicts the same x0 at every step
        def forward(self, x, lr, t):
            return target
    assert torch.equal(sr.sample_sr(Oracle(), lr_up, 7, noise=noise), target)
    with pytest.raises(ValueError, match="steps must be"):
        sr.sample_sr(m, lr_up, 0, noise=noise)
    with pytest.raises(TypeError, match="noise= .* or generator="):
        sr.sample_sr(m, lr_up, 2)


def test_scale_distillation_loss_is_zero_for_a_student_equal_to_its_teacher_on_the_same_input():
    m = _net()
    hr = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lr = sr.upsample(data.degrade(hr, 4, generator=torch.Generator().manual_seed(1)), 4)
    assert sr.scale_distill_loss(m, m, hr, lr, lr, generator=torch.Generator().manual_seed(2)) == 0
    lr2 = sr.upsample(data.degrade(hr, 2, generator=torch.Generator().manual_seed(1)), 2)
    assert sr.scale_distill_loss(m, m, hr, lr, lr2, generator=torch.Generator().manual_seed(2)) > 0


def test_feature_distance_is_zero_on_identical_images_and_grows_with_blur():
    x = data.image_patches(4, size=32, image="camera", generator=torch.Generator().manual_seed(0))
    assert torch.equal(sr.feature_distance(x, x), torch.zeros(4))
    up = sr.upsample(F.avg_pool2d(x, 2), 2)
    up4 = sr.upsample(F.avg_pool2d(x, 4), 4)
    assert (sr.feature_distance(up4, x) > sr.feature_distance(up, x)).all()


def test_train_sr_models_is_deterministic_and_loads():
    cfg = {"part": "sr", "width": 4, "size": 16, "batch": 4, "lr": 1e-3, "steps_teacher": 2, "steps_student": 2,
           "steps_compress": 2, "keep": 0.5, "adversarial": 0.1, "steps_pasd": 2}
    a, log = sr.train_sr_models(cfg, 0)
    b, _ = sr.train_sr_models(cfg, 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    models = sr.load_sr_models(a, log["configs"])
    assert set(models) == {"yonos", "direct", "adcsr", "small"}
    assert models["adcsr"].config["width"] == 2
    p, plog = sr.train_sr_models(dict(cfg, part="pasd"), 0)
    assert set(sr.load_sr_models(p, plog["configs"])) == {"plain", "pasd"}
    with pytest.raises(ValueError, match="part"):
        sr.train_sr_models(dict(cfg, part="x"), 0)


def test_adversarial_term_needs_a_discriminator():
    m = _net()
    hr = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="needs disc="):
        sr.compress_distill_loss(m, m, None, hr, hr, generator=torch.Generator(), adversarial=0.1)
    assert math.isfinite(float(sr.compress_distill_loss(m, m, sr.PatchDiscriminator(4), hr, hr,
                                                        generator=torch.Generator(), adversarial=0.1).detach()))


def test_full_scale_upscale_path_on_config_built_models():
    """The chapter's full-scale cell on a config-built upscaler (UNet with 4 + 3 input channels, noise-level class
    labels, v-prediction; a tiny VAE): one step is one UNet call at the last timestep, turned into x0."""
    import types

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=7, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2, num_class_embeds=64).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, scaling_factor=0.08333).eval()
    pipe = types.SimpleNamespace(unet=unet, vae=vae, scheduler=DDPMScheduler(prediction_type="v_prediction"),
                                 low_res_scheduler=DDPMScheduler(num_train_timesteps=64))
    emb = torch.randn(1, 4, 8)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out1 = sr.upscale(pipe, lr, 1, generator=torch.Generator().manual_seed(2), prompt_embeds=emb)
    out3 = sr.upscale(pipe, lr, 3, generator=torch.Generator().manual_seed(2), prompt_embeds=emb)
    assert out1.shape == out3.shape == (2, 3, 16, 16) and not torch.equal(out1, out3)
    g = torch.Generator().manual_seed(2)
    lvl = torch.full((2,), 20)
    noisy = pipe.low_res_scheduler.add_noise(lr, torch.randn(lr.shape, generator=g), lvl)
    z = torch.randn(2, 4, 8, 8, generator=g)
    ab = pipe.scheduler.alphas_cumprod[999].double()
    with torch.no_grad():
        v = unet(torch.cat([z, noisy], 1), torch.full((2,), 999), encoder_hidden_states=emb.expand(2, 4, 8),
                 class_labels=lvl).sample
        ref = vae.decode((ab.sqrt() * z - (1 - ab).sqrt() * v).float() / 0.08333).sample.clamp(-1, 1)
    torch.testing.assert_close(out1, ref, rtol=1e-4, atol=1e-4)


def test_residual_model_starts_at_bicubic_and_samples_its_residual_state():
    m = sr.SRNet(4, residual=0.13)
    lr_up = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(lr_up.shape, generator=torch.Generator().manual_seed(1))
    # one step of an untrained residual model returns the bicubic image
    torch.testing.assert_close(sr.sample_sr(m, lr_up, 1, noise=noise), lr_up.clamp(-1, 1), rtol=0, atol=1e-6)
    hr = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = (hr - lr_up) / 0.13  # at t = 0 the preconditioned model returns the HR image its state encodes
    torch.testing.assert_close(m(z, lr_up, torch.zeros(2)), hr, rtol=0, atol=1e-5)
    assert sr.prune_srnet(m, 1.0).config["residual"] == 0.13
    assert sr.scale_distill_loss(m, m, hr, lr_up, lr_up, generator=torch.Generator().manual_seed(3)) < 1e-10
    with pytest.raises(ValueError, match="residual must be"):
        sr.SRNet(4, residual=0.0)
