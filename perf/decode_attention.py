"""Decode step with batched vs per-sequence attention, on this machine.

    taskset -c 1 .venv/bin/python -m perf.decode_attention --out perf/out/decode_attention.json

The engine's decode attention either runs one sequence at a time (two fused
kernels and a merge per sequence and layer, reading the arena in place) or
gathers the batch's K/V into one padded tensor per layer and runs one masked
attention (``engine/decode_batch.py``); ``auto`` picks per step. This times
full decode steps (``LLMEngine.decode_step``, one torch thread, as an
instance runs) in each mode, alternating the modes round by round so the
shared machine's drift hits both, and reports the median step and the ratio.
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
from pdserve.engine.config import PRESETS
from perf.engine import prompts

MODES = ("never", "always", "auto")


def measure(preset: str, contexts: list[int], batches: list[int], steps: int,
            rounds: int) -> list[dict[str, Any]]:
    new_tokens = rounds * len(MODES) * (steps + 1) + 1
    layout = PRESETS[preset].kv_layout("float32")
    engine = LLMEngine.load(preset, kv_capacity_bytes=2 * max(batches) * layout.extent_bytes(
        max(contexts), new_tokens))
    rows = []
    for ctx in contexts:
        for batch in batches:
            times = decode_steps_ms(engine, batch, ctx, steps, rounds, new_tokens)
            med = {m: statistics.median(v) for m, v in times.items()}
            rows.append({"preset": preset, "context": ctx, "batch": batch,
                         "step_ms": med, "steps_ms": times,
                         "per_sequence_over_batched": med["never"] / med["always"],
                         "per_sequence_over_auto": med["never"] / med["auto"]})
            print(f"{preset} ctx {ctx} b {batch}: per-sequence {med['never']:.2f} ms, batched "
                  f"{med['always']:.2f} ms ({med['never'] / med['always']:.2f}x), auto "
                  f"{med['auto']:.2f} ms", flush=True)
    assert engine.arena.bytes_in_use == 0
    return rows


def decode_steps_ms(engine: LLMEngine, batch: int, ctx: int, steps: int, rounds: int,
                    new_tokens: int) -> dict[str, list[float]]:
    """One prefill of ``batch`` ``ctx``-token prompts, then ``rounds`` rounds of
    ``steps`` timed decode steps per mode (one untimed step at each change of
    mode), the modes alternating: the context grows by a few tokens, alike for all."""
    params = SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True)
    seqs = [engine.new_sequence(f"d{i}", p, params)
            for i, p in enumerate(prompts(batch, ctx, seed=2))]
    times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for i in range(0, batch, 16):
            engine.prefill(seqs[i:i + 16])
        for _ in range(rounds):
            for mode in MODES:
                engine.model.decode_batching = mode
                engine.decode_step(seqs)
                for _ in range(steps):
                    t0 = time.perf_counter()
                    engine.decode_step(seqs)
                    times[mode].append(1e3 * (time.perf_counter() - t0))
    finally:
        engine.model.decode_batching = "auto"
        for s in seqs:
            engine.release(s)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--contexts", default="64,256,900")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("perf/out/decode_attention.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    load_before = os.getloadavg()
    rows = []
    for preset in args.presets.split(","):
        rows += measure(preset, ints(args.contexts), ints(args.batches), args.steps, args.rounds)
    doc = {"rows": rows, "command": "python -m perf.decode_attention " + " ".join(argv or []),
           "machine": {"cores": sorted(os.sched_getaffinity(0)), "threads": 1,
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
