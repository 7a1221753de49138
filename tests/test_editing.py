"""dmlab.editing (SDEdit, SINE's model guidance, drag guidance) and dmlab.watermark."""
import pytest
import torch

from dmlab import editing, schedules
from dmlab import watermark as wm
from dmlab.denoisers import cfg
from dmlab.exact import GaussianDenoiser
from dmlab.hooks import capture
from dmlab.samplers import sample_euler
from tiny_models import tiny_sd_unet


class TinyNet(torch.nn.Module):
    """A class-conditional conv denoiser with a named feature block (stands in for a UNet)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.block = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.out = torch.nn.Conv2d(4, 1, 3, padding=1)
        self.emb = torch.nn.Embedding(11, 4)
        for p in self.parameters():
            p.data = 0.3 * torch.randn(p.shape, generator=g)

    def forward(self, x, sigma, class_labels):
        h = torch.tanh(self.block(x / (1 + sigma.view(-1, 1, 1, 1)) + 0) + self.emb(class_labels)[..., None, None])
        return self.out(h)


def _den(net):
    def d(x, sigma, class_labels):
        return net(x, sigma if torch.is_tensor(sigma) and sigma.ndim else torch.full((x.shape[0],), float(sigma)),
                   class_labels)
    return d


def test_model_guidance_reduces_to_cfg_and_to_the_finetuned_model():
    pre, ft = TinyNet(), TinyNet()
    for p in ft.parameters():
        p.data += 0.1
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    c = {"class_labels": torch.tensor([1, 2, 3])}
    nul, src = {"class_labels": torch.full((3,), 10)}, {"class_labels": torch.full((3,), 4)}
    with torch.no_grad():
        plain = cfg(_den(pre), 2.0, nul)(x, torch.full((3,), 5.0), **c)
        mg0 = editing.model_guidance(_den(pre), _den(ft), scale=2.0, v=0.0, source_cond=src, null_cond=nul)
        assert torch.equal(mg0(x, torch.full((3,), 5.0), **c), plain) and mg0.calls == 2
        mg1 = editing.model_guidance(_den(pre), _den(ft), scale=1.0, v=1.0, source_cond=src, null_cond=nul,
                                     sigma_switch=1.0)
        torch.testing.assert_close(mg1(x, torch.full((3,), 5.0), **c), _den(ft)(x, torch.full((3,), 5.0), **src))
        assert mg1.calls == 3
        below = mg1(x, torch.full((3,), 0.5), **c)  # below the switch: the pretrained model only
        torch.testing.assert_close(below, _den(pre)(x, torch.full((3,), 0.5), **c))
    with pytest.raises(ValueError, match="v must be in"):
        editing.model_guidance(_den(pre), _den(ft), scale=2.0, v=1.5, source_cond=src, null_cond=nul)
    with pytest.raises(TypeError, match="dicts"):
        editing.model_guidance(_den(pre), _den(ft), scale=2.0, v=0.5, source_cond=4, null_cond=nul)


def test_sdedit_exact_gaussian():
    """SDEdit at a tiny strength returns (nearly) the source; from sigma_max it forgets it."""
    d = GaussianDenoiser(torch.zeros(4), 0.3, shape=(1, 2, 2))
    x0 = torch.full((2, 1, 2, 2), 0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    near = editing.sdedit(d, x0, schedules.karras(5, 1e-4, 1e-3), generator=g)
    assert (near - x0).abs().max() < 1e-2
    with pytest.raises(ValueError, match="ending in 0"):
        editing.sdedit(d, x0, torch.tensor([1.0, 0.5]), generator=g)
    with pytest.raises(TypeError, match="generator"):
        editing.sdedit(d, x0, schedules.karras(5, 0.01, 1.0), generator=0)


def test_shift_and_centroid():
    x = -torch.ones(1, 1, 8, 8)
    x[..., 2:5, 2:4] = 1
    y = editing.shift_image(x, 1, 2)
    assert torch.equal(y[..., 3:6, 4:6], torch.ones(1, 1, 3, 2)) and float(y.sum()) == float(x.sum())
    torch.testing.assert_close(editing.ink_centroid(y) - editing.ink_centroid(x), torch.tensor([[1.0, 2.0]]))


def test_drag_guidance_noop_hooks_and_energy():
    net = TinyNet()
    den = _den(net)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    c = {"class_labels": torch.tensor([1, 2])}
    tgt = torch.zeros(2, 1, 8, 8)
    tgt[..., 2:6, 3:7] = 1

    def ref_fn(sigma):
        with torch.no_grad(), capture(net, ["block"]) as cap:
            den(x, sigma, **c)
        return cap["block"]

    s = torch.full((2,), 2.0)
    kw = dict(target=tgt, keep=1 - tgt, shift=(0, 1))
    with torch.no_grad():
        base = den(x, s, **c)
    assert torch.equal(editing.DragGuidance(den, net, "block", ref_fn, scale=0.0, **kw)(x, s, **c), base)
    guided = editing.DragGuidance(den, net, "block", ref_fn, scale=1.0, **kw)(x, s, **c)
    assert not torch.equal(guided, base) and torch.isfinite(guided).all()
    # one unit-RMS gradient times scale * sigma
    torch.testing.assert_close((guided - base).pow(2).flatten(1).mean(1).sqrt(), torch.full((2,), 2.0))
    assert not net.block._forward_hooks  # no hooks left behind
    f = ref_fn(s)
    e = editing.drag_energy(f, f, tgt, 1 - tgt, (0, 0))
    torch.testing.assert_close(e, torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="whole number"):
        editing.drag_energy(f[..., ::2, ::2], f[..., ::2, ::2], tgt, 1 - tgt, (0, 1))
    with pytest.raises(ValueError, match="scale"):
        editing.DragGuidance(den, net, "block", ref_fn, scale=-1.0, **kw)


def test_sample_drag_ode_matches_euler_and_region_sde():
    d = GaussianDenoiser(torch.zeros(4), 0.3, shape=(1, 2, 2))
    sig = schedules.karras(6, 0.01, 5.0)
    x = 5.0 * torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(editing.sample_drag(d, x, sig), sample_euler(d, x, sig))
    region = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    region[..., 0, 0] = 1
    out = editing.sample_drag(d, x, sig, region=region, eta=1.0, generator=torch.Generator().manual_seed(1))
    ode = sample_euler(d, x, sig)
    # d is diagonal: outside the region the trajectory is the ODE's exactly
    torch.testing.assert_close(out[..., 1, :], ode[..., 1, :])
    assert not torch.allclose(out[..., 0, 0], ode[..., 0, 0])
    with pytest.raises(TypeError, match="generator"):
        editing.sample_drag(d, x, sig, eta=0.5)


def test_noise_watermark_roundtrip_exact_inversion():
    bits = wm.random_bits(5, 4, generator=torch.Generator().manual_seed(0))
    z = wm.embed_noise(bits, (1, 4, 4), key=3, generator=torch.Generator().manual_seed(1))
    assert z.shape == (5, 1, 4, 4)
    d = GaussianDenoiser(torch.zeros(16), 0.5, shape=(1, 4, 4))
    sig = schedules.karras(40, 0.01, 20.0)
    x = sample_euler(d, z.double() * 20.0, sig)
    read = wm.extract_noise(d, x, sig, 4, key=3)
    assert torch.equal(read, bits)
    assert float(wm.bit_accuracy(wm.extract_noise(d, x, sig, 4, key=4), bits).mean()) < 1.0  # wrong key
    with pytest.raises(ValueError, match="dividing"):
        wm.group_layout((1, 4, 4), 5, key=0)


def test_additive_watermark_attacks_and_psnr():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(20, 1, 8, 8)
    bits = wm.random_bits(20, 4, generator=g)
    xa = wm.embed_additive(x, bits, alpha=0.1, key=1)
    torch.testing.assert_close(xa.pow(2).mean().sqrt(), torch.tensor(0.1), rtol=0.05, atol=0)
    assert torch.equal(wm.extract_additive(xa, 4, key=1), bits)
    torch.testing.assert_close(wm.psnr(x + 0.02, x), torch.full((20,), 40.0, dtype=torch.float64))
    img = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    assert (wm.jpeg_like(img, 100) - img).abs().max() < 2 / 255 + 1e-6
    assert (wm.jpeg_like(img, 10) - img).abs().max() > 0.05
    for a in wm.ATTACKS:
        assert wm.attack(img, a, generator=g).shape == img.shape
    with pytest.raises(ValueError, match="unknown attack"):
        wm.attack(img, "rotate", generator=g)
    with pytest.raises(ValueError, match="8x8"):
        wm.jpeg_like(torch.zeros(1, 1, 4, 4))


def test_full_scale_path_on_a_config_built_sd_unet():
    """The full-scale paths on a config-built UNet2DConditionModel: the sign-of-noise mark through sd_guided and
    extract_noise, SINE's model guidance and the drag guidance on a decoder block."""
    import types

    from diffusers import DDPMScheduler

    from dmlab.denoisers import DiscreteVPDenoiser
    from dmlab.samplers.fullscale import sd_guided

    unet = tiny_sd_unet()
    emb = {p: torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(len(p))) for p in ("", "a corgi")}
    pipe = types.SimpleNamespace(unet=unet, scheduler=DDPMScheduler(), encode_prompt=lambda ps, d, n, c, neg: (
        torch.cat([emb[p] for p in ps]), torch.cat([emb[p] for p in neg])))
    guided, cond, smin, smax, shape = sd_guided(pipe, ["a corgi"] * 2, 7.5)
    g = torch.Generator().manual_seed(0)
    bits = wm.random_bits(2, 16, generator=g)
    z = wm.embed_noise(bits, shape[1:], key=0, generator=g)
    sig = schedules.karras(4, smin, smax, dtype=torch.float32)
    lat = sample_euler(guided, z * smax, sig, cond=cond)
    den = DiscreteVPDenoiser.from_scheduler(unet, pipe.scheduler)
    empty = {"encoder_hidden_states": emb[""].expand(2, -1, -1)}
    read = wm.extract_noise(den, lat, sig, 16, key=0, cond=empty)
    assert read.shape == (2, 16) and set(read.unique().tolist()) <= {0, 1}
    x, s = lat, torch.full((2,), 3.0)
    with torch.no_grad():
        mg = editing.model_guidance(den, den, scale=7.5, v=0.0, source_cond=cond, null_cond=empty)
        torch.testing.assert_close(mg(x, s, **cond), cfg(den, 7.5, empty)(x, s, **cond))

    def ref_fn(sigma):
        with torch.no_grad(), capture(unet, ["up_blocks.1"]) as cap:
            den(lat, sigma, **cond)
        return cap["up_blocks.1"]

    m = torch.zeros(2, 1, 8, 8)
    m[..., 2:5, 2:5] = 1
    dg = editing.DragGuidance(den, unet, "up_blocks.1", ref_fn, target=m, keep=1 - m, shift=(0, 1), scale=0.5)
    out = dg(x, s, **cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
