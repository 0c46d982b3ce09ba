"""E1: disaggregated (1 prefill + 1 decode) vs aggregated (2 x chunked prefill) on 2 cores.

One tritonserver holds both deployments behind the same router (scenario
``default`` = prefill_0 on core 0 + decode_0 on core 1; scenario ``agg`` =
aggregated_0 on core 0 + aggregated_1 on core 1), so both see the same router,
client and machine; only one scenario carries load at a time. The idle pair
costs nothing but memory.

Workload: the Azure conversation trace, lengths scaled and capped to what one
CPU core serves, arrival times scaled to sweep the request rate. SLOs come
from the unloaded run (one request at a time) of the same requests:
  TPOT-tight: TPOT <= 2x unloaded TPOT p50, TTFT <= 10x unloaded TTFT p90
  TTFT-tight: TTFT <= 3x unloaded TTFT p90, TPOT <= 5x unloaded TPOT p50
"unloaded" = the better of the two deployments, per metric.

    python -m perf.experiments.e1_disagg_vs_agg [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import DEADLINE_KIND, Slo
from pdserve.bench.records import RequestSpec
from pdserve.bench.traces import TraceScaling, read_trace, trace_requests
from perf.experiments import common, host_speed, phases

NAME = "e1_disagg_vs_agg"
DEPLOYMENTS = {"disagg": "default", "agg": "agg"}  # label -> scenario


@dataclass(frozen=True)
class E1Config:
    model: str
    length_scale: float
    max_input_len: int
    max_output_len: int
    rates: tuple[float, ...]  # offered requests/s
    point_s: float  # arrivals span this long at each rate (longer where min_requests asks)
    unloaded_requests: int
    max_step_tokens: int  # aggregated chunk budget per step (Sarathi-style)
    # Before the points, per deployment: a closed loop of this many requests in flight
    # for busy_s seconds (the router and the client busy; the simulator's validation
    # calibrates their CPU work from it, never from the points). 0: not run.
    busy_concurrency: int = 2
    busy_s: float = 15.0
    # At least this many requests per point: at 0.5 req/s, 40 s of arrivals are 20
    # requests, and one slow request moves the point's attainment by 5 %.
    min_requests: int = 2
    # Before each point, on its deployment: the unloaded run's first requests again,
    # one at a time (the machine's speed then, against the unloaded run's;
    # perf/sim_validate.py --drift scales its engine by it). 0: not run.
    probe_requests: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.probe_requests <= self.unloaded_requests:
            raise ValueError("probe_requests must be in 0..unloaded_requests")
        if not self.rates or min(self.rates) <= 0:
            raise ValueError(f"rates must be positive, got {self.rates}")
        if self.point_s <= 0 or self.unloaded_requests < 2 or self.min_requests < 2:
            raise ValueError("point_s must be > 0, unloaded_requests and min_requests >= 2")
        if self.busy_concurrency < 0 or (self.busy_concurrency and self.busy_s <= 0):
            raise ValueError("busy_concurrency must be >= 0 and busy_s > 0 when it runs")


FULL = E1Config(model="small", length_scale=0.125, max_input_len=256, max_output_len=48,
                rates=(0.5, 1.0, 2.0, 3.0), point_s=40.0, unloaded_requests=10,
                max_step_tokens=128, min_requests=40)
QUICK = E1Config(model="tiny", length_scale=0.125, max_input_len=128, max_output_len=16,
                 rates=(2.0, 8.0), point_s=6.0, unloaded_requests=4, max_step_tokens=64,
                 busy_s=3.0)


def spec(cfg: E1Config) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "router": {"name": "pdserve", "num_threads": 1},
        "limits": {"max_tokens": max(256, cfg.max_output_len), "max_batch_size": 32,
                   "max_step_tokens": cfg.max_step_tokens, "kv_capacity_mb": 256,
                   "ttft_budget_s": 120},
        "kv": {"transport": "shm", "send_mode": "layerwise", "ttl_s": 60},
        "scenarios": {
            "default": {"prefill": 1, "decode": 1,
                        "cpu_cores": {"prefill": ["0"], "decode": ["1"]}},
            "agg": {"aggregated": 2, "cpu_cores": {"aggregated": ["0", "1"]}},
        },
    }


def trace_at(cfg: E1Config, rate: float, trace: Path) -> tuple[list[RequestSpec], float]:
    """The first requests of the trace replayed at ``rate`` req/s: (specs, time_scale)."""
    count = max(cfg.min_requests, math.ceil(rate * cfg.point_s))
    rows = read_trace(trace, max_rows=count)
    native_rate = (len(rows) - 1) / max(rows[-1].timestamp_s, 1e-9)
    time_scale = native_rate / rate
    scaling = TraceScaling(time_scale, cfg.length_scale, cfg.max_input_len, cfg.max_output_len)
    return trace_requests(rows, scaling), time_scale


def busy_specs(cfg: E1Config, trace: Path) -> list[RequestSpec]:
    """The trace's requests for the closed-loop busy run (more than it can send)."""
    rows, _ = trace_at(replace(cfg, point_s=max(cfg.busy_s * 20, 1.0)), 1.0, trace)
    return [replace(s, arrival_s=None) for s in rows]


