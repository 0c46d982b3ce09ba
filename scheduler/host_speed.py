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

The loop is pure Python: it slows with the router, the client and the stubs'
Python, not with the engine's torch work, which slowed far less in the same
episodes (a matmul in thread CPU time: 1.06x and 1.19x where the loop read 1.44x
and 1.59x, 2026-12-07). So a sample also times two torch products on one
thread (``EngineWork``), when torch is there: a GEMV over a 64 MiB fp32 weight,
bound by memory bandwidth as a decode step is (it streams every weight once per
step), and a 256 x 1024 x 1024 GEMM that runs from cache, bound by compute as a
prefill is. ``perf/sim_validate.py --host-model gauges`` can scale the
simulator's engine by them and its Python work by the loop. Measured
(2026-12-07, perf/RESULTS.md): on 2 cores that share one memory system the GEMV
follows the deployment's own memory traffic (1.28x during E1's unloaded run,
1.03x at its lightest point, the loop at 1.02-1.07x), since thread CPU time
leaves out waiting for a core but not waiting for memory. So the products are
a record beside the loop, not a host gauge, and the loop stays the one E3 reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LOOP = 20_000  # iterations: ~0.85 ms on the AMD EPYC box when it is not slowed
GEMV_SHAPE = (4096, 4096)  # fp32, 64 MiB: out of every cache, like a decode step's weights
GEMM_SHAPE = (256, 1024, 1024)  # (m, k, n): a prefill-sized product from cache
ENGINE_EVERY = 5  # the torch products in every 5th sample: on a saturated 2-core box
                  # their ~0.04 cores each second would be the gauge's own load


def work() -> int:
    total = 0
    for i in range(LOOP):
        total += i * i % 7
    return total


def timed(fn: Callable[[], Any], runs: int = 3) -> float:
    """Thread CPU milliseconds of ``fn``: the fastest of ``runs`` after one unmeasured run."""
    fn()
    best = float("inf")
    for _ in range(runs):
        began = time.thread_time()
        fn()
        best = min(best, time.thread_time() - began)
    return 1e3 * best


def sample() -> float:
    """Thread CPU milliseconds of the fixed work: the fastest of three warm runs."""
    return timed(work)


class EngineWork:
    """The two torch products of a sample, on one thread (``torch.set_num_threads(1)``
    for this process: thread CPU time must hold all of a product's work)."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(0)
        self._weight = torch.randn(GEMV_SHAPE, generator=gen)
        self._x = torch.randn(1, GEMV_SHAPE[1], generator=gen)
        m, k, n = GEMM_SHAPE
        self._a = torch.randn(m, k, generator=gen)
        self._b = torch.randn(k, n, generator=gen)
        self._linear = torch.nn.functional.linear
        self._mm = torch.mm

    def sample(self) -> dict[str, float]:
        """Thread CPU milliseconds of each product (the fastest of two warm runs)."""
        return {"gemv_ms": timed(lambda: self._linear(self._x, self._weight), runs=2),
                "gemm_ms": timed(lambda: self._mm(self._a, self._b), runs=2)}


def engine_work() -> EngineWork | None:
    """``EngineWork``, or None where torch is not installed (the loop alone then)."""
    try:
        return EngineWork()
    except ImportError:
        return None


def each_core(fn: Callable[[], T], cores: Iterable[int] | None = None) -> list[T]:
    """``fn`` run on each core in turn (the calling thread pinned to it, its
    affinity restored after). Where the affinity cannot be set (not Linux): once,
    wherever the thread runs."""
    if not hasattr(os, "sched_setaffinity"):
        return [fn()]
    before = os.sched_getaffinity(0)
    wanted = sorted(before if cores is None else set(cores) & before) or sorted(before)
    out = []
    try:
        for core in wanted:
            os.sched_setaffinity(0, {core})
            out.append(fn())
    finally:
        os.sched_setaffinity(0, before)
    return out


def sample_cores(cores: Iterable[int] | None = None) -> float:
    """``sample`` on each core in turn, averaged: a slowdown of one core (a busy
    sibling hyperthread under one vCPU) counts for its share of the machine."""
    costs = each_core(sample, cores)
    return sum(costs) / len(costs)


def record(engine: EngineWork | None, cores: Iterable[int] | None = None) -> dict[str, float]:
    """One sample as the CLI writes it: ``ms`` (the loop) and, with ``engine``,
    ``gemv_ms`` and ``gemm_ms``, each averaged over the cores."""
    def one() -> dict[str, float]:
        rec = {"ms": sample()}
        if engine is not None:
            rec.update(engine.sample())
        return rec

    runs = each_core(one, cores)
    return {key: round(sum(r[key] for r in runs) / len(runs), 4) for key in runs[0]}


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
    parser.add_argument("--no-engine", action="store_true",
                        help="time the Python loop only, not the torch products")
    parser.add_argument("--engine-every", type=int, default=ENGINE_EVERY, metavar="N",
                        help=f"time the torch products in every N-th sample only (default "
                             f"{ENGINE_EVERY}: they cost ~0.04 cores a sample a second, the "
                             f"loop ~0.007)")
    parser.add_argument("--duration-s", type=float, default=None,
                        help="stop after this long (default: until terminated or the "
                             "process that started it exits)")
    args = parser.parse_args(argv)
    if not args.interval_s > 0:
        parser.error("--interval-s must be positive")
    if args.engine_every < 1:
        parser.error("--engine-every must be >= 1")
    parent = os.getppid()  # gone (we were re-parented): stop, not sample forever
    engine = None if args.no_engine else engine_work()  # torch import and weights: ~1 s
    # the duration is of sampling, counted once the torch products are set up
    end = None if args.duration_s is None else time.monotonic() + args.duration_s
    with open(args.out, "a") as out:
        for n in itertools.count():
            if (end is not None and time.monotonic() >= end) or os.getppid() != parent:
                break
            rec = record(engine if n % args.engine_every == 0 else None)
            out.write(json.dumps({"at": round(time.time(), 3), **rec}) + "\n")
            out.flush()
            time.sleep(args.interval_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
