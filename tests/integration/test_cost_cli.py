"""cost, advise, report and interruptions end to end: real entry point, run records on disk,
Cost Explorer and EC2 on the moto server."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from pathlib import Path

import pytest

from mamba_training.aws.cost import Ledger
from tests.aws.moto_fleet import assert_one_line_error, cli, denying_endpoint, utc

SEG1 = "20261128T100000Z-ip-10-0-1-5-4242"
SEG2 = "20261128T120500Z-ip-10-0-2-9-777"


def _lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Two segments: the first interrupted by a spot notice at step 200, the second resumed to 400."""
    root = tmp_path / "runs" / "tiny"
    t1 = utc("2026-11-28T10:00:00Z").timestamp()
    t2 = utc("2026-11-28T12:05:00Z").timestamp()
    _lines(root / "records" / SEG1 / "metrics.jsonl", [
        {"time": _iso(t1 + 36 * s), "step": s, "tokens": s * 40_000, "loss": 6.0 - s / 100, "lr": 3e-3,
         "tokens_per_s": 1100.0 + s, "elapsed_s": 36.0 * s, "cost_usd": round(0.2104 * s / 100, 6)}
        for s in range(10, 201, 10)])
    _lines(root / "records" / SEG1 / "events.jsonl", [
        {"time": _iso(t1), "kind": "start", "step": 0},
        {"time": _iso(t1 + 7000), "kind": "rebalance", "step": 190, "noticeTime": _iso(t1 + 6990)},
        {"time": _iso(t1 + 7180), "kind": "interruption", "step": 199, "action": "terminate"},
        {"time": _iso(t1 + 7200), "kind": "exit", "step": 200, "reason": "preempted", "exit_code": 75,
         "notice_to_durable_s": 14.2, "lost_steps": 0},
    ])
    _lines(root / "records" / SEG2 / "metrics.jsonl", [
        {"time": _iso(t2 + 36 * (s - 200)), "step": s, "tokens": s * 40_000, "loss": 4.0 - (s - 200) / 200,
         "val_loss": 3.9 if s == 400 else None, "lr": 3e-3, "tokens_per_s": 1300.0, "elapsed_s": 36.0 * (s - 200)}
        for s in range(210, 401, 10)])
    _lines(root / "records" / SEG2 / "events.jsonl", [
        {"time": _iso(t2), "kind": "resume", "step": 200},
        {"time": _iso(t2 + 7200), "kind": "exit", "step": 400, "reason": "done", "exit_code": 0,
         "notice_to_durable_s": None, "lost_steps": 0},
    ])
    one = Ledger.start(root / "records" / SEG1 / "ledger.json", "g4dn.xlarge", "us-east-1a", "spot", "us-east-1",
                       0.2104, 0.526, tokens_at_start=0, now=t1)
    one.close(8_000_000, now=t1 + 7200)  # 2 h at $0.2104
    two = Ledger.start(root / "records" / SEG2 / "ledger.json", "g5.xlarge", "us-east-1b", "spot", "us-east-1",
                       0.3981, 1.006, tokens_at_start=8_000_000, now=t2)
    two.close(16_000_000, now=t2 + 7200)  # 2 h at $0.3981
    return root


SPENT = 2 * 0.2104 + 2 * 0.3981
ON_DEMAND = 2 * 0.526 + 2 * 1.006


def test_cost_from_ledgers_when_cost_explorer_is_empty(aws, capsys, run_dir):
    code, out, _ = cli(capsys, "cost", "--run", str(run_dir), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["source"] == "ledger" and "Cost Explorer has no cost tagged Project=mamba-training" in data["note"]
    assert data["cost_usd"] == pytest.approx(SPENT) and data["tokens"] == 16_000_000
    assert data["usd_per_million_tokens"] == pytest.approx(SPENT / 16)
    assert data["on_demand_cost_usd"] == pytest.approx(ON_DEMAND)
    assert data["saving_percent"] == pytest.approx(100 * (1 - SPENT / ON_DEMAND))
    assert data["instance_hours"] == pytest.approx(4.0)
    code, out, _ = cli(capsys, "cost", "--run", str(run_dir))
    assert code == 0 and f"${SPENT:.4f}" in out and "source: run ledgers (2 of 2 segments)" in out
    assert "g5.xlarge" in out and "us-east-1b" in out


def test_cost_since_keeps_only_ledgers_running_after_it(aws, capsys, run_dir):
    code, out, _ = cli(capsys, "cost", "--run", str(run_dir), "--since", "2026-11-28T13:00:00Z",
                       "--no-cost-explorer", "--json")
    data = json.loads(out)
    assert code == 0 and data["cost_usd"] == pytest.approx(2 * 0.3981) and data["tokens"] == 8_000_000


def test_cost_prefers_cost_explorer_when_it_has_data(aws, capsys, run_dir):
    results = {"results": [{"ResultsByTime": [
        {"TimePeriod": {"Start": "2026-11-28", "End": "2026-11-29"},
         "Total": {"UnblendedCost": {"Amount": "1.75", "Unit": "USD"}}, "Groups": [], "Estimated": True}]}]}
    request = urllib.request.Request(f"{aws}/moto-api/static/ce/cost-and-usage-results", method="POST",
                                     data=json.dumps(results).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).read()
    code, out, _ = cli(capsys, "cost", "--run", str(run_dir), "--since", "2026-11-01", "--json")
    data = json.loads(out)
    assert code == 0 and data["source"] == "cost-explorer" and data["cost_usd"] == 1.75
    assert data["usd_per_million_tokens"] == pytest.approx(1.75 / 16)
    assert data["saving_percent"] == pytest.approx(100 * (1 - 1.75 / ON_DEMAND))


def test_cost_without_run_or_cost_explorer_data_is_a_one_line_error(aws, capsys):
    code, _, err = cli(capsys, "cost")
    assert code == 2
    assert_one_line_error(err, "no cost data", "--run")


def test_cost_explorer_denied_falls_back_to_the_ledgers(monkeypatch, capsys, run_dir):
    with denying_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        code, out, _ = cli(capsys, "cost", "--run", str(run_dir), "--json")
    data = json.loads(out)
    assert code == 0 and data["source"] == "ledger" and "access denied" in data["note"]


def test_interruptions_lists_notices_rebalances_and_preempted_exits(capsys, run_dir):
    code, out, _ = cli(capsys, "interruptions", "--store", str(run_dir), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["kind"], r["step"], r["segment"]) for r in rows] == [
        ("rebalance", 190, SEG1), ("interruption", 199, SEG1), ("exit", 200, SEG1)]
    assert rows[2]["detail"]["notice_to_durable_s"] == 14.2
    code, out, _ = cli(capsys, "interruptions", "--store", str(run_dir))
    assert code == 0 and "3 event(s)" in out and "action=terminate" in out


