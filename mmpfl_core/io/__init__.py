"""Reading and writing results safely: checkpoints (safetensors + JSON, never pickle) and run directories."""

from mmpfl_core.io.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from mmpfl_core.io.run_directory import RunDirectory, RunDirectoryError, environment_info

__all__ = [
    "CheckpointError",
    "RunDirectory",
    "RunDirectoryError",
    "checkpoint_path",
    "environment_info",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]
