"""Helpers for the accelerator tests: tiny config-built diffusers models (random weights, built offline in well under a second) for accelerator tests."""
import json

import torch

from dmlab import schedules

AC = torch.cumprod(1 - schedules.betas_for(1000, 1e-4, 0.02, "linear"), 0)


def unet2d(widths=(16, 32, 32), layers=1, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    n = len(widths)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=widths, layers_per_block=layers,
                       down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n, num_class_embeds=11,
                       norm_num_groups=8).eval()


def cond_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4).eval()


def dit(seed=0, layers=4):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                                 num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=11).eval()


def write_clip_tokenizer(d):
    """A tiny CLIP BPE tokenizer written locally (as in transformers' own tokenizer tests)."""
    vocab = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "low</w>",
             "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("\n".join(["#version: 0.2", "l o", "lo w</w>", "e r</w>"]))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "unk_token": "<unk>",
                                                         "pad_token": "<|endoftext|>", "model_max_length": 77}))
    return d


def snapshot(model):
    """Everything a patch could leave behind: each module's __dict__ keys and hook dicts, and the weights."""
    attrs = {n: (sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    return attrs, {k: v.clone() for k, v in model.state_dict().items()}


def assert_restored(model, snap):
    attrs, sd = snapshot(model)
    assert attrs == snap[0]
    assert sd.keys() == snap[1].keys() and all(torch.equal(sd[k], snap[1][k]) for k in sd)
