"""Pinned results: small runs whose outcomes must not change.

The figures below were computed with the simulator as it was before its
speed-ups (2026-12-03, commit def1565): every request's send, first and last
token times, token counts and outcome, the failures, recoveries and ratio
decisions, hashed. An optimisation must leave them equal. A change that is
meant to alter results updates them, and says why in its commit.

failures_ratio was re-pinned once for a change of representation only: the ratio
decisions' times are recorded as floats (the native build's event loop keeps
``now`` a float, so a decision at 10 s was "10.0" there and "10" here).

The three on-demand cases with waiting requests (failures_ratio, overload,
layerwise_pinned) were re-pinned on 2026-12-07 for a change of behaviour: the
simulated router now passes ``forward_on_demand`` what the real one does
(``is_full``: a prefill its own calls fill is skipped; ``slot_freed``: a waiting
request sweeps again when a prefill call ends, oldest first, not only when its
back-off runs out). Until then a freed slot stayed idle until some waiter's
back-off (up to 50 ms) ran out, and waiters took slots in timer order.

failures_ratio's event count moved again on 2026-12-07 (29797 -> 29816), its
outcomes not: a drained donor is now checked in the decision's tick and then every
``SimConfig.switch_tick_s`` (0.25 s), as the live controller's ``tick_switches``
does, where it was checked every 1 s from 1 s after the decision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from pdserve.bench.metrics import Slo
from pdserve.bench.workload import LengthDistribution
from pdserve.scheduler.forwarding import ForwardingPolicy
from pdserve.scheduler.ratio import RatioPolicy
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import HostCores, ScenarioSpec, SimConfig
from pdserve.scheduler.sim.runner import document, run_result
from pdserve.scheduler.sim.workload import ScenarioLoad
from tests.scheduler.sim_helpers import profile


def _load(rate: float) -> ScenarioLoad:
    return ScenarioLoad(rate, LengthDistribution(1024, 300, 16, 4096),
                        LengthDistribution(128, 60, 1, 512))


def _cfg(*scenarios: ScenarioSpec, **kw: object) -> SimConfig:
    base = SimConfig(scenarios=scenarios, duration_s=30.0, slo=Slo(ttft_ms=1000, tpot_ms=50))
    return replace(base, **kw)


CASES: dict[str, SimConfig] = {
    # three scenarios, failures and their recovery, the ratio loop switching roles
    "failures_ratio": _cfg(*(ScenarioSpec(f"s{k}", 2, 4, load=_load(30 + 10 * k))
                             for k in range(3)),
                           failures_per_hour_per_1000=20000, ratio="dynamic",
                           ratio_interval_s=10, ratio_policy=RatioPolicy(cooldown_s=10),
                           seed=5),
    # overload: decode choice backs off, forwarding retries and ends requests early
    "overload": _cfg(ScenarioSpec("a", 2, 2, load=_load(90)),
                     forwarding=ForwardingPolicy(ttft_budget_s=0.5), seed=1),
    "local_queue": _cfg(ScenarioSpec("a", 1, 3, load=_load(60)), admission="local_queue"),
    "aggregated": _cfg(ScenarioSpec("a", n_aggregated=3, load=_load(30))),
    "layerwise_pinned": _cfg(ScenarioSpec("a", 3, 2, load=_load(40), prefill_cores=1),
                             transfer_mode="layerwise"),
    "host_cores": _cfg(ScenarioSpec("a", 2, 1, load=_load(12), host=HostCores(
        prefill=(0,), decode=(1,), router=(1,), request_s=0.002, token_s=0.0001))),
}


def _fingerprint(c: Cluster) -> dict[str, object]:
    o, ctl = c.outcomes, c.control
    h = hashlib.sha256()
    for name in ("send", "input_len", "requested", "first", "last", "tokens"):
        h.update(getattr(o, name).tobytes())
    h.update(json.dumps([o.kind, sorted(o.messages.items()), ctl.num_failures,
                         ctl.num_replaced, ctl.detect_s, ctl.recover_s, ctl.decisions,
                         ctl.fail_log, {n: [i.role for i in s.members]
                                        for n, s in c.scenarios.items()}]).encode())
    return {"requests": len(o), "events": c.loop.num_events, "counts": o.counts(),
            "sha256": h.hexdigest()[:20]}


PINNED: dict[str, dict[str, object]] = {
    "failures_ratio": {"requests": 3528, "events": 29816,
                       "counts": {"INSTANCE_FAILED": 227, "ok": 3301},
                       "sha256": "43e5d2269cc74e8857f0"},
    "overload": {"requests": 2642, "events": 78884, "counts": {"UNAVAILABLE": 966, "ok": 1676},
                 "sha256": "d04174dc52f4149cd64b"},
    "local_queue": {"requests": 1780, "events": 140436,
                    "counts": {"UNAVAILABLE": 359, "ok": 1421}, "sha256": "070c36a129aaa5cbac5c"},
    "aggregated": {"requests": 924, "events": 6059, "counts": {"ok": 924},
                   "sha256": "42b2c7493c2233c8c235"},
    "layerwise_pinned": {"requests": 1210, "events": 237021,
                         "counts": {"UNAVAILABLE": 157, "ok": 1053},
                         "sha256": "e2b5f5a5752b1e1cc3d2"},
    "host_cores": {"requests": 347, "events": 3992, "counts": {"ok": 347},
                   "sha256": "c07d25aae8684fbf36a2"},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_results_equal_the_pinned_ones(name: str) -> None:
    c = Cluster(CASES[name], profile())
    c.run()
    assert _fingerprint(c) == PINNED[name]


@pytest.mark.parametrize("workers", [1, 2])
def test_parts_run_one_after_another_equal_one_process(workers: int) -> None:
    cfg = CASES["failures_ratio"]
    one = run_result(cfg, profile())
    parts = run_result(cfg, profile(), workers=workers, parts=3)
    assert parts.workers == workers and len(parts.part_cpu_s) == 3
    rows = [sorted(zip(r.outcomes.send, r.outcomes.first, r.outcomes.last, r.outcomes.tokens,
                       r.outcomes.kind, strict=True)) for r in (one, parts)]
    assert rows[0] == rows[1]
    assert (one.events, one.failures, one.replaced) == (parts.events, parts.failures,
                                                        parts.replaced)
    assert document(cfg, profile(), one)["summary"] == document(cfg, profile(), parts)["summary"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_native_builds_typed_heaps_and_index_give_the_same_runs(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native build orders events, decode ends and the index with typed loops
    (``events.COMPILED``) where the interpreter uses heapq and bisect: the same
    order, so the same runs, checked here with those loops interpreted."""
    from pdserve.scheduler.sim import events, index, instance
    from pdserve.scheduler.sim.index import FieldIndex

    for module in (events, index, instance):
        monkeypatch.setattr(module, "COMPILED", True)
    c = Cluster(CASES[name], profile())
    assert c.loop._typed and isinstance(next(iter(c.scenarios.values())).prefills, FieldIndex)
    c.run()
    assert _fingerprint(c) == PINNED[name]
