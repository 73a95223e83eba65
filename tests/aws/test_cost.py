"""Prices and the cost ledger: bundled table, user price file, spot history, ledger arithmetic."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from mamba_training.aws.cost import Ledger, cost_report, ledger_totals, price_in_force
from mamba_training.aws.prices import PriceTable, bundled_date, latest_quotes, quote_table
from mamba_training.errors import UsageError
from tests.aws.moto_fleet import spot_history_fixture, utc

NOW = utc("2026-11-29T00:00:00Z")


def test_bundled_table_has_the_seed_rows_and_the_newer_families_with_a_date():
    table = PriceTable.load()
    assert table.on_demand("g4dn.xlarge", "us-east-1").usd_per_hour == 0.526
    assert table.on_demand("g4dn.2xlarge", "us-east-1").usd_per_hour == 0.752
    assert table.on_demand("g4dn.4xlarge", "us-east-1").usd_per_hour == 1.204
    assert table.on_demand("p3.2xlarge", "us-east-1").usd_per_hour == 3.06
    for itype in ("g5.xlarge", "g6.xlarge", "g6e.xlarge", "p4d.24xlarge", "p5.48xlarge"):
        assert table.on_demand(itype, "us-east-1").usd_per_hour > 0
    assert dt.date.fromisoformat(bundled_date())
    other = table.on_demand("g5.xlarge", "eu-west-1")  # no row there: us-east-1's, and it says so
    assert other.usd_per_hour == 1.006 and "us-east-1 price" in other.source


def test_user_price_file_overrides_rows_and_may_price_local(monkeypatch, tmp_path):
    prices = tmp_path / "prices.csv"
    prices.write_text("# my negotiated prices\ninstance_type,region,lifecycle,usd_per_hour\n"
                      "g5.xlarge,eu-west-1,on-demand,1.123\nlocal,*,on-demand,0.05\n")
    monkeypatch.setenv("MAMBA_TRAINING_PRICE_FILE", str(prices))
    table = PriceTable.load()
    assert table.on_demand("g5.xlarge", "eu-west-1").usd_per_hour == 1.123
    assert table.on_demand("g5.xlarge", "us-east-1").usd_per_hour == 1.006
    assert price_in_force("local", "local", "local", None) == (0.05, 0.05, str(prices))


def test_price_file_in_config_dir_is_found(monkeypatch, tmp_path):
    path = tmp_path / "config" / "mamba-training" / "prices.csv"
    path.parent.mkdir(parents=True)
    path.write_text("instance_type,usd_per_hour\ng4dn.xlarge,0.5\n")
    assert PriceTable.load().on_demand("g4dn.xlarge", "us-east-1").usd_per_hour == 0.5


@pytest.mark.parametrize("body, line, fragment", [
    ("instance_type,usd_per_hour\ng5.xlarge,cheap\n", 2, "'cheap' is not a number"),
    ("instance_type,usd_per_hour\n# fine\ng5.xlarge,1.0\ng6.xlarge\n", 4, "expected 2 fields"),
    ("type,price\ng5.xlarge,1.0\n", 1, "header needs columns"),
    ("instance_type,usd_per_hour,lifecycle\ng5.xlarge,1.0,reserved\n", 2, "lifecycle 'reserved'"),
    ("instance_type,usd_per_hour\ng5.xlarge,-1\n", 2, "must be >= 0"),
])
def test_malformed_price_file_names_file_and_line(monkeypatch, tmp_path, body, line, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    monkeypatch.setenv("MAMBA_TRAINING_PRICE_FILE", str(path))
    with pytest.raises(UsageError) as error:
        PriceTable.load()
    assert f"price file {path} line {line}" in str(error.value) and fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_price_file_named_by_env_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MAMBA_TRAINING_PRICE_FILE", str(tmp_path / "nope.csv"))
    with pytest.raises(UsageError, match="nope.csv"):
        PriceTable.load()


def test_latest_quote_per_pool_and_saving_from_recorded_history():
    quotes = latest_quotes(spot_history_fixture())
    pools = {(q.instance_type, q.availability_zone): q.usd_per_hour for q in quotes}
    assert pools[("g4dn.xlarge", "us-east-1a")] == 0.2104  # the newer of the two entries
    assert len(pools) == 6
    rows = quote_table(quotes, PriceTable.load(), "us-east-1", now=NOW)
    row = next(r for r in rows if (r["instance_type"], r["availability_zone"]) == ("g4dn.xlarge", "us-east-1a"))
    assert row["saving_percent"] == pytest.approx(100 * (1 - 0.2104 / 0.526))
    assert not row["stale"]
    assert all(r["stale"] for r in quote_table(quotes, PriceTable.load(), "us-east-1", now=utc("2029-01-01T00:00:00Z")))


def test_price_in_force_on_demand_local_and_spot_without_a_usable_history(aws):
    assert price_in_force("g4dn.xlarge", "us-east-1a", "on-demand", "us-east-1") == \
        (0.526, 0.526, f"bundled table ({bundled_date()})")
    assert price_in_force("local", "local", "local", None)[:2] == (0.0, 0.0)
    # moto's spot history holds 2006 placeholders: the on-demand price is the honest upper bound
    price, on_demand, source = price_in_force("g4dn.xlarge", "us-east-1a", "spot", "us-east-1")
    assert (price, on_demand) == (0.526, 0.526) and "no spot price" in source
    with pytest.raises(UsageError, match="no price known for x9.huge"):
        price_in_force("x9.huge", "us-east-1a", "on-demand", "us-east-1")


def test_ledger_accounts_time_at_the_price_in_force_and_writes_atomically(tmp_path):
    path = tmp_path / "records" / "20261129T000000Z-host-1" / "ledger.json"
    t0 = 1_800_000_000.0
    ledger = Ledger.start(path, "g4dn.xlarge", "us-east-1a", "spot", "us-east-1", 0.2104, 0.526, now=t0)
    assert json.loads(path.read_text())["cost_usd"] == 0
    assert ledger.update(1_000_000, now=t0 + 1800) == pytest.approx(0.1052)
    ledger.set_price(0.30, now=t0 + 3600)  # the spot price moved after the second half hour
    cost = ledger.close(5_000_000, now=t0 + 7200)
    assert cost == pytest.approx(0.2104 + 0.30)
    data = json.loads(path.read_text())
    assert data["segment"] == "20261129T000000Z-host-1" and data["closed"] is True
    assert data["cost_usd"] == pytest.approx(0.5104) and data["on_demand_cost_usd"] == pytest.approx(1.052)
    assert data["tokens_trained"] == 4_000_000 and data["seconds"] == 7200
    assert [e["usd_per_hour"] for e in data["entries"]] == [0.2104, 0.30]
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]  # no temp files left
    totals = ledger_totals([data])
    assert totals["tokens"] == 4_000_000 and totals["pools"][0]["hours"] == pytest.approx(2.0)
    report = cost_report([data], "mamba-training", use_cost_explorer=False)
    assert report.source == "ledger"
    assert report.usd_per_million_tokens == pytest.approx(0.5104 / 4)
    assert report.saving_percent == pytest.approx(100 * (1 - 0.5104 / 1.052))


def test_ledger_counts_tokens_from_the_given_start(tmp_path):
    ledger = Ledger.start(tmp_path / "seg" / "ledger.json", "local", "local", "local", None, 0.0, 0.0,
                          tokens_at_start=10_000, now=0.0)
    ledger.update(25_000, now=10.0)
    assert ledger.to_dict()["tokens_trained"] == 15_000 and ledger.cost_usd == 0.0


def test_no_cost_data_anywhere_is_a_usage_error():
    with pytest.raises(UsageError, match="no cost data"):
        cost_report([], "mamba-training", use_cost_explorer=False)
