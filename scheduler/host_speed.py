"""How fast the host runs a fixed piece of CPU work right now.

On shared machines the same deployment serves up to 46 % less from one quarter
hour to the next (E3's static passes, perf/RESULTS.md) and nothing pdserve
counts says why: the VM's ``/proc/stat`` shows no steal time and its load
average is its own processes. The gauge measures the host itself: it times a
fixed pure-Python loop in *thread CPU time*, which leaves out any wait for a
core (the deployment's own load) and takes in a core running slower under it
(another tenant on its sibling hyperthread, the host taking the vCPU away).
Measured on the 2-core AMD EPYC VM, 2026-12-06 22:00-22:22 UTC: 0.84 ms
normally, 1.2-1.4 ms in episodes of 20 s to several minutes, with the VM busy
and idle alike.

A sample is the fastest of three runs of the loop after one unmeasured run (the
first after a sleep pays for cold caches), on each core of the process's
affinity in turn, averaged: samples on one core could miss a slow episode of
the other vCPU. ``python -m pdserve.scheduler.host_speed --out FILE`` writes
one JSON line a sample from a process of its own, which the experiments run
beside their load generator and read per measured row
(``perf/experiments/host_speed.py``). It lives in the package so that a
deployment's own tooling can run it too.

What it is worth, measured (perf/RESULTS.md, E3 with owned compute, three
gauged runs of 2026-12-06): it explains some of the spread between passes of
the same static ratio in two runs and none of it in the third, so it is a
covariate to report, not a correction to apply. A controller that compared its
remembered ratio windows only at a matching host speed was tried in one E3 run
and removed: the matched subsets were one or two windows, and one such
comparison sent an exploration back on a 3 % difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

LOOP = 20_000  # iterations: ~0.85 ms on the AMD EPYC box when it is not slowed


def work() -> int:
    total = 0
    for i in range(LOOP):
        total += i * i % 7
    return total


def sample() -> float:
    """Thread CPU milliseconds of the fixed work: the fastest of three warm runs."""
    work()
    best = float("inf")
    for _ in range(3):
        began = time.thread_time()
        work()
        best = min(best, time.thread_time() - began)
    return 1e3 * best


def sample_cores(cores: Iterable[int] | None = None) -> float:
    """``sample`` on each core in turn (the calling thread pinned to it, its
    affinity restored after), averaged: a slowdown of one core (a busy sibling
    hyperthread under one vCPU) counts for its share of the machine. Where the
    affinity cannot be set (not Linux) it is ``sample`` wherever the thread runs."""
    if not hasattr(os, "sched_setaffinity"):
        return sample()
    before = os.sched_getaffinity(0)
    wanted = sorted(before if cores is None else set(cores) & before) or sorted(before)
    costs = []
    try:
        for core in wanted:
            os.sched_setaffinity(0, {core})
            costs.append(sample())
    finally:
        os.sched_setaffinity(0, before)
    return sum(costs) / len(costs)


def window_cost(samples: Iterable[tuple[float, float]], t0: float, t1: float) -> float | None:
    """Median of the samples taken in [t0, t1]; None: none."""
    inside = [ms for at, ms in samples if t0 <= at <= t1]
    return statistics.median(inside) if inside else None


def reference_ms(samples: Iterable[tuple[float, float]]) -> float | None:
    """The host's unslowed cost: the 10th percentile of the samples (a slow episode
    can last minutes, so not the median)."""
    values = sorted(ms for _, ms in samples)
    return values[len(values) // 10] if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=None,
                        help="stop after this long (default: until terminated or the "
                             "process that started it exits)")
    args = parser.parse_args(argv)
    if not args.interval_s > 0:
        parser.error("--interval-s must be positive")
    end = None if args.duration_s is None else time.monotonic() + args.duration_s
    parent = os.getppid()  # gone (we were re-parented): stop, not sample forever
    with open(args.out, "a") as out:
        while (end is None or time.monotonic() < end) and os.getppid() == parent:
            out.write(json.dumps({"at": round(time.time(), 3),
                                  "ms": round(sample_cores(), 4)}) + "\n")
            out.flush()
            time.sleep(args.interval_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
