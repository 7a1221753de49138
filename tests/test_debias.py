"""Tests of dmlab.debias (InvDiff, paper 44): the biased data and its exact detector, the invariant loss, the
zero-initialised guidance module, its training (delta only, reproducible) and the SD-shaped full-scale path."""
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tiny_models import tiny_sd_unet

from dmlab import debias as B
from dmlab import samplers, schedules
from dmlab.data import load_digits
from dmlab.denoisers import DiscreteVPDenoiser


def test_detector_is_exact_on_real_and_marked_digits():
    x, y = load_digits("train")
    assert not B.has_mark(x).any()  # no real digit carries the bar
    marked = B.add_mark(x, torch.ones(len(x), dtype=torch.bool))
    assert B.has_mark(marked).all()
    assert torch.equal(marked[:, :, :, B.MARK:], x[:, :, :, B.MARK:])  # nothing else changes


def test_biased_digits_follow_the_rate_and_seed():
    x, y, mark = B.biased_digits(rate=0.9, seed=0)
    assert torch.equal(B.has_mark(x), mark)
    even = y % 2 == 0
    assert abs(float(mark[even].float().mean()) - 0.9) < 0.04
    assert abs(float(mark[~even].float().mean()) - 0.1) < 0.04
    assert abs(float(B.aligned(mark, y).float().mean()) - 0.9) < 0.03
    assert torch.equal(B.biased_digits(rate=0.9, seed=0)[2], mark)
    assert not torch.equal(B.biased_digits(rate=0.9, seed=1)[2], mark)
    _, _, m0 = B.biased_digits(rate=0.0, seed=3)
    assert not m0[even].any() and m0[~even].all()


def test_annotate_and_errors():
    rows = B.annotate(100, 20, seed=1)
    assert rows.shape == (20,) and len(rows.unique()) == 20 and torch.equal(rows, rows.sort().values)
    assert torch.equal(rows, B.annotate(100, 20, seed=1))
    with pytest.raises(ValueError, match="annotated rows"):
        B.annotate(10, 11, seed=0)
    with pytest.raises(ValueError, match="probability"):
        B.biased_digits(rate=1.5)
    with pytest.raises(TypeError, match="bool tensor"):
        B.add_mark(torch.zeros(3, 1, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="exactly one"):
        B.DeltaNet(1)


def test_invariant_loss_values():
    per_row = torch.tensor([1.0, 3.0, 10.0, 0.0])
    groups = torch.tensor([0, 0, 1, 0])
    g = B.group_losses(per_row, groups)
    assert torch.allclose(g, torch.tensor([4.0 / 3, 10.0]))
    assert torch.isclose(B.invariant_loss(per_row, None, 1.0), torch.tensor(3.5))
    assert torch.isclose(B.invariant_loss(per_row, groups, 0.0), g.mean())  # reweighting
    assert torch.isclose(B.invariant_loss(per_row, groups, 2.0), g.mean() + 2 * g.var())
    assert torch.isclose(B.invariant_loss(per_row, torch.zeros(4, dtype=torch.long), 5.0), torch.tensor(3.5))
    with pytest.raises(ValueError, match="lam"):
        B.invariant_loss(per_row, groups, -1.0)


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       num_class_embeds=11, norm_num_groups=4).eval()


def test_zero_delta_is_the_base_and_training_moves_only_the_delta():
    base = _tiny_unet()
    sch = DDPMScheduler(num_train_timesteps=1000)
    D = DiscreteVPDenoiser.from_scheduler(base, sch, n_classes=11)
    delta = B.DeltaNet(1, width=8, n_classes=11)
    Dg = B.with_delta(D, delta)
    x, y = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    assert torch.equal(Dg(x, 2.0, class_labels=y), D(x, 2.0, class_labels=y))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    xs, ys, _ = B.biased_digits()
    rows = B.annotate(len(ys), 40, seed=0)
    grp = B.aligned(B.has_mark(xs[rows]), ys[rows]).long()
    runs = []
    for _ in range(2):
        m = B.EpsWithDelta(base, B.DeltaNet(1, width=8, n_classes=11))
        B.train_delta(m, xs[rows], ys[rows], sch.alphas_cumprod, groups=grp, lam=1.0, steps=3, batch_size=16)
        runs.append(m.delta.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # same seed, same delta
    assert runs[0]["out.weight"].abs().sum() > 0  # the delta moved off zero
    with pytest.raises(TypeError, match="EpsWithDelta"):
        B.train_delta(base, xs[rows], ys[rows], sch.alphas_cumprod, groups=None, lam=0.0, steps=2)


def test_full_scale_path_on_a_config_built_sd_unet():
    """The chapter's SD 1.5 cell: a text-conditioned DeltaNet on a UNet2DConditionModel, trained a few steps with
    groups and encoder_hidden_states, then sampled through with_delta."""
    unet = tiny_sd_unet()
    sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    D = DiscreteVPDenoiser.from_scheduler(unet, sch)
    delta = B.DeltaNet(4, width=8, cond_dim=8)
    g = torch.Generator().manual_seed(0)
    lat, text = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    Dg = B.with_delta(D, delta)
    assert torch.equal(Dg(lat, 3.0, encoder_hidden_states=text), D(lat, 3.0, encoder_hidden_states=text))
    m = Dg.model
    res = B.train_delta(m, lat, text, sch.alphas_cumprod, groups=torch.tensor([0, 0, 1, 1]), lam=1.0, steps=2,
                        batch_size=4, cond_key="encoder_hidden_states")
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    sig = schedules.discrete(4, D.sigmas_train, steps_offset=1)
    with torch.no_grad():
        out = samplers.sample_euler(Dg, lat * sig[0], sig, cond={"encoder_hidden_states": text})
    assert out.shape == lat.shape and torch.isfinite(out).all()


def test_zoo_entry_holds_one_trained_module_per_method_and_draw():
    from dmlab import zoo

    deltas = zoo.load("invdiff_deltas")
    cfg = zoo.get_recipe("invdiff_deltas").model
    assert sorted(deltas) == sorted(f"{m}_s{s}" for m in cfg["methods"] for s in cfg["draws"])
    assert all(isinstance(d, B.DeltaNet) and d.out.weight.abs().sum() > 0 for d in deltas.values())
    assert zoo.get_recipe("bias_full").extra["bias"] == {"rate": cfg["rate"], "seed": cfg["data_seed"]}


def test_grouper_separates_rows_by_their_loss_without_labels():
    """infer_groups on a 'model' whose error is larger on half of the rows puts those rows in one group."""
    y = torch.arange(40) % 2
    x = torch.zeros(40, 1, 4, 4)

    def model(xt, t, class_labels):  # eps-prediction off by 2 on the rows with label 1
        return torch.zeros_like(xt) + 2.0 * class_labels.float().view(-1, 1, 1, 1)

    ac = torch.linspace(0.99, 0.01, 100)
    g = B.infer_groups(model, x, y, ac, draws=4, steps=200)
    assert g.shape == (40,) and (torch.equal(g, y) or torch.equal(g, 1 - y))
    with pytest.raises(ValueError, match="n_groups"):
        B.infer_groups(model, x, y, ac, n_groups=1)
