"""`mamba-training rehearse` as users run it: a subprocess, with its JSON, its files and its exit.

The full rehearsal applies the real Terraform stack to a fresh moto server, runs the reconciler
and one agent per simulated instance (each with its own IMDS emulator), and injects a spot notice
and a hard kill at seeded points of the jobs' progress; the JSON must show both jobs done, no step
lost to the notice, the hard-killed job retried from its last committed checkpoint (and the lost
steps counted consistently), the weights bitwise those of a straight run, and the fleet going
0 -> 2 -> 0. Bad input starts
nothing; Ctrl-C ends every process it started and says where its files are.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mamba_training.fleet.rehearsal.procs import port_free
from mamba_training.fleet.rehearsal.schedule import plan
from tests.integration.rehearsing import assert_nothing_left, rehearse

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("rehearse")]
SEED = 1  # the hard kill first (24 % of the steps: both jobs mid-training), the notice at 75 %


@pytest.mark.timeout(1500)  # minutes on a busy machine; about a minute and a half on an idle one (docs/rehearse.md)
def test_a_short_rehearsal_loses_nothing_noticed_and_leaves_nothing_running(tmp_path: Path) -> None:
    print(f"seed {SEED}")
    directory = tmp_path / "rehearsal"
    done = rehearse("--instances", "2", "--jobs", "2", "--interruptions", "2", "--hard-kills", "1", "--seed", str(SEED),
                    "--dir", str(directory), "--json", cwd=tmp_path, timeout=1400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    print(f"wall {result['wall_seconds']} s, terraform apply {result['terraform_apply_seconds']} s")
    assert result["seed"] == SEED
    assert (result["jobs_completed"], result["jobs_failed"]) == (2, 0)
    assert result["interruptions"] == 2 and result["notices"] == 1 and result["hard_kills"] == 1
    assert [d["kind"] for d in result["disruptions"] if d["kind"] != "rebalance"] == \
        [e.kind for e in plan(SEED, interruptions=2, hard_kills=1)]
    # A notice loses nothing; a hard kill loses what was trained since the last committed checkpoint.
    assert result["lost_steps_after_notice"] == 0
    assert result["lost_steps"] == sum(job["lost_steps"] for job in result["jobs"])
    assert result["trained_steps"] == sum(job["max_steps"] for job in result["jobs"]) + result["lost_steps"]
    assert result["goodput"] == round(120 / result["trained_steps"], 4)
    history = result["capacity_history"]
    assert history[0] == 0 and max(history) == 2 and history[-1] == 0
    assert result["cost_spot_usd"] < result["cost_on_demand_usd"]
    for job in result["jobs"]:
        assert job["state"] == "done" and job["final_step"] == job["max_steps"] == 60
        assert job["store"].startswith("s3://mamba-training-rehearsal-ckpt-") and job["store"].endswith("/run")
        assert job["identical_to_straight"] is True
        assert job["trained_steps"] == job["max_steps"] + job["lost_steps"]
    killed = next(d["instance"] for d in result["disruptions"] if d["kind"] == "hard-kill")
    assert_the_killed_job_went_on_from_its_last_committed_checkpoint(directory, killed, result)
    assert result["instances_launched"] >= 3  # a disrupted instance was replaced (or scaled in once its job was done)
    assert result["terraform_apply_seconds"] > 0  # the apply returned, and its outputs matched what was used
    assert Path(result["png"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((directory / "result.json").read_text())["jobs_completed"] == 2
    assert_nothing_left(directory)


def assert_the_killed_job_went_on_from_its_last_committed_checkpoint(directory: Path, killed: str,
                                                                     result: dict) -> None:
    """The job on the hard-killed instance was taken up again elsewhere, from a checkpoint it had committed.

    Its segments (one training process each, `records/<start time>-<host>-<pid>/`) sort by start
    time; the last one on the killed instance is the one the kill cut (or, when the kill came after
    its last step, the one whose end its agent never reported).
    """
    segments = {job["id"]: job_segments(directory, job["id"]) for job in result["jobs"]}
    on_killed = [(s, job_id) for job_id, found in segments.items() for s in found if s["instance"] == killed]
    assert on_killed, f"the hard kill hit {killed}, which ran no job"
    cut, job_id = max(on_killed, key=lambda pair: pair[0]["name"])
    job = next(j for j in result["jobs"] if j["id"] == job_id)
    before = [s for s in segments[job_id] if s["name"] <= cut["name"]]
    after = [s for s in segments[job_id] if s["name"] > cut["name"]]
    assert after and after[0]["instance"] != killed, "the killed instance's job was not taken up again"
    resumed = next(e["step"] for e in after[0]["events"] if e.get("kind") in ("start", "resume"))
    committed = {0} | {e["checkpoint_step"] for s in before for e in s["events"] if e.get("kind") == "checkpoint"}
    assert resumed >= max(committed), f"resumed at {resumed}, before the committed step {max(committed)}"
    assert resumed in committed or resumed % 10 == 0, f"resumed at {resumed}, not at a checkpoint"
    assert job["lost_steps"] == max(0, max(cut["steps"], default=resumed) - resumed)


def job_segments(directory: Path, job_id: str) -> list[dict]:
    """Every training process of a job, sorted by start: name, instance, events, trained steps."""
    found = []
    for events in (directory / "fleet").glob(f"*/agent/{job_id}/**/records/*/events.jsonl"):
        steps = [row["step"] for row in json_lines(events.parent / "metrics.jsonl") if isinstance(row.get("step"), int)]
        found.append({"name": events.parent.name, "instance": events.relative_to(directory / "fleet").parts[0],
                      "events": json_lines(events), "steps": steps})
    return sorted(found, key=lambda s: s["name"])


def json_lines(path: Path) -> list[dict]:
    rows = []
    for line in (path.read_text(errors="replace") if path.exists() else "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed process may be cut
            pass
    return [row for row in rows if isinstance(row, dict)]


def test_ctrl_c_ends_every_process_and_says_where_the_files_are(tmp_path: Path) -> None:
    directory = tmp_path / "rehearsal"
    proc = subprocess.Popen([sys.executable, "-m", "mamba_training", "rehearse", "--dir", str(directory), "--json"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # Wait for the rehearsal to be in full swing: moto up, Terraform applying, a straight run training.
    while not {"terraform-apply", "straight-tiny-0"} <= {line.split()[1] for line in
                                                           _lines(directory / "procs" / "pids")}:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the rehearsal never got going"
        time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    print(f"Ctrl-C to exit: {time.monotonic() - sent:.1f} s")
    assert proc.returncode == 130, err
    assert f"its files are in {directory}" in err
    assert_nothing_left(directory)
    port = int(re.search(r"Running on http://127\.0\.0\.1:(\d+)", (directory / "procs" / "moto.log").read_text())[1])
    assert port_free(port)  # the moto server's port is free again


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


@pytest.mark.parametrize("args, message", [
    (["--instances", "0"], "--instances 0: a rehearsal needs at least one instance"),
    (["--nodes-per-job", "3"], "--nodes-per-job 3: must be within 1..--instances (2)"),
    (["--interruptions", "1", "--hard-kills", "2"], "--hard-kills 2"),
    (["--interruptions", "1", "--interrupt-every", "5"], "exclude each other"),
    (["--interrupt-every", "0"], "--interrupt-every 0"),
    (["--interrupt-every", "30", "--hard-kills", "-1"], "--hard-kills -1: must be >= 0"),
    (["--notice-compression", "0.5"], "--notice-compression 0.5"),
])
def test_bad_flags_are_one_line_exit_2_and_start_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    result = rehearse(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"] and message in result.stderr
    assert not (tmp_path / "rehearsals").exists()


def test_a_job_config_that_does_not_validate_is_refused_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 10\n")
    result = rehearse("--submit", str(bad), cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "max_stepz" in result.stderr
    assert not list((tmp_path / "rehearsals").glob("*/procs/pids"))


def test_a_used_folder_is_refused_every_rehearsal_starts_fresh(tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "result.json").write_text("{}")
    result = rehearse("--dir", str(used), cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and f"--dir {used}: exists and is not empty" in result.stderr
    assert sorted(p.name for p in used.iterdir()) == ["result.json"]


def test_a_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = rehearse("--moto-port", str(port), cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_terraform_missing_is_one_line_exit_1(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, no terraform
    result = rehearse(cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 1 and "terraform not found on PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_moto_server_missing_is_one_line_exit_1(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "moto"  # a `moto` without its server: what a plain `pip install moto` gives
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = rehearse(cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 1 and "the moto server is not installed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
