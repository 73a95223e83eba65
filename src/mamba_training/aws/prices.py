"""Instance prices: the bundled on-demand table, the user's price file, and EC2 spot price history.

The bundled table (`on_demand_prices.csv`) is a dated snapshot; a user price file with the same
columns overrides its rows: MAMBA_TRAINING_PRICE_FILE, else ~/.config/mamba-training/prices.csv.
Columns: instance_type, usd_per_hour, and optionally region ("*" = any) and lifecycle
(on-demand | spot | "*"). Lines starting with # are comments.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from mamba_training.aws.session import aws_errors, client
from mamba_training.errors import UsageError

BUNDLED = "on_demand_prices.csv"
DEFAULT_INSTANCE_TYPES = ["g4dn.xlarge", "g4dn.2xlarge", "g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge",
                          "g6e.xlarge"]
STALE_AFTER = dt.timedelta(days=365)  # older "current" spot prices are placeholders, not prices
LIFECYCLES = {"on-demand", "spot", "*"}
US_EAST_1_FALLBACK = "us-east-1 price"  # the mark on an on-demand row borrowed from us-east-1
# family (letters, generation digit, attributes) "." size: g5.xlarge, p4de.24xlarge, u-6tb1.metal
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\d[a-z0-9-]*\.[a-z0-9-]+$")


def check_instance_types(instance_types: list[str]) -> list[str]:
    """The types as given, or UsageError naming the first that cannot be an EC2 instance type."""
    for name in instance_types:
        if not _INSTANCE_TYPE.match(name):
            raise UsageError(f"instance type {name!r} is not an EC2 instance type (they look like g5.xlarge)")
    return instance_types


@dataclass(frozen=True)
class PriceRow:
    instance_type: str
    region: str  # "*" matches any region
    lifecycle: str  # on-demand | spot | *
    usd_per_hour: float
    source: str  # where the row came from, shown to users


@dataclass(frozen=True)
class SpotQuote:
    instance_type: str
    availability_zone: str
    usd_per_hour: float
    timestamp: dt.datetime

    def stale(self, now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now(dt.timezone.utc)
        return now - self.timestamp > STALE_AFTER


def _content_lines(text: str) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, line


def parse_price_csv(text: str, name: str) -> list[PriceRow]:
    """Rows of a price CSV; any problem is a UsageError naming the file and line."""
    lines = list(_content_lines(text))
    if not lines:
        return []
    header_line, header = lines[0]
    columns = [c.strip().lower() for c in next(csv.reader([header]))]
    missing = {"instance_type", "usd_per_hour"} - set(columns)
    if missing:
        raise UsageError(f"price file {name} line {header_line}: header needs columns instance_type,usd_per_hour "
                         f"(missing {', '.join(sorted(missing))})")
    rows = []
    for number, line in lines[1:]:
        values = [v.strip() for v in next(csv.reader([line]))]
        if len(values) != len(columns):
            raise UsageError(f"price file {name} line {number}: expected {len(columns)} fields "
                             f"({','.join(columns)}), got {len(values)}")
        row = dict(zip(columns, values))
        try:
            price = float(row["usd_per_hour"])
        except ValueError:
            raise UsageError(f"price file {name} line {number}: usd_per_hour {row['usd_per_hour']!r} "
                             "is not a number") from None
        if not price >= 0 or price == float("inf"):
            raise UsageError(f"price file {name} line {number}: usd_per_hour must be >= 0 (got {price})")
        lifecycle = (row.get("lifecycle") or "on-demand").lower()
        if lifecycle not in LIFECYCLES:
            raise UsageError(f"price file {name} line {number}: lifecycle {lifecycle!r} is not one of "
                             "on-demand, spot, *")
        if not row["instance_type"]:
            raise UsageError(f"price file {name} line {number}: empty instance_type")
        rows.append(PriceRow(row["instance_type"], row.get("region") or "*", lifecycle, price, name))
    return rows


def bundled_text() -> str:
    return resources.files("mamba_training.aws").joinpath(BUNDLED).read_text()


def bundled_date() -> str:
    """The date the bundled table was taken (from its `taken:` comment)."""
    match = re.search(r"taken:\s*(\d{4}-\d{2}-\d{2})", bundled_text())
    return match.group(1) if match else "unknown date"


def user_price_file() -> Path | None:
    """The user's price file: MAMBA_TRAINING_PRICE_FILE (must exist), else the one in ~/.config."""
    explicit = os.environ.get("MAMBA_TRAINING_PRICE_FILE")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UsageError(f"price file {path} (MAMBA_TRAINING_PRICE_FILE) does not exist")
        return path
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = base / "mamba-training" / "prices.csv"
    return path if path.is_file() else None


