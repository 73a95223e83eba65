"""The run configuration: typed sections, YAML loading, `--set section.key=value` overrides.

Config is data: validated once here, frozen, logged at start and saved in every checkpoint.
Every error names the offending key and becomes exit code 2 at the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mamba_training.errors import ConfigError

DEFAULT_CONFIG = "configs/tiny.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Section):
    """Mamba-1 shape; names follow Hugging Face `MambaConfig`."""

    d_model: int = Field(128, gt=0)
    n_layer: int = Field(4, gt=0)
    d_state: int = Field(16, gt=0)
    d_conv: int = Field(4, gt=0)
    expand: int = Field(2, gt=0)
    dt_rank: int | Literal["auto"] = "auto"
    vocab_size: int | Literal["auto"] = "auto"  # "auto": taken from the tokenizer
    pad_vocab_size_multiple: int = Field(8, gt=0)
    layer_norm_epsilon: float = Field(1e-5, gt=0)
    scan: str = "auto"  # auto | chunked | reference | triton | cuda (see mamba_training.model.scan)

    @field_validator("dt_rank", "vocab_size")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return value


class DataConfig(_Section):
    corpus: str = "bundled"  # "bundled", a text file or folder, or a folder made by `prepare`
    tokenizer: str = "byte"  # "byte", or a path to a Hugging Face tokenizers JSON file
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    shard_dtype: Literal["auto", "uint16", "uint32"] = "auto"
    cache_dir: str = ".cache/mamba-training/data"


class TrainConfig(_Section):
    max_steps: int = Field(300, gt=0)
    seed: int = Field(1337, ge=0)
    batch_size: int = Field(16, gt=0)  # sequences per optimizer step, summed over ranks
    seq_len: int = Field(128, gt=1)
    grad_accum: int = Field(1, gt=0)  # micro-batches per step when micro_batch_size is not set
    # Sequences per rank per forward/backward; set, the accumulation is derived from the world
    # size (accumulation_steps), so a rank's memory stays the same when nodes leave or join.
    micro_batch_size: int | None = Field(None, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(8, gt=0)
    log_every: int = Field(10, gt=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on a bf16 GPU, else off; bf16: any device, CPU too
    threads: int | None = Field(None, gt=0)  # torch intra-op threads; None: torch's default
    sample_tokens: int = Field(200, ge=0)  # length of the text sample generated at the end
    max_cost_usd: float | None = Field(None, gt=0)  # budget guard: stop gracefully past it
    # How long a collective waits for a peer (gradients, the per-step stop decision): a node lost
    # without a TCP reset (frozen, network cut) is detected within this. Joining the process
    # group at start is bounded by it too, so it must cover the spread of the ranks' start-ups.
    collective_timeout_s: float = Field(60.0, gt=0, le=3600)
    # How long the ranks wait for each other where one of them does slow work alone (rank 0
    # preparing the corpus or committing and uploading a checkpoint, unequal restores): these
    # waits use a group of their own with this timeout (docs/design.md, "Multi-node training").
    # A fixed bound, torch's gloo default, not one derived from spot.grace_seconds: corpus
    # preparation and a final upload grow with the data and the model, not with the stop grace.
    long_wait_timeout_s: float = Field(1800.0, gt=0, le=86400)


class CheckpointConfig(_Section):
    store: str = "runs/tiny"  # the run's home: a directory or s3://bucket/prefix/run
    every_steps: int = Field(100, ge=0)  # 0: no step-based saves
    every_minutes: float | None = Field(None, gt=0)
    keep_last: int = Field(3, gt=0)
    keep_every: int = Field(0, ge=0)  # also keep every M-th step; 0: none
    async_save: bool = True
    cache_dir: str = ".cache/mamba-training/checkpoints"  # local copy of remote checkpoints


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    tensorboard: bool = True
    plot: bool = True
    cloudwatch: Literal["auto", "on", "off"] = "auto"  # auto: on when running on EC2


class SpotConfig(_Section):
    imds_url: str = "auto"  # auto: only on EC2 (DMI check); off; or a metadata service URL
    poll_seconds: float = Field(5.0, gt=0)
    grace_seconds: float = Field(30.0, gt=0)
    rebalance_checkpoint: bool = True

    @field_validator("imds_url", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value

    @field_validator("imds_url")
    @classmethod
    def _url_or_keyword(cls, value: str) -> str:
        if value in ("auto", "off") or value.startswith(("http://", "https://")):
            return value
        raise ValueError("must be 'auto', 'off' or an http(s):// URL")


_REGION_PATTERN = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


@lru_cache(maxsize=1)
def known_aws_regions() -> frozenset[str]:
    """Every region botocore's endpoint data knows, in any partition (aws, aws-cn, aws-us-gov, ...).

    Read from the data file, not through a botocore session: a session reads the AWS profile, and a
    region check must not fail on a missing profile (that is reported by name where it is used).
    """
    import botocore.loaders

    data = botocore.loaders.create_loader().load_data("endpoints")
    regions: set[str] = set()
    for partition in data.get("partitions", []):
        regions.update(partition.get("regions", {}))
        regions.update(partition.get("services", {}).get("ec2", {}).get("endpoints", {}))
    return frozenset(r for r in regions if _REGION_PATTERN.match(r))


def unknown_region_reason(region: str) -> str | None:
    """None for a region AWS has, else why not. MAMBA_TRAINING_EXTRA_REGIONS (comma-separated)
    admits regions newer than this botocore."""
    extra = {r.strip() for r in os.environ.get("MAMBA_TRAINING_EXTRA_REGIONS", "").split(",") if r.strip()}
    if region in known_aws_regions() | extra:
        return None
    hint = "" if _REGION_PATTERN.match(region) else " (regions look like us-east-1)"
    return f"unknown AWS region {region!r}{hint}; a newer one can be admitted with MAMBA_TRAINING_EXTRA_REGIONS"


class AwsConfig(_Section):
    region: str | None = None
    profile: str | None = None
    project: str = "mamba-training"
    environment: str = "dev"
    metrics_namespace: str = "MambaTraining"

    @field_validator("region")
    @classmethod
    def _known_region(cls, value: str | None) -> str | None:
        reason = None if value is None else unknown_region_reason(value)
        if reason:
            raise ValueError(reason)
        return value


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    spot: SpotConfig = SpotConfig()
    aws: AwsConfig = AwsConfig()

    @model_validator(mode="after")
    def _batch_divides(self) -> "Config":
        t = self.train
        if t.micro_batch_size is not None and t.grad_accum != 1:
            raise ValueError(
                f"set train.micro_batch_size ({t.micro_batch_size}) or train.grad_accum ({t.grad_accum}), "
                "not both: with a micro-batch size the accumulation is derived from the world size"
            )
        if t.micro_batch_size is not None:
            accumulation_steps(t, 1)  # the world size is known at start; one process must fit
        elif t.batch_size % t.grad_accum:
            raise ValueError(
                f"train.batch_size ({t.batch_size}) must be a multiple of "
                f"train.grad_accum ({t.grad_accum})"
            )
        if t.long_wait_timeout_s < t.collective_timeout_s:
            raise ValueError(
                f"train.long_wait_timeout_s ({t.long_wait_timeout_s:g}) must be at least "
                f"train.collective_timeout_s ({t.collective_timeout_s:g})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self, section: str | None = None) -> str:
        """A stable short hash of the whole config, or of one section (e.g. "model")."""
        data = self.to_dict() if section is None else self.to_dict()[section]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank at `world_size`.

    With `train.micro_batch_size` set: batch_size / (world_size x micro_batch_size), so the global
    batch stays `train.batch_size` and each rank's forward pass stays the same size at any world
    size. Without it: `train.grad_accum`, and each rank's micro-batch is its share / grad_accum.
    Either way the rank's share of the global batch must split evenly (ConfigError, naming the keys
    and the world size, when it does not).
    """
    batch = train.batch_size
    if world_size < 1 or batch % world_size:
        raise ConfigError(f"train.batch_size {batch} does not split evenly over world size {world_size}")
    share = batch // world_size
    if train.micro_batch_size is None:
        if share % train.grad_accum:
            raise ConfigError(
                f"train.batch_size {batch} over world size {world_size} gives {share} sequences per rank, "
                f"which train.grad_accum {train.grad_accum} does not split evenly")
        return train.grad_accum
    micro = train.micro_batch_size
    if share % micro:
        raise ConfigError(
            f"train.batch_size {batch} / (world size {world_size} x train.micro_batch_size {micro}) "
            f"is not a whole number: each rank's {share} sequences do not split into micro-batches of {micro}")
    return share // micro


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.max_steps=100` -> (["train", "max_steps"], 100); values are read as YAML scalars."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool):
        value = raw.strip()  # YAML 1.1 reads off/no/yes as booleans; pydantic coerces where a bool is wanted
    return key.split("."), value


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown config key {where}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:  # a rule across keys: its message names them
        return message
    return f"config key {where}: {message}{shown}"


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a plain dict (plus `section.key=value` overrides) into a frozen Config."""
    data = json.loads(json.dumps(data or {}))
    for item in overrides:
        path, value = parse_override(item)
        _apply(data, path, value)
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (default configs/tiny.yaml, else built-in defaults) and apply overrides."""
    data: dict[str, Any] = {}
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(file)!r} is not valid YAML: {error}".splitlines()[0]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(file)!r} must hold a mapping of sections")
        data = loaded or {}
    return build_config(data, overrides)
