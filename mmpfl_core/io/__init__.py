"""Reading and writing results safely: checkpoints (safetensors + JSON, never pickle) and run directories."""

from mmpfl_core.io.checkpoint import (
    CheckpointError,
    checkpoint_path,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    numpy_generator_state,
    prune_checkpoints,
    restore_numpy_generator,
    restore_torch_generator,
    save_checkpoint,
    torch_generator_state,
    unflatten_optimizer_state,
)
from mmpfl_core.io.run_directory import RunDirectory, RunDirectoryError, environment_info

__all__ = [
    "CheckpointError",
    "RunDirectory",
    "RunDirectoryError",
    "checkpoint_path",
    "environment_info",
    "flatten_optimizer_state",
    "latest_checkpoint",
    "load_checkpoint",
    "numpy_generator_state",
    "prune_checkpoints",
    "restore_numpy_generator",
    "restore_torch_generator",
    "save_checkpoint",
    "torch_generator_state",
    "unflatten_optimizer_state",
]
