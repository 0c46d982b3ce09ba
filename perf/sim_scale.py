"""Scale: N instances in S scenarios for one simulated hour, with failures.

    python -m perf.sim_scale --instances 10000 --scenarios 50 --duration 3600 \
        --load 0.015 --failures 1 --json sim_scale --png perf/sim_recovery.png
    python -m perf.sim_scale --profile perf/sim_profiles/npu8_llama65b.yaml \
        --output-mean 512 --load 0.12 --json sim_scale_npu

Each scenario gets the balanced P/D split of its share of instances (the
profile's capacities for the length mix) and Poisson arrivals at ``--load`` x
its capacity. The scenarios run in ``--workers`` processes (one per core by
default), one scenario at a time (``--parts``; the merged result equals a
one-process run, and a scenario's 200 instances stay in the CPU caches).
Reports events/s, CPU
time per request, the policies' own cost per decision, and recovery (one
failure per hour per thousand instances by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pdserve.bench.metrics import Slo
from pdserve.scheduler.decode_choice import can_take, rank_decodes
from pdserve.scheduler.forwarding import (
    forward_on_demand,
    prefill_rank_key,
    rank_prefills,
    shortest_queue,
)
from pdserve.scheduler.sim import native
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import ScenarioSpec, SimConfig
from pdserve.scheduler.sim.index import ranked_index
from pdserve.scheduler.sim.profile import Profile, load_profile
from pdserve.scheduler.sim.runner import RunResult, simulate
from pdserve.scheduler.sim.workload import ScenarioLoad
from perf.sim_common import H100, binned, capacity_rps, lengths, save, split

MEAN_IN, MEAN_OUT = 2048, 256


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=10000)
    ap.add_argument("--scenarios", type=int, default=50)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--load", type=float, default=0.02, help="share of cluster capacity")
    ap.add_argument("--failures", type=float, default=1.0, help="per hour per 1000 instances")
    ap.add_argument("--profile", default=str(H100), help="instance profile YAML/JSON")
    ap.add_argument("--input-mean", type=float, default=MEAN_IN)
    ap.add_argument("--output-mean", type=float, default=MEAN_OUT)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes (default: one per core)")
    ap.add_argument("--parts", type=int, default=0,
                    help="parts the scenarios are cut into, run one after another by the "
                         "workers (default 0: one per scenario, which keeps a part's "
                         "instances in the CPU caches)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="sim_scale")
    ap.add_argument("--png", default=None)
    ap.add_argument("--native", nargs="?", const=str(native.DEFAULT_DIR), default=None,
                    metavar="DIR",
                    help="run the simulator's event machinery from its mypyc build in DIR "
                         f"(default {native.DEFAULT_DIR}; built first when missing or "
                         "stale); the policies stay interpreted")
    args = ap.parse_args(argv)
    if args.native and not os.environ.get(native.ENV):
        _rerun_native(args.native, sys.argv[1:] if argv is None else argv)
    p = load_profile(args.profile)
    mean_in, mean_out = args.input_mean, args.output_mean
    per = args.instances // args.scenarios
    n_p, n_d = split(p, per, mean_in, mean_out)
    capacity = capacity_rps(p, per, mean_in, mean_out)
    rate = args.load * capacity
    load = ScenarioLoad(rate, lengths(mean_in, 0.3 * mean_in, 16, int(4 * mean_in)),
                        lengths(mean_out, 0.4 * mean_out, 1, int(4 * mean_out)))
    scen = tuple(ScenarioSpec(f"s{k}", n_p, n_d, load=load) for k in range(args.scenarios))
    slo = Slo(ttft_ms=1000, tpot_ms=50)
    cfg = SimConfig(scenarios=scen, duration_s=args.duration, slo=slo, seed=args.seed,
                    failures_per_hour_per_1000=args.failures, max_drain_s=600)
    t0, cpu0, times0 = time.perf_counter(), time.process_time(), os.times()
    result, doc = simulate(cfg, p, workers=args.workers, parts=args.parts or args.scenarios)
    wall, cpu, times1 = time.perf_counter() - t0, time.process_time() - cpu0, os.times()
    sim = doc["simulation"]
    n_req = len(result.outcomes)
    sim["wall_total_s"] = round(wall, 1)  # parts + start, merge and summary
    sim["cpu_parent_s"] = round(cpu, 1)  # merge and summary in this process
    # the worker processes' whole CPU time (building the parts, sending results back)
    sim["cpu_workers_s"] = round(times1.children_user + times1.children_system
                                 - times0.children_user - times0.children_system, 1)
    sim["parts"] = len(result.part_cpu_s)
    sim["part_wall_s"] = [round(x, 1) for x in result.part_wall_s]
    sim["part_cpu_s"] = [round(x, 1) for x in result.part_cpu_s]
    sim["requests"] = n_req
    sim["requests_per_wall_s"] = round(n_req / wall, 1)
    sim["cpu_us_per_request"] = round(1e6 * result.cpu_s / max(n_req, 1), 1)
    sim["events_per_request"] = round(result.events / max(n_req, 1), 2)
    sim["rate_per_scenario"] = rate
    sim["cluster_rate"] = rate * args.scenarios
    sim["cluster_capacity_rps"] = capacity * args.scenarios
    sim["split_per_scenario"] = [n_p, n_d]
    sim["load"] = args.load
    sim["failures_in_flight_lost"] = sim["outcomes"].get("INSTANCE_FAILED", 0)
    sim["policy_us_per_decision"] = policy_costs(cfg, p, mean_in + mean_out)
    sim["native_modules"] = native.native_modules()  # [] = all interpreted
    bins = binned(result.outcomes, 60.0, 1000, 50, args.duration)
    doc["bins"] = bins
    doc["failure_times"] = result.fail_log
    save(args.json, {k: v for k, v in doc.items() if k != "requests"})
    print(json.dumps({k: v for k, v in sim.items() if k != "final_split"}, indent=1))
    if args.png:
        _plot(bins, result, cfg, args.png)
    return 0


def _rerun_native(path: str, argv: list[str]) -> None:
    """Build the native simulator if needed, then run this command again on it (the
    build must be on the package's path before ``pdserve.scheduler.sim`` is imported)."""
    if not native.is_current(Path(path)):
        print(f"building the native simulator in {path} ...", file=sys.stderr, flush=True)
        native.build(Path(path))
    env = {**os.environ, native.ENV: path}
    os.execve(sys.executable, [sys.executable, "-m", "perf.sim_scale", *argv], env)


def policy_costs(cfg: SimConfig, profile: Profile, kv_tokens: float,
                 repeats: int = 2000) -> dict[str, float]:
    """The policies' own cost per decision on one scenario's loads (microseconds).

    The simulator's per-call figures include the simulated instance work that
    runs inside a decision; these time the policy functions alone, over one
    scenario of the run as it stands when idle (the state a drained run ends in).
    """
    one = replace(cfg, scenarios=cfg.scenarios[:1])
    cluster = Cluster(one, profile)
    sc = next(iter(cluster.scenarios.values()))
    loads = list(sc.loads.values())
    need = int(kv_tokens) * profile.kv_bytes_per_token
    pre = [load for load in loads if load.role == "prefill"]

    async def accept(name: str) -> str:
        return name

    def one_forward() -> None:
        coro = forward_on_demand(sc.prefills.names, accept, cfg.forwarding,
                                 deadline=1e9, clock=lambda: 0.0)
        with contextlib.suppress(StopIteration):
            coro.send(None)

    idx = ranked_index(prefill_rank_key)  # the run's kind (native: a FieldIndex)
    for load in pre:
        idx.update(load, True)
    probe = pre[0]
    cases: dict[str, Callable[[], object]] = {
        f"rank_prefills (full sort, {len(pre)} prefills)": lambda: rank_prefills(loads),
        f"rank_decodes (full sort, {len(loads) - len(pre)} decodes)":
            lambda: rank_decodes(loads, need),
        "shortest_queue (scan)": lambda: shortest_queue(loads),
        "forward_on_demand, accepted at first try (index order)": one_forward,
        "decode choice via index (first fit)":
            lambda: next(n for n in sc.decodes if can_take(sc.loads[n], need)),
        "index update (one load change)": lambda: idx.update(probe, True),
    }
    out = {}
    for label, fn in cases.items():
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[label] = round(1e6 * (time.perf_counter() - t0) / repeats, 2)
    return out


def _plot(bins: dict[str, list[float]], result: RunResult, cfg: SimConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    t = [x / 60 for x in bins["t"]]
    ax.plot(t, [a * 100 for a in bins["attainment"]], label="SLO attainment (%)")
    ax.set_xlabel("simulated minute")
    ax.set_ylabel("SLO attainment (%)")
    ax2 = ax.twinx()
    ax2.bar(t, bins["errors"], width=0.8, color="tab:red", alpha=0.5, label="failed requests")
    ax2.set_ylabel("failed requests / min")
    for ft in result.fail_log:
        ax.axvline(ft / 60, color="gray", lw=0.5, ls="--")
    n = result.num_instances
    rate = cfg.failures_per_hour_per_1000
    ax.set_title(f"{n:,} instances, {rate:g} failures/h/1000 instances (dashed: failures)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
