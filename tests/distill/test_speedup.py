"""SpeedUpNet's cross-attention adapter (dmlab.distill.speedup): exact identities, the offset it adds, training through
guidance_distill, plug-in transfer, and the full-scale path on a config-built UNet."""
import copy
import types

import pytest
import torch
from tiny_models import tiny_sd_unet

from dmlab.anatomy import cross_attention_names
from dmlab.distill import guidance as gd
from dmlab.distill import speedup as su


def _setup(seed=0):
    from diffusers import DDPMScheduler

    unet = tiny_sd_unet().requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=100)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=g)
    pos, neg = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    return unet, sched, x, pos, neg


def test_a_fresh_adapter_equal_prompts_and_w1_give_the_base_unet_exactly():
    unet, sched, x, pos, neg = _setup()
    st = su.SpeedUpStudent(unet, su.NegativeOffsetAdapter(unet), su._wrap(sched))
    sig = torch.full((3,), 2.0)
    with torch.no_grad():
        base = st.teacher(x, sig, encoder_hidden_states=pos, negative_hidden_states=neg)
        assert torch.equal(st(x, sig, w=3.0, encoder_hidden_states=pos, negative_hidden_states=neg), base)
        st.adapter.gain.data.fill_(0.7)
        assert torch.equal(st(x, sig, w=3.0, encoder_hidden_states=pos, negative_hidden_states=pos), base)
        assert torch.equal(st(x, sig, w=1.0, encoder_hidden_states=pos, negative_hidden_states=neg), base)
        moved = st(x, sig, w=3.0, encoder_hidden_states=pos, negative_hidden_states=neg)
        assert not torch.allclose(moved, base, atol=1e-4)
    ref = {k: v.clone() for k, v in unet.state_dict().items()}
    st.remove()
    assert all(torch.equal(v, ref[k]) for k, v in unet.state_dict().items())
    with torch.no_grad():  # unplugged: the UNet is the base again, whatever the condition
        den = su._wrap(sched)(unet)
        assert torch.equal(den(x, sig, encoder_hidden_states=pos), base)


