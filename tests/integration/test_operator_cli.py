"""What an operator sees: the real `mamba-training` entry point in subprocesses, as on an instance
(no terminal: output to a log file), against a moto server where AWS is involved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.aws.moto_fleet import LOG_GROUP, make_fleet

REPO = Path(__file__).resolve().parents[2]
CHECK_STATUS = REPO / "infrastructure" / "aws" / "files" / "check_status.sh"
SEED = 1337  # the tiny config's train.seed; every run here uses it
SMALL = [
    "model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32", "train.max_steps=20",
    "train.warmup_steps=2", "train.eval_every=10", "train.eval_batches=2", "train.log_every=5",
    "train.sample_tokens=16", "train.threads=1", "checkpoint.every_steps=10", "spot.imds_url=off",
    "logging.cloudwatch=off", f"train.seed={SEED}",
]
# What the autouse fixture of tests/conftest.py sets, for the module-scoped run below (made before it).
OFFLINE = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "OMP_NUM_THREADS": "1"}


def mamba(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, stdout=subprocess.PIPE,
          timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`python -m mamba_training ARGS` with no terminal (stdout and stderr are pipes or a file)."""
    return subprocess.run([sys.executable, "-m", "mamba_training", *args], cwd=cwd, text=True, timeout=timeout,
                          stdout=stdout, stderr=subprocess.STDOUT if stdout is not subprocess.PIPE else subprocess.PIPE,
                          env={**os.environ, **(env or {})})


def train_args(tmp: Path, store: str, *extra: str) -> list[str]:
    sets = [*SMALL, f"checkpoint.store={store}", f"data.cache_dir={tmp / 'data-cache'}",
            f"checkpoint.cache_dir={tmp / 'ckpt-cache'}", *extra]
    return ["train", "-c", str(REPO / "configs" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)]]


def one_error_line(stderr: str, *fragments: str) -> str:
    """Exactly one non-empty line, an `error:` naming every fragment, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert all(f in lines[0] for f in fragments), stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny run trained as under systemd: stdout and stderr appended to logs/training.log."""
    print(f"seed {SEED}")
    tmp = tmp_path_factory.mktemp("operator")
    (tmp / "logs").mkdir()
    with open(tmp / "logs" / "training.log", "w") as log:
        done = mamba(*train_args(tmp, str(tmp / "runs" / "tiny")), cwd=tmp, env=OFFLINE, stdout=log)
    assert done.returncode == 0, (tmp / "logs" / "training.log").read_text()
    return tmp, tmp / "runs" / "tiny"


# ------------------------------------------------------------------ 1. progress without a terminal

def test_each_logged_step_is_a_console_line_and_a_json_record_without_a_terminal(trained) -> None:
    tmp, run = trained
    console = (tmp / "logs" / "training.log").read_text()
    steps = [line for line in console.splitlines() if " step " in line and "/20  loss " in line]
    assert [line.split(" step ")[1].split("/")[0] for line in steps] == ["5", "10", "15", "20"], console
    assert all(" tok/s  ETA " in line for line in steps)
    log = sorted(run.glob("records/*/train.log"))[0]  # the first segment: the run of the fixture
    records = [json.loads(line) for line in log.read_text().splitlines()]
    progress = [r for r in records if r.get("event") == "progress"]
    assert [r["step"] for r in progress] == [5, 10, 15, 20]
    assert all(r["max_steps"] == 20 and r["loss"] > 0 and r["tokens_per_s"] > 0 for r in progress)
    assert progress[0]["eta_s"] is None and progress[-1]["eta_s"] == 0


