"""The runtime: the only genkit package that imports Accelerate.

One :class:`Runtime` per process, built from a recipe's ``runtime`` section, owns the ``Accelerator``
(mixed precision, device placement, multi-process through ``accelerate launch`` or ``torchrun``), the
run folder (``config.yaml``, ``log.jsonl``, ``metrics.json``), checkpoints and the progress bar.
Training loops call it; they never touch Accelerate directly.
"""

from __future__ import annotations

from genkit.runtime.checkpoint import CheckpointManager, find_latest_checkpoint
from genkit.runtime.dist import ProcessInfo, barrier, process_info
from genkit.runtime.ema import EMA
from genkit.runtime.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    save_safetensors,
)
from genkit.runtime.progress import Progress
from genkit.runtime.runtime import Runtime, RuntimeConfig, software_versions

__all__ = [
    "Runtime",
    "RuntimeConfig",
    "CheckpointManager",
    "find_latest_checkpoint",
    "EMA",
    "Progress",
    "ProcessInfo",
    "process_info",
    "barrier",
    "software_versions",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_safetensors",
    "save_safetensors",
]
