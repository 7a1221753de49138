"""dmlab.dense: Lotus / Marigold-style / StableNormal / PrimeDepth pieces on exact rendered scenes."""
import pytest
import torch

from dmlab import dense, scenes
from tiny_models import tiny_sd_unet


class _Oracle(torch.nn.Module):
    """eps-network that knows the answer y: eps(x, t) = (x - sqrt(a_t) y) / sqrt(1 - a_t)."""

    def __init__(self, y):
        super().__init__()
        self.y, self.ac = y, dense._alphas_cumprod()

    def forward(self, image, x, t, task=None):
        a = self.ac[t][:, None, None, None]
        return (x - a.sqrt() * self.y) / (1 - a).sqrt()


def test_ddim_and_refine_recover_the_answer_of_an_exact_eps_model():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 4, 8, 8, generator=g) * 2 - 1
    img = torch.zeros(2, 3, 8, 8)
    for steps in (1, 3, 10):
        out = dense.sample_eps(_Oracle(y), img, steps, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, y, atol=1e-4, rtol=1e-4)
    out = dense.refine_from(_Oracle(y), img, torch.zeros_like(y), 400, 3, generator=g)
    torch.testing.assert_close(out, y, atol=1e-4, rtol=1e-4)


def test_training_is_seeded_and_methods_differ():
    b = scenes.render_scenes(16, generator=torch.Generator().manual_seed(0), size=16)
    y = dense.dense_targets(b)
    assert y.shape == (16, 4, 16, 16) and y[:, 0].amin() == -1 and y[:, 0].amax() == 1
    kw = dict(steps=3, batch=4, lr=1e-3, width=8)
    n1, r1 = dense.train_dense("lotus", b.image, y, generator=torch.Generator().manual_seed(3), **kw)
    n2, _ = dense.train_dense("lotus", b.image, y, generator=torch.Generator().manual_seed(3), **kw)
    n3, _ = dense.train_dense("eps", b.image, y, generator=torch.Generator().manual_seed(3), **kw)
    for (k, p), q in zip(n1.state_dict().items(), n2.state_dict().values()):
        assert torch.equal(p, q), k
    assert not torch.equal(n1.out.weight, n3.out.weight)
    assert len(r1.losses) == 3
    p = dense.predict_x0(n1, b.image)
    assert p.shape == (16, 4, 16, 16) and torch.equal(p, dense.predict_x0(n1, b.image))
    state = {f"{m}.{k}": v for m, n in (("x0", n1), ("eps", n3)) for k, v in n.state_dict().items()}
    nets = dense.load_dense_suite(state, {"width": 8})
    assert set(nets) == {"x0", "eps"} and torch.equal(nets["x0"](b.image, torch.zeros_like(y), torch.zeros(16)),
                                                      n1(b.image, torch.zeros_like(y), torch.zeros(16)))


