"""dmlab.claims: the bootstrap covers the truth at its level, the verdict rule, and records refuse what the rule
forbids."""
import math

import pytest
import torch

from dmlab import claims
from dmlab.claims import Interval


def test_paired_bootstrap_covers_the_true_mean_difference_at_about_its_level():
    """Paired samples with a known mean difference 0.2: the 90% interval covers it in about 90% of experiments
    (and pairing removes the shared per-sample term, so the interval is narrow)."""
    g = torch.Generator().manual_seed(0)
    hits, widths = 0, []
    for _ in range(60):
        shared = 3 * torch.randn(3, 40, generator=g)  # what both arms share (same noise)
        a = shared + 0.2 + 0.5 * torch.randn(3, 40, generator=g)
        b = shared + 0.5 * torch.randn(3, 40, generator=g)
        iv = claims.paired_bootstrap(a, b, generator=g, n_boot=300, level=0.9)
        hits += iv.low <= 0.2 <= iv.high
        widths.append(iv.width)
    assert 0.75 <= hits / 60 <= 0.99, hits
    assert max(widths) < 1.0  # unpaired, the shared term (std 3) would make it about 1.5 wide


def test_hierarchical_bootstrap_sees_seed_to_seed_spread():
    """Seeds that disagree (a per-seed offset) widen the interval beyond what resampling samples alone gives."""
    g = torch.Generator().manual_seed(1)
    offsets = torch.tensor([-1.0, 0.0, 1.0])[:, None]
    d = offsets + 0.1 * torch.randn(3, 200, generator=g)
    pooled = claims.paired_bootstrap(d.flatten(), generator=g, n_boot=500)  # one "seed"
    seeds = claims.paired_bootstrap(d, generator=g, n_boot=500)
    assert seeds.seeds == 3 and pooled.seeds == 1 and seeds.n == 200
    assert seeds.width > 5 * pooled.width


def test_bootstrap_of_a_set_statistic_is_paired():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 30, 4, generator=g)
    iv = claims.bootstrap(lambda a, b: float((a - b).abs().mean()), x, x + 1.0, generator=g, n_boot=200)
    assert iv.low == pytest.approx(1.0) and iv.high == pytest.approx(1.0)  # same indices on both arrays


@pytest.mark.parametrize("lo,hi,better,threshold,want", [
    (0.1, 0.5, "higher", 0.0, "holds"), (-0.5, -0.1, "higher", 0.0, "does-not-hold"),
    (-0.1, 0.5, "higher", 0.0, "unresolved"), (-0.4, -0.1, "higher", -0.5, "holds"),
    (-0.5, -0.1, "lower", 0.0, "holds"), (0.1, 0.5, "lower", 0.0, "does-not-hold"),
    (-0.1, 0.3, "lower", 0.5, "holds")])
def test_decide(lo, hi, better, threshold, want):
    iv = Interval((lo + hi) / 2, lo, hi, n=10, seeds=3)
    assert claims.decide(iv, threshold=threshold, better=better) == want


def test_record_takes_the_status_from_the_rule_and_refuses_contradictions():
    iv = Interval(0.3, 0.1, 0.5, n=100, seeds=3)
    c = claims.record(1, "faster at equal quality", metric="PSNR", diff=iv, display=False)
    assert c.status == "holds" and c.seeds == 3 and c.n == 100
    with pytest.raises(ValueError, match="contradicts the verdict rule"):
        claims.record(1, "x", diff=iv, status="does-not-hold", display=False)
    with pytest.raises(ValueError, match="at least 3 seeds"):
        claims.record(1, "x", diff=Interval(0.3, 0.1, 0.5, n=100, seeds=1), display=False)
    with pytest.raises(ValueError, match="needs diff=Interval"):
        claims.record(1, "x", status="holds", display=False)
    with pytest.raises(ValueError, match="needs diff=Interval"):
        claims.record(1, "x", display=False)
    with pytest.raises(ValueError, match="'planned' is the map's default"):
        claims.record(1, "x", status="planned", display=False)
    with pytest.raises(ValueError, match="paper must be the paper's number"):
        claims.record(0, "x", status="demonstrated", display=False)
    with pytest.raises(ValueError, match="finite number"):
        claims.record(1, "x", status="demonstrated", value=math.nan, display=False)
    assert claims.record(10, "needs SD and DINO", status="full-scale-only", display=False).status == \
        "full-scale-only"


def test_bad_inputs_name_the_fix():
    g = torch.Generator()
    with pytest.raises(TypeError, match="torch.Generator"):
        claims.paired_bootstrap(torch.ones(3, 4), generator=None)
    with pytest.raises(ValueError, match="paired"):
        claims.paired_bootstrap(torch.ones(3, 4), torch.ones(3, 5), generator=g)
    with pytest.raises(ValueError, match="clip them"):
        claims.paired_bootstrap(torch.tensor([1.0, math.inf]), generator=g)
    with pytest.raises(ValueError, match="n >= 2"):
        claims.paired_bootstrap(torch.ones(3, 1), generator=g)
    with pytest.raises(ValueError, match="low <= high"):
        Interval(0.0, 1.0, -1.0)


def test_fmt_prints_at_the_precision_of_the_interval():
    assert claims.fmt(Interval(0.12345, 0.11, 0.14)) == "0.123 [0.110, 0.140]"
    assert claims.fmt(Interval(12.345, 10.0, 15.0)) == "12.3 [10.0, 15.0]"
    assert claims.fmt(Interval(1234.5, 1000.0, 1500.0)) == "1234 [1000, 1500]"
    assert claims.fmt(0.000123456) == "0.000123"


def test_recap_fits_the_width_and_keeps_status_and_interval():
    iv = Interval(0.3, 0.1, 0.5, n=100, seeds=3)
    long = "A method with a long name makes samples faster than everything else at equal quality " * 3
    recs = [claims.record(7, long, metric="PSNR", diff=iv, display=False),
            claims.record(7, "wired", status="demonstrated", primary=False, display=False)]
    text = claims.recap(recs, width=60)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 60 and len(lines) == 2 + 2 * len(recs)
    assert lines[2].split()[:3] == ["7", "holds", claims.fmt(iv).split()[0]] and claims.fmt(iv) in lines[2]
    assert lines[3].startswith(" " * 7 + "A method") and lines[3].endswith("...")
    assert lines[4].split() == ["7", "demonstrated", "-"] and lines[5].strip() == "(sub) wired"
