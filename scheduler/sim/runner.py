"""Run a configured simulation and produce the ``pdserve bench`` JSON document."""

from __future__ import annotations

import dataclasses
from typing import Any

from pdserve.bench.records import RequestSpec
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import SimConfig
from pdserve.scheduler.sim.profile import Profile
from pdserve.scheduler.sim.results import report


def simulate(config: SimConfig, profile: Profile, trace: list[RequestSpec] | None = None,
             per_request: bool = False) -> tuple[Cluster, dict[str, Any]]:
    cluster = Cluster(config, profile, trace)
    cluster.run()
    summary = cluster.outcomes.summary(config.slo)
    ctl = cluster.control
    sim = {
        "profile": profile.name,
        "instances": config.num_instances,
        "scenarios": len(config.scenarios),
        "events": cluster.loop.num_events,
        "wall_s": round(cluster.wall_s, 3),
        "events_per_s": round(cluster.loop.num_events / max(cluster.wall_s, 1e-9), 1),
        "simulated_s": round(cluster.loop.now, 3),
        "outcomes": cluster.outcomes.counts(),
        "policy_cost": cluster.cost.to_dict(),
        "failures": ctl.num_failures,
        "replaced": ctl.num_replaced,
        "detect_s_mean": _mean(ctl.detect_s),
        "recover_s_mean": _mean(ctl.recover_s),
        "ratio_switches": sum(1 for d in ctl.decisions if d["action"] != "none"),
        "final_split": {n: _split(cluster, n) for n in list(cluster.scenarios)[:100]},
    }
    config_doc = {"mode": "simulation", **_plain(dataclasses.asdict(config))}
    config_doc["scenarios"] = f"{len(config.scenarios)} scenarios (see simulation.final_split)"
    doc = report(summary, config_doc, cluster.outcomes, {"simulation": sim}, per_request)
    return cluster, doc


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
