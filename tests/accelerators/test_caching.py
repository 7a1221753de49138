import copy
import types

import pytest
import torch

from dmlab import samplers, schedules
from dmlab.accelerators import (DeepCacheConfig, EncoderPropagationConfig, FeatureCacheConfig, FeatureInheritanceConfig,
                                apply_deepcache, apply_encoder_propagation, apply_feature_cache,
                                apply_feature_inheritance)
from dmlab.accelerators.caching import deepcache_modules, dense_early_keys, granularity_of
from dmlab.hooks import count_calls
from dmlab.accelerators.handle import active_methods
from dmlab.bench import count_flops
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, assert_restored, snapshot

SIG = schedules.karras(10, 0.01, 80.0)


def unet_run(unet, kind, gen, n_steps=10):
    """A closure sampling a fixed batch with Euler (one root call per step)."""
    d = DiscreteVPDenoiser(unet, AC)
    sig = schedules.karras(n_steps, 0.01, 80.0)
    if kind == "cond":
        x = torch.randn(2, 4, 8, 8, generator=gen) * sig[0]
        cond = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=gen)}
    else:
        x = torch.randn(3, 1, 8, 8, generator=gen) * sig[0]
        cond = {"class_labels": torch.tensor([0, 3, 7])}
    return lambda sampler=samplers.sample_euler: sampler(d, x, sig, cond=cond)


@pytest.fixture(params=["unet2d", "cond"])
def unet_and_run(request, tiny_unet, tiny_cond_unet, gen):
    unet = tiny_unet if request.param == "unet2d" else tiny_cond_unet
    return unet, unet_run(unet, request.param, gen)


CONFIGS = [
    lambda u: apply_deepcache(u, DeepCacheConfig(interval=3, branch=0)),
    lambda u: apply_deepcache(u, DeepCacheConfig(interval=2, branch=1)),
    lambda u: apply_encoder_propagation(u, EncoderPropagationConfig(interval=2)),
    lambda u: apply_feature_inheritance(u, FeatureInheritanceConfig(("up_blocks.0",), "block", interval=3)),
]
NOOPS = [
    lambda u: apply_deepcache(u, DeepCacheConfig(interval=1)),
    lambda u: apply_encoder_propagation(u, EncoderPropagationConfig(interval=1)),
    lambda u: apply_feature_inheritance(u, FeatureInheritanceConfig(("up_blocks.*.resnets.0",), "layer", interval=1)),
]


@pytest.mark.parametrize("apply", NOOPS)
def test_noop_settings_are_bit_identical(unet_and_run, apply):
    unet, run = unet_and_run
    base = run()
    with apply(unet) as h:
        assert torch.equal(run(), base)
    assert h.stats["cache_hits"] == 0 and h.stats["full_calls"] == 10


@pytest.mark.parametrize("apply", CONFIGS)
def test_caching_changes_output_and_removal_restores_bit_for_bit(unet_and_run, apply):
    unet, run = unet_and_run
    base = run()
    snap = snapshot(unet)
    with apply(unet) as h:
        out = run()
        assert torch.equal(run(), out)  # a new trajectory starts fresh: same noise, same output
    assert not torch.equal(out, base) and h.stats["cache_hits"] > 0 and h.stats["trajectories"] == 2
    assert torch.equal(run(), base)
    assert_restored(unet, snap)


def test_restored_also_after_an_exception(tiny_unet, gen):
    run = unet_run(tiny_unet, "unet2d", gen)
    base = run()
    snap = snapshot(tiny_unet)
    with pytest.raises(ZeroDivisionError):
        with apply_deepcache(tiny_unet, DeepCacheConfig(interval=3)):
            run()
            1 / 0
    assert torch.equal(run(), base)
    assert_restored(tiny_unet, snap)


def test_stats_and_flops_count_as_documented(tiny_unet, gen):
    run = unet_run(tiny_unet, "unet2d", gen)
    f_base = count_flops(run)
    with apply_deepcache(tiny_unet, DeepCacheConfig(interval=3, branch=0)) as h:
        f_dc = count_flops(run)
    # 10 steps, key steps 0, 3, 6, 9
    assert (h.stats["calls"], h.stats["full_calls"], h.stats["cached_calls"]) == (10, 4, 6)
    assert h.stats["cache_hits"] == 6 * len(h.stats["modules"])
    # one reuse call costs the shallow branch only: total = 4 full + 6 shallow
    d = DiscreteVPDenoiser(tiny_unet, AC)
    x, y = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([0, 3, 7])
    f_call = count_flops(lambda: d(x, torch.tensor(5.0), class_labels=y))
    with apply_deepcache(tiny_unet, DeepCacheConfig(interval=3)):
        d(x, torch.tensor(5.0), class_labels=y)
        f_shallow = count_flops(lambda: d(x, torch.tensor(4.0), class_labels=y))
    assert f_base == 10 * f_call and f_dc == 4 * f_call + 6 * f_shallow
    assert f_base / f_dc > 2.0


