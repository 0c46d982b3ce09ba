"""The first requests after a server (re)start, with and without the load-time warm-up.

A fresh instance process pays its first forward pass's one-time costs on its
first request unless it warmed up at load (``warmup_tokens``; see
``roles.instance.warm_up``). This serves E1's deployment (``small``, 1P+1D and
2 aggregated, pinned to the two cores) once per ``--warmup-tokens`` value, each
in a fresh tritonserver, measures how long the server took to become ready, and
sends the same few requests one at a time to each scenario, first to last:

    python -m perf.first_request [--warmup-tokens 0 16] [--requests 4] [--json FILE]

It prints each request's TTFT and first inter-token gap (token 1 -> 2), so the
first request of each deployment compares with the ones after it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from pdserve.bench.records import RequestRecord
from perf.experiments import common
from perf.experiments import e1_disagg_vs_agg as e1

SCENARIOS = {"disagg": "default", "agg": "agg"}


def spec(warmup_tokens: int) -> dict[str, Any]:
    """E1's deployment with every instance warming up ``warmup_tokens`` (0: not at all)."""
    return {**e1.spec(e1.FULL), "warmup_tokens": warmup_tokens}


def row(record: RequestRecord) -> dict[str, float | None]:
    """A request's TTFT and first inter-token gap (None for a 1-response answer), in ms."""
    first = record.first_token_s
    if not record.is_ok or first is None:
        raise RuntimeError(f"request {record.index} failed: {record.error_message}")
    ts = record.response_s
    return {"ttft_ms": 1000 * (first - record.send_s),
            "first_gap_ms": 1000 * (ts[1] - ts[0]) if len(ts) > 1 else None}


def measure(warmup_tokens: int, n: int) -> dict[str, Any]:
    base, _ = e1.trace_at(e1.FULL, 1.0, common.AZURE_CONV)
    specs = [replace(s, arrival_s=None) for s in base[:n]]
    out: dict[str, Any] = {"warmup_tokens": warmup_tokens,
                           "lengths": [(s.input_len, s.output_len) for s in specs]}
    with TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        with common.deployed(spec(warmup_tokens), Path(tmp)) as server:
            out["ready_s"] = time.monotonic() - t0
            for label, scenario in SCENARIOS.items():
                # one at a time: each request alone on the deployment
                out[label] = [row(common.drive(server, [s], label=label, scenario=scenario,
                                               concurrency=1).records[0]) for s in specs]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup-tokens", type=int, nargs="+", default=[0, 16])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    for tokens in args.warmup_tokens:
        res = measure(tokens, args.requests)
        results.append(res)
        print(f"warmup_tokens {tokens}: ready after {res['ready_s']:.1f} s")
        for label in SCENARIOS:
            cells = ", ".join(
                f"{r['ttft_ms']:.0f}" + (f" / {r['first_gap_ms']:.0f}" if r["first_gap_ms"]
                                         is not None else "")
                for r in res[label])
            print(f"  {label}: TTFT / first gap ms, request 1..{args.requests}: {cells}",
                  flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": common.machine(), "runs": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
