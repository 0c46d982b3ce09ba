"""``pdserve bench``: load a running pdserve (or any Triton LLM model) and report.

Examples::

    pdserve bench --concurrency 4 --num-requests 100 --input-len-mean 256 --output-len-mean 64
    pdserve bench --request-rate 2 --burstiness 0.5 --max-duration-s 120 --slo-ttft-ms 500
    pdserve bench --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv \\
        --time-scale 20 --length-scale 0.25 --max-input-len 1024 --max-output-len 128 \\
        --max-duration-s 300 --json out.json --csv out.csv --plot plots/
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdserve.bench import report
from pdserve.bench.client import ClientConfig, TritonStreamClient
from pdserve.bench.metrics import Slo, summarize
from pdserve.bench.progress import Progress
from pdserve.bench.records import RequestSpec
from pdserve.bench.runner import LoadConfig, LoadMode, RunResult, run_load
from pdserve.bench.traces import TraceScaling, read_trace, trace_requests
from pdserve.bench.workload import (
    LengthDistribution,
    PromptIds,
    iter_arrivals,
    iter_synthetic_requests,
)
from pdserve.errors import InvalidArgument, PdserveError

DEFAULT_NUM_REQUESTS = 100  # when neither --num-requests nor --max-duration-s bounds a run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC host:port")
    target.add_argument("--model", default="pdserve", help="entry model name")
    target.add_argument("--scenario", default=None, help="send this `scenario` input")
    target.add_argument(
        "--ready-timeout-s",
        type=float,
        default=30.0,
        help="wait this long for the model to be ready",
    )

    load = parser.add_argument_group("load (pick one mode; default --concurrency 1)")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: N requests always in flight")
    mode.add_argument(
        "--request-rate", type=float, help="open loop: mean requests/s ('inf' sends all at once)"
    )
    mode.add_argument("--trace", help="open loop: replay an Azure CSV or JSONL trace")
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrivals: 1 Poisson, <1 burstier",
    )
    load.add_argument("--num-requests", type=int, help="measured requests (after warmup)")
    load.add_argument(
        "--max-duration-s",
        type=float,
        help="stop sending and cancel in-flight requests after this long",
    )
    load.add_argument("--warmup-requests", type=int, default=0, help="unmeasured requests first")
    load.add_argument(
        "--request-timeout-s",
        type=float,
        default=600.0,
        help="cancel any request after this long (default 600; a stuck stream never hangs a run)",
    )
    load.add_argument("--seed", type=int, default=0, help="seeds arrivals, lengths and prompt ids")

    lengths = parser.add_argument_group("lengths (synthetic modes)")
    lengths.add_argument("--input-len-mean", type=float, default=128.0)
    lengths.add_argument("--input-len-stddev", type=float, default=0.0)
    lengths.add_argument("--output-len-mean", type=float, default=64.0)
    lengths.add_argument("--output-len-stddev", type=float, default=0.0)

    trace = parser.add_argument_group("trace replay")
    trace.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply trace arrival offsets (10 = ten times slower)",
    )
    trace.add_argument(
        "--length-scale", type=float, default=1.0, help="multiply trace token counts"
    )
    parser.add_argument("--max-input-len", type=int, help="cap prompt tokens (any mode)")
    parser.add_argument("--max-output-len", type=int, help="cap output tokens (any mode)")

    sampling = parser.add_argument_group("request content")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="let EOS end requests early (lengths then stop following the workload)",
    )
    sampling.add_argument("--token-id-min", type=int, default=32, help="lowest random prompt id")
    sampling.add_argument("--token-id-max", type=int, default=127, help="prompt ids below this")

    slo = parser.add_argument_group("SLOs (goodput)")
    slo.add_argument("--slo-ttft-ms", type=float, help="time-to-first-token SLO")
    slo.add_argument("--slo-tpot-ms", type=float, help="time-per-output-token (ITL) SLO")

    out = parser.add_argument_group("output")
    out.add_argument("--json", help="write config, summary and per-request rows here")
    out.add_argument("--csv", help="write the summary in genai-perf's CSV layout here")
    out.add_argument("--plot", metavar="DIR", help="write latency CDF and throughput PNGs here")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _load_config(args: argparse.Namespace) -> LoadConfig:
    mode: LoadMode
    if args.trace is not None:
        mode = "trace"
    elif args.request_rate is not None:
        mode = "request_rate"
    else:
        mode = "concurrency"
    concurrency = args.concurrency if args.concurrency is not None else 1
    return LoadConfig(
        mode=mode,
        concurrency=concurrency,
        max_duration_s=args.max_duration_s,
        warmup_requests=args.warmup_requests,
        warmup_concurrency=concurrency if mode == "concurrency" else 1,
    )


def _workload(
    args: argparse.Namespace, load: LoadConfig
) -> tuple[Iterable[RequestSpec], list[RequestSpec], int | None]:
    """(measured requests, warmup requests, number of measured requests if known)."""
    num = args.num_requests
    if num is not None and num < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num}")
    if num is None and args.max_duration_s is None and load.mode != "trace":
        num = DEFAULT_NUM_REQUESTS
    in_dist = LengthDistribution(
        args.input_len_mean, args.input_len_stddev, max_len=args.max_input_len
    )
    out_dist = LengthDistribution(
        args.output_len_mean, args.output_len_stddev, max_len=args.max_output_len
    )
    warmup_index = 10**9  # warmup indices never collide with measured ones
    if load.mode == "trace":
        scaling = TraceScaling(
            args.time_scale, args.length_scale, args.max_input_len, args.max_output_len
        )
        specs = trace_requests(read_trace(args.trace, max_rows=num), scaling)
        if not specs:
            raise ValueError(f"trace {args.trace} has no rows")
        warmup = [
            RequestSpec(warmup_index + i, s.input_len, s.output_len)
            for i, s in enumerate(specs[: args.warmup_requests])
        ]
        return specs, warmup, len(specs)
    arrivals = None
    if load.mode == "request_rate":
        arrivals = iter_arrivals(args.request_rate, args.burstiness, seed=args.seed)
    measured: Iterable[RequestSpec] = iter_synthetic_requests(
        in_dist, out_dist, arrivals, seed=args.seed
    )
    if num is not None:
        measured = itertools.islice(measured, num)
    warmup_it = iter_synthetic_requests(in_dist, out_dist, None, args.seed + 1, warmup_index)
    return measured, list(itertools.islice(warmup_it, args.warmup_requests)), num


def _config_dict(
    args: argparse.Namespace, load: LoadConfig, client: ClientConfig, slo: Slo
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "tool": "pdserve bench",
        "mode": load.mode,
        "url": client.url,
        "model": client.model,
        "scenario": client.scenario,
        "concurrency": load.concurrency if load.mode == "concurrency" else None,
        "request_rate": args.request_rate,
        "burstiness": args.burstiness if load.mode == "request_rate" else None,
        "num_requests": args.num_requests,
        "max_duration_s": load.max_duration_s,
        "warmup_requests": load.warmup_requests,
        "request_timeout_s": client.request_timeout_s,
        "seed": args.seed,
        "max_input_len": args.max_input_len,
        "max_output_len": args.max_output_len,
        "temperature": client.temperature,
        "ignore_eos": client.ignore_eos,
        "token_id_range": [client.prompt_ids.min_id, client.prompt_ids.max_id],
        "slo": asdict(slo),
    }
    if load.mode == "trace":
        cfg.update(trace=args.trace, time_scale=args.time_scale, length_scale=args.length_scale)
    else:
        cfg.update(
            input_len_mean=args.input_len_mean,
            input_len_stddev=args.input_len_stddev,
            output_len_mean=args.output_len_mean,
            output_len_stddev=args.output_len_stddev,
        )
    return cfg


async def _run_async(
    client_cfg: ClientConfig,
    load: LoadConfig,
    specs: Iterable[RequestSpec],
    warmup: list[RequestSpec],
    progress: Progress,
    ready_timeout_s: float,
) -> RunResult:
    async with TritonStreamClient(client_cfg) as client:
        await client.wait_ready(ready_timeout_s)
        try:
            return await run_load(specs, load, client.send, warmup, progress)
        finally:
            progress.close()


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the run, not after it, when an output cannot be written."""
    for flag, value in (("--json", args.json), ("--csv", args.csv)):
        if value is not None and not Path(value).parent.is_dir():
            raise InvalidArgument(f"{flag} {value}: directory {Path(value).parent} does not exist")
    if args.plot is not None and Path(args.plot).exists() and not Path(args.plot).is_dir():
        raise InvalidArgument(f"--plot {args.plot} exists and is not a directory")


