"""What reserving a CPU quota is worth: one server, the instances' CPU weight toggled.

E3 with owned compute gives each instance a CPU quota (``cpu_quota``: a cgroup
per instance). A quota caps; whether the instance gets it when the router,
Triton and the load generator crowd its core is the cgroup's CPU weight
(``roles/cpu_quota.py``). This measurement runs one static E3 deployment and
one phase's traffic in 20 s rows, and between rows writes the weight of the
chosen roles' cgroups: the default (v1 ``cpu.shares`` 1024, v2 ``cpu.weight``
100) and the reserved one (262144 / 10000), alternating which goes first each
round. Both settings then see the same server, the same warm instances and
the machine minutes apart, not runs apart; compare them as the ratio of the
means.

    python -m perf.experiments.cpu_weight --ratio 1P3D --phase output-heavy \\
        --roles decode --rounds 4 --out DIR

``--roles`` names which instances' cgroups are toggled (prefill, decode or
both); the others keep the weight their role starts with (``reserves_cpu``).
Writes ``DIR/cpu_weight.json`` (one row per 20 s: the weights, throughput,
TTFT/TPOT, SLO attainment, CPU per process) and prints the means. Needs root
(or a delegated cgroup) like ``cpu_quota`` itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import Slo
from pdserve.roles.cpu_quota import PREFIX, WEIGHTS, find_hierarchy
from perf.experiments import common, e3_owned
from perf.experiments import e3_dynamic_ratio as e3

ROW_S = 20.0


def groups(parent: Path, server_pid: int, roles: set[str]) -> list[Path]:
    """The cgroups of ``server_pid``'s instances in ``roles``."""
    found = sorted(g for g in parent.glob(f"{PREFIX}{server_pid}-*")
                   if g.name.rsplit("-", 1)[1].rsplit("_", 1)[0] in roles)
    if not found:
        raise SystemExit(f"no {PREFIX}{server_pid}-* cgroup of {sorted(roles)} under {parent}")
    return found


def set_weight(paths: list[Path], version: int, reserved: bool) -> int:
    name, default, high = WEIGHTS[version]
    value = high if reserved else default
    for path in paths:
        (path / name).write_text(str(value))
    return value


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for reserved in (False, True):
        rs = [r for r in rows if r["reserved"] == reserved]
        out["reserved" if reserved else "default"] = {
            k: statistics.fmean(r[k] for r in rs)
            for k in ("req_per_s", "goodput", "slo_attainment", "ttft_p50_ms", "ttft_p90_ms",
                      "tpot_p50_ms", "tpot_p90_ms")}
    out["ratio"] = {k: out["reserved"][k] / out["default"][k] for k in out["default"]
                    if out["default"][k]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", default="1P3D", help="static ratio, like 1P3D")
    parser.add_argument("--phase", default="output-heavy",
                        choices=[p.name for p in e3_owned.FULL.mixes()])
    parser.add_argument("--roles", default="decode",
                        help="comma-separated roles whose weight is toggled")
    parser.add_argument("--rounds", type=int, default=4, help="rows per weight")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    roles = set(args.roles.split(","))
    if not roles <= {"prefill", "decode"} or args.rounds < 1:
        raise SystemExit("--roles: prefill and/or decode; --rounds >= 1")
    cfg = e3_owned.FULL
    n_p, n_d = e3.parse_ratio(args.ratio)
    phase = next(p for p in cfg.mixes() if p.name == args.phase)
    index = cfg.phases.index(phase)
    slo = Slo(ttft_ms=cfg.slo_ttft_ms, tpot_ms=cfg.slo_tpot_ms)
    hierarchy = find_hierarchy()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with common.deployed(e3.spec(cfg, n_p, n_d), args.out / "server") as server:
        assert server.process is not None
        paths = groups(hierarchy.current, server.process.pid, roles)
        e3.warmup(server, cfg)
        for rnd in range(args.rounds):
            for reserved in (False, True) if rnd % 2 == 0 else (True, False):
                weight = set_weight(paths, hierarchy.version, reserved)
                row = e3.run_phases(server, cfg, f"{'reserved' if reserved else 'default'}",
                                    slo, [(index, phase)], ROW_S)[0]
                row.update(reserved=reserved, weight=weight, round=rnd)
                rows.append(row)
    doc = {"experiment": "cpu_weight", "at": dt.datetime.now(dt.UTC).isoformat(),
           "ratio": args.ratio, "phase": args.phase, "mix": e3.mix(phase),
           "roles": sorted(roles), "cpu_quota": cfg.cpu_quota, "row_s": ROW_S,
           "machine": common.machine(), "rows": rows, "summary": summary(rows)}
    (args.out / "cpu_weight.json").write_text(json.dumps(doc, indent=1))
    for k, v in doc["summary"].items():
        print(k, {m: round(x, 3) for m, x in v.items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
