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
from .capture import Capture, capture, extract_features, tokens_to_grid, vit_features
from .classifier import (ClassConditional, ClassifierResult, classifier_sigmas, diffusion_classify, label_conds,
                         linear_probe, pooled_features, probe_grid, prune_table)
from .correspondence import co_pca, fuse, grid_keypoints, l2_normalize, layer_descriptor, load_spair, match_points, warp_pck
from .density import gaussian_log_prior, ito_log_density, sample_reverse_sde, superpose
from .fields import add_field, divergence, energy_distance, jacobian, score_of
from .fokker_planck import fp_regulariser, log_fp_residual, ode_sde_gap, score_fp_residual
from .gauge import helmholtz_split, intrinsic_dimension, jacobian_asymmetry, mle_dimension, skew_gauge
from .drift import DriftReport, adjacent_mse, feature_drift, fnorm_curve, relative_change, trajectory_features, unet_blocks
from .subspace import (LowRankDenoiser, generalisation, lowrank_denoise, molrg, sample_per_subspace, subspace_clustering,
                       subspace_distance, train_lowrank_dae)

__all__ = ["Capture", "capture", "extract_features", "tokens_to_grid", "vit_features",
           "gaussian_log_prior", "ito_log_density", "sample_reverse_sde", "superpose",
           "add_field", "divergence", "energy_distance", "jacobian", "score_of",
           "fp_regulariser", "log_fp_residual", "ode_sde_gap", "score_fp_residual",
           "helmholtz_split", "intrinsic_dimension", "jacobian_asymmetry", "mle_dimension", "skew_gauge",
           "LowRankDenoiser", "generalisation", "lowrank_denoise", "molrg", "sample_per_subspace", "subspace_clustering",
           "subspace_distance", "train_lowrank_dae",
           "ClassConditional", "ClassifierResult", "classifier_sigmas", "diffusion_classify", "label_conds", "linear_probe",
           "pooled_features", "probe_grid", "prune_table",
           "co_pca", "fuse", "grid_keypoints", "l2_normalize", "layer_descriptor", "load_spair", "match_points", "warp_pck",
           "DriftReport", "adjacent_mse", "feature_drift", "fnorm_curve", "relative_change", "trajectory_features",
           "unet_blocks"]
