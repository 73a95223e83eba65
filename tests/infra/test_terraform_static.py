"""The Terraform stack offline: fmt, init from the local mirror, validate, plan-time validation of bad
input (terraform test with a mocked provider), checkov with our custom policy, shellcheck, deploy.sh
argument handling. The stack applied against moto lives in tests/integration/test_terraform_apply.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from infra.terraform_env import (REPO, STACK, copy_stack, initialized_stack, provider_mirror, run, terraform_env, tool,
                                 write_cli_config)

# Tests that use the shared initialized copy run on one worker (group "terraform", with the apply
# test); the rest may run anywhere.
shared_init = pytest.mark.xdist_group("terraform")

CHECKOV_ARGS = ["--framework", "terraform", "--skip-download", "--output", "json",
                "--external-checks-dir", str(STACK / "checkov")]


def committed_terraform() -> list[Path]:
    return sorted(p for p in STACK.rglob("*") if p.suffix in (".tf", ".tfvars", ".hcl", ".tftpl")
                  and ".terraform" not in p.parts and not p.name.endswith("_override.tf"))


def test_terraform_files_are_formatted() -> None:
    result = run([tool("terraform"), "fmt", "-check", "-recursive", "-no-color"], STACK, os.environ.copy(), check=False)
    assert result.returncode == 0, f"terraform fmt would change: {result.stdout}"


@shared_init
def test_init_installs_the_aws_provider_from_the_local_mirror() -> None:
    stack = initialized_stack()
    mirror = provider_mirror()
    assert "hashicorp/aws" in stack.init_output
    installed = list((stack.dir / ".terraform" / "providers" / "registry.terraform.io" / "hashicorp" / "aws").iterdir())
    assert len(installed) == 1 and installed[0].name.startswith("5."), installed
    if mirror is not None:
        assert "Installed hashicorp/aws" in stack.init_output
        assert str(mirror) in stack.cli_config.read_text()


def test_committed_terraform_names_no_machine_path_or_test_endpoint() -> None:
    offenders = []
    for path in committed_terraform():
        text = path.read_text()
        for needle in ("/opt/tf-plugins", "127.0.0.1", "localhost", "skip_credentials_validation", "endpoints {"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert not offenders
    assert "*_override.tf" in (REPO / ".gitignore").read_text()


def test_only_the_aws_provider_and_no_registry_modules() -> None:
    text = "\n".join(p.read_text() for p in STACK.glob("*.tf"))
    assert re.findall(r'source\s*=\s*"([^"]+)"', text) == ["hashicorp/aws"]
    assert 'version = "~> 5.0"' in text
    assert "module " not in text


@shared_init
def test_validate_passes() -> None:
    result = initialized_stack().tf("validate", "-no-color")
    assert "The configuration is valid" in result.stdout


# Each bad input, the object that must refuse it, and words its message must contain.
BAD_INPUTS = {
    "public_ssh_needs_opt_in": ["allowed_ssh_cidrs", "allow_public_ssh"],
    "max_below_desired": ["desired_instances", "max_instances"],
    "bad_instance_type_format": ["instance_types", "instance type"],
    "empty_instance_list": ["instance_types", "at least one"],
    "negative_price": ["max_spot_price", "positive"],
    "p3_needs_own_ami": ["instance_types", "p3", "ami_id"],
    "noncurrent_days_zero": ["noncurrent_version_expiration_days", "whole number of days"],
    "noncurrent_days_fraction": ["noncurrent_version_expiration_days", "whole number of days"],
    "schedule_with_bad_cron": ["schedules", "five-field cron"],
    "schedule_that_sets_nothing": ["schedules", "at least one of min_size"],
    "hook_heartbeat_out_of_range": ["termination_hook_heartbeat_seconds", "30 and 7200"],
    "bad_jobs_prefix": ["jobs_prefix", "one path segment"],
    "nodes_max_below_min": ["max_nodes_per_run", "min_nodes_per_run"],
    "nodes_beyond_the_fleet": ["max_nodes_per_run", "max_instances"],
    "mixed_gpu_counts": ["instance_types", "same GPU count"],
    "gpu_count_unknown": ["instance_types", "gpus_per_instance_type"],
}


@shared_init
def test_bad_tfvars_fail_at_plan_with_a_message_naming_the_variable() -> None:
    """Each run of the committed validation.tftest.hcl, expect_failures removed, in a file of its own
    (terraform test skips the rest of a file after a failure): the bad runs must fail with their
    message, the good ones still pass. Mocked provider, offline."""
    stack = initialized_stack()
    source = (stack.dir / "tests" / "validation.tftest.hcl").read_text()
    header, *runs = re.split(r"\n(?=run \")", source)
    names = [re.match(r'run "(\w+)"', block).group(1) for block in runs]
    assert set(names) >= set(BAD_INPUTS)
    messages = stack.dir / "messages"
    messages.mkdir(exist_ok=True)
    for name, block in zip(names, runs):
        block = re.sub(r"\n\s*expect_failures = \[[^\]]*\]\n", "\n", block)
        (messages / f"{name}.tftest.hcl").write_text(f"{header}\n{block}")
    # The example a user copies must plan as it is.
    example = (stack.dir / "terraform.tfvars.example").read_text()
    names.append("example_tfvars")
    (messages / "example_tfvars.tftest.hcl").write_text(
        f'{header}\nrun "example_tfvars" {{\n  command = plan\n  variables {{\n{example}\n  }}\n}}\n')
    result = stack.tf("test", "-json", "-test-directory=messages", check=False)
    assert result.returncode != 0
    verdicts: dict[str, str] = {}
    diagnostics: dict[str, str] = {}
    for line in result.stdout.splitlines():
        event = json.loads(line)
        name = Path(event.get("@testfile", "x")).name.removesuffix(".tftest.hcl")
        if event.get("type") == "test_file" and event["test_file"].get("progress") == "complete":
            verdicts[name] = event["test_file"]["status"]
        if event.get("type") == "diagnostic":
            diag = event["diagnostic"]
            diagnostics[name] = diagnostics.get(name, "") + f" {diag['summary']} {diag.get('detail', '')}"
    for name in names:
        expected = "pass" if name not in BAD_INPUTS else ("fail", "error")
        assert verdicts.get(name) in expected, f"{name}: {verdicts.get(name)} {diagnostics.get(name, '')}"
    for name, words in BAD_INPUTS.items():
        flat = " ".join(diagnostics.get(name, "").split())
        for word in words:
            assert word in flat, f"{name}: {word!r} missing from: {flat}"


UNENCRYPTED_TEMPLATE = """resource "aws_launch_template" "plain" {
  name_prefix = "x-"
  block_device_mappings {
    device_name = "/dev/sda1"
    ebs {
      volume_size = 100
      encrypted   = false
    }
  }
}
"""


@pytest.fixture(scope="module")
def checkov_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One checkov run (seconds to start) over a copy of the stack plus one bad launch template file
    (checkov 3.3.30 given two -d directories reported only the first)."""
    copy = copy_stack(tmp_path_factory.mktemp("checkov") / "stack")
    bad = copy / "zz_unencrypted_fixture.tf"
    bad.write_text(UNENCRYPTED_TEMPLATE)
    result = subprocess.run([tool("checkov"), "-d", str(copy), *CHECKOV_ARGS],
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.strip(), result.stderr[-2000:]
    reports, text, decoder = [], result.stdout.strip(), json.JSONDecoder()
    while text:  # one JSON document per scanned directory
        doc, end = decoder.raw_decode(text)
        reports.extend(doc if isinstance(doc, list) else [doc])
        text = text[end:].strip()
    split: dict[str, dict] = {"stack": {}, "bad": {}}
    for kind in ("passed_checks", "failed_checks", "skipped_checks"):
        for check in (c for r in reports for c in r["results"].get(kind, [])):
            where = "bad" if check["file_abs_path"] == str(bad) else "stack"
            split[where].setdefault(kind, []).append(check)
    return split


def test_checkov_reports_no_failed_checks_and_every_skip_has_a_reason(checkov_reports: dict[str, dict]) -> None:
    stack = checkov_reports["stack"]
    assert [(c["check_id"], c["resource"]) for c in stack.get("failed_checks", [])] == []
    assert len(stack["passed_checks"]) > 50
    assert any(c["check_id"] == "CKV_MAMBA_1" for c in stack["passed_checks"])
    for skipped in stack["skipped_checks"]:
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]


