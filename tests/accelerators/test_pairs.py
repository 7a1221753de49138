"""Every pair of accelerators composes, on the zoo's UNet and DiT: applied in either order and removed in either
order, each handle stays in force until its own removal (after removing one, the model samples exactly as with the
other alone), and removing both restores the model bit for bit (module ``__dict__``s, hook dicts, weights,
samples). Order-sensitive pairs (post-training quantization calibrated after another handle) are refused."""
import copy
import itertools

import pytest
import torch

from dmlab import accelerators as acc
from dmlab import samplers, schedules, zoo
from dmlab.accelerators.caching import FeatureInheritanceConfig
from dmlab.accelerators.early_exit import EarlyExitConfig, exit_heads_for
from dmlab.accelerators.linear_attention import LinearAttentionConfig, linear_attention_for
from dmlab.accelerators.pruning_masks import mask_sites
from dmlab.hooks import _PatchedForward, capture

from acc_models import assert_restored, snapshot

STEPS = 3


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Setup:
    def __init__(self, name):
        self.den, self.net = zoo.load_denoiser(name)
        self.net.eval()
        g = torch.Generator().manual_seed(0)
        self.sigmas = schedules.discrete(STEPS, self.den.sigmas_train, dtype=torch.float32)
        self.x = torch.randn(2, 1, 8, 8, generator=g) * self.sigmas[0]
        self.cond = {"class_labels": torch.tensor([3, 7])}

    @torch.no_grad()
    def run(self):
        return samplers.sample_euler(self.den, self.x, self.sigmas, cond=self.cond)


def _methods(s: _Setup, kind: str) -> dict:
    net = s.net
    calib = acc.calibration_set(s.den, s.x, s.sigmas, n=4, cond=s.cond)
    sites = mask_sites(net)
    site = next(iter(sites))
    masks = {site: torch.ones(sites[site]["groups"]).index_fill_(0, torch.tensor([0]), 0.0)}
    m = {
        "w8a8": lambda: acc.apply_quantization(net, acc.QuantConfig(8, 8, act_range="minmax"), calibration=calib),
        "masks": lambda: acc.apply_masks(net, masks),
        "capture": lambda: capture(net, [acc_name(net)]),
    }
    if kind == "unet":
        unit = acc.prunable_units(net, s.x, torch.tensor([500.0, 500.0]), class_labels=s.cond["class_labels"])[0]
        m.update({
            "deepcache": lambda: acc.apply_deepcache(net, acc.DeepCacheConfig(interval=2)),
            "encoder_prop": lambda: acc.apply_encoder_propagation(net, acc.EncoderPropagationConfig(interval=2)),
            "inherit": lambda: acc.apply_feature_inheritance(net, FeatureInheritanceConfig(("up_blocks.0",), "block")),
            "prune": lambda: acc.apply_layer_pruning(net, acc.LayerPruneConfig((unit,))),
        })
    else:
        heads = exit_heads_for(net)
        lin = linear_attention_for(net)
        ratios = acc.calibrate_mag_ratios(net, s.run)
        m.update({
            "inherit": lambda: acc.apply_feature_inheritance(
                net, FeatureInheritanceConfig(("transformer_blocks.2", "transformer_blocks.3"), "block",
                                              reuse="residual")),
            "fbc": lambda: acc.apply_first_block_cache(net, 10.0),
            "taylorseer": lambda: acc.apply_taylorseer(net, 2, warmup=1),
            "pab": lambda: acc.apply_pab(net, 2, timestep_range=(0, 1000)),
            "magcache": lambda: acc.apply_mag_cache(net, ratios, threshold=10.0),
            "early_exit": lambda: acc.apply_early_exit(
                net, EarlyExitConfig(heads, threshold=0.9, per_sample=False)),  # per-sample exit refuses caches
            "linear": lambda: acc.apply_linear_attention(net, LinearAttentionConfig(lin)),
            "prune": lambda: acc.apply_layer_pruning(net, acc.LayerPruneConfig(("transformer_blocks.1",))),
        })
    return m


def acc_name(net):
    return "mid_block" if hasattr(net, "mid_block") else "transformer_blocks.1"


CONFLICTS = {frozenset(("early_exit", "fbc")), frozenset(("early_exit", "magcache"))}


def _calibrates(name):
    return name == "w8a8"


@pytest.mark.parametrize("zoo_name,kind", [("unet_s", "unet"), ("dit_s", "dit")])
def test_every_pair_composes_in_any_order(zoo_name, kind):
    s = _Setup(zoo_name)
    methods = _methods(s, kind)
    snap = snapshot(s.net)
    base = s.run()
    alone = {}
    for name, apply in methods.items():
        with apply():
            alone[name] = s.run()
        assert_restored(s.net, snap)
    # the accelerators really change the samples (else the checks below could not fail)
    for name in ("w8a8", "masks", "inherit", "prune") + (("deepcache",) if kind == "unet" else
                                                                 ("fbc", "taylorseer", "early_exit", "linear")):
        assert not torch.equal(alone[name], base), name
    refused = []
    for a, b in itertools.combinations(methods, 2):
        for first, second in ((a, b), (b, a)):
            for remove_first in (first, second):
                h1 = methods[first]()
                if frozenset((first, second)) in CONFLICTS:
                    with pytest.raises(RuntimeError, match="cannot be combined"):
                        methods[second]()
                    h1.remove()
                    continue
                if _calibrates(second) and h1.alters_outputs:
                    with pytest.raises(RuntimeError, match="Apply quantization first"):
                        methods[second]()
                    h1.remove()
                    refused.append((first, second))
                    continue
                h2 = methods[second]()
                handles = {first: h1, second: h2}
                s.run()
                keep = second if remove_first == first else first
                handles[remove_first].remove()
                assert torch.equal(s.run(), alone[keep]), (first, second, "removed", remove_first)
                handles[keep].remove()
                assert_restored(s.net, snap)
        assert torch.equal(s.run(), base)
    assert refused and all(b == "w8a8" for _, b in refused)


def test_deepcopy_under_a_handle_gives_a_clean_copy():
    s = _Setup("unet_s")
    base = s.run()
    h = acc.apply_deepcache(s.net, acc.DeepCacheConfig(interval=2))
    cached = s.run()
    assert not torch.equal(cached, base)
    clone = copy.deepcopy(s.net)
    assert not any(isinstance(m.__dict__.get("forward"), _PatchedForward) for m in clone.modules())  # no patch
    assert all(getattr(m.__dict__.get("forward"), "__func__", type(m).forward) is type(m).forward
               for m in clone.modules())
    den2 = copy.copy(s.den)
    den2.model = clone
    with torch.no_grad():
        out = samplers.sample_euler(den2, s.x, s.sigmas, cond=s.cond)
    assert torch.equal(out, base)  # the copy runs its own forward
    with acc.apply_deepcache(clone, acc.DeepCacheConfig(interval=2)):  # and takes a handle of its own
        with torch.no_grad():
            assert torch.equal(samplers.sample_euler(den2, s.x, s.sigmas, cond=s.cond), cached)
    assert h.stats["calls"] == STEPS  # the copy's calls never reached the original's handle
    h.remove()
    assert torch.equal(s.run(), base)
