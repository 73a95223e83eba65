"""The simulated spot market: a seeded random walk in a band of the on-demand price, and costs."""

from __future__ import annotations

import pytest

from mamba_training.errors import UsageError
from mamba_training.fleet.rehearsal.prices import DEFAULT_BAND, Market, Usage, costs, walk

SEED = 99
G4DN_XLARGE = 0.526


def test_the_walk_is_seeded_and_stays_in_the_default_band() -> None:
    print(f"seed {SEED}")
    market = walk(G4DN_XLARGE, SEED, 2000)
    assert market == walk(G4DN_XLARGE, SEED, 2000)
    assert market != walk(G4DN_XLARGE, SEED + 1, 2000)
    low, high = DEFAULT_BAND
    assert all(G4DN_XLARGE * low - 1e-9 <= p <= G4DN_XLARGE * high + 1e-9 for p in market.prices)
    # g4dn.xlarge lands in the range users see on spot: about $0.16-0.24
    assert 0.15 <= min(market.prices) and max(market.prices) <= 0.25
    assert market.prices[0] == pytest.approx(G4DN_XLARGE * sum(DEFAULT_BAND) / 2, abs=1e-6)
    assert len(set(market.prices)) > 100  # it moves


def test_a_walk_in_a_point_band_is_constant() -> None:
    assert set(walk(1.0, SEED, 50, band=(0.4, 0.4)).prices) == {0.4}


@pytest.mark.parametrize("band", [(0.0, 0.5), (0.6, 0.5), (0.5, 1.5)])
def test_bad_bands_are_refused(band: tuple[float, float]) -> None:
    with pytest.raises(UsageError, match="spot price band"):
        walk(1.0, SEED, 10, band=band)


MARKET = Market(on_demand=3.6, step_seconds=10.0, prices=(1.8, 3.6, 0.36))


@pytest.mark.parametrize("start, end, spot", [
    (0, 10, 1.8 * 10 / 3600),  # one whole step
    (5, 15, (1.8 * 5 + 3.6 * 5) / 3600),  # across a boundary
    (0, 40, (18 + 36 + 3.6 + 3.6) / 3600),  # past the path: the last price holds
    (7, 7, 0.0),
])
def test_spot_cost_integrates_the_price_path(start: float, end: float, spot: float) -> None:
    assert MARKET.spot_cost(start, end) == pytest.approx(spot)
    assert MARKET.on_demand_cost(start, end) == pytest.approx(3.6 * (end - start) / 3600)


def test_costs_sum_instances_and_count_running_ones_up_to_now() -> None:
    usages = [Usage("i-a", 0, 10), Usage("i-b", 5, None)]
    spot, on_demand = costs(usages, MARKET, now=15)
    assert spot == pytest.approx((18 + 1.8 * 5 + 3.6 * 5) / 3600)
    assert on_demand == pytest.approx(3.6 * 20 / 3600)
