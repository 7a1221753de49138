import pytest
import torch

from dmlab import samplers, schedules
from dmlab.accelerators import (apply_first_block_cache, apply_mag_cache, apply_pab, apply_taylorseer,
                                calibrate_mag_ratios)
from dmlab.accelerators.diffusers_caches import _dit_identifiers
from dmlab.denoisers import DiscreteVPDenoiser

from acc_models import AC, assert_restored, snapshot

SIG = schedules.karras(10, 0.01, 80.0)


@pytest.fixture
def dit_run(tiny_dit, gen):
    d = DiscreteVPDenoiser(tiny_dit, AC)
    x = torch.randn(2, 1, 8, 8, generator=gen) * SIG[0]
    return lambda: samplers.sample_euler(d, x, SIG, cond={"class_labels": torch.tensor([1, 2])})


APPLY = {
    "first_block_cache": lambda m, run: apply_first_block_cache(m, threshold=0.5),
    "taylorseer": lambda m, run: apply_taylorseer(m, interval=3),
    "pab": lambda m, run: apply_pab(m, skip_range=3, timestep_range=(0, 1000)),
    "mag_cache": lambda m, run: apply_mag_cache(m, calibrate_mag_ratios(m, run), threshold=0.5),
}


@pytest.mark.parametrize("name", list(APPLY))
def test_diffusers_caches_work_on_dit_and_come_off_exactly(name, tiny_dit, dit_run):
    base = dit_run()
    snap = snapshot(tiny_dit)
    with APPLY[name](tiny_dit, dit_run) as h:
        out = dit_run()
        again = dit_run()  # stateful hooks are reset when a new trajectory starts
    assert torch.equal(out, again) and not torch.equal(out, base) and torch.isfinite(out).all()
    assert h.stats["calls"] == 20 and h.stats["trajectories"] == 2
    assert 0 < h.stats["cache_hits"] < h.stats["module_calls"]
    assert h.stats["cache_hits"] == h.stats["module_calls"] - h.stats["module_computes"]
    assert torch.equal(dit_run(), base)
    assert_restored(tiny_dit, snap)


@pytest.mark.parametrize("apply", [lambda m: apply_first_block_cache(m, threshold=0.0),
                                   lambda m: apply_taylorseer(m, interval=1), lambda m: apply_pab(m, skip_range=1)])
def test_noop_settings_are_bit_identical(apply, tiny_dit, dit_run):
    base = dit_run()
    with apply(tiny_dit) as h:
        assert torch.equal(dit_run(), base)
    assert h.stats["cache_hits"] == 0 and h.stats["module_calls"] > 0


def test_taylorseer_default_identifiers_match_dit(tiny_dit):
    ids = _dit_identifiers(tiny_dit)
    import re

    hit = [n for n, _ in tiny_dit.named_modules() if any(re.fullmatch(p, n) for p in ids)]
    assert len(hit) == 2 * len(tiny_dit.transformer_blocks) and all(n.endswith(("attn1", "ff")) for n in hit)
    with pytest.raises(ValueError, match="match no module"):
        apply_taylorseer(tiny_dit, identifiers=[r"^transformer_blocks.*attn"])  # diffusers' default shape


def test_transformer_caches_refuse_a_unet_and_bad_values(tiny_unet, tiny_dit):
    with pytest.raises(TypeError, match="transformer_blocks.*apply_deepcache"):
        apply_taylorseer(tiny_unet)
    with pytest.raises(TypeError, match="transformer"):
        apply_first_block_cache(tiny_unet)
    with pytest.raises(ValueError, match="interval"):
        apply_taylorseer(tiny_dit, interval=0)
    with pytest.raises(ValueError, match="mag_ratios"):
        apply_mag_cache(tiny_dit, [])
    with pytest.raises(ValueError, match="skip_range"):
        apply_pab(tiny_dit, skip_range=0)
    with apply_taylorseer(tiny_dit):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_taylorseer(tiny_dit)


def test_calibrated_ratios_one_per_call(tiny_dit, dit_run):
    snap = snapshot(tiny_dit)
    r = calibrate_mag_ratios(tiny_dit, dit_run)
    assert len(r) == 10 and r[0] == 1.0 and all(v > 0 for v in r)
    assert_restored(tiny_dit, snap)