def test_interruptions_of_a_store_without_records_is_a_usage_error(capsys, tmp_path):
    code, _, err = cli(capsys, "interruptions", "--store", str(tmp_path / "empty"))
    assert code == 2
    assert_one_line_error(err, "no run records under", "empty")


def test_report_writes_a_png_and_prints_a_summary(capsys, run_dir, tmp_path):
    png = tmp_path / "out" / "report.png"
    code, out, _ = cli(capsys, "report", str(run_dir), "--out", str(png))
    assert code == 0
    blob = png.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 20_000
    assert "segments (process lifetimes)" in out and "400" in out and "16,000,000" in out
    assert f"${SPENT:.4f}" in out and "1 (0 steps lost)" in out and "3.9000" in out
    code, out, _ = cli(capsys, "report", str(run_dir), "--out", str(png), "--json")
    facts = json.loads(out)
    assert facts["step"] == 400 and facts["interruptions"] == 1 and facts["last_exit"] == "done"
    assert facts["usd_per_million_tokens"] == pytest.approx(SPENT / 16)
    assert facts["wall_hours"] == pytest.approx(4 + 5 / 60, abs=0.01)


def test_advise_prints_a_ranking_and_the_tfvars_line(aws, capsys, tmp_path):
    measured = tmp_path / "mine.csv"
    measured.write_text("instance_type,tokens_per_s,source\ng4dn.xlarge,30000,my bench\n")
    code, out, _ = cli(capsys, "advise", "-t", "g4dn.xlarge,g5.xlarge,g6.xlarge", "--throughput-file",
                       str(measured), "--top", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[-1] == 'instance_types = ["g4dn.xlarge", "g6.xlarge"]'
    assert "my bench" in out and "paste into terraform.tfvars" in out
    cells = [[cell.strip() for cell in line.split("│")] for line in lines if line.startswith("│")]
    basis = {row[2]: row[5] for row in cells}  # | # | type | $/M | tokens/s | tokens/s is | ...
    assert basis == {"g4dn.xlarge": "measured", "g5.xlarge": "estimate", "g6.xlarge": "estimate"}, out
    assert "tokens/s is" in out and "are estimates, not measurements" in out
    assert "estimated as on-demand x 0.4" in out  # moto's 2006 placeholder spot prices are not used
    code, out, _ = cli(capsys, "advise", "-t", "g5.xlarge", "--json", "--offline")
    data = json.loads(out)
    assert data["ranking"][0]["usd_per_hour"] == pytest.approx(1.006 * 0.4)
    assert data["ranking"][0]["throughput_basis"] == "estimate"


def test_malformed_price_file_is_a_one_line_usage_error_for_every_price_command(aws, capsys, tmp_path,
                                                                                 monkeypatch, run_dir):
    bad = tmp_path / "prices.csv"
    bad.write_text("instance_type,usd_per_hour\ng4dn.xlarge,0.5\ng5.xlarge,one dollar\n")
    monkeypatch.setenv("MAMBA_TRAINING_PRICE_FILE", str(bad))
    for command in (["prices"], ["advise", "--offline"]):
        code, _, err = cli(capsys, *command)
        assert code == 2, command
        assert_one_line_error(err, f"price file {bad} line 3", "'one dollar' is not a number")


def test_advise_with_a_malformed_throughput_file_names_it(capsys, tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("instance_type,tokens_per_s\ng5.xlarge\n")
    code, _, err = cli(capsys, "advise", "--offline", "--throughput-file", str(bad))
    assert code == 2
    assert_one_line_error(err, f"throughput file {bad} line 2")
