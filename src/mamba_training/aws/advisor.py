"""The instance advisor: rank instance types by expected dollars per million training tokens.

    $/Mtok = spot $/h / (tokens/s * 3600 / 1e6) * (1 + restart_overhead * interruption_rate)

Throughput comes from the bundled table (`throughput.csv`, estimates for the default model)
overridden by the user's rows; each row says whether it was measured or estimated (its `basis`); the spot price from EC2 spot price history (median over
the region's AZs), else the on-demand table times a typical spot discount; the interruption rate
from a bundled Spot-Advisor-like bucket per type (`interruption_buckets.csv`).
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mamba_training.aws.prices import (
    DEFAULT_INSTANCE_TYPES,
    PriceTable,
    SpotQuote,
    latest_quotes,
    read_csv_text,
    spot_history,
)
from mamba_training.errors import AwsError, UsageError

log = logging.getLogger(__name__)

# Midpoints of Spot Advisor's buckets (share of instances interrupted in a month).
BUCKET_RATES = {"<5%": 0.025, "5-10%": 0.075, "10-15%": 0.125, "15-20%": 0.175, ">20%": 0.25}
UNKNOWN_BUCKET_RATE = 0.25  # assume the worst when a type has no bucket
TYPICAL_SPOT_PRICE_RATIO = 0.4  # GPU spot usually runs 55-70 % below on-demand
DEFAULT_RESTART_OVERHEAD = 1.0


@dataclass
class Advice:
    instance_type: str
    tokens_per_s: float | None
    throughput_source: str
    throughput_basis: str | None  # "measured" or "estimate"; None when the type has no row
    usd_per_hour: float | None
    price_source: str
    interruption_bucket: str
    interruption_rate: float
    usd_per_million_tokens: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bundled(name: str) -> str:
    return resources.files("mamba_training.aws").joinpath(name).read_text()


BASES = ("measured", "estimate")


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    basis: str  # one of BASES
    source: str


def parse_throughput(text: str, name: str, default_basis: str = "measured") -> dict[str, Throughput]:
    """instance type -> Throughput from a CSV with instance_type,tokens_per_s[,basis][,source].

    `basis` says whether a row was measured or is an estimate; a file without the column is
    `default_basis` throughout (a user's file holds their measurements)."""
    rows = read_csv_text(text)
    table: dict[str, Throughput] = {}
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip() and not line.lstrip().startswith("#")]
    if rows and not {"instance_type", "tokens_per_s"} <= set(rows[0]):
        raise UsageError(f"throughput file {name} line {lines[0]}: header needs columns instance_type,tokens_per_s")
    for number, row in zip(lines[1:], rows):
        if None in row or any(v is None for v in row.values()):
            raise UsageError(f"throughput file {name} line {number}: wrong number of fields")
        try:
            tps = float(row["tokens_per_s"])
        except ValueError:
            raise UsageError(f"throughput file {name} line {number}: tokens_per_s {row['tokens_per_s']!r} "
                             "is not a number") from None
        if tps <= 0:
            raise UsageError(f"throughput file {name} line {number}: tokens_per_s must be > 0")
        basis = (row.get("basis") or default_basis).strip()
        if basis not in BASES:
            raise UsageError(f"throughput file {name} line {number}: basis {basis!r} must be one of "
                             f"{', '.join(BASES)}")
        table[row["instance_type"].strip()] = Throughput(tps, basis, (row.get("source") or name).strip())
    return table


def load_throughput(extra: str | Path | None = None) -> dict[str, Throughput]:
    table = parse_throughput(_bundled("throughput.csv"), "bundled throughput table", default_basis="estimate")
    if extra is not None:
        path = Path(extra)
        if not path.is_file():
            raise UsageError(f"throughput file {path} does not exist")
        table.update(parse_throughput(path.read_text(), str(path)))
    return table


def load_buckets() -> dict[str, str]:
    return {row["instance_type"]: row["bucket"] for row in read_csv_text(_bundled("interruption_buckets.csv"))}


def expected_usd_per_million(usd_per_hour: float, tokens_per_s: float, interruption_rate: float,
                             restart_overhead: float = DEFAULT_RESTART_OVERHEAD) -> float:
    return usd_per_hour / (tokens_per_s * 3600 / 1e6) * (1 + restart_overhead * interruption_rate)


def _median_spot(quotes: list[SpotQuote], now: dt.datetime | None = None) -> dict[str, float]:
    by_type: dict[str, list[float]] = {}
    for quote in quotes:
        if not quote.stale(now):
            by_type.setdefault(quote.instance_type, []).append(quote.usd_per_hour)
    return {t: statistics.median(prices) for t, prices in by_type.items()}


def advise(instance_types: list[str] | None = None, region: str | None = None, profile: str | None = None,
           throughput_file: str | Path | None = None, restart_overhead: float = DEFAULT_RESTART_OVERHEAD,
           offline: bool = False, quotes: list[SpotQuote] | None = None,
           now: dt.datetime | None = None) -> tuple[list[Advice], list[str]]:
    """Ranked advice (cheapest per token first; types without a throughput or price last) and notes."""
    if restart_overhead < 0:
        raise UsageError("--restart-overhead must be >= 0")
    throughput = load_throughput(throughput_file)
    types = list(dict.fromkeys(instance_types or sorted(set(DEFAULT_INSTANCE_TYPES) | set(throughput))))
    notes: list[str] = []
    if quotes is None and not offline:
        try:
            quotes = latest_quotes(spot_history(types, region, profile))
        except AwsError as error:
            notes.append(f"spot prices unavailable ({error})")
    spot = _median_spot(quotes or [], now)
    table = PriceTable.load()
    buckets = load_buckets()
    advice = []
    for itype in types:
        row = throughput.get(itype)
        tps = row.tokens_per_s if row else None
        tps_source = row.source if row else "unknown: add it to --throughput-file"
        price, price_source = spot.get(itype), "spot price history (median over AZs)"
        if price is None:
            on_demand = table.on_demand(itype, region)
            price = on_demand.usd_per_hour * TYPICAL_SPOT_PRICE_RATIO if on_demand else None
            price_source = (f"estimate: on-demand x {TYPICAL_SPOT_PRICE_RATIO}" if on_demand
                            else "unknown: add it to your price file")
        bucket = buckets.get(itype, "unknown")
        rate = BUCKET_RATES.get(bucket, UNKNOWN_BUCKET_RATE)
        per_m = expected_usd_per_million(price, tps, rate, restart_overhead) if price is not None and tps else None
        advice.append(Advice(itype, tps, tps_source, row.basis if row else None, price, price_source, bucket, rate,
                             per_m))
    if any(a.price_source.startswith("estimate") for a in advice):
        notes.append(f"no current spot price for some types: estimated as on-demand x {TYPICAL_SPOT_PRICE_RATIO} "
                     "(a typical GPU spot discount)")
    estimated = [a.instance_type for a in advice if a.throughput_basis == "estimate"]
    if estimated:
        notes.append(f"tokens/s of {len(estimated)} of {len(advice)} types are estimates, not measurements; "
                     "measure yours and pass --throughput-file")
    advice.sort(key=lambda a: (a.usd_per_million_tokens is None, a.usd_per_million_tokens or 0.0))
    return advice, notes


def tfvars_line(advice: list[Advice], count: int = 4) -> str:
    """`instance_types = [...]`: the cheapest `count` ranked types, for terraform.tfvars."""
    chosen = [a.instance_type for a in advice if a.usd_per_million_tokens is not None][:count]
    return "instance_types = [" + ", ".join(f'"{t}"' for t in chosen) + "]"
