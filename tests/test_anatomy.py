"""dmlab.anatomy on full-size configurations built on the meta device (SD 1.5 / 2.1 UNets, DiT-XL/2) and on the
zoo's tiny models."""
import pytest
import torch

from dmlab import anatomy


def _sd_unet(version: str):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if version == "1.5":
        cfg = dict(cross_attention_dim=768, attention_head_dim=8)
    else:  # 2.1
        cfg = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    with torch.device("meta"):
        return UNet2DConditionModel(**common, **cfg)


def _dit_xl():
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                     num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


@pytest.fixture(scope="module")
def full():
    return {"sd15": _sd_unet("1.5"), "sd21": _sd_unet("2.1"), "dit_xl": _dit_xl()}


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_sd_unets(full, name):
    unet = full[name]
    assert next(unet.parameters()).is_meta
    assert anatomy.kind(unet) == "unet" and anatomy.is_unet(unet) and not anatomy.is_dit(unet)
    blocks = anatomy.unet_blocks(unet)
    assert blocks == {"encoder": [f"down_blocks.{i}" for i in range(4)] + ["mid_block"],
                      "decoder": [f"up_blocks.{i}" for i in range(4)]}
    assert anatomy.stage_modules(unet) == [f"down_blocks.{i}" for i in range(4)] + \
        [f"up_blocks.{i}" for i in range(4)] + ["mid_block"]  # named_modules order
    # SD's 16 transformer blocks: 2 per cross-attention down block (3), 1 in the middle, 3 per up block (3)
    selfs = anatomy.self_attention_names(unet)
    assert len(selfs) == 16 and all(n.endswith("attn1") for n in selfs)
    cross = anatomy.self_attention_names(unet, "*attn2")
    assert len(cross) == 16 and len(anatomy.attention_modules(unet)) == 32
    # every up-block resnet reads [hidden, skip] through a 1x1 shortcut: 3 per up block
    assert len(anatomy.skip_shortcuts(unet)) == 12
    assert anatomy.transformer_blocks(unet) == []
    with pytest.raises(TypeError, match="cannot stop half-way"):
        anatomy.require_dit(unet, "early exit")
    with pytest.raises(TypeError, match="transformer_blocks"):
        anatomy.require_transformer(unet, "TaylorSeer")
    anatomy.require_unet(unet, "DeepCache")


def test_dit_xl(full):
    dit = full["dit_xl"]
    assert anatomy.kind(dit) == "dit" and anatomy.is_transformer(dit) and not anatomy.is_unet(dit)
    blocks = anatomy.transformer_blocks(dit)
    assert [n for n, _ in blocks] == [f"transformer_blocks.{i}" for i in range(28)]
    assert anatomy.stage_modules(dit) == [n for n, _ in blocks]
    assert anatomy.self_attention_names(dit) == [f"transformer_blocks.{i}.attn1" for i in range(28)]
    assert anatomy.skip_shortcuts(dit) == []
    anatomy.require_dit(dit)
    anatomy.require_transformer(dit, "TaylorSeer")
    with pytest.raises(TypeError, match="UNet with down_blocks"):
        anatomy.require_unet(dit, "DeepCache")
    with pytest.raises(TypeError, match="unet_blocks"):
        anatomy.unet_blocks(dit)


def test_zoo_models():
    from dmlab import zoo

    unet, dit = zoo.load("unet_s"), zoo.load("dit_s")
    assert anatomy.kind(unet) == "unet" and anatomy.kind(dit) == "dit"
    b = anatomy.unet_blocks(unet)
    assert b["encoder"][-1] == "mid_block" and len(b["encoder"]) == len(unet.down_blocks) + 1
    assert len(anatomy.transformer_blocks(dit)) == len(dit.transformer_blocks)
    assert len(anatomy.self_attention_names(dit)) == len(dit.transformer_blocks)


def test_granularity_and_lookup():
    assert [anatomy.granularity_of(n) for n in ["mid_block", "up_blocks.1", "up_blocks.1.resnets.0",
                                                 "transformer_blocks.2.attn1", "up_blocks.1.resnets.0.conv1",
                                                 "conv_in"]] == ["block", "block", "layer", "layer", "unit", None]
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="neither"):
        anatomy.kind(lin)
    with pytest.raises(TypeError, match="pipeline"):
        anatomy.resolve_model(object())
    assert "did you mean" in str(anatomy.unknown_name_error("mid_blok", ["mid_block", "conv_in"]))


def test_core_layering():
    """anatomy and hooks are core: they import no accelerator, probe, solver or artefact."""
    import ast
    import pathlib

    import dmlab

    root = pathlib.Path(dmlab.__file__).parent
    for mod in ("anatomy.py", "hooks.py"):
        tree = ast.parse((root / mod).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in ("anatomy", "hooks"), (mod, node.module)