def test_heun_calls_per_step_keeps_predictor_and_corrector_apart(tiny_unet, gen):
    run = unet_run(tiny_unet, "unet2d", gen, n_steps=5)
    with apply_deepcache(tiny_unet, DeepCacheConfig(interval=2, calls_per_step=2)) as h:
        run(samplers.sample_heun)
    # 9 calls: steps 0..3 make two calls, step 4 one; key steps 0, 2, 4 -> calls 0, 1, 4, 5, 8
    assert (h.stats["calls"], h.stats["full_calls"], h.stats["cached_calls"]) == (9, 5, 4)


def test_changed_batch_shape_forces_a_full_call(tiny_unet):
    with apply_deepcache(tiny_unet, DeepCacheConfig(interval=4)) as h:
        y = torch.tensor([1, 2])
        tiny_unet(torch.zeros(2, 1, 8, 8), 900, class_labels=y)
        tiny_unet(torch.zeros(1, 1, 8, 8), 800, class_labels=y[:1])
    assert h.stats["forced_full"] == 1 and h.stats["cache_hits"] == 0


def test_deepcache_is_identical_to_the_deepcache_package(tiny_cond_unet, gen):
    DeepCache = pytest.importorskip("DeepCache")
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(8)
    x, ehs = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)

    @torch.no_grad()
    def run():
        z = x
        for t in sched.timesteps:
            z = sched.step(tiny_cond_unet(z, t, encoder_hidden_states=ehs).sample, t, z).prev_sample
        return z

    for interval, branch in [(2, 0), (3, 0), (3, 1), (3, 3)]:
        helper = DeepCache.DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=tiny_cond_unet, scheduler=sched))
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        ref = run()
        helper.disable()
        with apply_deepcache(tiny_cond_unet, DeepCacheConfig(interval=interval, branch=branch)):
            assert torch.equal(run(), ref)


def test_deepcache_on_a_whole_pipeline_matches_the_package(sd_pipe):
    DeepCache = pytest.importorskip("DeepCache")
    kw = dict(prompt="lower newer", height=16, width=16, num_inference_steps=6, guidance_scale=3.0, output_type="np")
    base = sd_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    helper = DeepCache.DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    ref = sd_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    helper.disable()
    with apply_deepcache(sd_pipe, DeepCacheConfig(interval=3)) as h:
        ours = sd_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert (ours == ref).all() and not (ours == base).all()
    assert h.stats["calls"] == 6 and h.stats["full_calls"] == 2  # CFG is batched: one call per step
    assert (sd_pipe(generator=torch.Generator().manual_seed(0), **kw).images == base).all()


def test_encoder_propagation_reuse_steps_ignore_the_input(tiny_unet):
    """At a reuse step the decoder sees only cached encoder features and the new time embedding."""
    y = torch.tensor([4])
    a, b = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    with apply_encoder_propagation(tiny_unet, EncoderPropagationConfig(interval=2)) as h:
        tiny_unet(a, 900, class_labels=y)
        out_b = tiny_unet(b, 800, class_labels=y).sample
        h.reset()
        tiny_unet(a, 900, class_labels=y)
        out_a = tiny_unet(a, 800, class_labels=y).sample
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, tiny_unet(a, 800, class_labels=y).sample)


