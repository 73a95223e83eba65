"""The stack's rehearsal wiring: the moto override, the CLI config, and the TLS-only bucket statement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mamba_training.aws.session import client
from mamba_training.errors import UsageError
from mamba_training.fleet.rehearsal.stack import SERVICES, allow_plain_http, cli_config, override, tf_vars

TLS_ONLY = {"Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
            "Resource": ["arn:aws:s3:::tls-test", "arn:aws:s3:::tls-test/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
OTHER = {"Sid": "DenyDelete", "Effect": "Deny", "Principal": "*", "Action": "s3:DeleteBucket",
         "Resource": "arn:aws:s3:::tls-test"}


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


@pytest.mark.parametrize("statements, kept", [([TLS_ONLY, OTHER], [OTHER]), ([TLS_ONLY], None)])
def test_only_the_tls_statement_is_dropped(rehearsal_aws: str, statements: list, kept: list | None) -> None:
    s3 = client("s3")
    s3.create_bucket(Bucket="tls-test")
    s3.put_bucket_policy(Bucket="tls-test", Policy=json.dumps({"Version": "2012-10-17", "Statement": statements}))
    assert allow_plain_http("tls-test", "us-east-1") == ["DenyInsecureTransport"]
    if kept is None:
        with pytest.raises(Exception, match="NoSuchBucketPolicy"):
            s3.get_bucket_policy(Bucket="tls-test")
    else:
        assert json.loads(s3.get_bucket_policy(Bucket="tls-test")["Policy"])["Statement"] == kept
    s3.put_object(Bucket="tls-test", Key="k", Body=b"reachable over plain HTTP now")