class PriceTable:
    """On-demand (and user-given) prices; the user's rows win over the bundled ones."""

    def __init__(self, bundled: list[PriceRow], user: list[PriceRow] | None = None) -> None:
        self.bundled = bundled
        self.user = user or []

    @classmethod
    def load(cls) -> "PriceTable":
        bundled = parse_price_csv(bundled_text(), f"bundled table ({bundled_date()})")
        path = user_price_file()
        user = parse_price_csv(path.read_text(), str(path)) if path else []
        return cls(bundled, user)

    @staticmethod
    def _match(rows: list[PriceRow], instance_type: str, region: str | None, lifecycle: str) -> PriceRow | None:
        for wanted_region in ([region] if region else []) + ["*"]:
            for row in reversed(rows):  # a later row overrides an earlier one
                if row.instance_type == instance_type and row.region == wanted_region and \
                        row.lifecycle in (lifecycle, "*"):
                    return row
        return None

    def user_price(self, instance_type: str, region: str | None, lifecycle: str) -> PriceRow | None:
        return self._match(self.user, instance_type, region, lifecycle)

    def on_demand(self, instance_type: str, region: str | None) -> PriceRow | None:
        """The on-demand price: user file, then the bundled row for the region, then us-east-1's."""
        row = self._match(self.user, instance_type, region, "on-demand") or \
            self._match(self.bundled, instance_type, region, "on-demand")
        if row is None and region != "us-east-1":
            fallback = self._match(self.bundled, instance_type, "us-east-1", "on-demand")
            if fallback is not None:
                row = PriceRow(fallback.instance_type, fallback.region, "on-demand", fallback.usd_per_hour,
                               f"{fallback.source}, {US_EAST_1_FALLBACK}")
        return row

    def instance_types(self) -> list[str]:
        return sorted({row.instance_type for row in self.bundled + self.user})


def latest_quotes(history: Iterable[dict[str, Any]]) -> list[SpotQuote]:
    """The newest price per (instance type, AZ) from DescribeSpotPriceHistory entries."""
    newest: dict[tuple[str, str], SpotQuote] = {}
    for entry in history:
        stamp = entry["Timestamp"]
        if isinstance(stamp, str):
            stamp = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.timezone.utc)
        quote = SpotQuote(entry["InstanceType"], entry["AvailabilityZone"], float(entry["SpotPrice"]),
                          stamp.astimezone(dt.timezone.utc))
        key = (quote.instance_type, quote.availability_zone)
        if key not in newest or quote.timestamp > newest[key].timestamp:
            newest[key] = quote
    return sorted(newest.values(), key=lambda q: (q.instance_type, q.availability_zone))


def spot_history(instance_types: list[str], region: str | None = None, profile: str | None = None,
                 availability_zone: str | None = None, ec2=None) -> list[dict[str, Any]]:
    """Raw Linux spot price history entries in force now for the given types (all AZs, or one)."""
    ec2 = ec2 or client("ec2", region=region, profile=profile)
    args: dict[str, Any] = {
        "InstanceTypes": instance_types,
        "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
        "StartTime": dt.datetime.now(dt.timezone.utc),
    }
    if availability_zone:
        args["AvailabilityZone"] = availability_zone
    entries: list[dict[str, Any]] = []
    with aws_errors("reading EC2 spot price history"):
        for page in ec2.get_paginator("describe_spot_price_history").paginate(**args):
            entries.extend(page.get("SpotPriceHistory", []))
    return entries


def saving_percent(price: float, on_demand: float | None) -> float | None:
    if not on_demand:
        return None
    return 100.0 * (1.0 - price / on_demand)


def quote_table(quotes: list[SpotQuote], table: PriceTable, region: str | None,
                now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Rows for `mamba-training prices`: spot per AZ beside on-demand and the saving."""
    rows = []
    for quote in quotes:
        on_demand = table.on_demand(quote.instance_type, region)
        od = on_demand.usd_per_hour if on_demand else None
        rows.append({
            "instance_type": quote.instance_type,
            "availability_zone": quote.availability_zone,
            "spot_usd_per_hour": quote.usd_per_hour,
            "spot_time": quote.timestamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "stale": quote.stale(now),
            "on_demand_usd_per_hour": od,
            "on_demand_source": on_demand.source if on_demand else None,
            "saving_percent": saving_percent(quote.usd_per_hour, od),
        })
    return rows


def read_csv_text(text: str) -> list[dict[str, str]]:
    """Comment-free CSV rows as dicts (shared by the advisor's throughput and bucket tables)."""
    body = "\n".join(line for _, line in _content_lines(text))
    return list(csv.DictReader(io.StringIO(body)))
