"""Method-agnostic training engine: one compiled program per fit, folds as a leading axis."""

from .folds import fit_folds, fold_keys, fold_mesh, map_folds, prepare_folds, run_folds, stack_trees, use_devices
from .loop import FitResult, LoopConfig, Method, Splits, chunk_map, chunked, fit, fit_one, make_splits, valid_mean
from .lr_finder import LRFinder, lr_range_test, suggest_lr

__all__ = [
    "FitResult",
    "LoopConfig",
    "LRFinder",
    "Method",
    "Splits",
    "chunk_map",
    "chunked",
    "fit",
    "fit_one",
    "fit_folds",
    "fold_keys",
    "fold_mesh",
    "lr_range_test",
    "make_splits",
    "map_folds",
    "prepare_folds",
    "run_folds",
    "stack_trees",
    "suggest_lr",
    "use_devices",
    "valid_mean",
]
