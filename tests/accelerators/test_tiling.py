import pytest
import torch

from dmlab import samplers, schedules
from dmlab.accelerators.tiling import seam_score, tile_starts, tiled


def pointwise(x, sigma, **cond):
    """A denoiser that acts on each pixel alone: every tiling must reproduce it exactly."""
    return torch.tanh(x) / (1 + sigma.view(-1, 1, 1, 1))


@pytest.mark.parametrize("mode", ["fixed", "shift", "overlap"])
def test_tiling_a_pointwise_denoiser_is_exact(mode):
    x = torch.randn(2, 1, 16, 32, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([3.0, 0.5])
    d = tiled(pointwise, 8, mode=mode, generator=torch.Generator().manual_seed(1))
    for _ in range(4):  # several random grid offsets
        assert torch.equal(d(x, sig), pointwise(x, sig))
    # a whole sampling run agrees too
    s = schedules.karras(3, 0.1, 10.0)
    torch.testing.assert_close(samplers.sample_euler(d, x * 10, s), samplers.sample_euler(pointwise, x * 10, s))


def test_tile_counts_and_grids():
    x = torch.zeros(1, 1, 8, 32)
    for mode, per_call in [("fixed", 4), ("overlap", 7)]:
        d = tiled(pointwise, 8, mode=mode)
        d(x, 1.0)
        assert d.stats == {"calls": 1, "tiles": per_call}
    starts = tile_starts(32, 8, 8, offset=3)
    assert starts == [(0, False), (3, True), (11, True), (19, True), (24, False)]
    assert tile_starts(32, 8, 4) == [(s, True) for s in range(0, 25, 4)]
    assert tile_starts(30, 8, 8) == [(0, True), (8, True), (16, True), (22, False)]
    d = tiled(pointwise, 8, mode="shift", generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        d(x, 1.0)
    assert 4 * 20 < d.stats["tiles"] <= 5 * 20  # a shifted grid costs one extra tile per row


def test_grid_tiles_own_their_pixels():
    """A denoiser that returns each pixel's column inside its tile shows which tile owns every output pixel."""
    def column(x, sigma, **cond):
        return torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x)

    d = tiled(column, 8, mode="shift", generator=torch.Generator().manual_seed(3))
    offsets = set()
    for _ in range(10):
        row = d(torch.zeros(1, 1, 8, 32), 1.0)[0, 0, 0]
        resets = [i for i in range(1, 32) if row[i] == 0]  # where a grid tile starts
        o = resets[0] if resets and resets[0] < 8 else 0
        offsets.add(o)
        want = [i if i < o else ((i - o) % 8 if i < o + 24 or o == 0 else i - 24) for i in range(32)]
        assert row.tolist() == want
    assert len(offsets) > 3  # the grid moves


def test_labels_are_repeated_for_every_tile():
    def label(x, sigma, class_labels):
        return class_labels.view(-1, 1, 1, 1).float() + 0 * x

    d = tiled(label, 8, mode="overlap")
    out = d(torch.zeros(3, 1, 8, 24), 1.0, class_labels=torch.tensor([2, 5, 7]))
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([2.0, 5.0, 7.0])) and out.std(dim=(1, 2, 3)).max() == 0


def test_seam_score():
    smooth = torch.linspace(0, 1, 32).repeat(1, 1, 8, 1)
    assert abs(seam_score(smooth, 8) - 1) < 1e-6
    blocks = smooth.clone()
    blocks[..., 8:16] += 0.5
    blocks[..., 24:] += 0.5
    assert seam_score(blocks, 8) > 3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tile"):
        tiled(pointwise, 0)
    with pytest.raises(ValueError, match="mode"):
        tiled(pointwise, 8, mode="mosaic")
    with pytest.raises(TypeError, match="generator"):
        tiled(pointwise, 8, mode="shift")
    with pytest.raises(ValueError, match="stride"):
        tiled(pointwise, 8, mode="fixed", stride=4)
    with pytest.raises(ValueError, match="multiples"):
        tiled(pointwise, 8, mode="fixed")(torch.zeros(1, 1, 8, 20), 1.0)
    with pytest.raises(ValueError, match="smaller"):
        tiled(pointwise, 8, mode="overlap")(torch.zeros(1, 1, 8, 6), 1.0)
