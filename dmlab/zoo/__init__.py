"""The model zoo: small real diffusion models (the same diffusers classes as Stable Diffusion and DiT) trained on
digits that ship with scikit-learn, committed as safetensors under ``data/zoo/`` with a registry.

>>> clf = dmlab.zoo.load("classifier")  # the yardstick's feature network
>>> denoiser, unet = dmlab.zoo.load_denoiser("unet_l")  # D(x, sigma, class_labels=y)
>>> pipe = dmlab.zoo.load("sd_tiny")  # a real StableDiffusionPipeline, offline
>>> heads = dmlab.zoo.load("dit_l_exit")  # an adapter: DeeDiff exit heads on dit_l

Adapters (exit heads, linear attention) are zoo entries like the models, with a recipe naming their base model.
Every file's sha256 is checked against ``registry.json`` before it is loaded. Retrain any model with
``python -m dmlab.zoo train NAME`` (recipes in :mod:`dmlab.zoo.recipes`, one table per kind in :mod:`dmlab.zoo.kinds`; the loop is
:func:`dmlab.train.fit`, data-parallel under ``accelerate launch -m dmlab.zoo train NAME``). Where files come from (checkout,
``$DMLAB_DATA``, download cache): :mod:`dmlab.zoo.store`. Class id 10 is the "null" label for classifier-free guidance.
"""
from __future__ import annotations

from .kinds import ADAPTER_KINDS, KINDS, Kind
from .recipes import N_CLASSES, NULL_CLASS, RECIPES, get_recipe
from .registry import _entry, _load_folder, _load_unverified, info, load, load_denoiser, names, registry_table, verify_all
from .store import ZooIntegrityError, fetch, read_registry, zoo_dir

__all__ = ["load", "load_denoiser", "names", "info", "registry_table", "verify_all", "get_recipe", "RECIPES",
           "N_CLASSES", "NULL_CLASS", "ZooIntegrityError", "zoo_dir", "KINDS", "Kind", "ADAPTER_KINDS"]
