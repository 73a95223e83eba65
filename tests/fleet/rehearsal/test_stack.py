"""The stack's rehearsal wiring: the moto override, the CLI config, and the variables it is applied with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mamba_training.errors import UsageError
from mamba_training.fleet.rehearsal.stack import SERVICES, cli_config, default_stack_dir, override, tf_vars


def test_the_override_sends_every_service_to_moto() -> None:
    text = override("http://127.0.0.1:5000")
    assert all(f'{service} = "http://127.0.0.1:5000"' in text for service in SERVICES)
    assert "skip_credentials_validation = true" in text and 'access_key                  = "testing"' in text


def test_the_cli_config_uses_the_mirror_and_a_shared_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "registry.terraform.io" / "hashicorp" / "aws").mkdir(parents=True)
    monkeypatch.setenv("MAMBA_TF_PROVIDER_MIRROR", str(mirror))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text = cli_config(tmp_path).read_text()
    assert f'path    = "{mirror}"' in text
    assert f'plugin_cache_dir = "{tmp_path / "cache" / "mamba-training" / "terraform-plugins"}"' in text


def test_a_mirror_without_the_provider_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAMBA_TF_PROVIDER_MIRROR", str(tmp_path))
    with pytest.raises(UsageError, match=f"MAMBA_TF_PROVIDER_MIRROR={tmp_path} has no registry.terraform.io"):
        cli_config(tmp_path)


def test_the_variables_size_the_group_and_start_at_zero() -> None:
    values = dict(v[len("-var="):].split("=", 1) for v in tf_vars("ami-1", 3, "g5.xlarge", "us-east-1"))
    assert (values["max_instances"], values["desired_instances"], values["min_instances"]) == ("3", "0", "0")
    assert json.loads(values["instance_types"]) == ["g5.xlarge"] and values["environment"] == "rehearsal"


def test_the_bucket_takes_plain_http_like_deploy_sh_endpoint() -> None:
    # moto serves plain HTTP and evaluates bucket policies: the stack's own switch, not an edit.
    values = dict(v[len("-var="):].split("=", 1) for v in tf_vars("ami-1", 2, "g4dn.xlarge", "us-east-1"))
    assert values["deny_insecure_transport"] == "false"
    assert '-var "deny_insecure_transport=false"' in (default_stack_dir() / "deploy.sh").read_text()


def test_every_variable_passed_is_declared_by_the_stack() -> None:
    declared = set(re.findall(r'^variable "(\w+)"', (default_stack_dir() / "variables.tf").read_text(), re.M))
    passed = {v[len("-var="):].split("=", 1)[0] for v in tf_vars("ami-1", 2, "g4dn.xlarge", "us-east-1")}
    assert passed <= declared, passed - declared
