"""Every metric the Terraform dashboard draws is one that something really emits: the trainer's
CloudWatch names (checked statically, then by a real run publishing to the moto server) and the
CloudWatch agent's GPU metrics (checked against the agent configuration the instances run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from infra.terraform_env import REPO, STACK
from mamba_training.aws.metrics import DEFAULT_UNITS, METRIC_NAMES
from mamba_training.aws.session import client
from mamba_training.train.metrics import CLOUDWATCH_NAMES

DASHBOARD = STACK / "cloudwatch.tf"
AGENT = STACK / "files" / "cloudwatch-agent.json.tftpl"


def dashboard_training_metrics() -> set[str]:
    """The names in the dashboard's training widgets (namespace var.metrics_namespace)."""
    text = DASHBOARD.read_text()
    block = text[text.index("training_widgets = ["):]
    block = block[: block.index("\n  ]")]
    return set(re.findall(r'metric\s*=\s*"(\w+)"', block))


def dashboard_agent_metrics() -> set[str]:
    """The CWAgent metric names the dashboard searches for."""
    return set(re.findall(r'\{CWAgent,[^}]*\}[^\n]*MetricName=\\"(\w+)\\"', DASHBOARD.read_text()))


def test_the_dashboard_draws_only_metrics_the_trainer_sink_publishes() -> None:
    drawn = dashboard_training_metrics()
    assert drawn, "no training widgets found in cloudwatch.tf"
    assert drawn == set(CLOUDWATCH_NAMES.values()) == set(METRIC_NAMES) == set(DEFAULT_UNITS)


def test_the_dashboard_gpu_metrics_are_collected_by_the_agent_config() -> None:
    drawn = dashboard_agent_metrics()
    assert drawn == {"nvidia_smi_utilization_gpu"}
    agent = AGENT.read_text()
    measured = re.search(r"nvidia_gpu\s*=\s*\{\s*measurement\s*=\s*\[([^\]]*)\]", agent).group(1)
    # The agent names its nvidia_gpu measurements nvidia_smi_<measurement>.
    collected = {f"nvidia_smi_{m}" for m in re.findall(r'"(\w+)"', measured)}
    assert drawn <= collected
    assert 'aggregation_dimensions = [["AutoScalingGroupName"]]' in agent  # what the SEARCH keys on


def test_a_real_run_publishes_every_metric_the_dashboard_draws(aws: str, tmp_path: Path) -> None:
    store = tmp_path / "runs" / "dash"
    sets = ["model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32",
            "train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4", "train.eval_batches=1",
            "train.log_every=2", "train.sample_tokens=8", "train.threads=1", "checkpoint.every_steps=4",
            "spot.imds_url=off", "logging.cloudwatch=on", "logging.tensorboard=false", "logging.plot=false",
            "aws.region=us-east-1", f"checkpoint.store={store}", f"data.cache_dir={tmp_path / 'data'}",
            f"checkpoint.cache_dir={tmp_path / 'ckpt-cache'}"]
    args = [sys.executable, "-m", "mamba_training", "train", "-c", str(REPO / "configs" / "tiny.yaml")]
    for item in sets:
        args += ["--set", item]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    listed = client("cloudwatch", region="us-east-1").list_metrics(Namespace="MambaTraining")["Metrics"]
    published = {m["MetricName"] for m in listed
                 if {d["Name"]: d["Value"] for d in m["Dimensions"]}.get("Run") == "dash"}
    missing = dashboard_training_metrics() - published
    assert not missing, f"the dashboard draws {sorted(missing)}, which the run never published\n" + json.dumps(
        sorted(published))
