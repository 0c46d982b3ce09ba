"""Router + Triton overhead: tokens/s and TTFT through the server vs the offline engine.

    python -m perf.serving_overhead --json OUT [--model tiny] [--requests 32] [--max-tokens 32]
                                    [--repeat N] [--cores 0]

Same prompts, same sampling (greedy, ignore_eos), all requests at once. The
offline run is ``engine.generate`` (one continuous batcher, chunked prefill) in
this process; the server runs the ``agg`` scenario (one aggregated instance:
the same batcher behind router + Triton) and the ``default`` scenario (1P/1D).
Torch threads: 1 per engine process on both sides, so the comparison isolates
serving cost; 1P/1D uses two engine processes and is reported for reference.

CPU: this process pins itself to ``--cores`` (default core 0) before anything
starts, so the offline engine, tritonserver and every stub it forks share the
same core(s). Without that, on a machine others load too, the served side ran
in more processes than the offline one and simply got more CPU share (served
faster than offline, 1.2-1.8x, which measures the scheduler, not us).
Each run also reports CPU seconds (offline: this process; served: every
process of tritonserver's group) and tokens per CPU second, a ratio that other
people's load does not move much.

With ``--repeat N`` the three runs alternate N times against one server (the
offline engine stays loaded), so machine noise hits both sides alike; the
report keeps every round and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.grpc as grpcclient
import yaml

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.server.config import parse_cpu_cores
from pdserve.server.launcher import ServerOptions, TritonServer, free_port
from pdserve.server.repo import build


def _prompts(n: int) -> list[str]:
    return [f"request {i}: " + "tell me a story about serving " * (1 + i % 4) for i in range(n)]


def offline(engine: LLMEngine, prompts: list[str], max_tokens: int) -> dict[str, float]:
    ids = [engine.tokenizer.encode(p) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    generate(engine, ids[:2], params, chunked_prefill=True)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    out = generate(engine, ids, params, chunked_prefill=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(o) for o in out)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "cpu_s": cpu,
            "tokens_per_cpu_s": tokens / cpu}


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every live process of group ``pgid``.

    tritonserver runs in its own process group with every stub it forked, so
    this is the whole serving side: frontends, router, instances.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def served(grpc_url: str, prompts: list[str], max_tokens: int, scenario: str,
           pgid: int) -> dict[str, float]:
    client = grpcclient.InferenceServerClient(grpc_url)
    events: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put(
        (result, error, time.perf_counter())))
    sampling = json.dumps({"ignore_eos": True, "max_tokens": max_tokens}).encode()
    start: dict[str, float] = {}
    first: dict[str, float] = {}
    tokens = 0
    c0 = group_cpu_s(pgid)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        inputs = []
        for name, dtype, value in (("text_input", "BYTES", p.encode()), ("stream", "BOOL", True),
                                   ("sampling_parameters", "BYTES", sampling),
                                   ("scenario", "BYTES", scenario.encode())):
            t = grpcclient.InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
            inputs.append(t)
        start[str(i)] = time.perf_counter()
        client.async_stream_infer("pdserve", inputs, request_id=str(i),
                                  enable_empty_final_response=True)
    pending = len(prompts)
    while pending:
        result, error, at = events.get(timeout=300)
        if error is not None:
            raise RuntimeError(str(error))
        resp = result.get_response()
        n = len(result.as_numpy("output_ids"))
        tokens += n
        if n and resp.id not in first:
            first[resp.id] = at - start[resp.id]
        if resp.parameters["triton_final_response"].bool_param:
            pending -= 1
    wall = time.perf_counter() - t0
    cpu = group_cpu_s(pgid) - c0
    client.stop_stream()
    client.close()
    if tokens != len(prompts) * max_tokens:  # ignore_eos: every request runs to max_tokens
        raise RuntimeError(f"{scenario}: got {tokens} tokens, expected "
                           f"{len(prompts) * max_tokens}")
    ttfts = sorted(first.values())
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "cpu_s": cpu,
            "tokens_per_cpu_s": tokens / cpu,
            "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_mean_s": float(np.mean(ttfts))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cores", default="0", help="CPU cores for both sides (e.g. 0 or 0-1)")
    args = ap.parse_args()
    cores = parse_cpu_cores(args.cores)
    os.sched_setaffinity(0, cores)  # inherited by tritonserver and its stubs
    prompts = _prompts(args.requests)
    report: dict[str, Any] = {"model": args.model, "requests": args.requests,
                              "max_tokens": args.max_tokens, "cores": list(cores), "rounds": []}
    torch.set_num_threads(1)
    engine = LLMEngine.load(args.model)
    spec = {"model": args.model, "router": {"name": "pdserve", "num_threads": 1},
            "limits": {"max_tokens": 1024, "max_batch_size": 64, "kv_capacity_mb": 256},
            "kv": {"transport": "shm", "send_mode": "whole"},
            "scenarios": {"default": {"prefill": 1, "decode": 1}, "agg": {"aggregated": 1}}}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        build(spec_path, Path(tmp) / "repo")
        for name in ("pdserve", "prefill_0", "decode_0", "aggregated_0"):  # 1 torch thread each
            cfg = Path(tmp) / "repo" / name / "config.pbtxt"
            cfg.write_text(cfg.read_text().replace(
                'parameters { key: "role"',
                'parameters { key: "num_threads" value { string_value: "1" } }\n'
                'parameters { key: "role"') if name != "pdserve" else cfg.read_text())
        opts = ServerOptions(repository=Path(tmp) / "repo", http_port=free_port(),
                             grpc_port=free_port(), metrics_port=free_port())
        with TritonServer(opts) as server:
            assert server.process is not None
            pgid = server.process.pid  # started as a session (and group) leader
            for scenario in ("agg", "default"):
                served(opts.grpc_url, prompts[:2], args.max_tokens, scenario, pgid)  # warm-up
            for _ in range(args.repeat):
                rnd: dict[str, Any] = {"offline": offline(engine, prompts, args.max_tokens)}
                for scenario in ("agg", "default"):
                    rnd[f"server_{scenario}"] = served(opts.grpc_url, prompts, args.max_tokens,
                                                       scenario, pgid)
                rnd["agg_throughput_ratio"] = (rnd["server_agg"]["tokens_per_s"]
                                               / rnd["offline"]["tokens_per_s"])
                # Load-independent: tokens per CPU second, served side vs offline.
                rnd["agg_cpu_efficiency_ratio"] = (rnd["server_agg"]["tokens_per_cpu_s"]
                                                   / rnd["offline"]["tokens_per_cpu_s"])
                report["rounds"].append(rnd)
    ratios = sorted(r["agg_throughput_ratio"] for r in report["rounds"])
    report["agg_throughput_ratio_median"] = float(np.median(ratios))
    report["agg_throughput_ratio_min_max"] = [ratios[0], ratios[-1]]
    cpu_ratios = sorted(r["agg_cpu_efficiency_ratio"] for r in report["rounds"])
    report["agg_cpu_efficiency_ratio_median"] = float(np.median(cpu_ratios))
    report["agg_cpu_efficiency_ratio_min_max"] = [cpu_ratios[0], cpu_ratios[-1]]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
