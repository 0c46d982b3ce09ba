"""The seed's trends, reproduced with the simulator (H100 estimate profile).

    python -m perf.sim_experiments forwarding|ratio|transfer|disagg|all [--profile P]

``--profile``: another profile (default perf/sim_profiles/h100_llama3_8b.yaml);
its outputs are named after it (sim_transfer_<profile file stem>.json, .png).

Each experiment writes perf/out/sim_<name>.json, perf/sim_<name>.png and
prints a markdown table. Loads are multiples of the deployment's capacity as
the profile alone predicts it (``perf.sim_common.capacity_rps``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pdserve.bench.metrics import Slo, Summary
from pdserve.scheduler.forwarding import ForwardingPolicy
from pdserve.scheduler.ratio import RatioPolicy
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import ScenarioSpec, SimConfig
from pdserve.scheduler.sim.profile import Profile, load_profile
from pdserve.scheduler.sim.workload import DayNight, ScenarioLoad
from perf.sim_common import H100, ROOT, binned, capacity_rps, lengths, save, split

N = 8  # instances per deployment (CPU time of the simulator bounds it: see RESULTS)
_profile_path = H100


def _profile() -> Profile:
    return load_profile(_profile_path)


def _suffix() -> str:
    return "" if _profile_path == H100 else f"_{_profile_path.stem}"


def _run(cfg: SimConfig) -> tuple[Cluster, Summary]:
    c = Cluster(cfg, _profile())
    c.run()
    return c, c.outcomes.summary(cfg.slo)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ms(s: Summary, field: str, q: str) -> float:
    st = getattr(s, field)
    return float("nan") if st is None else float(getattr(st, q))


def _png(name: str) -> str:
    return str(ROOT / "perf" / f"sim_{name}{_suffix()}.png")


def forwarding() -> str:
    p = _profile()
    mean_in, mean_out = 1024, 128
    n_p, n_d = split(p, N, mean_in, mean_out)
    cap = capacity_rps(p, N, mean_in, mean_out)
    slo = Slo(ttft_ms=1000)
    rows: list[str] = []
    series: dict[str, list[float]] = {"on_demand": [], "local_queue": []}
    loads = [0.5, 0.7, 0.9, 1.0, 1.1, 1.3]
    for x in loads:
        load = ScenarioLoad(x * cap, lengths(mean_in, 600, 16, 4096),
                            lengths(mean_out, 50, 1, 512), burstiness=0.5)
        for adm in ("on_demand", "local_queue"):
            cfg = SimConfig(scenarios=(ScenarioSpec("a", n_p, n_d, load=load),), duration_s=60,
                            admission=adm, slo=slo, forwarding=ForwardingPolicy(ttft_budget_s=1.0))
            _, s = _run(cfg)
            series[adm].append(s.slo_attainment or 0.0)
            rows.append(f"| {x:.1f} | {adm} | {_pct(s.slo_attainment)} | "
                        f"{_ms(s, 'time_to_first_token_ms', 'p50'):.0f} | "
                        f"{_ms(s, 'time_to_first_token_ms', 'p90'):.0f} | "
                        f"{s.goodput:.1f} | {s.errors_by_kind.get('UNAVAILABLE', 0)} |")
    plt.figure(figsize=(6, 3.5))
    for adm, ys in series.items():
        plt.plot(loads, [100 * y for y in ys], marker="o", label=adm.replace("_", " "))
    plt.xlabel("offered load / capacity (bursty arrivals, gamma shape 0.5)")
    plt.ylabel("TTFT <= 1 s attainment (%)")
    plt.title(f"On-demand forwarding vs local queues ({n_p}P/{n_d}D)")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(_png("forwarding"), dpi=100)
    save(f"sim_forwarding{_suffix()}", {"loads": loads, "capacity_rps": cap, "attainment": series})
    head = ("| load | admission | TTFT<=1s attainment | TTFT p50 ms | TTFT p90 ms | goodput req/s "
            "| ended early |\n|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def ratio() -> str:
    p = _profile()
    day_in, day_out, night_in, night_out = 512, 512, 4096, 64
    n_p, n_d = split(p, N, day_in, day_out)
    day_rate = 0.75 * capacity_rps(p, N, day_in, day_out)
    night_rate = 0.75 * capacity_rps(p, N, night_in, night_out)
    period = 1800.0
    dn = DayNight(period, 0.5, night_rate / day_rate, lengths(night_in, 800, 16, 8192),
                  lengths(night_out, 20, 1, 256))
    load = ScenarioLoad(day_rate, lengths(day_in, 150, 16, 2048), lengths(day_out, 150, 1, 2048),
                        day_night=dn)
    slo = Slo(ttft_ms=1000, tpot_ms=50)
    base = SimConfig(scenarios=(ScenarioSpec("a", n_p, n_d, load=load),), duration_s=2 * period,
                     slo=slo, forwarding=ForwardingPolicy(ttft_budget_s=2.0),
                     ratio_interval_s=15, ratio_policy=RatioPolicy(cooldown_s=30))
    rows, curves, splits = [], {}, {}
    for mode in ("static", "dynamic"):
        c, s = _run(replace(base, ratio=mode))
        b = binned(c.outcomes, 60, 1000, 50, base.duration_s)
        curves[mode] = b
        n_prefill = [(0.0, n_p)] + [(float(str(d["t"])), int(str(d["n_prefill"])))
                                    for d in c.control.decisions if d["action"] != "none"]
        splits[mode] = n_prefill
        day = [a for t, a in zip(b["t"], b["attainment"], strict=True) if not dn.is_night(t)]
        night = [a for t, a in zip(b["t"], b["attainment"], strict=True) if dn.is_night(t)]
        rows.append(f"| {mode} | {_pct(s.slo_attainment)} | {_pct(sum(day) / len(day))} | "
                    f"{_pct(sum(night) / len(night))} | {s.goodput:.1f} | "
                    f"{sum(1 for d in c.control.decisions if d['action'] != 'none')} |")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for mode, b in curves.items():
        ax1.plot([t / 60 for t in b["t"]], [100 * a for a in b["attainment"]], label=mode)
        ts, ns = zip(*splits[mode], strict=True)
        ax2.step([t / 60 for t in ts] + [base.duration_s / 60], [*ns, ns[-1]], where="post",
                 label=mode)
    for k in range(2):
        ax1.axvspan((k + 0.5) * period / 60, (k + 1) * period / 60, color="gray", alpha=0.15)
    ax1.set_ylabel("SLO attainment (%)")
    ax1.legend()
    ax2.set_ylabel("prefill instances")
    ax2.set_xlabel("simulated minute (shaded: night, long prompts / short answers)")
    ax1.set_title(f"Dynamic vs static P/D ratio, {N} instances, day/night cycle")
    fig.tight_layout()
    fig.savefig(_png("ratio"), dpi=100)
    save(f"sim_ratio{_suffix()}", {"curves": curves, "splits": splits})
    head = ("| ratio | SLO attainment | day | night | goodput req/s | switches |\n"
            "|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def transfer() -> str:
    p = _profile()
    mean_in, mean_out = 4096, 128
    n_p, n_d = split(p, N, mean_in, mean_out)
    cap = capacity_rps(p, N, mean_in, mean_out)
    slo = Slo(ttft_ms=500)
    loads = [0.5, 0.8, 0.95]
    rows: list[str] = []
    series: dict[str, list[float]] = {}
    for mode in ("block_free", "layerwise", "block_fixed"):
        series[mode] = []
        for x in loads:
            load = ScenarioLoad(x * cap, lengths(mean_in, 1000, 256, 8192),
                                lengths(mean_out, 50, 1, 512))
            cfg = SimConfig(scenarios=(ScenarioSpec("a", n_p, n_d, load=load),), duration_s=60,
                            transfer_mode=mode, slo=slo)
            _, s = _run(cfg)
            series[mode].append(_ms(s, "time_to_first_token_ms", "p90"))
            rows.append(f"| {mode} | {x:.2f} | {_ms(s, 'time_to_first_token_ms', 'p50'):.1f} | "
                        f"{_ms(s, 'time_to_first_token_ms', 'p90'):.1f} | "
                        f"{_pct(s.slo_attainment)} |")
    t_free = p.transfer_time("block_free", mean_in)
    t_fixed = p.transfer_time("block_fixed", mean_in)
    plt.figure(figsize=(6, 3.5))
    for mode, ys in series.items():
        plt.plot(loads, ys, marker="o", label=mode.replace("_", "-"))
    plt.xlabel("offered load / capacity")
    plt.ylabel("TTFT p90 (ms)")
    plt.title(f"KV transfer mode, D2D profile, {mean_in}-token prompts ({n_p}P/{n_d}D)")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(_png("transfer"), dpi=100)
    save(f"sim_transfer{_suffix()}", {"loads": loads, "ttft_p90_ms": series,
                          "transfer_s": {"block_free": t_free, "block_fixed": t_fixed}})
    head = (f"One {mean_in}-token prompt's KV: block-free {1e3 * t_free:.1f} ms, block-fixed "
            f"{1e3 * t_fixed:.1f} ms (profile).\n\n| mode | load | TTFT p50 ms | TTFT p90 ms | "
            "TTFT<=500ms attainment |\n|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def disagg() -> str:
    p = _profile()
    mean_in, mean_out = 1024, 256
    n_p, n_d = split(p, N, mean_in, mean_out)
    cap = capacity_rps(p, N, mean_in, mean_out)
    slo = Slo(ttft_ms=1000, tpot_ms=30)
    loads = [0.3, 0.5, 0.7, 0.9]
    rows: list[str] = []
    series: dict[str, list[float]] = {"disaggregated": [], "aggregated": []}
    for x in loads:
        load = ScenarioLoad(x * cap, lengths(mean_in, 400, 16, 4096),
                            lengths(mean_out, 100, 1, 1024))
        for kind, spec in (("disaggregated", ScenarioSpec("a", n_p, n_d, load=load)),
                           ("aggregated", ScenarioSpec("a", n_aggregated=N, load=load))):
            cfg = SimConfig(scenarios=(spec,), duration_s=60, slo=slo,
                            forwarding=ForwardingPolicy(ttft_budget_s=2.0))
            _, s = _run(cfg)
            series[kind].append(s.goodput or 0.0)
            rows.append(f"| {x:.1f} | {kind} | {_pct(s.slo_attainment)} | "
                        f"{_pct(s.ttft_attainment)} | {_pct(s.tpot_attainment)} | "
                        f"{_ms(s, 'inter_token_latency_ms', 'p90'):.1f} | {s.goodput:.1f} |")
    plt.figure(figsize=(6, 3.5))
    for kind, ys in series.items():
        plt.plot([x * cap for x in loads], ys, marker="o", label=kind)
    plt.xlabel("offered load (req/s)")
    plt.ylabel("goodput (req/s, TTFT<=1s & TPOT<=30ms)")
    plt.title(f"{N} instances: {n_p}P/{n_d}D vs {N} aggregated (chunked prefill)")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(_png("disagg"), dpi=100)
    save(f"sim_disagg{_suffix()}", {"loads": loads, "capacity_rps": cap, "goodput": series})
    head = ("| load | deployment | SLO attainment | TTFT att. | TPOT att. | ITL p90 ms | "
            "goodput req/s |\n|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


EXPERIMENTS = {"forwarding": forwarding, "ratio": ratio, "transfer": transfer, "disagg": disagg}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--profile", type=Path, default=H100, help="instance profile YAML/JSON")
    args = ap.parse_args(argv)
    global _profile_path
    _profile_path = args.profile.resolve()
    names: Any = list(EXPERIMENTS) if args.which == "all" else [args.which]
    for name in names:
        print(f"### {name}\n\n{EXPERIMENTS[name]()}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