def busy_runs(server: Any, cfg: E1Config, trace: Path) -> dict[str, dict[str, Any]]:
    """Per deployment: ``busy_concurrency`` requests in flight for ``busy_s``."""
    out = {}
    specs = busy_specs(cfg, trace)
    for label, scenario in DEPLOYMENTS.items():
        before = phases.totals(server.options.metrics_url)
        run_ = common.drive(server, specs, label=f"busy {label}", scenario=scenario,
                            concurrency=cfg.busy_concurrency, max_duration_s=cfg.busy_s)
        out[label] = {"concurrency": cfg.busy_concurrency, "duration_s": cfg.busy_s,
                      "load": common.summary_row(run_.summary()), "cpu_cores": run_.cpu_cores,
                      **run_.window(),
                      "phases_ms": phases.point(before, phases.totals(server.options.metrics_url),
                                                run_.records)}
        print(f"busy {label}: {out[label]['load']}", flush=True)
    return out


def slos(unloaded: dict[str, dict[str, Any]]) -> dict[str, Slo]:
    ttft = min(u["ttft_p90_ms"] for u in unloaded.values())
    tpot = min(u["tpot_p50_ms"] for u in unloaded.values())
    return {"tpot_tight": Slo(ttft_ms=10 * ttft, tpot_ms=2 * tpot),
            "ttft_tight": Slo(ttft_ms=3 * ttft, tpot_ms=5 * tpot)}