def test_residual_inheritance_on_dit_blocks(tiny_dit, gen):
    d = DiscreteVPDenoiser(tiny_dit, AC)
    x = torch.randn(2, 1, 8, 8, generator=gen) * SIG[0]
    run = lambda: samplers.sample_euler(d, x, SIG, cond={"class_labels": torch.tensor([1, 2])})  # noqa: E731
    base = run()
    cfg = FeatureInheritanceConfig(("transformer_blocks.*",), "block", interval=2, reuse="residual")
    with apply_feature_inheritance(tiny_dit, cfg) as h:
        out = run()
    assert h.stats["cache_hits"] == 5 * 4 and torch.isfinite(out).all() and not torch.equal(out, base)
    with apply_feature_inheritance(tiny_dit, FeatureInheritanceConfig(("transformer_blocks.0.ff",), "layer",
                                                                      interval=2)) as h:
        run()
    assert h.stats["cache_hits"] == 5
    with pytest.raises(ValueError, match="residual"):
        with apply_feature_cache(tiny_dit, FeatureCacheConfig(("transformer_blocks.0.ff.net.2",), interval=2,
                                                               reuse="residual")):
            tiny_dit(torch.zeros(1, 1, 8, 8), timestep=torch.tensor([3.0]), class_labels=torch.tensor([1]))
            tiny_dit(torch.zeros(1, 1, 8, 8), timestep=torch.tensor([2.0]), class_labels=torch.tensor([1]))


def test_two_methods_compose_and_come_off_in_either_order(tiny_unet, gen):
    run = unet_run(tiny_unet, "unet2d", gen)
    base = run()
    snap = snapshot(tiny_unet)
    outs = []
    for first_off in (0, 1):
        hs = [apply_deepcache(tiny_unet, DeepCacheConfig(interval=2)),
              apply_feature_inheritance(tiny_unet, FeatureInheritanceConfig(("up_blocks.2.resnets.1.conv1",), "unit",
                                                                            interval=2)),
              count_calls(tiny_unet)]
        outs.append(run())
        assert hs[0].stats["cache_hits"] > 0 and hs[1].stats["cache_hits"] > 0 and hs[2].stats["calls"] == 10
        hs[first_off].remove()
        partial = run()
        assert not torch.equal(partial, base)
        for h in hs:
            h.remove()
        assert torch.equal(run(), base)
        assert_restored(tiny_unet, snap)
    assert torch.equal(outs[0], outs[1])


def test_applying_twice_raises(tiny_unet):
    with apply_deepcache(tiny_unet):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_deepcache(tiny_unet, DeepCacheConfig(interval=2))
        apply_encoder_propagation(tiny_unet).remove()  # another method is fine


def test_bad_configs_say_what_to_do(tiny_unet, tiny_dit):
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        DeepCacheConfig(interval=0)
    with pytest.raises(ValueError, match="calls_per_step"):
        EncoderPropagationConfig(calls_per_step=0)
    with pytest.raises(ValueError, match="branch must be in 0..8"):
        apply_deepcache(tiny_unet, DeepCacheConfig(branch=9))
    with pytest.raises(TypeError, match="needs a UNet.*apply_feature_inheritance"):
        apply_deepcache(tiny_dit)
    with pytest.raises(TypeError, match="needs a UNet"):
        apply_encoder_propagation(tiny_dit)
    with pytest.raises(ValueError, match="did you mean"):
        apply_feature_inheritance(tiny_unet, FeatureInheritanceConfig(("up_block.1",), "block"))
    with pytest.raises(ValueError, match="is a layer, not a block"):
        apply_feature_inheritance(tiny_unet, FeatureInheritanceConfig(("up_blocks.1.resnets.0",), "block"))
    with pytest.raises(ValueError, match="matches no unit"):
        apply_feature_inheritance(tiny_unet, FeatureInheritanceConfig(("mid_blocks.*",), "unit"))
    with pytest.raises(ValueError, match="outside the network's blocks"):
        apply_feature_inheritance(tiny_unet, FeatureInheritanceConfig(("conv_in",), "block"))
    with pytest.raises(ValueError, match="container"):
        apply_feature_cache(tiny_unet, FeatureCacheConfig(("up_blocks",)))
    with pytest.raises(ValueError, match="granularity"):
        FeatureInheritanceConfig(("up_blocks.0",), "channel")
    with pytest.raises(ValueError, match="key_steps"):
        FeatureCacheConfig(("conv_in",), key_steps=(-1,))
    with pytest.raises(TypeError, match="DeepCacheConfig"):
        apply_deepcache(tiny_unet, EncoderPropagationConfig())
    assert active_methods(tiny_unet) == set()  # a failed apply leaves nothing half-applied


