"""dmlab.dense, DiffMatch (paper 78): correlation matching, flow diffusion, end-point error, full-scale path."""
import pytest
import torch

from dmlab import dense, scenes
from tiny_models import tiny_sd_unet


def _texture(n=2, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("du,dv", [(0, 0), (-3, 2), (4, -4), (1, 3)])
def test_correlation_argmax_is_exact_on_a_pure_translation(du, dv):
    x = _texture()
    y = torch.roll(x, shifts=(dv, du), dims=(2, 3))  # view 2 = view 1 moved by (du, dv): flow is (du, dv)
    c = dense.cost_volume(dense.patch_features(x), dense.patch_features(y), 4)
    assert c.shape == (2, 81, 24, 24)
    f = dense.argmax_flow(c, 4)
    inner = f[:, :, 6:-6, 6:-6]  # away from the wrap-around seam and the zero padding
    assert torch.equal(inner[:, 0], torch.full_like(inner[:, 0], du))
    assert torch.equal(inner[:, 1], torch.full_like(inner[:, 1], dv))
    # the cost at the true displacement is the descriptor's squared norm / sqrt(C): the self-correlation
    j = dense.displacements(4).tolist().index([du, dv])
    fx = dense.patch_features(x)
    torch.testing.assert_close(c[:, j, 6:-6, 6:-6], (fx * fx).sum(1)[:, 6:-6, 6:-6] / fx.shape[1] ** 0.5)


def test_argmax_ties_stay_put_and_condition_layout():
    flat = torch.full((1, 3, 12, 12), 0.3)
    c = dense.cost_volume(dense.patch_features(flat), dense.patch_features(flat), 2)
    inner = (..., slice(3, -3), slice(3, -3))  # every compared patch lies inside the image (no zero padding)
    assert c[inner].abs().max() < 1e-6  # a constant patch has an (almost) zero descriptor
    assert torch.equal(dense.argmax_flow(c, 2)[inner], torch.zeros(1, 2, 6, 6))
    d = dense.displacements(1)
    assert d.tolist() == [[-1, -1], [0, -1], [1, -1], [-1, 0], [0, 0], [1, 0], [-1, 1], [0, 1], [1, 1]]
    x = _texture(1, 16)
    y = torch.roll(x, shifts=(1, 2), dims=(2, 3))
    cond = dense.match_condition(x, dense.patch_features(x), dense.patch_features(y), 3)
    assert cond.shape == (1, dense.condition_channels(3), 16, 16) == (1, 3 + 49 + 2, 16, 16)
    assert torch.equal(cond[:, :3], x)
    assert cond[0, -2:, 8, 8].tolist() == [2 / dense.FLOW_SCALE, 1 / dense.FLOW_SCALE]


class _Oracle(torch.nn.Module):
    """x0-network that knows the (scaled) flow y and ignores its inputs."""

    def __init__(self, y):
        super().__init__()
        self.y = y

    def forward(self, cond, x, t, task=None):
        return self.y.expand_as(x)


def test_sampler_returns_the_answer_of_an_exact_x0_model():
    y = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5
    cond = torch.zeros(2, 5, 8, 8)
    for steps in (1, 2, 5):
        out = dense.sample_flow(_Oracle(y), cond, steps, generator=torch.Generator().manual_seed(1), samples=2)
        torch.testing.assert_close(out, y * dense.FLOW_SCALE)
    torch.testing.assert_close(dense.regress_flow(_Oracle(y), cond), y * dense.FLOW_SCALE)


def test_endpoint_error_is_exact():
    flow = torch.zeros(2, 2, 4, 4)
    pred = torch.zeros(2, 2, 4, 4)
    pred[0, 0] = 3.0
    pred[0, 1] = 4.0  # |(3, 4)| = 5 everywhere in pair 0
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[1, :, :2] = False
    pred[1, 0, :2] = 100.0  # masked out
    torch.testing.assert_close(dense.endpoint_error(pred, flow, mask), torch.tensor([5.0, 0.0], dtype=torch.float64))


def test_training_is_seeded_and_the_suite_round_trips():
    cfg = {"seed": 0, "n_train": 8, "data_seed": 1, "size": 16, "p_flat": 0.4, "patch": 3, "radius": 2,
           "steps": 3, "batch": 4, "lr": 1e-3, "width": 8}
    b, cond = dense.match_data(8, cfg, torch.Generator().manual_seed(1))
    assert cond.shape == (8, dense.condition_channels(2), 16, 16) and b.flow.shape == (8, 2, 16, 16)
    s1, log = dense.train_match_suite(cfg)
    s2, _ = dense.train_match_suite(cfg, cond, b.flow)  # the same pairs passed in: the same weights
    assert set(log) == set(dense.MATCH_METHODS)
    for k, v in s1.items():
        assert torch.equal(v, s2[k]), k
    assert not torch.equal(s1["diffusion.out.weight"], s1["regress.out.weight"])
    nets = dense.load_match_suite(s1, cfg)
    p = dense.match_predictions(nets, cond, 2, 2, generator=torch.Generator().manual_seed(0))
    assert {k: v.shape for k, v in p.items()} == {k: (8, 2, 16, 16) for k in ("argmax", "regress", "diffusion")}
    q = dense.match_predictions(nets, cond, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p["diffusion"], q["diffusion"])
    assert torch.equal(p["argmax"], dense.argmax_flow(cond[:, 3:-2], 2))


def test_errors():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="method must be one of"):
        dense.train_matcher("eps", torch.zeros(2, 5, 8, 8), torch.zeros(2, 2, 8, 8), steps=1, batch=1, lr=1e-3,
                            generator=torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        dense.train_matcher("regress", torch.zeros(2, 5, 8, 8), torch.zeros(2, 2, 8, 8), steps=1, batch=1,
                            lr=1e-3, generator=None)
    with pytest.raises(ValueError, match="must pair up"):
        dense.train_matcher("regress", torch.zeros(2, 5, 8, 8), torch.zeros(3, 2, 8, 8), steps=1, batch=1,
                            lr=1e-3, generator=torch.Generator())
    with pytest.raises(ValueError, match="odd int"):
        dense.patch_features(x, 4)
    with pytest.raises(ValueError, match="radius must be"):
        dense.displacements(-1)
    with pytest.raises(ValueError, match="one shape"):
        dense.cost_volume(x, torch.zeros(1, 3, 8, 9), 1)
    with pytest.raises(ValueError, match="radius 2"):
        dense.argmax_flow(torch.zeros(1, 9, 8, 8), 2)
    with pytest.raises(ValueError, match="steps must be"):
        dense.sample_flow(_Oracle(torch.zeros(1, 2, 8, 8)), torch.zeros(1, 5, 8, 8), 0, generator=torch.Generator())
    with pytest.raises(ValueError, match="empty mask"):
        dense.endpoint_error(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4, dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        dense.endpoint_error(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="both cond and flow"):
        dense.train_match_suite({}, cond=torch.zeros(1, 5, 4, 4))


def test_full_scale_path_on_a_config_built_sd_unet():
    """The chapter's full-scale cell: frozen SD-UNet features of both views (dense.preimage), their cost volume
    and argmax flow as the condition, then both matchers trained and sampled by the same code."""
    from dmlab.denoisers import DiscreteVPDenoiser

    unet = tiny_sd_unet(attention_head_dim=4)
    D = DiscreteVPDenoiser(unet, dense._alphas_cumprod())
    lat1 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    lat2 = torch.roll(lat1, shifts=(0, 1), dims=(2, 3))
    cond_txt = {"encoder_hidden_states": torch.zeros(4, 2, 8)}
    feats = [torch.nn.functional.normalize(
        dense.preimage(D, unet, lat, ["up_blocks.1"], sigma=0.05, cond=cond_txt,
                       generator=torch.Generator().manual_seed(0), size=8), dim=1) for lat in (lat1, lat2)]
    img = torch.zeros(4, 3, 8, 8)
    cond = dense.match_condition(img, feats[0], feats[1], 2)
    flow = torch.zeros(4, 2, 8, 8)
    flow[:, 0] = 1.0
    cfg = {"seed": 0, "steps": 2, "batch": 2, "lr": 1e-3, "width": 8, "radius": 2}
    state, _ = dense.train_match_suite(cfg, cond, flow)
    p = dense.match_predictions(dense.load_match_suite(state, cfg), cond, 2, 3,
                                generator=torch.Generator().manual_seed(0))
    assert all(v.shape == (4, 2, 8, 8) and torch.isfinite(v).all() for v in p.values())
    assert not any(m._forward_hooks for m in unet.modules())
