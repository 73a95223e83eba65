"""Cost: the price in force for this instance, the per-process cost ledger, and cost reports.

A ledger is one JSON file per training process (`records/<segment>/ledger.json`): instance-seconds
per (instance type, AZ, lifecycle, price), tokens trained, dollars so far and what on-demand would
have cost. The trainer updates it every logged step; the file is replaced atomically, so a kill
at any moment leaves the previous complete version.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mamba_training.aws.prices import PriceTable, latest_quotes, saving_percent, spot_history
from mamba_training.aws.session import aws_errors, client
from mamba_training.errors import AwsError, UsageError

log = logging.getLogger(__name__)

LEDGER_FORMAT = 1


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def price_in_force(instance_type: str, availability_zone: str, lifecycle: str, region: str | None,
                   profile: str | None = None, query_aws: bool = True) -> tuple[float, float, str]:
    """(USD/hour now, on-demand USD/hour, where the price came from) for one instance.

    Order: a row in the user's price file; for spot, EC2 spot price history of the AZ (newest
    entry); else the on-demand table. A local run ("local") costs 0 unless the price file lists it.
    Raises UsageError when no price is known at all. `query_aws=False` (a rehearsal against the
    IMDS emulator, off EC2) never calls AWS: tables only.
    """
    table = PriceTable.load()
    user = table.user_price(instance_type, region, lifecycle)
    if user is None and instance_type == "local":  # a local machine has one price, whatever it is called
        user = table.user_price(instance_type, region, "on-demand")
    on_demand_row = table.on_demand(instance_type, region)
    if instance_type == "local" and user is None:
        return 0.0, 0.0, "local run (no price for 'local' in a price file)"
    on_demand = on_demand_row.usd_per_hour if on_demand_row else None
    if user is not None:
        return user.usd_per_hour, on_demand if on_demand is not None else user.usd_per_hour, user.source
    if query_aws and lifecycle == "spot" and availability_zone not in ("", "local"):
        try:
            quote = _spot_quote(instance_type, availability_zone, region, profile)
        except AwsError as error:
            log.warning("spot price of %s in %s unknown (%s)", instance_type, availability_zone, error)
            quote = None
        if quote is not None:
            when = quote.timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")
            return quote.usd_per_hour, on_demand if on_demand is not None else quote.usd_per_hour, \
                f"spot price history ({availability_zone}, {when})"
        if on_demand is not None:
            return on_demand, on_demand, f"{on_demand_row.source}: on-demand price as upper bound (no spot price)"
    if on_demand is not None:
        return on_demand, on_demand, on_demand_row.source
    raise UsageError(f"no price known for {instance_type} ({lifecycle}, {region or 'any region'}): "
                     "add a row to your price file (MAMBA_TRAINING_PRICE_FILE)")


def _spot_quote(instance_type: str, availability_zone: str, region: str | None, profile: str | None):
    quotes = [q for q in latest_quotes(spot_history([instance_type], region, profile, availability_zone))
              if q.availability_zone == availability_zone and not q.stale()]
    return quotes[0] if quotes else None


@dataclass
class LedgerEntry:
    instance_type: str
    availability_zone: str
    lifecycle: str
    usd_per_hour: float
    on_demand_usd_per_hour: float
    seconds: float = 0.0

    @property
    def cost_usd(self) -> float:
        return self.seconds / 3600.0 * self.usd_per_hour

    @property
    def on_demand_cost_usd(self) -> float:
        return self.seconds / 3600.0 * self.on_demand_usd_per_hour


@dataclass
class Ledger:
    """The cost ledger of one training process. Create with `Ledger.start(...)`."""

    path: Path
    region: str | None
    started: float
    entries: list[LedgerEntry] = field(default_factory=list)
    tokens_at_start: int | None = None
    tokens: int = 0
    last: float = 0.0
    closed: bool = False
    # Seconds since the epoch. A rehearsal or a test injects a clock that counts steps, so the
    # cost after k steps, and the step a budget stops at, do not depend on the machine's speed.
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    @classmethod
    def start(cls, path: str | Path, instance_type: str, availability_zone: str, lifecycle: str,
              region: str | None, price_usd_per_hour: float, on_demand_usd_per_hour: float,
              tokens_at_start: int | None = None, now: float | None = None,
              clock: Callable[[], float] = time.time) -> "Ledger":
        """Open a ledger (and write it) for a process that starts paying `price_usd_per_hour` now.

        `clock` gives the time wherever a call passes no `now` (wall time by default)."""
        now = clock() if now is None else now
        entry = LedgerEntry(instance_type, availability_zone, lifecycle, float(price_usd_per_hour),
                            float(on_demand_usd_per_hour))
        ledger = cls(Path(path), region, now, [entry], tokens_at_start, tokens_at_start or 0, now, clock=clock)
        ledger._write()
        return ledger

    @property
    def cost_usd(self) -> float:
        return sum(e.cost_usd for e in self.entries)

    @property
    def on_demand_cost_usd(self) -> float:
        return sum(e.on_demand_cost_usd for e in self.entries)

    def update(self, tokens_seen: int, now: float | None = None) -> float:
        """Account the time since the last update at the price in force; returns dollars so far."""
        now = self.clock() if now is None else now
        self.entries[-1].seconds += max(0.0, now - self.last)
        self.last = max(self.last, now)
        if self.tokens_at_start is None:
            self.tokens_at_start = int(tokens_seen)
        self.tokens = int(tokens_seen)
        self._write()
        return self.cost_usd

    def set_price(self, price_usd_per_hour: float, on_demand_usd_per_hour: float | None = None,
                  now: float | None = None) -> None:
        """A new price from now on (spot prices move); time so far stays at the old price."""
        self.update(self.tokens, now)
        current = self.entries[-1]
        od = current.on_demand_usd_per_hour if on_demand_usd_per_hour is None else on_demand_usd_per_hour
        self.entries.append(LedgerEntry(current.instance_type, current.availability_zone, current.lifecycle,
                                        float(price_usd_per_hour), float(od)))

    def close(self, tokens_seen: int | None = None, now: float | None = None) -> float:
        """Final update; the file is marked closed."""
        self.closed = True
        return self.update(self.tokens if tokens_seen is None else tokens_seen, now)

    def to_dict(self) -> dict[str, Any]:
        first = self.entries[0]
        return {
            "format": LEDGER_FORMAT,
            "segment": self.path.parent.name,
            "region": self.region,
            "instance_type": first.instance_type,
            "availability_zone": first.availability_zone,
            "lifecycle": first.lifecycle,
            "started": _iso(self.started),
            "updated": _iso(self.last),
            "seconds": self.last - self.started,
            "tokens_at_start": self.tokens_at_start or 0,
            "tokens": self.tokens,
            "tokens_trained": self.tokens - (self.tokens_at_start or 0),
            "cost_usd": round(self.cost_usd, 6),
            "on_demand_cost_usd": round(self.on_demand_cost_usd, 6),
            "closed": self.closed,
            "entries": [{**asdict(e), "cost_usd": round(e.cost_usd, 6),
                         "on_demand_cost_usd": round(e.on_demand_cost_usd, 6)} for e in self.entries],
        }

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ledger.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ------------------------------------------------------------------ reports


@dataclass
class CostReport:
    source: str  # "cost-explorer" | "ledger"
    note: str
    cost_usd: float
    on_demand_cost_usd: float | None
    tokens: int | None
    usd_per_million_tokens: float | None
    saving_percent: float | None
    instance_hours: float | None
    pools: list[dict[str, Any]] = field(default_factory=list)
    segments: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    when = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def ledger_totals(ledgers: list[dict[str, Any]], since: dt.datetime | None = None) -> dict[str, Any]:
    """Sum ledgers (those still running after `since`): cost, on-demand cost, tokens, per-pool hours."""
    pools: dict[tuple[str, str, str], dict[str, Any]] = {}
    cost = on_demand = 0.0
    tokens = 0
    used = 0
    for ledger in ledgers:
        updated = _parse_time(ledger.get("updated"))
        if since is not None and updated is not None and updated < since:
            continue
        used += 1
        tokens += int(ledger.get("tokens_trained", 0))
        for entry in ledger.get("entries", []):
            hours = float(entry.get("seconds", 0.0)) / 3600.0
            entry_cost = hours * float(entry.get("usd_per_hour", 0.0))
            entry_od = hours * float(entry.get("on_demand_usd_per_hour", 0.0))
            cost += entry_cost
            on_demand += entry_od
            key = (entry.get("instance_type", "?"), entry.get("availability_zone", "?"), entry.get("lifecycle", "?"))
            pool = pools.setdefault(key, {"instance_type": key[0], "availability_zone": key[1],
                                          "lifecycle": key[2], "hours": 0.0, "cost_usd": 0.0})
            pool["hours"] += hours
            pool["cost_usd"] += entry_cost
    return {"cost_usd": cost, "on_demand_cost_usd": on_demand, "tokens": tokens, "segments": used,
            "pools": sorted(pools.values(), key=lambda p: -p["cost_usd"])}


def per_million_tokens(cost: float, tokens: int | None) -> float | None:
    return cost / (tokens / 1e6) if tokens else None


def cost_explorer_total(project: str, since: dt.date, until: dt.date | None = None,
                        profile: str | None = None) -> float | None:
    """Unblended cost of resources tagged Project=<project>, or None when Cost Explorer has no data.

    Cost Explorer lives in us-east-1 whatever the fleet's region.
    """
    until = until or (dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1))
    ce = client("ce", region="us-east-1", profile=profile)
    args: dict[str, Any] = {
        "TimePeriod": {"Start": since.isoformat(), "End": until.isoformat()},
        "Granularity": "DAILY",
        "Metrics": ["UnblendedCost"],
        "Filter": {"Tags": {"Key": "Project", "Values": [project]}},
    }
    total = 0.0
    found = False
    with aws_errors("querying Cost Explorer"):
        while True:
            page = ce.get_cost_and_usage(**args)
            for period in page.get("ResultsByTime", []):
                amounts = [period.get("Total", {}).get("UnblendedCost")] + \
                          [g.get("Metrics", {}).get("UnblendedCost") for g in period.get("Groups", [])]
                for amount in amounts:
                    if amount and amount.get("Amount") is not None:
                        found = True
                        total += float(amount["Amount"])
            token = page.get("NextPageToken")
            if not token:
                break
            args["NextPageToken"] = token
    return total if found and total > 0 else None


def cost_report(ledgers: list[dict[str, Any]], project: str, since: dt.datetime | None = None,
                use_cost_explorer: bool = True, profile: str | None = None) -> CostReport:
    """Dollars spent: Cost Explorer's total when it has one, else the run's ledgers (said which)."""
    totals = ledger_totals(ledgers, since)
    tokens = totals["tokens"] or None
    od = totals["on_demand_cost_usd"] or None
    hours = sum(p["hours"] for p in totals["pools"]) if ledgers else None
    ce_total, ce_note = None, "Cost Explorer not asked (--no-cost-explorer)"
    if use_cost_explorer:
        start = (since or dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)).date()
        try:
            ce_total = cost_explorer_total(project, start, profile=profile)
            ce_note = f"Cost Explorer has no cost tagged Project={project} since {start}"
        except AwsError as error:
            ce_note = f"Cost Explorer unavailable ({error})"
    if ce_total is not None:
        note = f"Cost Explorer, resources tagged Project={project} (all services, not only instances)"
        return CostReport("cost-explorer", note, ce_total, od, tokens, per_million_tokens(ce_total, tokens),
                          saving_percent(ce_total, od), hours, totals["pools"], totals["segments"])
    if not ledgers:
        raise UsageError(f"no cost data: {ce_note}; pass --run STORE_URL to use the run's cost ledgers")
    note = f"run ledgers ({totals['segments']} of {len(ledgers)} segments); {ce_note}"
    return CostReport("ledger", note, totals["cost_usd"], od, tokens,
                      per_million_tokens(totals["cost_usd"], tokens),
                      saving_percent(totals["cost_usd"], od), hours, totals["pools"], totals["segments"])
