"""capture() and extract_features() on config-built (random) diffusers and transformers models."""
import pytest
import torch

from dmlab import schedules
from dmlab.denoisers import DiscreteVPDenoiser
from dmlab.probes import capture, extract_features, vit_features
from dmlab.probes.capture import tokens_to_grid

AC = torch.cumprod(1 - schedules.betas_for(1000), 0)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def cond_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=4, norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_type="ada_norm_zero").eval()


def test_capture_records_and_leaves_no_hooks(unet, gen):
    x = torch.randn(2, 1, 8, 8, generator=gen)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ref = unet(x, t).sample
        with capture(unet, ["down_blocks.0", "mid_block", "up_blocks.1"]) as cap:
            assert _hooks(unet) == 3
            out = unet(x, t).sample
        assert _hooks(unet) == 0 and not cap.active
    assert torch.equal(out, ref)  # bit-identical
    # down blocks return (hidden, res_samples): the hidden state is recorded
    assert cap["down_blocks.0"].shape == (2, 16, 4, 4)
    assert cap["mid_block"].shape == (2, 32, 4, 4)
    assert cap["up_blocks.1"].shape == (2, 16, 8, 8)
    assert cap.calls == {"down_blocks.0": 1, "mid_block": 1, "up_blocks.1": 1}
    cap.remove()  # idempotent


def test_capture_removes_hooks_on_exception(unet):
    with pytest.raises(RuntimeError, match="boom"):
        with capture(unet, ["mid_block", "conv_out"]):
            assert _hooks(unet) == 2
            raise RuntimeError("boom")
    assert _hooks(unet) == 0
    # an exception inside the model's forward too
    with pytest.raises(Exception):
        with capture(unet, ["mid_block"]), torch.no_grad():
            unet(torch.randn(1, 3, 8, 8), 1)  # wrong channel count
    assert _hooks(unet) == 0


def test_bad_layer_names_suggest_close_matches(unet):
    with pytest.raises(ValueError, match="did you mean 'mid_block'"):
        capture(unet, ["mid_blok"])
    with pytest.raises(ValueError, match="no submodule"):
        capture(unet, ["mid_block", "qqqqqqqqqqqqqqq"])
    assert _hooks(unet) == 0  # nothing registered when one name is wrong
    with pytest.raises(ValueError, match="empty"):
        capture(unet, [])
    with pytest.raises(TypeError, match="nn.Module"):
        capture(DiscreteVPDenoiser(unet, AC), ["mid_block"])


def test_keep_all_records_every_call(unet, gen):
    x = torch.randn(1, 1, 8, 8, generator=gen)
    with capture(unet, "mid_block", keep_all=True) as cap, torch.no_grad():
        unet(x, 1)
        unet(x, 900)
    assert cap.calls["mid_block"] == 2 and len(cap.history["mid_block"]) == 2
    assert not torch.equal(cap.history["mid_block"][0], cap.history["mid_block"][1])
    assert torch.equal(cap["mid_block"], cap.history["mid_block"][1])


def test_extract_features_unet_ensemble(unet, gen):
    d = DiscreteVPDenoiser(unet, AC)
    x0 = torch.randn(3, 1, 8, 8, generator=gen)
    f = extract_features(d, unet, x0, 0.5, ["down_blocks.1", "up_blocks.0"], ensemble=4,
                         generator=torch.Generator().manual_seed(1))
    assert f["down_blocks.1"].shape == (3, 32, 4, 4) and f["up_blocks.0"].shape == (3, 32, 8, 8)
    assert _hooks(unet) == 0
    # batched ensemble == loop over draws, and == the mean of single draws by hand
    f2 = extract_features(d, unet, x0, 0.5, ["down_blocks.1"], ensemble=4, generator=torch.Generator().manual_seed(1),
                          batch_ensemble=False)
    torch.testing.assert_close(f["down_blocks.1"], f2["down_blocks.1"], rtol=1e-5, atol=1e-5)
    eps = torch.randn((4, *x0.shape), generator=torch.Generator().manual_seed(1))
    by_hand = 0
    for e in range(4):
        with capture(unet, ["down_blocks.1"]) as cap, torch.no_grad():
            d(x0 + 0.5 * eps[e], torch.full((3,), 0.5))
        by_hand = by_hand + cap["down_blocks.1"] / 4
    torch.testing.assert_close(f["down_blocks.1"], by_hand, rtol=1e-5, atol=1e-5)
    # sigma = 0 reads the clean input: deterministic, no noise used
    a = extract_features(d, unet, x0, 0.0, ["mid_block"], generator=torch.Generator().manual_seed(5))
    b = extract_features(d, unet, x0, 0.0, ["mid_block"], generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["mid_block"], b["mid_block"])


