"""Tests for dmlab.viz: every function returns a Figure of the documented shape; fit_order is right."""
import io

import pytest
import torch

from dmlab import viz

mpl = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _renders(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------- fit_order


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, 4.0])
def test_fit_order_recovers_power_law(p):
    nfe = [4, 8, 16, 32, 64]
    err = [3.0 * n ** (-p) for n in nfe]
    assert viz.fit_order(nfe, err) == pytest.approx(p, abs=1e-12)
    noisy = [e * (1 + 0.05 * (-1) ** i) for i, e in enumerate(err)]
    assert viz.fit_order(torch.tensor(nfe), torch.tensor(noisy)) == pytest.approx(p, abs=0.1)


@pytest.mark.parametrize(
    "nfe, err, match",
    [
        ([4], [1.0], "at least 2"),
        ([4, 8], [1.0], "same length"),
        ([4, 8], [1.0, 0.0], "finite and > 0"),
        ([4, 4], [1.0, 0.5], "distinct"),
    ],
)
def test_fit_order_bad_input(nfe, err, match):
    with pytest.raises(ValueError, match=match):
        viz.fit_order(nfe, err)


# ----------------------------------------------------------------------------------------------- figures


def test_image_grid_gray_rgb_and_3d():
    x = torch.rand(10, 1, 8, 8, generator=gen()) * 2 - 1
    fig = viz.image_grid(x, nrow=4, titles=[str(i) for i in range(10)], title="digits")
    assert isinstance(fig, Figure) and len(fig.axes) == 1 and fig.dpi == viz.DPI >= 110
    _renders(fig)
    fig2 = viz.image_grid(x, nrow=4, titles=[str(i) for i in range(10)], title="digits")
    assert tuple(fig.get_size_inches()) == tuple(fig2.get_size_inches())  # figsize fixed by the inputs
    rgb = viz.image_grid(torch.rand(3, 3, 16, 16, generator=gen()) * 2 - 1, scale=0.5)
    assert len(rgb.axes) == 1
    _renders(rgb)
    assert len(viz.image_grid(torch.zeros(2, 8, 8)).axes) == 1


def test_image_grid_errors():
    with pytest.raises(ValueError, match="C = 1"):
        viz.image_grid(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="permute"):
        viz.image_grid(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="one title per image"):
        viz.image_grid(torch.zeros(2, 1, 8, 8), titles=["a"])
    with pytest.raises(ValueError, match="nrow"):
        viz.image_grid(torch.zeros(2, 1, 8, 8), nrow=0)
    with pytest.raises(ValueError, match="B = 0"):
        viz.image_grid(torch.zeros(0, 1, 8, 8))


def test_plot_trajectories():
    traj = torch.randn(6, 20, 2, generator=gen())
    fig = viz.plot_trajectories(traj, data=torch.randn(100, 2, generator=gen(1)), title="paths")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    _renders(fig)
    as_list = viz.plot_trajectories(list(traj.unbind(0)), lim=3)
    assert len(as_list.axes) == 1
    # drawing into a caller's axes returns its figure and adds no axes
    ax = fig.axes[0]
    assert viz.plot_trajectories(traj, ax=ax) is fig and len(fig.axes) == 1
    with pytest.raises(ValueError, match=r"\[T, B, 2\]"):
        viz.plot_trajectories(torch.zeros(4, 5, 3))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        viz.plot_trajectories(traj, data=torch.zeros(5))
    with pytest.raises(ValueError, match="share one shape"):
        viz.plot_trajectories([torch.zeros(3, 2), torch.zeros(4, 2)])


def test_plot_error_vs_nfe():
    res = {"euler": ([4, 8, 16], [0.25, 0.125, 0.0625]), "heun": ([8, 16, 32], [1 / 64, 1 / 256, 1 / 1024])}
    fig = viz.plot_error_vs_nfe(res, title="order")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["euler (order 1.00)", "heun (order 2.00)"]
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    _renders(fig)
    plain = viz.plot_error_vs_nfe(res, slopes=False)
    assert [t.get_text() for t in plain.axes[0].get_legend().get_texts()] == ["euler", "heun"]
    with pytest.raises(ValueError, match="non-empty dict"):
        viz.plot_error_vs_nfe({})
    with pytest.raises(ValueError, match="pair"):
        viz.plot_error_vs_nfe({"a": [1, 2, 3]})


def test_plot_sigma_schedules():
    s = torch.cat([torch.logspace(1, -2, 8), torch.zeros(1)])
    fig = viz.plot_sigma_schedules({"log-uniform": s, "half": s / 2})
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 2
    assert len(fig.axes[0].lines[0].get_xdata()) == 8  # the final 0 is not drawn
    _renders(fig)
    with pytest.raises(ValueError, match="1-D"):
        viz.plot_sigma_schedules({"bad": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=">= 0"):
        viz.plot_sigma_schedules({"bad": torch.tensor([1.0, -1.0])})


def test_denoising_strip():
    xs = [torch.rand(6, 1, 8, 8, generator=gen(i)) * 2 - 1 for i in range(5)]
    sig = [10.0, 3.0, 1.0, 0.1, 0.0]
    fig = viz.denoising_strip(xs, sig, n=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["σ=10", "σ=3", "σ=1", "σ=0.1", "σ=0"]
    _renders(fig)
    assert len(viz.denoising_strip(torch.stack(xs), torch.tensor(sig)).axes) == 1
    with pytest.raises(ValueError, match="one sigma per snapshot"):
        viz.denoising_strip(xs, sig[:-1])
    with pytest.raises(ValueError, match="share one shape"):
        viz.denoising_strip([xs[0], xs[1][:2]], sig[:2])


def test_no_pyplot_figures_leak():
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_fignums()
    viz.image_grid(torch.zeros(2, 1, 4, 4))
    viz.plot_sigma_schedules({"a": torch.tensor([1.0, 0.5, 0.0])})
    assert plt.get_fignums() == before


def test_book_style_from_setup_and_helpers():
    import dmlab
    from matplotlib import rcParams

    rcParams["legend.fontsize"], rcParams["figure.dpi"] = 6, 72
    dmlab.setup(seed=0)  # every chapter's setup cell applies the one style
    assert rcParams["figure.dpi"] >= 110 and rcParams["savefig.dpi"] >= 110
    for k in ("font.size", "legend.fontsize", "xtick.labelsize", "ytick.labelsize", "axes.labelsize"):
        assert rcParams[k] >= 9, k
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    assert len(set(colours)) == len(colours) >= 8
    fig = Figure()
    ax = fig.subplots()
    im = ax.imshow(torch.rand(4, 4).numpy())
    cb = viz.colorbar(im, ax, "accuracy")
    assert cb.ax.get_ylabel() == "accuracy"
    with pytest.raises(ValueError, match="label"):
        viz.colorbar(im, ax, "")
    ax.plot([0, 1], [0, 1], label="a")
    leg = viz.legend_outside(ax)
    fig.canvas.draw()
    box, axbox = leg.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axbox.x1  # the legend is right of the data, not on it
    _renders(fig)
