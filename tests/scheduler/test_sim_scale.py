"""10,000 instances in 50 scenarios (slow: ``make test-slow``)."""

from __future__ import annotations

import pytest

from pdserve.bench.workload import LengthDistribution
from pdserve.scheduler.sim.config import ScenarioSpec, SimConfig
from pdserve.scheduler.sim.workload import ScenarioLoad
from tests.scheduler.sim_helpers import assert_clean, run


@pytest.mark.slow
def test_ten_thousand_instances_fifty_scenarios() -> None:
    load = ScenarioLoad(20.0, LengthDistribution(2048, 600, 16, 8192),
                        LengthDistribution(256, 100, 1, 1024))
    scenarios = tuple(ScenarioSpec(f"s{k}", 112, 88, load=load) for k in range(50))
    cfg = SimConfig(scenarios=scenarios, duration_s=120, failures_per_hour_per_1000=60)
    c = run(cfg)
    assert len(c.instances) == 10000
    assert len(c.outcomes) > 100_000
    assert c.control.num_failures > 0
    assert_clean(c)
    assert c.wall_s < 600
