"""Probes: read what a frozen diffusion model knows, without editing it.

* :mod:`.capture` - ``capture(model, layers)`` forward-hook recorder, ``extract_features`` (DIFT / SD-DINO recipe),
  ``vit_features`` (DINOv2 tokens on a grid).
* :mod:`.fields` - scores of denoisers, Jacobians, divergences, energy distance.
* :mod:`.fokker_planck` - the Fokker-Planck residual and regulariser, the ODE-SDE gap (paper 15).
* :mod:`.gauge` - gauge fields, the conservative/gauge split, intrinsic dimension (paper 59).
* :mod:`.density` - the Itô log-density estimator, reverse-SDE paths, SuperDiff AND/OR (paper 31).
* :mod:`.subspace` - mixtures of low-rank Gaussians and subspace clustering (paper 66).
* :mod:`.classifier` - the Diffusion Classifier (paper 33) and linear probes on denoiser features (paper 54).
* :mod:`.correspondence` - SD + DINO feature fusion and matching, PCK on exact warps (paper 10).
* :mod:`.drift` - how much each UNet block's output changes along a trajectory (paper 35's analysis).

All of these import torch only.
"""
from .capture import Capture, capture, extract_features, vit_features
from .classifier import (ClassConditional, ClassifierResult, classifier_sigmas, diffusion_classify, linear_probe,
                         probe_grid)
from .correspondence import fuse, load_spair, match_points, warp_pck
from .density import gaussian_log_prior, ito_log_density, sample_reverse_sde, superpose
from .fields import add_field, divergence, energy_distance, jacobian, score_of
from .fokker_planck import fp_regulariser, ode_sde_gap, score_fp_residual
from .gauge import helmholtz_split, intrinsic_dimension, jacobian_asymmetry, mle_dimension, skew_gauge
from .drift import DriftReport, feature_drift
from .subspace import (LowRankDenoiser, generalisation, molrg, sample_per_subspace, subspace_clustering,
                       subspace_distance, train_lowrank_dae)

# The paper entry points and the fields they are built from; helpers (tokens_to_grid, l2_normalize, co_pca,
# adjacent_mse, pooled_features, label_conds, lowrank_denoise, log_fp_residual, ...) stay in their submodules.
__all__ = ["Capture", "capture", "extract_features", "vit_features",
           "gaussian_log_prior", "ito_log_density", "sample_reverse_sde", "superpose",
           "add_field", "divergence", "energy_distance", "jacobian", "score_of",
           "fp_regulariser", "ode_sde_gap", "score_fp_residual",
           "helmholtz_split", "intrinsic_dimension", "jacobian_asymmetry", "mle_dimension", "skew_gauge",
           "LowRankDenoiser", "generalisation", "molrg", "sample_per_subspace", "subspace_clustering",
           "subspace_distance", "train_lowrank_dae",
           "ClassConditional", "ClassifierResult", "classifier_sigmas", "diffusion_classify", "linear_probe",
           "probe_grid",
           "fuse", "load_spair", "match_points", "warp_pck",
           "DriftReport", "feature_drift"]
