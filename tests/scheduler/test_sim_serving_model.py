"""The serving-path terms the live validation calibrates: request overhead, per-step
stream overhead, prefills pinned together on shared cores."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve.bench.records import RequestSpec
from pdserve.scheduler.forwarding import ForwardingPolicy
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import ScenarioSpec, SimConfig
from pdserve.scheduler.sim.profile import Profile
from tests.scheduler.sim_helpers import profile


def _one(prof: Profile, specs: list[RequestSpec], scenario: ScenarioSpec) -> Cluster:
    cfg = SimConfig(scenarios=(scenario,), duration_s=100.0)
    c = Cluster(cfg, prof, trace=specs)
    c.run()
    assert c.outcomes.counts() == {"ok": len(specs)}
    return c


def test_serving_overhead_adds_to_ttft_and_stream_overhead_to_every_step() -> None:
    base = profile()
    spec = [RequestSpec(0, 1000, 10, 0.0)]
    sc = ScenarioSpec("a", 1, 1)
    a = _one(base, spec, sc).outcomes
    more = replace(base, serving_overhead_s=0.25,
                   decode=replace(base.decode, stream_overhead_s=0.01))
    b = _one(more, spec, sc).outcomes
    assert b.first[0] - a.first[0] == pytest.approx(0.25)
    itl_a = (a.last[0] - a.first[0]) / 9
    itl_b = (b.last[0] - b.first[0]) / 9
    assert itl_b - itl_a == pytest.approx(0.01, rel=1e-6)


def test_prefills_sharing_one_core_take_turns_at_half_speed() -> None:
    prof = replace(profile(), prefill=replace(profile().prefill, max_batch_size=1))
    specs = [RequestSpec(i, 2000, 2, 0.0) for i in range(2)]
    own = _one(prof, specs, ScenarioSpec("a", 2, 1)).outcomes
    shared = _one(prof, specs, ScenarioSpec("a", 2, 1, prefill_cores=1)).outcomes
    t = prof.prefill.prompt_time(2000)
    # own cores: both prompts in parallel; one core: the second starts while the
    # first computes, so it runs at half speed
    assert own.first[0] == pytest.approx(own.first[1])
    assert max(shared.first) - max(own.first) == pytest.approx(t, rel=1e-6)


def test_prefill_cores_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        ScenarioSpec("a", 1, 1, prefill_cores=-1)


def test_a_free_prefill_takes_a_prompt_longer_than_the_budget_as_the_router_does() -> None:
    # Router._prefill calls forward_on_demand without a prefill estimate: the budget
    # bounds the time to START prefill, so a long prompt on a free instance is served.
    prof = profile()
    assert prof.prefill.prompt_time(4000) > 0.05
    cfg = SimConfig(scenarios=(ScenarioSpec("a", 1, 1),), duration_s=10.0,
                    forwarding=ForwardingPolicy(ttft_budget_s=0.05))
    c = Cluster(cfg, prof, trace=[RequestSpec(0, 4000, 4, 0.0)])
    c.run()
    assert c.outcomes.counts() == {"ok": 1}
    assert c.outcomes.first[0] > 0.05
