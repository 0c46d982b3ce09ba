"""Small simulated deployments shared by the simulator tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pdserve.bench.metrics import Slo
from pdserve.bench.workload import LengthDistribution
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import ScenarioSpec, SimConfig
from pdserve.scheduler.sim.profile import Profile, load_profile
from pdserve.scheduler.sim.workload import ScenarioLoad

ROOT = Path(__file__).resolve().parents[2]
H100 = ROOT / "perf" / "sim_profiles" / "h100_llama3_8b.yaml"


def profile() -> Profile:
    return load_profile(H100)


def load(rate: float, burstiness: float = 1.0) -> ScenarioLoad:
    return ScenarioLoad(rate=rate, burstiness=burstiness,
                        input=LengthDistribution(1024, 300, 16, 4096),
                        output=LengthDistribution(128, 60, 1, 512))


def config(rate: float = 20.0, n_p: int = 2, n_d: int = 2, duration_s: float = 60.0,
           **kw: object) -> SimConfig:
    base = SimConfig(scenarios=(ScenarioSpec("a", n_p, n_d, load=load(rate)),),
                     duration_s=duration_s, slo=Slo(ttft_ms=1000, tpot_ms=50))
    return replace(base, **kw)


def run(cfg: SimConfig, prof: Profile | None = None) -> Cluster:
    cluster = Cluster(cfg, prof or profile())
    cluster.run()
    return cluster


def assert_clean(cluster: Cluster) -> None:
    """Every request ended exactly once and no instance holds anything."""
    o = cluster.outcomes
    assert o.num_unfinished == 0
    assert sum(o.counts().values()) == len(o)
    for inst in cluster.instances:
        assert inst.kv_used == 0, inst.name
        assert not inst.running and not inst.reserved and not inst.pending, inst.name
        assert not inst.transferring and inst.pf_in_flight == 0, inst.name
