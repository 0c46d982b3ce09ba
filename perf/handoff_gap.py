"""The prefill-to-decode hand-off, seen by the client: E1's first inter-token gap.

A disaggregated request's first token comes from the prefill; the second from
the decode, after the KV moved and the decode took the sequence into its
batch. An aggregated instance makes both. This runs E1's deployment (``small``,
1P+1D and 2 aggregated, one tritonserver) plus a second 1P+1D pair on the same
two cores whose decode starts on the router's commit (``decode_start:
on_commit``) instead of when the KV lands (the default), sends E1's unloaded
requests one at a time to each deployment in turn, ``rounds`` times, and prints
per deployment and round the first gap (token 1 -> 2) and the later gaps
(token k -> k+1, k >= 2), then the medians over all rounds:

    python -m perf.handoff_gap [--rounds 3] [--json FILE]

For answers of 2 tokens the TPOT is the first gap alone, which is why it
matters for E1's TPOT-tight SLO at light load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from pdserve.bench.records import RequestRecord
from perf.experiments import common
from perf.experiments import e1_disagg_vs_agg as e1


def gaps_ms(records: Sequence[RequestRecord]) -> tuple[list[float], list[float]]:
    """(first gaps, later gaps) in ms over requests with at least 2 responses."""
    first: list[float] = []
    later: list[float] = []
    for r in records:
        ts = r.response_s
        if len(ts) >= 2:
            first.append(1000 * (ts[1] - ts[0]))
            later += [1000 * (b - a) for a, b in itertools.pairwise(ts[1:])]
    return first, later


def describe(first: list[float], later: list[float]) -> str:
    if not first:
        return "no request with 2 tokens"
    line = (f"first gap median {statistics.median(first):.1f} ms, max {max(first):.1f} ms "
            f"({len(first)} requests)")
    if later:
        line += f"; later gaps median {statistics.median(later):.1f} ms ({len(later)})"
    return line


# label -> scenario: E1's two, and E1's disaggregated pair starting on commit
DEPLOYMENTS = {"disagg": "default", "disagg_on_commit": "commit", "agg": "agg"}


def spec(cfg: e1.E1Config) -> dict[str, Any]:
    out = e1.spec(cfg)
    pair = out["scenarios"]["default"]
    out["scenarios"] = {**out["scenarios"], "commit": {**pair, "decode_start": "on_commit"}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write every gap here")
    args = parser.parse_args(argv)
    cfg = e1.FULL
    base, _ = e1.trace_at(cfg, 1.0, common.AZURE_CONV)
    base = [replace(s, arrival_s=None) for s in base[: cfg.unloaded_requests + 2]]
    print(f"{len(base) - 2} requests, output lengths {[s.output_len for s in base[2:]]}")
    gaps: dict[str, dict[str, list[float]]] = {
        label: {"first": [], "later": []} for label in DEPLOYMENTS}
    with TemporaryDirectory() as tmp, common.deployed(spec(cfg), Path(tmp)) as server:
        for scenario in DEPLOYMENTS.values():
            common.drive(server, base[:2], label="warmup", scenario=scenario, concurrency=1)
        for k in range(args.rounds):  # deployments in turn: the machine's drift hits all
            for label, scenario in DEPLOYMENTS.items():
                run = common.drive(server, base[2:], label=label, scenario=scenario,
                                   concurrency=1)
                first, later = gaps_ms(run.records)
                gaps[label]["first"] += first
                gaps[label]["later"] += later
                print(f"{label} round {k + 1}: {describe(first, later)}", flush=True)
    for label, g in gaps.items():
        print(f"{label} all rounds: {describe(g['first'], g['later'])}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": common.machine(), "spec": spec(cfg),
                                         "requests": len(base) - 2, "gaps_ms": gaps},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
