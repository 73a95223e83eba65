"""The advisor's ranking arithmetic with recorded spot prices and user throughput rows."""

from __future__ import annotations

import pytest

from mamba_training.aws.advisor import BASES, advise, expected_usd_per_million, load_throughput, tfvars_line
from mamba_training.aws.prices import latest_quotes
from mamba_training.errors import UsageError
from tests.aws.moto_fleet import spot_history_fixture, utc

NOW = utc("2026-11-29T00:00:00Z")


def test_formula():
    # $0.36/h at 10,000 tok/s = 36 M tok/h -> $0.01/M, +10 % for 0.1 interruption rate at overhead 1
    assert expected_usd_per_million(0.36, 10_000, 0.1, 1.0) == pytest.approx(0.011)


def test_ranking_uses_median_spot_price_measured_throughput_and_buckets(tmp_path):
    measured = tmp_path / "throughput.csv"
    measured.write_text("instance_type,tokens_per_s,source\ng4dn.xlarge,12000,bench 2026-11-20\n")
    quotes = latest_quotes(spot_history_fixture())
    ranked, notes = advise(["g4dn.xlarge", "g5.xlarge", "g6.xlarge", "x9.huge"], "us-east-1",
                           throughput_file=measured, quotes=quotes, now=NOW)
    by_type = {a.instance_type: a for a in ranked}
    g4 = by_type["g4dn.xlarge"]
    assert g4.usd_per_hour == pytest.approx((0.2104 + 0.2253) / 2) and g4.tokens_per_s == 12000
    assert g4.throughput_source == "bench 2026-11-20" and g4.interruption_bucket == "<5%"
    assert g4.throughput_basis == "measured"  # a user's row without a basis column is a measurement
    assert by_type["g5.xlarge"].throughput_basis == "estimate" and by_type["x9.huge"].throughput_basis is None
    assert g4.usd_per_million_tokens == pytest.approx(expected_usd_per_million(g4.usd_per_hour, 12000, 0.025))
    assert by_type["g5.xlarge"].usd_per_hour == pytest.approx(0.4527)  # median of three AZs
    assert ranked[-1].instance_type == "x9.huge" and ranked[-1].usd_per_million_tokens is None
    costs = [a.usd_per_million_tokens for a in ranked[:-1]]
    assert costs == sorted(costs)
    assert tfvars_line(ranked, 2) == f'instance_types = ["{ranked[0].instance_type}", "{ranked[1].instance_type}"]'
    assert any("estimates" in n for n in notes)


def test_without_spot_prices_it_estimates_from_on_demand_and_says_so():
    ranked, notes = advise(["g4dn.xlarge"], "us-east-1", offline=True)
    assert ranked[0].usd_per_hour == pytest.approx(0.526 * 0.4)
    assert ranked[0].price_source.startswith("estimate") and any("on-demand x 0.4" in n for n in notes)


def test_restart_overhead_penalises_interruption_prone_types():
    calm, _ = advise(["g4dn.xlarge", "p3.2xlarge"], offline=True, restart_overhead=0.0)
    wary, _ = advise(["g4dn.xlarge", "p3.2xlarge"], offline=True, restart_overhead=4.0)
    ratio = {a.instance_type: a.usd_per_million_tokens for a in wary}
    base = {a.instance_type: a.usd_per_million_tokens for a in calm}
    assert ratio["p3.2xlarge"] / base["p3.2xlarge"] == pytest.approx(1 + 4 * 0.25)
    assert ratio["g4dn.xlarge"] / base["g4dn.xlarge"] == pytest.approx(1 + 4 * 0.025)


def test_malformed_throughput_file_names_file_and_line(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("instance_type,tokens_per_s\ng5.xlarge,fast\n")
    with pytest.raises(UsageError, match=r"t.csv line 2: tokens_per_s 'fast' is not a number"):
        advise(["g5.xlarge"], offline=True, throughput_file=bad)


def test_every_bundled_throughput_row_says_whether_it_was_measured():
    table = load_throughput()
    assert table and all(row.basis in BASES for row in table.values())
    # Nothing bundled has been timed on its instance type yet: the table must not claim otherwise.
    assert {row.basis for row in table.values()} == {"estimate"}


def test_a_user_row_can_be_an_estimate_and_the_note_counts_the_estimates(tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("instance_type,tokens_per_s,basis,source\ng4dn.xlarge,12000,measured,bench\n"
                    "g5.xlarge,30000,estimate,vendor sheet\n")
    ranked, notes = advise(["g4dn.xlarge", "g5.xlarge", "g6.xlarge"], offline=True, throughput_file=mine)
    assert {a.instance_type: a.throughput_basis for a in ranked} == {
        "g4dn.xlarge": "measured", "g5.xlarge": "estimate", "g6.xlarge": "estimate"}
    assert "tokens/s of 2 of 3 types are estimates, not measurements" in " ".join(notes)
    measured_only, notes = advise(["g4dn.xlarge"], offline=True, throughput_file=mine)
    assert not any("estimates" in n for n in notes)


def test_an_unknown_basis_names_file_line_and_the_valid_ones(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("instance_type,tokens_per_s,basis\ng5.xlarge,100,guess\n")
    with pytest.raises(UsageError, match=r"t.csv line 2: basis 'guess' must be one of measured, estimate"):
        advise(["g5.xlarge"], offline=True, throughput_file=bad)
