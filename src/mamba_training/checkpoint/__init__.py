"""Durable checkpoints: run stores (local, S3), the commit protocol, async save, verified restore.

Knows nothing about training loops: it saves and restores a dict of Stateful objects.
"""

from mamba_training.checkpoint.manager import (
    CheckpointManager,
    CheckpointPolicy,
    CheckpointSummary,
    CommitInfo,
    RestoreInfo,
    list_checkpoints,
    read_latest,
    verify_checkpoint,
)
from mamba_training.checkpoint.store import LocalStore, NotFound, ObjectInfo, S3Store, Store, open_store

__all__ = [
    "CheckpointManager", "CheckpointPolicy", "CheckpointSummary", "CommitInfo", "RestoreInfo",
    "list_checkpoints", "read_latest", "verify_checkpoint",
    "LocalStore", "NotFound", "ObjectInfo", "S3Store", "Store", "open_store",
]