def test_check_status_reads_the_step_from_a_real_training_log(trained) -> None:
    tmp, run = trained
    env = {**os.environ, "MAMBA_APP_DIR": str(tmp / "no-app"), "MAMBA_LOG_DIR": str(tmp / "logs"),
           "MAMBA_VENV": str(Path(sys.executable).parent.parent), "MAMBA_RUN_STORE": str(run),
           "MAMBA_IMDS_URL": "http://127.0.0.1:9"}
    result = subprocess.run(["bash", str(CHECK_STATUS)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "== Current step ==\n20\nlast progress: " in result.stdout, result.stdout
    assert '"path": "checkpoints/step_00000010"' in result.stdout  # the real `checkpoints list --json`


# ------------------------------------------------------------------ 2. a missing profile

@pytest.mark.parametrize("command", [["status"], ["prices"], ["scale", "1"], ["logs"], ["cost"], ["advise"],
                                     ["stop", "--yes"], ["checkpoints", "list", "s3://bucket/runs/tiny"]])
@pytest.mark.parametrize("region", ["us-west-2", None])
def test_a_missing_profile_from_the_environment_is_one_line_naming_it(command: list[str], region: str | None,
                                                                      tmp_path: Path) -> None:
    env = {"AWS_PROFILE": "nope"}
    if region is None:
        env.update(AWS_DEFAULT_REGION="", AWS_REGION="")
    else:
        env.update(AWS_DEFAULT_REGION=region, AWS_REGION=region)
    result = mamba(*command, cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr, "AWS profile 'nope'", "not found")


# ------------------------------------------------------------------ 3. silent wrong answers

def test_an_unknown_region_in_the_config_is_refused(tmp_path: Path) -> None:
    result = mamba(*train_args(tmp_path, str(tmp_path / "runs" / "x"), "aws.region=xx-fake-1"), cwd=tmp_path)
    assert result.returncode == 2
    one_error_line(result.stderr, "aws.region", "xx-fake-1")
    assert not (tmp_path / "runs" / "x").exists()


def test_prices_of_a_name_that_is_no_instance_type_is_a_usage_error(tmp_path: Path) -> None:
    result = mamba("prices", "-t", "notatype", cwd=tmp_path)
    assert result.returncode == 2
    one_error_line(result.stderr, "'notatype'", "not an EC2 instance type")


def test_listing_checkpoints_of_a_store_that_does_not_exist_says_so(trained) -> None:
    tmp, run = trained
    result = mamba("checkpoints", "list", str(run) + "y", cwd=tmp)
    assert result.returncode == 2
    one_error_line(result.stderr, str(run) + "y", "does not exist")
    assert mamba("checkpoints", "list", str(run), cwd=tmp).returncode == 0


def test_scale_beyond_the_bounds_names_the_terraform_variables(aws, tmp_path: Path) -> None:
    make_fleet(desired=0, max_size=4)
    result = mamba("scale", "99", cwd=tmp_path)
    assert result.returncode == 2
    one_error_line(result.stderr, "allowed 0..4", "min_instances/max_instances",
                   "infrastructure/aws/environments/dev.tfvars")


def test_scale_to_a_negative_number_is_a_one_line_usage_error(tmp_path: Path) -> None:
    result = mamba("scale", "-1", cwd=tmp_path)
    assert result.returncode == 2 and "No such option" not in result.stderr
    one_error_line(result.stderr, "desired capacity -1")


def test_verify_names_a_bad_checkpoint_once(trained, tmp_path: Path) -> None:
    tmp, run = trained
    copy = tmp_path / "tiny"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    (data,) = [p for p in (copy / "checkpoints" / "step_00000020").iterdir() if p.name != "manifest.json"][:1]
    data.write_bytes(data.read_bytes()[:-1] + bytes([data.read_bytes()[-1] ^ 1]))
    result = mamba("checkpoints", "verify", str(copy), "20", cwd=tmp)
    assert result.returncode == 1
    line = one_error_line(result.stderr, data.name)
    assert line.removeprefix("error: ") not in result.stdout


def test_report_counts_one_interruption_once(tmp_path: Path) -> None:
    """The records one interrupted segment leaves: its notice, then its preempted exit."""
    run = tmp_path / "run"
    for segment, events in {
        "20261128T100000Z-ip-10-0-1-5-4242": [
            {"time": "2026-11-28T10:00:00Z", "kind": "start", "step": 0},
            {"time": "2026-11-28T11:00:00Z", "kind": "rebalance", "step": 90},
            {"time": "2026-11-28T11:00:30Z", "kind": "interruption", "step": 99, "action": "terminate"},
            {"time": "2026-11-28T11:00:31Z", "kind": "exit", "step": 100, "reason": "interruption:terminate",
             "exit_code": 75, "committed_step": 100, "lost_steps": 0}],
        "20261128T111000Z-ip-10-0-1-6-99": [
            {"time": "2026-11-28T11:10:00Z", "kind": "resume", "step": 100},
            {"time": "2026-11-28T12:00:00Z", "kind": "exit", "step": 200, "reason": "completed", "exit_code": 0}],
    }.items():
        (run / "records" / segment).mkdir(parents=True)
        (run / "records" / segment / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        (run / "records" / segment / "metrics.jsonl").write_text(
            json.dumps({"time": events[-1]["time"], "step": events[-1]["step"], "loss": 2.0}) + "\n")
    result = mamba("report", str(run), "--out", str(tmp_path / "r.png"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["interruptions"] == 1


# ------------------------------------------------------------------ 5. docs as written

def test_prices_outside_us_east_1_say_the_on_demand_price_is_borrowed(aws, tmp_path: Path) -> None:
    result = mamba("prices", "-t", "g5.xlarge", "--region", "us-west-2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no us-west-2 row" in result.stdout and "the us-east-1 price is shown" in result.stdout


# ------------------------------------------------------------------ 6. help and messages

def test_help_shows_no_type_tags_and_no_options_box_with_only_help(tmp_path: Path) -> None:
    for command in ([], ["train"], ["scale"], ["checkpoints"], ["checkpoints", "verify"], ["spot"], ["prices"]):
        out = mamba(*command, "--help", cwd=tmp_path, env={"COLUMNS": "120"}).stdout
        assert "<bool>" not in out and "<str>" not in out and "<int>" not in out and "list[" not in out, out
        assert "{" not in out.split("\n\n")[0] + out.splitlines()[1], out
    scale = mamba("scale", "--help", cwd=tmp_path, env={"COLUMNS": "120"}).stdout
    assert "Usage: mamba-training scale [OPTIONS] DESIRED" in scale
    for group in ("checkpoints", "spot"):
        assert "Options" not in mamba(group, "--help", cwd=tmp_path, env={"COLUMNS": "120"}).stdout


def test_training_a_finished_run_again_says_it_was_finished(trained) -> None:
    tmp, run = trained
    result = mamba(*train_args(tmp, str(run)), cwd=tmp, env=OFFLINE)
    assert result.returncode == 0, result.stderr
    assert "already finished: checkpoint step 20 reached train.max_steps (20)" in result.stdout
    assert "tok/s over" not in result.stdout


def test_logs_without_events_say_so(aws, tmp_path: Path) -> None:
    from mamba_training.aws.session import client

    client("logs").create_log_group(logGroupName=LOG_GROUP)
    result = mamba("logs", "--since", "30m", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == ""
    assert f"no log events in {LOG_GROUP} since" in result.stderr


def test_prepare_names_the_files_it_skipped(tmp_path: Path) -> None:
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text("to be or not to be, that is the question\n" * 50)
    (tmp_path / "src" / "sub" / "b.bin").write_bytes(b"\x00\x01binary" * 100)
    result = mamba("prepare", "src", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped src/sub/b.bin: binary" in result.stderr
    assert "1 source file(s), 1 skipped" in result.stdout


# ------------------------------------------------------------------ 4. the TLS-only bucket policy

def test_access_denied_over_plain_http_says_the_bucket_policy_wants_tls(aws, tmp_path: Path) -> None:
    from mamba_training.aws.session import client

    s3 = client("s3")
    s3.create_bucket(Bucket="tls-only")
    s3.put_bucket_policy(Bucket="tls-only", Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": ["arn:aws:s3:::tls-only", "arn:aws:s3:::tls-only/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]}))  # as infrastructure/aws/s3.tf writes it
    result = mamba("checkpoints", "list", "s3://tls-only/runs/dev", cwd=tmp_path)
    assert result.returncode != 0
    one_error_line(result.stderr, "access denied", "plain HTTP", "not made over TLS", "deploy.sh --endpoint")


# ------------------------------------------------------------------ 3. a price file that prices nothing

def test_a_budget_with_no_price_refuses_to_start_and_no_budget_warns(tmp_path: Path) -> None:
    prices = tmp_path / "prices.csv"
    prices.write_text("instance_type,usd_per_hour\nlocal,notanumber\n")
    env = {"MAMBA_TRAINING_PRICE_FILE": str(prices)}
    refused = mamba(*train_args(tmp_path, str(tmp_path / "runs" / "b"), "train.max_cost_usd=1"), cwd=tmp_path, env=env)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and refused.stderr.strip().endswith(errors[0]) and "Traceback" not in refused.stderr
    assert "train.max_cost_usd" in errors[0] and str(prices) in errors[0] and "line 2" in errors[0]
    assert not list((tmp_path / "runs" / "b").glob("checkpoints/*"))
    ran = mamba(*train_args(tmp_path, str(tmp_path / "runs" / "c")), cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    assert "WARNING NO PRICE for local" in ran.stderr and "cost is NOT counted" in ran.stderr


# ------------------------------------------------------------------ 6. config and events in words

def test_the_config_is_one_console_line_and_yaml_on_the_run_log(trained) -> None:
    tmp, run = trained
    console = (tmp / "logs" / "training.log").read_text()
    lines = [line for line in console.splitlines() if " config " in line]
    assert len(lines) == 1 and "d_model 32 x 2 layers, 20 steps of 4x32 tokens" in lines[0], console
    assert "{'model'" not in console and "'d_model'" not in console
    log = sorted(run.glob("records/*/train.log"))[0]  # the first segment: the run of the fixture
    messages = [json.loads(line)["message"] for line in log.read_text().splitlines()]
    (full,) = [m for m in messages if m.startswith("config (hash ")]
    assert "\nmodel:\n  d_model: 32\n  n_layer: 2\n" in full and "\ncheckpoint:\n  store: " in full


def test_events_are_logged_in_words(trained) -> None:
    tmp, _ = trained
    console = (tmp / "logs" / "training.log").read_text()
    assert "event: checkpoint step 10 committed" in console
    assert "event: exit at step 20: completed (exit code 0, 0 steps lost)" in console
    assert "{'checkpoint_step'" not in console and "{'reason'" not in console


# ------------------------------------------------------------------ 5. a rehearsal's cost is an upper bound

def test_a_rehearsal_prices_spot_at_on_demand_and_says_it_is_an_upper_bound(tmp_path: Path) -> None:
    from mamba_training.spot.emulator import ImdsEmulator

    emulator = ImdsEmulator("127.0.0.1", 0, token_required=True, instance_type="g5.xlarge", lifecycle="spot")
    emulator.start()
    try:
        store = str(tmp_path / "runs" / "rehearsal")
        args = [a if a != "spot.imds_url=off" else f"spot.imds_url={emulator.url}"
                for a in train_args(tmp_path, store, "train.max_steps=10")]
        done = mamba(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    finally:
        emulator.stop()
    assert "on-demand price as upper bound" in done.stderr
    result = mamba("cost", "--run", store, "--no-cost-explorer", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    assert "spot time priced at the on-demand rate" in said and "an upper bound, so the saving shows 0 %" in said