def test_metrics_are_exact():
    b = scenes.render_scenes(4, generator=torch.Generator().manual_seed(1), size=8)
    perfect = torch.cat([0.5 * b.depth - 3, b.normal], 1)
    torch.testing.assert_close(dense.depth_absrel(perfect, b.depth), torch.zeros(4, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    torch.testing.assert_close(dense.normal_angle(perfect, b.normal), torch.zeros(4, dtype=torch.float64),
                               atol=0.05, rtol=0)  # float32 normals: acos near 1
    ortho = torch.cat([b.depth, torch.linalg.cross(b.normal, torch.randn_like(b.normal), dim=1)], 1)
    torch.testing.assert_close(dense.normal_angle(ortho, b.normal), torch.full((4,), 90.0, dtype=torch.float64))


def test_preimage_on_a_config_built_sd_unet_and_refiner():
    from dmlab.denoisers import DiscreteVPDenoiser

    unet = tiny_sd_unet(attention_head_dim=4)
    D = DiscreteVPDenoiser(unet, dense._alphas_cumprod())
    lat = torch.randn(3, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(3, 2, 8)}
    f = dense.preimage(D, unet, lat, ["up_blocks.0", "up_blocks.1"], sigma=0.05, cond=cond,
                       generator=torch.Generator().manual_seed(0), size=8)
    assert f.shape == (3, 16 + 8, 8, 8)
    assert not any(m._forward_hooks for m in unet.modules())  # the probe left nothing behind
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    net, res = dense.train_refiner(img, f, torch.zeros(3, 4, 16, 16), steps=2, batch=2, lr=1e-3,
                                   generator=torch.Generator().manual_seed(0), width=8)
    assert net(img, f).shape == (3, 4, 16, 16) and len(res.losses) == 2


def test_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        dense.train_dense("v", torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, 8, 8), steps=1, batch=1, lr=1e-3,
                          generator=torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        dense.sample_eps(dense.DenseNet(width=8), torch.zeros(1, 3, 8, 8), 2, generator=None)
    with pytest.raises(ValueError, match="steps must be"):
        dense.sample_eps(dense.DenseNet(width=8), torch.zeros(1, 3, 8, 8), 0, generator=torch.Generator())
    with pytest.raises(ValueError, match="depth \\+ normal"):
        dense.split_targets(torch.zeros(1, 3, 4, 4))


def test_fit_intrinsics_recovers_K_exactly_and_robustly():
    K = scenes.intrinsics(torch.tensor([25.0, 40.0]), torch.tensor([15.0, 17.5]), torch.tensor([16.5, 14.0]),
                          fy=torch.tensor([26.0, 39.0]))
    cam = scenes.incidence_map(K, 32)
    want = torch.stack([K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]], 1)
    torch.testing.assert_close(dense.fit_intrinsics(cam), want)
    g = torch.Generator().manual_seed(0)
    bad = cam.clone()
    mask = torch.rand(2, 1, 32, 32, generator=g) < 0.2  # 20 % gross outliers
    bad = torch.where(mask, torch.rand(bad.shape, generator=g) - 0.5, bad)
    rough = dense.fit_intrinsics(bad)
    robust = dense.fit_intrinsics(bad, generator=torch.Generator().manual_seed(1))
    assert (robust - want).abs().max() < 0.01 and (rough - want).abs().max() > 1.0


class _CamOracle(torch.nn.Module):
    """A 'camera' calibration net that outputs the exact camera image of known intrinsics."""

    def __init__(self, K):
        super().__init__()
        self.K, self.out = K, torch.nn.Conv2d(1, 2, 1)

    def forward(self, image, x_t, t, task=None):
        return scenes.incidence_map(self.K, image.shape[-1]).float()


def test_predict_intrinsics_reads_an_exact_camera_image_back():
    K = scenes.intrinsics(torch.tensor([30.0, 45.0]), torch.tensor([15.0, 17.0]), torch.tensor([17.5, 14.5]))
    img = torch.zeros(2, 3, 32, 32)
    got = dense.predict_intrinsics(_CamOracle(K), "camera", img, generator=torch.Generator().manual_seed(0))
    want = torch.stack([K[:, 0, 0], K[:, 0, 2], K[:, 1, 2]], 1)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(dense._k_decode(dense._k_code(K, 32), 32), want, atol=1e-4, rtol=0)


def test_train_calib_is_seeded_and_checked():
    b = scenes.render_scenes(16, generator=torch.Generator().manual_seed(0), size=16)
    kw = dict(steps=3, batch=4, lr=1e-3, width=8)
    n1, _ = dense.train_calib("camera", b.image, b.K, generator=torch.Generator().manual_seed(2), **kw)
    n2, _ = dense.train_calib("camera", b.image, b.K, generator=torch.Generator().manual_seed(2), **kw)
    for a, c in zip(n1.state_dict().values(), n2.state_dict().values()):
        assert torch.equal(a, c)
    r, _ = dense.train_calib("regress", b.image, b.K, generator=torch.Generator().manual_seed(2), **kw)
    assert dense.predict_camera_image(n1, b.image).shape == (16, 2, 16, 16)
    assert dense.predict_intrinsics(r, "regress", b.image).shape == (16, 3)
    suite = dense.load_calib_suite({**{f"camera.{k}": v for k, v in n1.state_dict().items()},
                                    **{f"regress.{k}": v for k, v in r.state_dict().items()}}, {"width": 8})
    assert torch.equal(suite["camera"](b.image, b.image[:, :0], torch.zeros(16, dtype=torch.long)),
                       n1(b.image, b.image[:, :0], torch.zeros(16, dtype=torch.long)))
    with pytest.raises(ValueError, match="camera"):
        dense.train_calib("diffusion", b.image, b.K, generator=torch.Generator(), **kw)
    with pytest.raises(ValueError, match="K must be"):
        dense.train_calib("camera", b.image, b.K[:3], generator=torch.Generator(), **kw)
    with pytest.raises(TypeError, match="Generator"):
        dense.train_calib("camera", b.image, b.K, generator=0, **kw)
    with pytest.raises(ValueError, match="2 output channels"):
        dense.predict_camera_image(r, b.image)
