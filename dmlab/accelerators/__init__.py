"""Accelerators: reversible, composable speed-ups on diffusers models; every one returns a dmlab.hooks.Handle."""
from .caching import (DeepCacheConfig, EncoderPropagationConfig, FeatureCacheConfig, FeatureInheritanceConfig,
                      apply_deepcache, apply_encoder_propagation, apply_feature_cache, apply_feature_inheritance)
from .handle import Handle
from .diffusers_caches import (apply_diffusers_cache, apply_first_block_cache, apply_mag_cache, apply_pab,
                               apply_taylorseer, calibrate_mag_ratios)
from .tstitch import TStitch, tstitch
from .harness import Testbed
from .quantization import QuantConfig, apply_quantization
from .quant_calibration import calibration_set
from .quest import quest_finetune
from .pruning import LayerPruneConfig, apply_layer_pruning, distill_pruned, prunable_units, select_units, unit_scores
from .pruning_masks import apply_masks, learn_masks, threshold_masks
from .early_exit import (EarlyExitConfig, ExitHeads, apply_early_exit, build_exit_heads, exit_heads_for, load_exit_heads,
                         train_exit_heads)
from .linear_attention import (LinearAttentionConfig, apply_linear_attention, build_linear_attention, cost_curve,
                               distill_linear_attention, linear_attention_for, load_linear_attention)
from .tiling import seam_score, tiled
from .frontier import Family, Frontier, Stack, pareto_front

# The curated surface: Config/apply pairs, the Handle they return, the denoiser transformers (T-Stitch, tiling), the
# trained adapters' entry points and the frontier. Plumbing lives where it belongs: hooks (patch_forward, CallCounter,
# count_calls, resolve_model) in dmlab.hooks, module lists in dmlab.anatomy and the submodules (caching.deepcache_modules,
# tstitch.denoising_error, quantization.temporal_cache_bytes, pruning_masks.sliced_copy, ...).
__all__ = [
    "Handle",
    "DeepCacheConfig", "apply_deepcache", "EncoderPropagationConfig", "apply_encoder_propagation",
    "FeatureCacheConfig", "apply_feature_cache", "FeatureInheritanceConfig", "apply_feature_inheritance",
    "apply_diffusers_cache", "apply_first_block_cache", "apply_mag_cache", "apply_pab", "apply_taylorseer",
    "calibrate_mag_ratios",
    "QuantConfig", "apply_quantization", "calibration_set", "quest_finetune",
    "LayerPruneConfig", "apply_layer_pruning", "distill_pruned", "prunable_units", "select_units", "unit_scores",
    "apply_masks", "learn_masks", "threshold_masks",
    "EarlyExitConfig", "apply_early_exit", "ExitHeads", "build_exit_heads", "train_exit_heads", "load_exit_heads", "exit_heads_for",
    "LinearAttentionConfig", "apply_linear_attention", "build_linear_attention", "distill_linear_attention",
    "load_linear_attention", "linear_attention_for", "cost_curve",
    "tstitch", "TStitch", "tiled", "seam_score",
    "Testbed", "Family", "Frontier", "Stack", "pareto_front",
]