def test_module_sets_and_granularity(tiny_unet):
    assert deepcache_modules(tiny_unet, 0) == ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                                               "up_blocks.0", "up_blocks.1", "up_blocks.2.resnets.0")
    assert "down_blocks.0" not in deepcache_modules(tiny_unet, 1)
    assert [granularity_of(n) for n in ["mid_block", "up_blocks.1", "up_blocks.1.resnets.0",
                                        "transformer_blocks.2.attn1", "up_blocks.1.resnets.0.conv1", "conv_in"]] \
        == ["block", "block", "layer", "layer", "unit", None]
    keys = dense_early_keys(50, 9)
    assert len(keys) == 9 and keys[0] == 0 and keys[1] - keys[0] < keys[-1] - keys[-2]
    assert dense_early_keys(10, 10) == tuple(range(10))
    cfg = FeatureCacheConfig(("mid_block",), key_steps=(0, 4, 5))
    with apply_feature_cache(tiny_unet, cfg) as h:
        for t in range(8):
            tiny_unet(torch.zeros(1, 1, 8, 8), 900 - 100 * t, class_labels=torch.tensor([0]))
    assert h.stats["full_calls"] == 3 and h.stats["cache_hits"] == 5


def test_flop_accountant_matches_count_flops(tiny_unet, gen):
    from dmlab.bench import FlopAccountant

    run = unet_run(tiny_unet, "unet2d", gen)
    d = DiscreteVPDenoiser(tiny_unet, AC)
    x, y = torch.randn(1, 1, 8, 8, generator=gen), torch.tensor([3])
    acct = FlopAccountant(tiny_unet).profile(lambda: d(x, torch.tensor([5.0]), class_labels=y))
    snap = snapshot(tiny_unet)
    for apply in [None, *CONFIGS]:
        with acct.counting() as c:
            if apply is None:
                run()
            else:
                with apply(tiny_unet):
                    run()
        if apply is None:
            expected = count_flops(run)
        else:
            with apply(tiny_unet):
                expected = count_flops(run)
        assert c.total == expected
    assert_restored(tiny_unet, snap)
    with pytest.raises(RuntimeError, match="profile"):
        with FlopAccountant(tiny_unet).counting():
            pass
    with pytest.raises(RuntimeError, match="outside the networks"):
        FlopAccountant(tiny_unet).profile(lambda: torch.ones(2, 2) @ torch.ones(2, 2))


def _attn_unet2d():
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=2,
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       num_class_embeds=11, norm_num_groups=8, attention_head_dim=8).eval()


def _zoo_unet():
    from dmlab import zoo

    return zoo.load_denoiser("unet_l")[1].eval()


@pytest.mark.parametrize("make", ["tiny", "attn", "zoo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deepcache_direct_shallow_branch_is_bit_identical_to_the_patched_route(tiny_unet, make, dtype):
    unet = {"tiny": lambda: tiny_unet, "attn": _attn_unet2d, "zoo": _zoo_unet}[make]()
    unet = copy.deepcopy(unet).to(dtype) if dtype != torch.float32 else unet  # never cast a shared fixture
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 8, 8, generator=g).to(dtype)
    y = torch.tensor([0, 3, 7])

    @torch.no_grad()
    def run():  # every output of a 12-step trajectory, both return styles
        z, outs = x, []
        for i, t in enumerate(torch.linspace(990, 10, 12).round().long()):
            o = unet(z, t, class_labels=y).sample if i % 2 else unet(z, int(t), y, False)[0]
            outs.append(o)
            z = z - 0.05 * o
        return torch.stack(outs)

    base = run()
    assert base.dtype == dtype and torch.isfinite(base).all()
    for interval in (2, 3, 5):
        with apply_deepcache(unet, DeepCacheConfig(interval), shortcut=False) as ref_h:
            ref = run()
        with apply_deepcache(unet, DeepCacheConfig(interval)) as h:
            out = run()
            assert torch.equal(run(), out)  # a second trajectory starts fresh
        assert h.stats["shortcut"] and not ref_h.stats["shortcut"]
        assert torch.equal(out, ref) and not torch.equal(out, base)
        assert h.stats["cache_hits"] == 2 * ref_h.stats["cache_hits"] > 0
        assert torch.equal(run(), base)


def test_deepcache_shortcut_applies_only_where_it_is_exact(tiny_unet, tiny_cond_unet):
    with apply_deepcache(tiny_unet, DeepCacheConfig(3, branch=1)) as h:
        assert not h.stats["shortcut"]  # deeper branches take the patched route
    with apply_deepcache(tiny_cond_unet, DeepCacheConfig(3)) as h:
        assert not h.stats["shortcut"]
    with apply_deepcache(tiny_unet, DeepCacheConfig(3)) as h:
        assert h.stats["shortcut"]