def run(args: argparse.Namespace) -> int:
    try:
        _check_outputs(args)
        load = _load_config(args)
        client_cfg = ClientConfig(
            url=args.url,
            model=args.model,
            prompt_ids=PromptIds(args.token_id_min, args.token_id_max, args.seed),
            temperature=args.temperature,
            ignore_eos=not args.no_ignore_eos,
            scenario=args.scenario,
            request_timeout_s=args.request_timeout_s,
        )
        slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
        specs, warmup, total = _workload(args, load)
        config = _config_dict(args, load, client_cfg, slo)
        enabled = not args.no_progress and Progress.is_tty()
        progress = Progress(total, load.max_duration_s, enabled=enabled)
        result = asyncio.run(
            _run_async(client_cfg, load, specs, warmup, progress, args.ready_timeout_s)
        )
    except (PdserveError, ValueError) as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(result.records, slo)
    warm_failed = sum(1 for r in result.warmup_records if not r.is_ok)
    config.update(started_at=result.started_at, deadline_hit=result.deadline_hit)
    print(report.format_table(summary, title=f"pdserve bench | {load.mode} | {client_cfg.model}"))
    if warmup:
        print(f"Warmup: {len(result.warmup_records)} requests, {warm_failed} failed")
    extra = {"warmup": {"num_requests": len(result.warmup_records), "num_failed": warm_failed}}
    try:
        if args.json:
            report.write_json(args.json, report.to_json(summary, config, result.records, extra))
        if args.csv:
            report.write_csv(args.csv, summary)
        if args.plot:
            from pdserve.bench.plots import write_plots

            write_plots(result.records, args.plot, title=f"{load.mode} {client_cfg.model}")
    except (OSError, PdserveError) as e:
        print(f"pdserve bench: error writing results: {e}", file=sys.stderr)
        return 2
    return 0 if summary.num_ok > 0 else 1
