"""How much one static E3 pass repeats: the same pass again and again, on one server or several.

E3's goal compares a dynamic phase with static passes that differ by up to
46 % between passes (perf/RESULTS.md, E3 with owned compute). This measures
that spread where nothing changes: one static ratio, one mix, E3-owned's
deployment and load (``e3_owned.FULL``: 0.3 cores a quota, 0.4 before
2026-12-07; 16 in flight; 20 s a pass), ``--passes`` passes back to back on
each of ``--servers`` fresh servers, with the host gauge beside it
(``host_slowdown`` per pass) and each process's CPU per pass (``cpu_cores``,
``process_cpu``), so a slow pass can be told apart by what its processes did::

    python -m perf.e3_pass_spread --ratio 3P1D --passes 10 --out /tmp/spread

Writes ``spread.json`` in ``--out`` and prints one line a pass, then the
correlation of the passes' req/s with each host gauge (``gauge_correlation``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import Slo
from perf.experiments import common, host_speed, process_cpu
from perf.experiments import e3_dynamic_ratio as e3
from perf.experiments.e3_owned import FULL


def measure(ratio: str, mix_index: int, passes: int, servers: int, out: Path,
            cfg: e3.E3Config = FULL) -> dict[str, Any]:
    n_p, n_d = e3.parse_ratio(ratio)
    phase = cfg.phases[mix_index]
    slo = Slo(ttft_ms=cfg.slo_ttft_ms, tpot_ms=cfg.slo_tpot_ms)
    rows: list[dict[str, Any]] = []
    with host_speed.HostSpeed(out / "host_speed.jsonl") as gauge:
        for server_index in range(servers):
            with common.deployed(e3.spec(cfg, n_p, n_d), out / f"server{server_index}") as server:
                e3.warmup(server, cfg)
                for k in range(passes):
                    started = time.time()
                    run_ = common.drive(
                        server, list(itertools.islice(e3.phase_requests(phase, mix_index),
                                                      100_000)),
                        label=ratio, concurrency=cfg.concurrency,
                        max_duration_s=cfg.static_phase_s, request_timeout_s=60)
                    row = {"server": server_index, "pass": k, "started_at": started,
                           "seconds": cfg.static_phase_s, **common.summary_row(run_.summary(slo)),
                           "cpu_cores": run_.cpu_cores}
                    rows.append(row)
                    used = process_cpu.groups(run_.cpu_cores)
                    print(f"server {server_index} pass {k}: {row['req_per_s']:.2f} req/s, "
                          f"TPOT p50 {common.fmt(row['tpot_p50_ms'], '.2f')} ms, cores "
                          + " ".join(f"{g} {v:.2f}" for g, v in used.items()), flush=True)
        gauge_doc = host_speed.annotate_all(rows, gauge)
    rates = [r["req_per_s"] for r in rows]
    doc = {"experiment": "e3_pass_spread", "ratio": ratio, "mix": e3.mix(phase),
           "passes": passes, "servers": servers, "config": {"cpu_quota": cfg.cpu_quota,
                                                            "concurrency": cfg.concurrency,
                                                            "seconds": cfg.static_phase_s},
           "machine": common.machine(), "host_speed": gauge_doc, "rows": rows,
           "req_per_s": {"min": min(rates), "max": max(rates), "mean": statistics.mean(rates),
                         "stdev": statistics.stdev(rates) if len(rates) > 1 else 0.0},
           "gauge_correlation": gauge_correlation(rows)}
    common.write_json(out / "spread.json", doc)
    return doc


def gauge_correlation(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Pearson correlation of the passes' req/s with each host gauge's slowdown
    (``host_speed.GAUGES``); None where fewer than 3 passes have it or it never moved."""
    out: dict[str, float | None] = {}
    for _, field in host_speed.GAUGES:
        pairs = [(r["req_per_s"], r[field]) for r in rows if r.get(field) is not None]
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        if len(pairs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
            out[field] = None
        else:
            out[field] = round(statistics.correlation(xs, ys), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", default="3P1D", help="static ratio, e.g. 3P1D")
    parser.add_argument("--mix-index", type=int, default=0,
                        help="which E3 phase's mix (0: prompt-heavy, 1: output-heavy)")
    parser.add_argument("--passes", type=int, default=10, help="passes per server")
    parser.add_argument("--servers", type=int, default=1, help="fresh servers, one after another")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.passes < 1 or args.servers < 1 or not 0 <= args.mix_index < len(FULL.phases):
        parser.error("need --passes >= 1, --servers >= 1 and a phase index of E3")
    try:
        e3.parse_ratio(args.ratio)
    except ValueError as exc:
        parser.error(str(exc))
    doc = measure(args.ratio, args.mix_index, args.passes, args.servers, args.out)
    print(json.dumps(doc["req_per_s"]))
    print("correlation of req/s with each gauge's slowdown:", json.dumps(doc["gauge_correlation"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