def test_extract_features_errors(unet):
    d = DiscreteVPDenoiser(unet, AC)
    x0 = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="ensemble"):
        extract_features(d, unet, x0, 0.5, ["mid_block"], ensemble=0)
    with pytest.raises(ValueError, match="non-negative"):
        extract_features(d, unet, x0, -0.1, ["mid_block"])
    with pytest.raises(ValueError, match="shape"):
        extract_features(d, unet, x0, torch.ones(3), ["mid_block"])
    with pytest.raises(ValueError, match="did you mean"):
        extract_features(d, unet, x0, 0.5, ["midblock"])
    with pytest.raises(TypeError, match="Generator"):
        extract_features(d, unet, x0, 0.5, ["mid_block"], generator=0)
    assert _hooks(unet) == 0


def test_extract_features_conditional_unet_with_prompts(cond_unet, gen):
    d = DiscreteVPDenoiser(cond_unet, AC)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    emb = torch.randn(2, 5, 12, generator=gen)
    f = extract_features(d, cond_unet, x0, 1.0, ["up_blocks.0", "up_blocks.1"], ensemble=2, generator=gen,
                         cond={"encoder_hidden_states": emb})
    assert f["up_blocks.0"].shape == (2, 32, 8, 8) and f["up_blocks.1"].shape == (2, 16, 8, 8)
    g1 = extract_features(d, cond_unet, x0, 1.0, ["up_blocks.1"], generator=torch.Generator().manual_seed(0),
                          cond={"encoder_hidden_states": emb})
    g2 = extract_features(d, cond_unet, x0, 1.0, ["up_blocks.1"], generator=torch.Generator().manual_seed(0),
                          cond={"encoder_hidden_states": emb.flip(0)})
    assert not torch.allclose(g1["up_blocks.1"], g2["up_blocks.1"])  # the prompt reaches the features
    assert _hooks(cond_unet) == 0


def test_extract_features_dit_tokens_become_a_grid(dit, gen):
    d = DiscreteVPDenoiser(dit, AC)
    x0 = torch.randn(2, 1, 8, 8, generator=gen)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        ref = dit(x0, timestep=torch.tensor([3, 3]), class_labels=labels).sample
        with capture(dit, ["transformer_blocks.1"]) as cap:
            out = dit(x0, timestep=torch.tensor([3, 3]), class_labels=labels).sample
    assert torch.equal(ref, out) and cap["transformer_blocks.1"].shape == (2, 16, 16)
    f = extract_features(d, dit, x0, 0.3, ["transformer_blocks.1"], ensemble=3, generator=gen,
                         cond={"class_labels": labels})
    assert f["transformer_blocks.1"].shape == (2, 16, 4, 4)  # D x (8/2) x (8/2)
    assert _hooks(dit) == 0


def test_tokens_to_grid_order():
    tok = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)  # 1 prefix + 2x3 grid, D = 3
    g = tokens_to_grid(tok, 2, 3, n_prefix=1)
    assert g.shape == (2, 3, 2, 3)
    assert torch.equal(g[:, :, 1, 2], tok[:, 6])  # row-major patches after the prefix
    with pytest.raises(ValueError, match="grid"):
        tokens_to_grid(tok, 3, 3)


def test_vit_features_dinov2_from_config(gen):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                     patch_size=4, image_size=16)).eval()
    x = torch.randn(2, 3, 16, 12, generator=gen)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    f = vit_features(model, x, ["encoder.layer.1", "layernorm"])
    assert f["encoder.layer.1"].shape == (2, 16, 4, 3)
    torch.testing.assert_close(f["layernorm"], tokens_to_grid(ref, 4, 3, n_prefix=1))
    assert _hooks(model) == 0
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit_features(model, torch.zeros(1, 3, 15, 16), ["layernorm"])
