"""Durable checkpoints: run stores (local, S3), the commit protocol, async save, verified restore.

Knows nothing about training loops: it saves and restores a dict of Stateful objects.
`CheckpointManager` needs torch and is imported on first use, so the stores and the protocol
(listing, verifying, copying checkpoints: the CLI, the run-records reader) start without it.
"""

from typing import Any

from mamba_training.checkpoint.protocol import (
    CheckpointPolicy,
    CheckpointSummary,
    CommitInfo,
    RestoreInfo,
    RetentionPlan,
    apply_retention,
    download_checkpoint,
    latest_committed_step,
    list_checkpoints,
    prefetch_latest,
    read_latest,
    retention_plan,
    upload_checkpoint,
    verify_checkpoint,
)
from mamba_training.checkpoint.store import LocalStore, NotFound, ObjectInfo, S3Store, Store, open_store

__all__ = [
    "CheckpointManager", "CheckpointPolicy", "CheckpointSummary", "CommitInfo", "RestoreInfo", "RetentionPlan",
    "apply_retention", "download_checkpoint", "latest_committed_step", "list_checkpoints", "prefetch_latest",
    "read_latest", "retention_plan", "upload_checkpoint", "verify_checkpoint",
    "LocalStore", "NotFound", "ObjectInfo", "S3Store", "Store", "open_store",
]


def __getattr__(name: str) -> Any:
    if name == "CheckpointManager":
        from mamba_training.checkpoint.manager import CheckpointManager

        return CheckpointManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
