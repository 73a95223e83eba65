from pathlib import Path

import pytest

from mamba_training.config import accumulation_steps, build_config, load_config
from mamba_training.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.train.max_steps > 0


def test_overrides_are_parsed_as_yaml_scalars() -> None:
    config = build_config({}, ["train.max_steps=7", "spot.imds_url=off", "checkpoint.store=s3://b/p/run"])
    assert config.train.max_steps == 7
    assert config.spot.imds_url == "off"
    assert config.checkpoint.store == "s3://b/p/run"


def test_unknown_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key train\.max_stepz"):
        build_config({}, ["train.max_stepz=3"])


def test_bad_value_names_the_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps.*-1"):
        build_config({}, ["train.max_steps=-1"])


def test_bad_imds_url_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"spot\.imds_url"):
        build_config({}, ["spot.imds_url=169.254.1.1"])


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen_and_hash_is_stable() -> None:
    a, b = build_config({}), build_config({})
    assert a.hash() == b.hash()
    assert a.hash("model") != build_config({}, ["model.d_model=64"]).hash("model")
    with pytest.raises(Exception):
        a.train.max_steps = 5  # type: ignore[misc]


# ---- process-group timeouts (docs/design.md, "Multi-node training")
def test_collective_timeouts_default_to_a_minute_and_half_an_hour() -> None:
    train = build_config({}).train
    assert (train.collective_timeout_s, train.long_wait_timeout_s) == (60.0, 1800.0)
    assert build_config({}, ["train.collective_timeout_s=10"]).train.collective_timeout_s == 10.0


@pytest.mark.parametrize(("overrides", "named"), [
    (["train.collective_timeout_s=0"], r"config key train\.collective_timeout_s: .*greater than 0"),
    (["train.collective_timeout_s=-5"], r"config key train\.collective_timeout_s: .*greater than 0"),
    (["train.collective_timeout_s=7200"], r"config key train\.collective_timeout_s: .*less than or equal to 3600"),
    (["train.collective_timeout_s=soon"], r"config key train\.collective_timeout_s: .*valid number"),
    (["train.long_wait_timeout_s=0"], r"config key train\.long_wait_timeout_s: .*greater than 0"),
    (["train.collective_timeout_s=120", "train.long_wait_timeout_s=60"],
     r"^train\.long_wait_timeout_s \(60\) must be at least train\.collective_timeout_s \(120\)$"),
])
def test_a_bad_timeout_is_one_line_naming_the_key(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        build_config({}, overrides)
    assert "\n" not in str(caught.value)


# ---- gradient accumulation derived from the world size
@pytest.mark.parametrize(("batch", "micro", "accum", "world", "expected"), [
    (16, None, 1, 1, 1),   # no micro-batch size: grad_accum as given, at any size
    (16, None, 2, 4, 2),
    (16, 2, 1, 1, 8),      # the global batch stays 16: 1 x 8 x 2
    (16, 2, 1, 2, 4),      # 2 x 4 x 2
    (16, 2, 1, 8, 1),      # 8 x 1 x 2
    (12, 2, 1, 3, 2),
    (12, 6, 1, 2, 1),
])
def test_accumulation_keeps_the_global_batch(batch: int, micro: int | None, accum: int, world: int,
                                             expected: int) -> None:
    overrides = [f"train.batch_size={batch}", f"train.grad_accum={accum}"]
    if micro is not None:
        overrides.append(f"train.micro_batch_size={micro}")
    train = build_config({}, overrides).train
    assert accumulation_steps(train, world) == expected
    assert world * expected * (micro or batch // world // accum) == batch


@pytest.mark.parametrize(("batch", "micro", "accum", "world", "named"), [
    (16, 2, 1, 16, r"train\.batch_size 16 / \(world size 16 x train\.micro_batch_size 2\) is not a whole number"),
    (12, 4, 1, 2, r"train\.batch_size 12 / \(world size 2 x train\.micro_batch_size 4\) is not a whole number"),
    (16, None, 1, 3, r"train\.batch_size 16 does not split evenly over world size 3"),
    (16, None, 4, 8, r"train\.grad_accum 4 does not split evenly"),
])
def test_a_batch_that_does_not_split_names_the_keys_and_the_world_size(
        batch: int, micro: int | None, accum: int, world: int, named: str) -> None:
    overrides = [f"train.batch_size={batch}", f"train.grad_accum={accum}"]
    if micro is not None:
        overrides.append(f"train.micro_batch_size={micro}")
    train = build_config({}, overrides).train
    with pytest.raises(ConfigError, match=named) as caught:
        accumulation_steps(train, world)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("overrides", "named"), [
    (["train.batch_size=16", "train.micro_batch_size=5"], r"train\.micro_batch_size 5"),  # not even on one process
    (["train.micro_batch_size=0"], r"config key train\.micro_batch_size: .*greater than 0"),
    (["train.micro_batch_size=2", "train.grad_accum=4"],
     r"^set train\.micro_batch_size \(2\) or train\.grad_accum \(4\), not both"),
])
def test_a_bad_micro_batch_size_is_refused_at_load(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_config({}, overrides)