def run(cfg: E1Config, quick: bool, trace: Path, out: Path | None = None) -> dict[str, Any]:
    out = out or common.out_dir(NAME, quick)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"experiment": NAME, "quick": quick, "config": cfg.__dict__,
                           "spec": spec(cfg), "trace": str(trace), "machine": common.machine()}
    points: list[dict[str, Any]] = []
    with host_speed.HostSpeed(out / "host_speed.jsonl", engine_every=1) as gauge, \
            common.deployed(spec(cfg), out / "server") as server:
        # Unloaded: the first requests of the trace, one at a time, after 2 warmups.
        base, _ = trace_at(cfg, 1.0, trace)
        base = [replace(s, arrival_s=None) for s in base[: cfg.unloaded_requests + 2]]
        unloaded: dict[str, dict[str, Any]] = {}
        doc["unloaded_requests"] = {}
        # when each calibration run ran: the host gauge gives each its slowdown
        doc["unloaded_window"] = {}
        # the router's first-token phases (disaggregated only; perf.experiments.phases)
        doc["unloaded_phases_ms"] = {}
        url = server.options.metrics_url
        for label, scenario in DEPLOYMENTS.items():
            common.drive(server, base[:2], label="warmup", scenario=scenario, concurrency=1)
            before = phases.totals(url)
            run_ = common.drive(server, base[2:], label=label, scenario=scenario, concurrency=1)
            doc["unloaded_phases_ms"][label] = phases.point(before, phases.totals(url),
                                                            run_.records)
            unloaded[label] = common.summary_row(run_.summary())
            doc["unloaded_requests"][label] = common.request_rows(run_.records)
            doc["unloaded_window"][label] = run_.window()
            print(f"unloaded {label}: {unloaded[label]}", flush=True)
        slo = slos(unloaded)
        doc["unloaded"] = unloaded
        if cfg.busy_concurrency:
            doc["busy"] = busy_runs(server, cfg, trace)
        doc["slo"] = {k: v.__dict__ for k, v in slo.items()}
        for i, rate in enumerate(cfg.rates):
            specs, time_scale = trace_at(cfg, rate, trace)
            # Alternate which deployment goes first, so slow drift in the shared
            # machine's load does not always favour the same one.
            order = list(DEPLOYMENTS.items())
            for label, scenario in order if i % 2 == 0 else order[::-1]:
                probe = common.probe(server, base[2: 2 + cfg.probe_requests], scenario)
                before = phases.totals(url)
                started = time.time()
                run_ = common.drive(server, specs, label=label, scenario=scenario,
                                    max_duration_s=len(specs) / rate * 3 + 30,
                                    request_timeout_s=120)
                point: dict[str, Any] = {
                    "deployment": label, "rate": rate, "time_scale": time_scale,
                    "offered_requests": len(specs), "started_at": started,
                    "wall_s": run_.wall_s, "cpu_cores": run_.cpu_cores,
                    "load": common.summary_row(run_.summary()),
                    "requests": common.request_rows(run_.records),
                    "phases_ms": phases.point(before, phases.totals(url), run_.records)}
                if probe is not None:
                    point["probe"] = probe
                for key, s in slo.items():
                    point[key] = common.summary_row(run_.summary(s))
                points.append(point)
                print(f"rate {rate} {label}: tpot_tight goodput "
                      f"{point['tpot_tight']['goodput']:.3f} att "
                      f"{point['tpot_tight']['slo_attainment']:.2f} | ttft_tight goodput "
                      f"{point['ttft_tight']['goodput']:.3f} att "
                      f"{point['ttft_tight']['slo_attainment']:.2f} | "
                      f"{point['load']}", flush=True)
        calibration = [*doc["unloaded_window"].values(), *(doc.get("busy") or {}).values()]
        doc["host_speed"] = host_speed.annotate_all(points + calibration, gauge)
    doc["points"] = points
    doc["machine_after"] = common.machine()
    common.write_json(out / "e1.json", doc)
    png = plot(doc, out / "e1.png")
    doc["png"] = str(png)
    return doc


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for col, key in enumerate(("tpot_tight", "ttft_tight")):
        s = doc["slo"][key]
        for label, marker in (("disagg", "o-"), ("agg", "s--")):
            pts = [p for p in doc["points"] if p["deployment"] == label]
            rates = [p["rate"] for p in pts]
            axes[0][col].plot(rates, [p[key]["goodput"] for p in pts], marker, label=label)
            axes[1][col].plot(rates, [100 * p[key]["slo_attainment"] for p in pts], marker,
                              label=label)
        axes[0][col].set_title(f"{key}: TTFT<={s['ttft_ms']:.0f} ms, TPOT<={s['tpot_ms']:.0f} ms")
        axes[0][col].set_ylabel("goodput (req/s)")
        axes[1][col].set_ylabel("SLO attainment (%)")
        axes[1][col].set_xlabel("offered rate (req/s)")
        axes[1][col].set_ylim(0, 105)
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"E1 {doc['config']['model']}: 1P+1D vs 2 aggregated (chunked), 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(doc: dict[str, Any], figure: str | None) -> str:
    cfg, m, slo = doc["config"], doc["machine"], doc["slo"]
    u = doc["unloaded"]
    lines = [
        "## E1: disaggregated 1P+1D vs 2 aggregated (chunked prefill) on 2 cores — experiments",
        "",
        f"Command: `.venv/bin/python -m perf.experiments.{NAME}`  ",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores shared with other engineers' "
        f"jobs, load average {m['load_average']} before / {doc['machine_after']['load_average']} "
        f"after, {m['date_utc']}.  ",
        f"Model `{cfg['model']}`; one tritonserver, router unpinned (1 torch thread), "
        "disagg = prefill_0 on core 0 + decode_0 on core 1 (shm KV, layer-wise), "
        f"agg = aggregated_0 on core 0 + aggregated_1 on core 1, chunked prefill with "
        f"{cfg['max_step_tokens']} tokens per step. Client on the same 2 cores.  ",
        f"Trace `{Path(doc['trace']).name}` (first rows), lengths x{cfg['length_scale']} capped "
        f"at {cfg['max_input_len']} in / {cfg['max_output_len']} out; arrivals time-scaled to "
        f"each offered rate; {cfg['point_s']:.0f} s of arrivals per point, at least "
        f"{cfg.get('min_requests', 2)} requests.  ",
        f"Unloaded (one at a time, {cfg['unloaded_requests']} requests): disagg TTFT p90 "
        f"{u['disagg']['ttft_p90_ms']:.0f} ms, TPOT p50 {u['disagg']['tpot_p50_ms']:.1f} ms; "
        f"agg TTFT p90 {u['agg']['ttft_p90_ms']:.0f} ms, TPOT p50 "
        f"{u['agg']['tpot_p50_ms']:.1f} ms.  ",
        f"SLOs from the better unloaded value: **TPOT-tight** TPOT <= 2x = "
        f"{slo['tpot_tight']['tpot_ms']:.1f} ms and TTFT <= 10x = "
        f"{slo['tpot_tight']['ttft_ms']:.0f} ms; **TTFT-tight** TTFT <= 3x = "
        f"{slo['ttft_tight']['ttft_ms']:.0f} ms and TPOT <= 5x = "
        f"{slo['ttft_tight']['tpot_ms']:.1f} ms. Goodput = requests meeting both / s.",
        "",
        "| rate req/s | deployment | done/offered | out tok/s | TTFT p50/p90 ms | TPOT p50/p90 ms "
        "| TPOT-tight goodput (att.) | TTFT-tight goodput (att.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in doc["points"]:
        ld, a, b = p["load"], p["tpot_tight"], p["ttft_tight"]
        lines.append(
            f"| {p['rate']:g} | {p['deployment']} | {ld['ok']}/{p['offered_requests']} | "
            f"{common.fmt(ld['out_tok_per_s'])} | {common.fmt(ld['ttft_p50_ms'], '.0f')}/"
            f"{common.fmt(ld['ttft_p90_ms'], '.0f')} | {common.fmt(ld['tpot_p50_ms'])}/"
            f"{common.fmt(ld['tpot_p90_ms'])} | {common.fmt(a['goodput'], '.2f')} "
            f"({common.pct(a['slo_attainment'])}) | {common.fmt(b['goodput'], '.2f')} "
            f"({common.pct(b['slo_attainment'])}) |")
    lines += ["", *verdict(doc), "",
              "Reading it: the aggregated instances interleave 128-token prefill chunks with "
              "decode steps on the same core, so every arriving prompt stretches the running "
              "requests' TPOT; the decode core of the disaggregated pair only decodes. That is "
              "the TPOT-tight gap. Its price is that all prefill sits on one core: once the "
              "offered rate nears that core's prefill capacity, prompts queue there and TTFT "
              "grows faster than on two aggregated cores that both prefill. The same 2 cores "
              "also carry the router, the client and other engineers' jobs (load average "
              "above), so single points move by +-20% between runs; the trend across rates is "
              "the result, not any one cell."]
    lines += host_speed.note(doc, doc["points"], lambda p: f"{p['deployment']} {p['rate']:g}")
    if figure:
        lines += ["", f"![E1]({figure})"]
    return "\n".join(lines)


def _good(row: dict[str, Any]) -> int:
    """Requests of a summary row that met its SLO (rows before "good" was kept: from the
    attainment, whose denominator leaves out requests still running at the time limit)."""
    if row.get("good") is not None:
        return int(row["good"])
    finished = row["requests"] - row["errors"].get(DEADLINE_KIND, 0)
    return round(row["slo_attainment"] * finished)


def verdict(doc: dict[str, Any]) -> list[str]:
    """Plain sentences: where disaggregation is ahead and where it is not.

    Both deployments get the same requests at a rate, so they are compared on how many
    met the SLO; goodput (those per second of the run) also moves with a run's wall
    time, which differs by a fraction of a second at equal counts.
    """
    out = []
    for key, name in (("tpot_tight", "TPOT-tight"), ("ttft_tight", "TTFT-tight")):
        ahead, behind = [], []
        for rate in doc["config"]["rates"]:
            met = {p["deployment"]: _good(p[key]) for p in doc["points"] if p["rate"] == rate}
            if met["disagg"] > met["agg"]:
                ahead.append(f"{rate:g}")
            elif met["disagg"] < met["agg"]:
                behind.append(f"{rate:g}")
        out.append(f"- {name}: disaggregation ahead on goodput (more requests meeting the SLO) "
                   f"at rates {ahead or 'none'}, behind at {behind or 'none'} "
                   "(as many elsewhere).")
    return out


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--trace", type=Path, default=common.AZURE_CONV)
        parser.add_argument("--rates", type=lambda v: tuple(float(x) for x in v.split(",")),
                            help="override the offered rates, e.g. 0.5,1,2")
        parser.add_argument("--point-s", type=float, help="override seconds of arrivals per point")

    def run_args(args: argparse.Namespace) -> dict[str, Any]:
        cfg = QUICK if args.quick else FULL
        if args.rates:
            cfg = replace(cfg, rates=args.rates)
        if args.point_s:
            cfg = replace(cfg, point_s=args.point_s)
        return run(cfg, args.quick, args.trace, args.out)

    return common.main(argv, key="e1", name=NAME, description=__doc__.split("\n")[0],
                       quick_help="tiny preset, 2 short points", run=run_args, plot=plot,
                       markdown=markdown, add_arguments=add_arguments)

if __name__ == "__main__":
    raise SystemExit(main())
