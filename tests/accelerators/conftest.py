"""Fixtures: tiny config-built diffusers models (random weights, offline)."""
import pytest
import torch

from acc_models import cond_unet, dit, unet2d, write_clip_tokenizer


@pytest.fixture(scope="module")
def tiny_unet():
    return unet2d()


@pytest.fixture(scope="module")
def tiny_cond_unet():
    return cond_unet()


@pytest.fixture(scope="module")
def tiny_dit():
    return dit()


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    """A StableDiffusionPipeline assembled from config-built parts (random weights), offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=21, eos_token_id=22, pad_token_id=22, hidden_size=32,
                                      intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=23,
                                      max_position_embeddings=77)).eval()
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=cond_unet(), vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