def test_custom_checkov_policy_fails_an_unencrypted_launch_template(checkov_reports: dict[str, dict]) -> None:
    failed = [c["check_id"] for c in checkov_reports["bad"].get("failed_checks", [])]
    assert "CKV_MAMBA_1" in failed


def test_deploy_script_validate_in_a_fresh_copy(tmp_path: Path) -> None:
    stack = copy_stack(tmp_path / "stack")
    env = terraform_env(write_cli_config(tmp_path))
    result = run([str(stack / "deploy.sh"), "-e", "prod", "validate"], stack, env)
    assert "The configuration is valid" in result.stdout
    assert "workspace=prod-us-west-2" in result.stderr


def shell_scripts() -> list[Path]:
    return [STACK / "deploy.sh", *sorted((STACK / "files").glob("*.sh"))]


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = shell_scripts()
    assert len(scripts) >= 3
    result = subprocess.run([tool("shellcheck"), "--severity=style", *map(str, scripts)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    for script in scripts:
        assert "set -euo pipefail" in script.read_text() or "set -uo pipefail" in script.read_text(), script


def deploy(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(STACK / "deploy.sh"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, culprit", [
    (["launch"], "unknown command 'launch'"),
    (["-e", "staging", "plan"], "unknown environment 'staging'"),
    ([], "no command given"),
    (["--frobnicate", "plan"], "unknown option --frobnicate"),
    (["-r", "mars-1", "plan"], "'mars-1' is not an AWS region"),
])
def test_deploy_script_rejects_bad_arguments_with_usage_and_exit_2(args: list[str], culprit: str) -> None:
    result = deploy(args)
    assert result.returncode == 2
    assert culprit in result.stderr
    assert "usage:" in result.stderr


def test_deploy_script_says_when_terraform_is_missing() -> None:
    result = deploy(["-e", "dev", "plan"], env={"TERRAFORM": "terraform-not-installed"})
    assert result.returncode == 1
    assert "terraform not found on PATH: install Terraform" in result.stderr


def test_deploy_script_says_when_credentials_are_missing(tmp_path: Path) -> None:
    env = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    result = deploy(["-e", "prod", "plan"], env=env)
    assert result.returncode == 1
    assert "no AWS credentials found" in result.stderr


def test_workflows_plan_on_pull_requests_and_deploy_on_main_behind_an_approval_environment() -> None:
    import yaml

    workflows = REPO / ".github" / "workflows"
    deploy_wf = yaml.safe_load((workflows / "deploy-training.yml").read_text())
    triggers = deploy_wf[True] if True in deploy_wf else deploy_wf["on"]  # YAML 1.1 reads `on` as true
    assert "pull_request" in triggers and triggers["push"]["branches"] == ["main"]
    plan, deploy_job = deploy_wf["jobs"]["plan"], deploy_wf["jobs"]["deploy"]
    assert any("deploy.sh" in s.get("run", "") and " plan" in s.get("run", "") for s in plan["steps"])
    assert deploy_job["needs"] == "plan"
    assert "pull_request" in deploy_job["if"] and "refs/heads/main" in deploy_job["if"]
    assert deploy_job["environment"]["name"]  # reviewers on this environment are the approval gate
    assert any("--yes deploy" in s.get("run", "") for s in deploy_job["steps"])
    ci = yaml.safe_load((workflows / "ci.yml").read_text())
    assert any(s.get("run", "").strip() == "make test" for s in ci["jobs"]["test"]["steps"])
