"""Handles: the reversible way accelerators attach to a model. The machinery lives in :mod:`dmlab.hooks` (the one
hook layer) and :mod:`dmlab.anatomy` (model lookup); this module re-exports it under its historical names."""
from ..anatomy import module_names, resolve_model, unknown_name_error
from ..hooks import (CallCounter, Handle, active_handles, active_methods, add_hook, claim, count_calls,
                     foreign_hooks, input_tensor, patch_forward, require_no_active, timestep_of)

__all__ = ["Handle", "CallCounter", "add_hook", "claim", "count_calls", "patch_forward", "resolve_model",
           "timestep_of", "active_methods", "active_handles", "require_no_active", "foreign_hooks", "module_names",
           "unknown_name_error", "input_tensor"]
