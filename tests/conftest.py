import os

# Before any Hugging Face import: a missing model must fail at once, never retry over the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _smooth_mixture():
    """The smooth test mixture: 2-D, three components with variances 0.2-0.4."""
    from dmlab.exact import GMMDenoiser

    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    covs = torch.stack([torch.tensor([[0.3, 0.05], [0.05, 0.2]]), 0.4 * torch.eye(2), 0.25 * torch.eye(2)]).double()
    return GMMDenoiser(torch.tensor([0.3, 0.3, 0.4]), means, covs)


@pytest.fixture
def smooth_gmm():
    """The smooth test mixture, fresh for each test (tests may move it to another device)."""
    return _smooth_mixture()


@pytest.fixture(scope="module")
def smooth_gmm_module():
    """The same mixture shared by a module (exact references computed from it are cached per module)."""
    return _smooth_mixture()


@pytest.fixture(scope="module")
def unet():
    """A config-built, randomly initialised diffusers UNet2DModel on 8x8 single-channel images (seeded)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()

