"""Spot interruption handling: the IMDSv2 client, the watcher thread, and the IMDS emulator.

Never imports torch (an import-linter contract): the trainer pulls events from here, not the
other way round. The emulator lives in `mamba_training.spot.emulator` and is imported on demand.
"""

from mamba_training.spot.imds import EC2_IMDS_URL, ImdsClient, ImdsUnavailable, on_ec2, resolve_imds_url
from mamba_training.spot.watcher import (
    NOTICE_SECONDS,
    Interruption,
    LifecycleTerminating,
    Rebalance,
    SpotEvent,
    Watcher,
    make_watcher,
)

__all__ = [
    "EC2_IMDS_URL", "ImdsClient", "ImdsUnavailable", "on_ec2", "resolve_imds_url",
    "NOTICE_SECONDS", "Interruption", "LifecycleTerminating", "Rebalance", "SpotEvent", "Watcher",
    "make_watcher",
]
