"""Run a configured simulation and produce the ``pdserve bench`` JSON document.

``simulate(..., workers=n, parts=m)`` cuts the scenarios into ``m`` parts
(``Cluster`` ``part``: scenario k goes to part k % m; default m = n) and runs
them in ``n`` worker processes, each worker one part after another. Scenarios
are independent P/D groups (own instances, own arrivals, own ratio loop), so
the merged outcomes are those of the one-process run (tested); only the
request numbering (part by part) and the measured costs differ.

More parts than workers is faster: a part of one scenario keeps its instances
in the CPU caches, while thousands of instances interleaved in one event loop
miss them at nearly every event (about 2x the CPU per request, perf/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import multiprocessing
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pdserve.bench.records import RequestSpec
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import SimConfig
from pdserve.scheduler.sim.profile import Profile
from pdserve.scheduler.sim.results import Outcomes, PolicyCost, report


@dataclass
class RunResult:
    """What a run (or the merge of its worker parts) leaves: outcomes and counters."""

    outcomes: Outcomes
    cost: PolicyCost
    num_instances: int
    events: int
    simulated_s: float
    wall_s: float  # run_result: measured over all parts; merge alone: the longest part's
    cpu_s: float  # all parts together
    failures: int = 0
    replaced: int = 0
    detect_s: list[float] = field(default_factory=list)
    recover_s: list[float] = field(default_factory=list)
    decisions: list[dict[str, object]] = field(default_factory=list)
    fail_log: list[float] = field(default_factory=list)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    workers: int = 1
    part_wall_s: list[float] = field(default_factory=list)
    part_cpu_s: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, cluster: Cluster) -> RunResult:
        ctl = cluster.control
        return cls(
            outcomes=cluster.outcomes, cost=cluster.cost, num_instances=len(cluster.instances),
            events=cluster.loop.num_events, simulated_s=cluster.loop.now,
            wall_s=cluster.wall_s, cpu_s=cluster.cpu_s, failures=ctl.num_failures,
            replaced=ctl.num_replaced, detect_s=list(ctl.detect_s),
            recover_s=list(ctl.recover_s), decisions=list(ctl.decisions),
            fail_log=list(ctl.fail_log), splits={n: _split(cluster, n) for n in cluster.scenarios},
            part_wall_s=[cluster.wall_s], part_cpu_s=[cluster.cpu_s],
        )

    @classmethod
    def merge(cls, parts: list[RunResult], workers: int | None = None) -> RunResult:
        """The parts' results as one run's (``workers``: the processes that ran them,
        default one per part, side by side)."""
        if not parts:
            raise ValueError("nothing to merge")
        out, cost = Outcomes(), PolicyCost()
        for p in parts:
            out.extend(p.outcomes)
            for kind, seconds in p.cost.seconds.items():
                cost.seconds[kind] = cost.seconds.get(kind, 0.0) + seconds
                cost.calls[kind] = cost.calls.get(kind, 0) + p.cost.calls[kind]
        return cls(
            outcomes=out, cost=cost, num_instances=sum(p.num_instances for p in parts),
            events=sum(p.events for p in parts),
            simulated_s=max(p.simulated_s for p in parts),
            wall_s=max(p.wall_s for p in parts), cpu_s=sum(p.cpu_s for p in parts),
            failures=sum(p.failures for p in parts), replaced=sum(p.replaced for p in parts),
            detect_s=[x for p in parts for x in p.detect_s],
            recover_s=[x for p in parts for x in p.recover_s],
            decisions=sorted((d for p in parts for d in p.decisions),
                             key=lambda d: (d["t"], str(d["scenario"]))),
            fail_log=sorted(x for p in parts for x in p.fail_log),
            splits={k: v for p in parts for k, v in p.splits.items()},
            workers=workers or len(parts),
            part_wall_s=[x for p in parts for x in p.part_wall_s],
            part_cpu_s=[x for p in parts for x in p.part_cpu_s],
        )


def _run_part(config: SimConfig, profile: Profile, trace: list[RequestSpec] | None,
              part: tuple[int, int]) -> RunResult:
    cluster = Cluster(config, profile, trace, part=part)
    cluster.run()
    return RunResult.of(cluster)


def _die_with_parent() -> None:
    """Worker initializer: end this worker when the parent process dies (Linux), so a
    killed run leaves no simulation running on the shared cores."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still applies
        pass


_PR_SET_PDEATHSIG = 1


def run_result(config: SimConfig, profile: Profile, trace: list[RequestSpec] | None = None,
               workers: int = 1, parts: int | None = None) -> RunResult:
    """Simulate ``parts`` parts (default: one per worker; at most one per scenario) in
    ``workers`` processes."""
    n_parts = max(1, min(parts or workers, len(config.scenarios)))
    n_workers = max(1, min(workers, n_parts))
    if n_parts == 1:
        return _run_part(config, profile, trace, (0, 1))
    t0 = time.perf_counter()
    if n_workers == 1:
        results = [_run_part(config, profile, trace, (i, n_parts)) for i in range(n_parts)]
    else:
        # fork: the workers start at once and share the parent's imported code
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx,
                                 initializer=_die_with_parent) as pool:
            futures = [pool.submit(_run_part, config, profile, trace, (i, n_parts))
                       for i in range(n_parts)]
            results = [f.result() for f in futures]
    merged = RunResult.merge(results, workers=n_workers)
    merged.wall_s = time.perf_counter() - t0
    return merged


def simulate(config: SimConfig, profile: Profile, trace: list[RequestSpec] | None = None,
             per_request: bool = False, workers: int = 1,
             parts: int | None = None) -> tuple[RunResult, dict[str, Any]]:
    result = run_result(config, profile, trace, workers, parts)
    return result, document(config, profile, result, per_request)


def document(config: SimConfig, profile: Profile, result: RunResult,
             per_request: bool = False) -> dict[str, Any]:
    summary = result.outcomes.summary(config.slo)
    sim = {
        "profile": profile.name,
        "instances": config.num_instances,
        "scenarios": len(config.scenarios),
        "workers": result.workers,
        "events": result.events,
        "wall_s": round(result.wall_s, 3),
        "cpu_s": round(result.cpu_s, 3),
        "events_per_s": round(result.events / max(result.wall_s, 1e-9), 1),
        "events_per_cpu_s": round(result.events / max(result.cpu_s, 1e-9), 1),
        "simulated_s": round(result.simulated_s, 3),
        "outcomes": result.outcomes.counts(),
        "policy_cost": result.cost.to_dict(),
        "failures": result.failures,
        "replaced": result.replaced,
        "detect_s_mean": _mean(result.detect_s),
        "recover_s_mean": _mean(result.recover_s),
        "ratio_switches": sum(1 for d in result.decisions if d["action"] != "none"),
        "final_split": {n: result.splits[n] for n in
                        [s.name for s in config.scenarios][:100] if n in result.splits},
    }
    config_doc = {"mode": "simulation", **_plain(dataclasses.asdict(config))}
    config_doc["scenarios"] = f"{len(config.scenarios)} scenarios (see simulation.final_split)"
    return report(summary, config_doc, result.outcomes, {"simulation": sim}, per_request)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def _split(cluster: Cluster, scenario: str) -> dict[str, int]:
    roles = [i.role for i in cluster.scenarios[scenario].members]
    return {r: roles.count(r) for r in ("prefill", "decode", "aggregated") if r in roles}


def _plain(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _plain(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_plain(v) for v in doc]
    if isinstance(doc, float) and doc in (float("inf"), float("-inf")):
        return None
    return doc
