"""The simulated spot market of a rehearsal, and what its instance-seconds cost.

The market price is a fraction of the on-demand price (aws/on_demand_prices.csv or the user's
price file) that moves by a seeded random walk inside a band. The default band, 30-45 % of
on-demand, is where spot prices of the common GPU types sit (g4dn.xlarge $0.16-0.24 against
$0.526 on-demand). Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mamba_training.errors import UsageError

DEFAULT_BAND = (0.30, 0.45)  # spot price as a fraction of on-demand
DEFAULT_STEP_SECONDS = 5.0  # the walk moves once per this many rehearsal seconds
DEFAULT_VOLATILITY = 0.03  # standard deviation of one move, as a fraction of on-demand


@dataclass(frozen=True)
class Market:
    """A price path: price i holds from i * step_seconds to (i + 1) * step_seconds."""

    on_demand: float
    step_seconds: float
    prices: tuple[float, ...]

    def price_at(self, t: float) -> float:
        index = max(0, int(t // self.step_seconds))
        return self.prices[min(index, len(self.prices) - 1)]

    def spot_cost(self, start: float, end: float) -> float:
        """USD for one instance running from `start` to `end` (rehearsal seconds) at the walk's prices."""
        total, t = 0.0, start
        while t < end:
            boundary = (int(t // self.step_seconds) + 1) * self.step_seconds
            upto = min(end, boundary)
            total += self.price_at(t) * (upto - t) / 3600.0
            t = upto
        return total

    def on_demand_cost(self, start: float, end: float) -> float:
        return self.on_demand * max(0.0, end - start) / 3600.0


def walk(on_demand: float, seed: int, steps: int, *, band: tuple[float, float] = DEFAULT_BAND,
         volatility: float = DEFAULT_VOLATILITY, step_seconds: float = DEFAULT_STEP_SECONDS) -> Market:
    """`steps` prices starting mid-band, each the last plus a seeded Gaussian move, reflected into the band."""
    low, high = band
    if not 0.0 < low <= high <= 1.0:
        raise UsageError(f"spot price band {low}..{high}: expected 0 < low <= high <= 1 (fractions of on-demand)")
    if on_demand <= 0:
        raise UsageError(f"on-demand price {on_demand}: must be > 0")
    if steps < 1 or step_seconds <= 0:
        raise UsageError("a price walk needs at least one step of positive length")
    rng = random.Random(seed)
    fraction, fractions = (low + high) / 2, []
    for _ in range(steps):
        fractions.append(fraction)
        fraction += rng.gauss(0.0, volatility)
        # Reflect at the edges rather than clamp: a clamped walk sticks to the band's edge.
        while not low <= fraction <= high and high > low:
            fraction = 2 * low - fraction if fraction < low else 2 * high - fraction
        fraction = min(max(fraction, low), high)
    return Market(on_demand, step_seconds, tuple(round(on_demand * f, 6) for f in fractions))


@dataclass(frozen=True)
class Usage:
    """One instance's life in rehearsal seconds; `end` None while it still runs."""

    instance_id: str
    start: float
    end: float | None


def costs(usages: list[Usage], market: Market, now: float) -> tuple[float, float]:
    """(spot USD, on-demand USD) for the same instance-seconds."""
    spot = on_demand = 0.0
    for usage in usages:
        end = now if usage.end is None else usage.end
        spot += market.spot_cost(usage.start, end)
        on_demand += market.on_demand_cost(usage.start, end)
    return spot, on_demand


__all__ = ["Market", "Usage", "walk", "costs", "DEFAULT_BAND", "DEFAULT_STEP_SECONDS"]
