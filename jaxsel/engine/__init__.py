"""Method-agnostic training engine: one compiled program per fit, folds as a leading axis."""

from .checkpoint import (
    check_checkpoint_args,
    fingerprint,
    fit_checkpointed,
    fit_folds_checkpointed,
    read_checkpoint,
    run_checkpointed,
    tagged_path,
    write_checkpoint,
)
from .faults import DivergenceError, check_history, first_divergence
from . import linalg
from .folds import fit_folds, fold_keys, fold_mesh, map_folds, prepare_folds, run_folds, stack_trees, use_devices
from .loop import (
    Checkpoint,
    FitResult,
    LoopConfig,
    Method,
    Splits,
    checkpoint_done,
    chunk_map,
    chunked,
    fit,
    fit_one,
    make_splits,
    start,
    valid_mean,
)
from .optim import AdamState, adam
from .lr_finder import LRFinder, lr_range_test, suggest_lr
from .stream import StreamFit, fit_stream

__all__ = [
    "AdamState",
    "adam",
    "check_checkpoint_args",
    "fingerprint",
    "tagged_path",
    "fit_checkpointed",
    "fit_folds_checkpointed",
    "read_checkpoint",
    "run_checkpointed",
    "write_checkpoint",
    "Checkpoint",
    "checkpoint_done",
    "start",
    "DivergenceError",
    "check_history",
    "first_divergence",
    "FitResult",
    "LoopConfig",
    "LRFinder",
    "Method",
    "Splits",
    "StreamFit",
    "chunk_map",
    "chunked",
    "fit",
    "fit_one",
    "fit_folds",
    "fit_stream",
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
    "linalg",
    "valid_mean",
]
