"""Scenarios split over worker processes give the one-process run's outcomes."""

from __future__ import annotations

from dataclasses import replace

from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import ScenarioSpec, SimConfig
from pdserve.scheduler.sim.results import Outcomes, PolicyCost
from pdserve.scheduler.sim.runner import RunResult, document, run_result
from tests.scheduler.sim_helpers import config, load, profile


def _rows(o: Outcomes) -> list[tuple[object, ...]]:
    return sorted(zip(o.send, o.input_len, o.first, o.last, o.tokens, o.kind, strict=True))


def _five_scenarios() -> SimConfig:
    return replace(config(duration_s=40, failures_per_hour_per_1000=20000, ratio="dynamic",
                          ratio_interval_s=10),
                   scenarios=tuple(ScenarioSpec(f"s{k}", 3, 3, load=load(25 + 2 * k))
                                   for k in range(5)))


def test_two_workers_equal_one_process() -> None:
    cfg = _five_scenarios()
    one = run_result(cfg, profile(), workers=1)
    two = run_result(cfg, profile(), workers=2)
    assert two.workers == 2 and len(two.part_wall_s) == 2
    assert one.failures > 0 and one.outcomes.counts().get("INSTANCE_FAILED", 0) > 0
    assert _rows(one.outcomes) == _rows(two.outcomes)
    assert one.outcomes.counts() == two.outcomes.counts()
    assert (one.events, one.failures, one.replaced) == (two.events, two.failures, two.replaced)
    assert sorted(one.fail_log) == two.fail_log
    assert one.splits == two.splits and one.num_instances == two.num_instances == 30
    key = [(d["t"], d["scenario"], d["action"]) for d in one.decisions]
    assert sorted(key) == [(d["t"], d["scenario"], d["action"]) for d in two.decisions]
    a = document(cfg, profile(), one)["summary"]
    b = document(cfg, profile(), two)["summary"]
    assert a == b


def test_a_part_holds_only_its_scenarios_with_whole_run_numbers() -> None:
    cfg = _five_scenarios()
    part = Cluster(cfg, profile(), part=(1, 2))
    assert list(part.scenarios) == ["s1", "s3"]
    assert sorted(part.numbered) == [*range(6, 12), *range(18, 24)]
    assert part.num_instances_total == 30


def test_merge_renumbers_error_messages_and_adds_costs() -> None:
    a, b = Outcomes(), Outcomes()
    a.ok(a.new(0.0, 10, 2), 0.1, 0.2, 2)
    b.error(b.new(1.0, 10, 2), 1.5, "UNAVAILABLE", "full", None)
    ca, cb = PolicyCost(), PolicyCost()
    ca.add("forward", 1.0)
    cb.add("forward", 2.0)
    merged = RunResult.merge([RunResult(a, ca, 1, 4, 2.0, 3.0, 3.0),
                              RunResult(b, cb, 2, 6, 5.0, 1.0, 1.0)])
    assert len(merged.outcomes) == 2 and merged.outcomes.messages == {1: "full"}
    assert merged.outcomes.counts() == {"UNAVAILABLE": 1, "ok": 1}
    assert (merged.num_instances, merged.events, merged.simulated_s) == (3, 10, 5.0)
    assert (merged.wall_s, merged.cpu_s) == (3.0, 4.0)
    assert merged.cost.calls == {"forward": 2} and merged.cost.seconds == {"forward": 3.0}
