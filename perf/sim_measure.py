"""Engine timings for ``pdserve sim profile``, the way E1/E2 instances run.

    taskset -c 1 .venv/bin/python -m perf.sim_measure --preset small \\
        --lengths 32,96,256 --decode-batches 1,4,16 --out perf/out/sim_engine
    .venv/bin/pdserve sim profile --engine perf/out/sim_engine/p32.json \\
        --engine perf/out/sim_engine/p96.json --engine perf/out/sim_engine/p256.json \\
        --kv perf/kv_transfer_results.json --transport shm -o PROFILE.yaml

An E1/E2 instance is one engine pinned to one core with one torch thread; this
times the pdserve engine alone in the same setting (no HF reference, no
GEMM/memcpy limits: ``perf/engine.py`` measures those, at twice the time).
Per prompt length L it writes one JSON in ``perf/engine.py``'s shape (the
fields ``pdserve sim profile`` reads): the prefill of one L-token prompt (best
of ``--repeats`` after a warm-up) and the median decode step per batch size
after L-token prompts, so the fit sees prefill at several lengths and decode at
several batch sizes and contexts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.engine import LLMEngine, SamplingParams
from perf.engine import prompts


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def prefill_s(engine: LLMEngine, length: int, repeats: int) -> float:
    """Best time of one ``length``-token prompt's prefill (a warm-up first)."""
    ids = prompts(1, length, seed=1)[0]
    params = SamplingParams(max_tokens=1)
    times = []
    for _ in range(repeats + 1):
        seq = engine.new_sequence("p", ids, params)
        try:
            t0 = time.perf_counter()
            engine.prefill([seq])
            times.append(time.perf_counter() - t0)
        finally:
            engine.release(seq)
    return min(times[1:])


def decode_step_s(engine: LLMEngine, batch: int, prompt_len: int, steps: int) -> float:
    """Median decode step of ``batch`` sequences after ``prompt_len``-token prompts."""
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    seqs = [engine.new_sequence(f"d{i}", p, params)
            for i, p in enumerate(prompts(batch, prompt_len, seed=2))]
    try:
        engine.prefill(seqs)
        engine.decode_step(seqs)  # warm-up step
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.decode_step(seqs)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        for s in seqs:
            engine.release(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (an instance: 1)")
    ap.add_argument("--lengths", type=_ints, default=[32, 96, 256])
    ap.add_argument("--decode-batches", type=_ints, default=[1, 4, 16])
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="prefill: best of this many")
    ap.add_argument("--out", type=Path, default=Path("perf/out/sim_engine"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    engine = LLMEngine.load(args.preset, dtype=args.dtype)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    for length in args.lengths:
        load_before = os.getloadavg()
        t_pf = prefill_s(engine, length, args.repeats)
        steps = {str(b): 1e3 * decode_step_s(engine, b, length, args.decode_steps)
                 for b in args.decode_batches}
        doc: dict[str, Any] = {
            "preset": args.preset, "dtype": args.dtype,
            "prefill_batch": 1, "prefill_len": length, "prefill_tok_s": length / t_pf,
            "decode_prompt_len": length, "decode_steps": args.decode_steps,
            "decode_step_ms": steps,
            "machine": {"threads": args.threads, "cores": cores,
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        assert engine.arena.bytes_in_use == 0
        path = args.out / f"p{length}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"L={length}: prefill {1e3 * t_pf:.1f} ms, decode step ms "
              f"{ {b: round(v, 1) for b, v in steps.items()} } -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
