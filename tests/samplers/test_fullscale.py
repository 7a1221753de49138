import types

import pytest
import torch

from dmlab import schedules
from dmlab.denoisers import DiscreteVPDenoiser
from dmlab.samplers import sample_dpmpp_2m
from dmlab.samplers.fullscale import sd_guided
from tiny_models import tiny_sd_unet


def _fake_sd():
    """A config-built conditional UNet and DDPM config behind the two pipeline attributes sd_guided uses."""
    from diffusers import DDPMScheduler

    unet = tiny_sd_unet()
    emb = {p: torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(len(p))) for p in ("", "a cat", "a dog")}

    def encode_prompt(prompts, device, n, do_cfg, negative):
        return torch.cat([emb[p] for p in prompts]), torch.cat([emb[p] for p in negative])

    return types.SimpleNamespace(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100), encode_prompt=encode_prompt), emb


def test_sd_guided_is_cfg_of_the_vp_adapter():
    pipe, emb = _fake_sd()
    den1, cond, smin, smax, shape = sd_guided(pipe, ["a cat", "a dog"], scale=1.0)
    assert shape == (2, 4, 8, 8) and smin < smax
    x, sig = torch.randn(shape, generator=torch.Generator().manual_seed(1)), torch.tensor([3.0, 0.5])
    plain = DiscreteVPDenoiser.from_scheduler(pipe.unet, pipe.scheduler)
    with torch.no_grad():
        torch.testing.assert_close(den1(x, sig, **cond), plain(x, sig, encoder_hidden_states=cond["encoder_hidden_states"]),
                                   rtol=1e-5, atol=1e-5)
        den3 = sd_guided(pipe, ["a cat", "a dog"], scale=3.0)[0]
        u = plain(x, sig, encoder_hidden_states=torch.cat([emb[""]] * 2))
        torch.testing.assert_close(den3(x, sig, **cond), u + 3.0 * (den1(x, sig, **cond) - u), rtol=1e-4, atol=1e-4)
    out = sample_dpmpp_2m(den3, smax * torch.randn(shape), schedules.karras(3, smin, smax), cond=cond)
    assert out.shape == shape and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="list of strings"):
        sd_guided(pipe, "a cat")
