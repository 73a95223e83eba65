"""The package's exception types. Each names its culprit; the CLI maps them to exit codes.

Exit codes are decided only in `cli/`: 2 for usage and bad input, 1 for runtime failures
(AWS refused, network down), 75 when the run was preempted and should resume elsewhere.
"""

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "preempted: resume elsewhere"


class MambaTrainingError(Exception):
    """Base class; `exit_code` is what the CLI exits with when this reaches it."""

    exit_code = EXIT_RUNTIME


class UsageError(MambaTrainingError):
    """Bad input from the user: a flag, a path, a value."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """An unknown configuration key, a bad value, a missing config file."""


class DataError(UsageError):
    """A corpus path that does not exist, a corrupted token shard, a bad tokenizer file."""


class ModelError(UsageError):
    """An invalid model shape, or weights that do not fit the configured model."""


class StoreError(MambaTrainingError):
    """A checkpoint store could not be read or written (missing bucket, denied, disk full)."""


class CheckpointError(MambaTrainingError):
    """A checkpoint is missing, corrupt, or does not fit the run."""


class FencedError(CheckpointError):
    """Another writer advanced `latest.json`: this writer must stop writing."""


class AwsError(MambaTrainingError):
    """AWS refused a request or could not be reached."""


class SpotError(MambaTrainingError):
    """The instance metadata service misbehaved in a way the caller must know about."""


class Preempted(MambaTrainingError):
    """The run stopped on an interruption notice or signal after committing its state."""

    exit_code = EXIT_PREEMPTED
