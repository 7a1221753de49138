import math

import pytest
import torch

from dmlab import bench


def test_flops_of_a_linear_layer_and_macs():
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    f = bench.count_flops(lin, x)
    assert f == 2 * 4 * 16 * 8 and bench.macs(f) == 4 * 16 * 8
    assert bench.flop_ratio(lambda: (lin(x), lin(x)), lambda: lin(x)) == 2.0
    with pytest.raises(ValueError, match="no counted FLOPs"):
        bench.flop_ratio(lambda: lin(x), lambda: x + 1)


def test_psnr():
    ref = torch.zeros(2, 1, 4, 4)
    x = ref.clone()
    x[1] += 0.1  # mse 0.01 -> 10 log10(4 / 0.01)
    p = bench.psnr(x, ref, reduction="none")
    assert math.isinf(p[0]) and abs(float(p[1]) - 10 * math.log10(400)) < 1e-6
    assert abs(bench.psnr(x, ref) - 10 * math.log10(400)) < 1e-6
    assert math.isinf(bench.psnr(ref, ref))
    with pytest.raises(ValueError, match="same shape"):
        bench.psnr(x, ref[:1])


def test_matched_steps():
    assert bench.matched_steps(20, 2.31) == 9 and bench.matched_steps(20, 1.0) == 20 and bench.matched_steps(5, 100) == 1
    with pytest.raises(ValueError):
        bench.matched_steps(20, 0)


def test_time_pair_interleaves_and_restores_threads():
    calls = []
    threads = torch.get_num_threads()
    t = bench.time_pair(lambda: calls.append(("b", torch.get_num_threads())),
                        lambda: calls.append(("m", torch.get_num_threads())), pairs=3, warmup=1)
    assert [c[0] for c in calls] == ["b", "m"] * 4 and {c[1] for c in calls} == {1}
    assert torch.get_num_threads() == threads
    assert t.pairs == 3 and t.lo <= t.speedup <= t.hi and "x [" in str(t)
    with pytest.raises(ValueError, match="pairs"):
        bench.time_pair(lambda: 0, lambda: 0, pairs=0)


def test_format_table_wraps_long_labels_to_the_width():
    long = "3 removed + 30 steps normalized KD, spectral output (Spectral Diffusion)"
    rows = [{"configuration": long, "psnr": 24.38, "fd": 5.27}, {"configuration": "short", "psnr": 1.0, "fd": 2.0}]
    wide = bench.format_table(rows, width=None).splitlines()
    assert max(map(len, wide)) > 60 and len(wide) == 4  # no limit: one line per row
    text = bench.format_table(rows, width=60).splitlines()
    assert max(map(len, text)) <= 60 and len(text) > 4
    # every word of the label survives, and the numbers sit on the label's last line
    assert " ".join(ln.strip().split("  ")[0] for ln in text[2:-1]) == long
    assert text[-2].split()[-2:] == ["24.38", "5.27"] and text[-1].split() == ["short", "1.00", "2.00"]
    assert bench.format_table(rows[1:], width=60) == bench.format_table(rows[1:], width=None)  # narrow: unchanged


def test_table_text_and_figure():
    tab = bench.Table("demo", columns=["flop_speedup", "psnr"])
    tab.add("baseline", flop_speedup=1.0, psnr=math.inf, group="x")
    tab.add("method a", flop_speedup=2.345, psnr=30.0, group="a")
    tab.add("method b", flop_speedup=3.0, psnr=25.5, group="a")
    text = tab.text()
    lines = text.splitlines()
    assert lines[0] == "demo" and lines[1].split() == ["configuration", "flop_speedup", "psnr"]
    assert "2.35" in lines[4] and "inf" in lines[3] and len(lines) == 6
    assert tab["method b"]["psnr"] == 25.5
    with pytest.raises(KeyError, match="rows"):
        tab["nope"]
    fig = tab.figure("flop_speedup", "psnr")
    assert len(fig.axes[0].lines) == 1  # the finite group 'a' as one line; the inf baseline is left out
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_time_pair_on_the_cpu_reports_no_gpu_memory():
    t = bench.time_pair(lambda: sum(range(1000)), lambda: sum(range(10)), pairs=2, warmup=0)
    assert t.baseline_peak_bytes is None and t.method_peak_bytes is None and t.pairs == 2
