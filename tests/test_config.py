from pathlib import Path

import pytest

from mamba_training.config import build_config, load_config
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