def test_the_offset_is_the_difference_of_two_softmax_attentions():
    unet, sched, x, pos, neg = _setup(1)
    ad = su.NegativeOffsetAdapter(unet)
    assert ad.layers == cross_attention_names(unet) and len(ad.layers) == 4
    q = torch.randn(3, 6, ad.to_k[0].out_features)
    h = ad.heads[0]

    def attn(c):
        k, v = ad.to_k[0](c), ad.to_v[0](c)
        split = lambda t: t.reshape(3, -1, h, t.shape[-1] // h).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // h) ** 0.5, -1)
        return (a @ split(v)).transpose(1, 2).reshape(3, 6, -1)

    with torch.no_grad():
        assert torch.allclose(ad.offset(0, q, pos, neg), attn(pos) - attn(neg), atol=1e-6)


def test_the_hook_adds_gain_times_w_minus_1_times_the_projected_offset():
    from dmlab.hooks import capture

    unet, sched, x, pos, neg = _setup(2)
    ad = su.NegativeOffsetAdapter(unet)
    name = ad.layers[0]
    layer = unet.get_submodule(name)
    st = su.SpeedUpStudent(unet, ad, su._wrap(sched))
    ad.gain.data.zero_()
    ad.gain.data[0] = 0.5
    sig, w = torch.full((3,), 1.0), torch.tensor([1.0, 2.0, 4.0])
    with torch.no_grad(), capture(unet, [name]) as cap:
        st(x, sig, w=w, encoder_hidden_states=pos, negative_hidden_states=neg)
        out = cap[name]
    h = {}
    hk = layer.register_forward_pre_hook(lambda m, a, k: h.update(x=a[0] if a else k["hidden_states"]),
                                         with_kwargs=True)
    with torch.no_grad():
        st(x, sig, w=w, encoder_hidden_states=pos, negative_hidden_states=neg)
        hk.remove()
        plain = layer(h["x"], encoder_hidden_states=pos)
        d = ad.offset(0, layer.to_q(h["x"]), pos, neg) * (0.5 * (w - 1)).view(-1, 1, 1)
        expect = plain + d @ layer.to_out[0].weight.T
    assert torch.allclose(out, expect, atol=1e-5)
    assert torch.equal(out[0], plain[0])  # w = 1: nothing added


def test_guidance_distill_trains_the_adapter_only_and_the_adapter_plugs_into_a_finetuned_copy():
    unet, sched, x, pos, neg = _setup(3)
    frozen = {k: v.clone() for k, v in unet.state_dict().items()}
    st = su.SpeedUpStudent(unet, su.NegativeOffsetAdapter(unet), su._wrap(sched))
    start = {k: v.clone() for k, v in st.adapter.state_dict().items()}

    def data(g, n):
        i = torch.randint(3, (n,), generator=g)
        return x[i], {"encoder_hidden_states": pos[i], "negative_hidden_states": neg[i]}

    res = gd.guidance_distill(st, st.teacher, data, su.negative_uncond, w_range=(3.0, 3.0),
                              sigma_range=(st.denoiser.sigma_min, st.denoiser.sigma_max), steps=3, batch=3, lr=1e-2,
                              generator=torch.Generator().manual_seed(0))
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    assert all(torch.equal(v, frozen[k]) for k, v in unet.state_dict().items())
    assert all(not torch.equal(v, start[k]) for k, v in st.adapter.state_dict().items())
    st.remove()
    ft = copy.deepcopy(unet)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    plug = su.SpeedUpStudent(ft, st.adapter, su._wrap(sched))
    sig = torch.full((3,), 1.0)
    with torch.no_grad():
        one = plug(x, sig, w=3.0, encoder_hidden_states=pos, negative_hidden_states=neg)
        assert one.shape == x.shape and not torch.equal(one, plug.teacher(x, sig, encoder_hidden_states=pos))


def test_clear_errors():
    unet, sched, x, pos, neg = _setup()
    with pytest.raises(ValueError, match="no cross-attention"):
        su.NegativeOffsetAdapter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not cross-attention layers"):
        su.NegativeOffsetAdapter(unet, layers=["conv_in"])
    with pytest.raises(TypeError, match="NegativeOffsetAdapter"):
        su.SpeedUpStudent(unet, object(), su._wrap(sched))
    ad = su.NegativeOffsetAdapter(unet)
    other = tiny_sd_unet(attention_head_dim=4)
    from diffusers import UNet2DConditionModel

    wider = UNet2DConditionModel.from_config(dict(unet.config, cross_attention_dim=16))
    with pytest.raises(ValueError, match="widths"):
        su.SpeedUpStudent(wider, ad, su._wrap(sched))
    st = su.SpeedUpStudent(other, ad, su._wrap(sched))  # heads differ, widths agree: it plugs
    odd = tiny_sd_unet()
    odd.get_submodule(ad.layers[0]).rescale_output_factor = 2.0
    with pytest.raises(ValueError, match="rescales its output"):
        su.SpeedUpStudent(odd, ad, su._wrap(sched))
    with pytest.raises(ValueError, match="shaped like encoder_hidden_states"):
        st(x, torch.ones(3), w=2.0, encoder_hidden_states=pos, negative_hidden_states=neg[:, :2])
    with pytest.raises(ValueError, match="negative_hidden_states"):
        su.negative_uncond({"encoder_hidden_states": pos})
    with pytest.raises(TypeError, match="one-pass student"):
        gd.guidance_distill(lambda *a, **k: a[0], st.teacher, lambda g, n: None, su.negative_uncond,
                            generator=torch.Generator())
    with pytest.raises(ValueError, match="speedup_adapters recipe"):
        su.load_speedup_entry({}, {"seeds": [0]})
    with pytest.raises(ValueError, match="images"):
        su.thick_digits(torch.zeros(16, 16))
    assert torch.equal(su.thick_digits(-torch.ones(1, 1, 4, 4)), -torch.ones(1, 1, 4, 4))


def test_sd_speedup_distill_on_a_config_built_pipeline_and_a_finetuned_copy():
    from diffusers import DDPMScheduler

    unet = tiny_sd_unet()
    g = torch.Generator().manual_seed(3)
    emb = {p: torch.randn(1, 3, 8, generator=g) for p in ("", "a", "b", "blurry")}
    pipe = types.SimpleNamespace(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100),
                                 encode_prompt=lambda prompts, device, n, cfg, neg: (
                                     torch.cat([emb[p] for p in prompts]), torch.cat([emb[p] for p in neg])))
    ft = copy.deepcopy(unet)
    with torch.no_grad():
        ft.conv_out.bias.add_(0.05)
    out = su.sd_speedup_distill(pipe, ["a", "b"], ["", "blurry"], w=3.0, n_steps=3, fast_steps=2, train_steps=2,
                                batch=2, lr=1e-2, unet_ft=ft, generator=torch.Generator().manual_seed(0))
    for k in ("teacher_latents", "fast_latents", "ft_teacher_latents", "ft_fast_latents"):
        assert out[k].shape == (2, 4, 8, 8) and torch.isfinite(out[k]).all()
    assert len(out["losses"]) == 2 and any(float(v.abs().max()) > 0 for v in [out["adapter"].gain.data])
    assert not any(h for m in unet.modules() for h in m._forward_hooks.values())  # unplugged again
    with pytest.raises(ValueError, match="one negative prompt per prompt"):
        su.sd_speedup_distill(pipe, ["a", "b"], [""], generator=torch.Generator())
    with pytest.raises(TypeError, match="list of strings"):
        su.sd_speedup_distill(pipe, "a", generator=torch.Generator())


def test_the_zoo_entry_loads():
    from dmlab import zoo

    if "speedup_adapters" not in zoo.read_registry():
        pytest.skip("speedup_adapters is not registered")
    E = zoo.load("speedup_adapters")
    assert len(E["adapters"]) == len(zoo.get_recipe("speedup_adapters").model["seeds"])
    assert all(not p.requires_grad for a in E["adapters"] for p in a.parameters())
    assert type(E["finetuned"]).__name__ == "UNet2DConditionModel"
