"""Small models shared by the tests (imported as ``from tiny_models import ...``; ``tests/`` is on sys.path)."""
import torch


def tiny_sd_unet(attention_head_dim: int = 2):
    """A config-built Stable-Diffusion-shaped ``UNet2DConditionModel`` (4 latent channels, 8x8, one cross-attention
    down and up block, text width 8), weights from ``torch.manual_seed(0)``, in eval mode: the model the tests of
    every full-scale path drive. Shared by every test of a full-scale path."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=attention_head_dim).eval()
