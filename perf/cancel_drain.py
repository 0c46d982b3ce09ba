"""How long a server takes to let go of many streams a client cancels at once.

One tritonserver with the e2e tests' deployment (``tiny``: 1 prefill + 1 decode
behind the router, and 1 aggregated instance; 64 sequences per instance, answers
up to 1000 tokens, TTFT budget 60 s). Per trial the client opens ONE gRPC stream,
sends ``--streams`` requests on it (half to each scenario, 1000 tokens each:
half of them run, the rest wait in the router for a batch slot), waits until the
router's ``pdserve_router_requests_in_flight`` gauge shows them all, then
closes the stream with its requests cancelled, and measures until the gauge
is back at 0 and until every instance's KV arena is empty again:

    python -m perf.cancel_drain [--streams 256] [--trials 6] [--json FILE]

The gauge and the arenas are sent every 0.25 s (``roles.metric_buffer``), so
figures are +-0.25 s. Written to compare the code before and after the
abort stopped waiting on a full token socket (RESULTS.md, "Cancelling under load").
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from pdserve.scheduler.controller.signals import scrape_text
from perf.experiments import common

SPEC: dict[str, Any] = {
    "model": "tiny",
    "router": {"name": "pdserve", "num_threads": 1},
    "limits": {"max_tokens": 1000, "max_batch_size": 64, "kv_capacity_mb": 64,
               "ttft_budget_s": 60},
    "kv": {"transport": "shm", "send_mode": "layerwise", "ttl_s": 20},
    "scenarios": {"default": {"prefill": 1, "decode": 1}, "agg": {"aggregated": 1}},
}
KV_INSTANCES = ("prefill_0", "decode_0", "aggregated_0")
IN_FLIGHT = "pdserve_router_requests_in_flight"
KV_IN_USE = "pdserve_kv_arena_bytes_in_use"


def gauges(metrics_url: str) -> tuple[float, float]:
    """(requests in the router, KV bytes in use over every instance)."""
    return gauges_in(scrape_text(metrics_url, timeout_s=10))


def gauges_in(text: str) -> tuple[float, float]:
    """``gauges`` from a /metrics page's text (every scenario's series summed)."""
    in_flight = kv = 0.0
    for line in text.splitlines():
        if line.startswith(IN_FLIGHT + "{") and 'instance="pdserve"' in line:
            in_flight += float(line.rsplit(" ", 1)[1])
        elif line.startswith(KV_IN_USE + "{") and any(f'instance="{i}"' in line
                                                      for i in KV_INSTANCES):
            kv += float(line.rsplit(" ", 1)[1])
    return in_flight, kv


def _inputs(i: int) -> list[Any]:
    ids = grpcclient.InferInput("input_ids", [3], "INT32")
    ids.set_data_from_numpy(np.array([5 + i % 50, 7, 9], dtype=np.int32))
    stream = grpcclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([b'{"max_tokens": 1000, "ignore_eos": true}'],
                                          dtype=object))
    scenario = grpcclient.InferInput("scenario", [1], "BYTES")
    scenario.set_data_from_numpy(np.array([(b"default", b"agg")[i % 2]], dtype=object))
    return [ids, stream, sampling, scenario]


def trial(grpc_url: str, metrics_url: str, n: int, timeout_s: float) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(grpc_url)
    responses = 0
    lock = threading.Lock()

    def on_response(result: Any, error: Any) -> None:
        nonlocal responses
        with lock:
            responses += 1

    client.start_stream(callback=on_response)
    t0 = time.monotonic()
    try:
        for i in range(n):
            client.async_stream_infer("pdserve", _inputs(i), request_id=str(i))
        while gauges(metrics_url)[0] < n:
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"the router never held all {n} requests")
            time.sleep(0.05)
        all_in_s = time.monotonic() - t0
    finally:
        cancel = time.monotonic()
        client.stop_stream(cancel_requests=True)
        client.close()
    router_free = kv_free = None
    while router_free is None or kv_free is None:
        now = time.monotonic() - cancel
        if now > timeout_s:
            break
        in_flight, kv = gauges(metrics_url)
        if router_free is None and in_flight == 0:
            router_free = now
        if kv_free is None and kv == 0:
            kv_free = now
        time.sleep(0.05)
    return {"all_in_s": all_in_s, "responses_before_cancel": responses,
            "router_free_s": router_free, "kv_free_s": kv_free}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="per trial, for the gauge to show all and to fall to 0")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    with TemporaryDirectory() as tmp, common.deployed(SPEC, Path(tmp)) as server:
        for k in range(args.trials):
            row = trial(server.options.grpc_url, server.options.metrics_url, args.streams,
                        args.timeout_s)
            rows.append(row)
            print(f"trial {k}: all {args.streams} in the router after {row['all_in_s']:.1f} s; "
                  f"after the cancel: router empty {common.fmt(row['router_free_s'])} s, "
                  f"KV free {common.fmt(row['kv_free_s'])} s", flush=True)
    done = [r["router_free_s"] for r in rows if r["router_free_s"] is not None]
    print(f"router empty after the cancel: median "
          f"{common.fmt(statistics.median(done) if done else None)} s, "
          f"max {common.fmt(max(done, default=None))} s; {len(rows) - len(done)} of "
          f"{len(rows)} trials not within {args.timeout_s:g} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": common.machine(), "streams": args.streams,
                                         "trials": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
