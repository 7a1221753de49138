"""Networks of the zoo: the digit classifier (the yardstick's feature space) and the diffusers models built from a
recipe's config (randomly initialised from a seed; no download)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recipes import N_CLASSES, Recipe

__all__ = ["DigitClassifier", "model_class", "build_model"]


class DigitClassifier(nn.Module):
    """A small CNN for 8x8 digits in ``[-1, 1]``: three 3x3 conv stages (GroupNorm, SiLU, 2x2 max-pool after the
    first two), global average pooling, a ``features``-wide penultimate layer and a linear head.

    Its penultimate activations (:meth:`features`) are the feature space of the digits Frechet distance
    (:func:`dmlab.metrics.digits_fd`), the small-scale analogue of FID's Inception pool features (Heusel et al. 2017).
    16x16 inputs (``load_digits(size=16)``, the latent pipeline's images) are area-resized to 8x8 first.
    """

    def __init__(self, widths=(32, 64, 128), features: int = 64, n_classes: int = N_CLASSES):
        super().__init__()
        c1, c2, c3 = widths
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())  # noqa: E731
        self.body = nn.Sequential(block(1, c1), nn.MaxPool2d(2), block(c1, c2), nn.MaxPool2d(2), block(c2, c3),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, features), nn.SiLU())
        self.head = nn.Linear(features, n_classes)

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"the digit classifier takes images [B, 1, H, W] in [-1, 1], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="area")
        return x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[B, features]``."""
        p = next(self.parameters())
        return self.body(self.prepare(x).to(p.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, 10]``."""
        return self.head(self.features(x))


NETWORKS = {"classifier": "DigitClassifier", "unet": "UNet2DModel", "dit": "DiTTransformer2DModel"}


def model_class(kind: str):
    """The class of the single network of ``kind`` (``DigitClassifier`` or a diffusers model class)."""
    if kind not in NETWORKS:
        raise ValueError(f"zoo kind {kind!r} has no single network class; known: {', '.join(NETWORKS)}")
    if NETWORKS[kind] == DigitClassifier.__name__:
        return DigitClassifier
    import diffusers

    return getattr(diffusers, NETWORKS[kind])


def build_model(recipe: Recipe, seed: int | None = None) -> nn.Module:
    """The (randomly initialised) network of a recipe: ``DigitClassifier``, ``UNet2DModel`` or
    ``DiTTransformer2DModel``. Initialisation uses ``torch.manual_seed(seed)`` inside a forked RNG state."""
    seed = recipe.train.seed if seed is None else seed
    if recipe.kind not in NETWORKS:
        raise ValueError(f"recipe {recipe.name!r} of kind {recipe.kind!r} has no single network; "
                         f"train it with `python -m dmlab.zoo train {recipe.name}`")
    cls = model_class(recipe.kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**recipe.model)
