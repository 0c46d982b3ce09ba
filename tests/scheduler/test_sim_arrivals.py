"""The native-friendly arrival stream draws exactly ``scenario_arrivals``' requests."""

from __future__ import annotations

import itertools

import pytest

from pdserve.bench.workload import LengthDistribution
from pdserve.scheduler.sim.arrivals import scenario_arrivals_native
from pdserve.scheduler.sim.workload import DayNight, ScenarioLoad, scenario_arrivals

_IN = LengthDistribution(1024, 300, 16, 4096)
_OUT = LengthDistribution(128, 60, 1, 512)
LOADS = {
    "poisson": ScenarioLoad(40.0, _IN, _OUT),
    "poisson_float_lengths": ScenarioLoad(171.6, LengthDistribution(2048.0, 614.4, 16, 8192),
                                          LengthDistribution(512.0, 204.8, 1, 2048)),
    "bursty": ScenarioLoad(25.0, _IN, _OUT, burstiness=0.5),
    "regular": ScenarioLoad(25.0, _IN, _OUT, burstiness=2.5),
    "fixed_and_unbounded": ScenarioLoad(30.0, LengthDistribution(100.5), LengthDistribution(
        7.0, 40.0)),
    "day_night": ScenarioLoad(30.0, _IN, _OUT, day_night=DayNight(
        20.0, 0.6, 0.25, night_input=LengthDistribution(3000, 500, 64, 8000),
        night_output=LengthDistribution(32, 10, 1, 64))),
    "night_busier": ScenarioLoad(10.0, _IN, _OUT, day_night=DayNight(10.0, 0.5, 3.0)),
}


@pytest.mark.parametrize("name", sorted(LOADS))
@pytest.mark.parametrize("seed", [0, 7, 123456789])
def test_same_requests_as_scenario_arrivals(name: str, seed: int) -> None:
    load = LOADS[name]
    expected = list(scenario_arrivals(load, 60.0, seed))
    got = list(scenario_arrivals_native(load, 60.0, seed))
    assert len(expected) > 100
    assert got == expected  # floats compared exactly
    assert [type(x) for x in itertools.chain.from_iterable(got[:3])] == [float, int, int] * 3


def test_ends_and_stays_ended() -> None:
    it = scenario_arrivals_native(LOADS["poisson"], 0.5, 1)
    assert len(list(it)) == len(list(scenario_arrivals(LOADS["poisson"], 0.5, 1)))
    assert next(it, None) is None
