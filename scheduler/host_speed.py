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
the other vCPU (E3's output-heavy rows lost 20 % between two passes whose
one-core samples were alike; the cause of that is not known). Used two ways:
- ``HostGauge``: a thread sampling once per interval, for the controller, whose
  ratio memory compares windows measured at a matching host speed
  (``RatioPolicy.host_match``);
- ``python -m pdserve.scheduler.host_speed --out FILE``: the same samples as
  JSON lines from a process of its own, which the experiments run beside their
  load generator (``perf/experiments/host_speed.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
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


class HostGauge:
    """A daemon thread sampling every ``interval_s``; ``cost_ms(t0, t1)`` on the
    ``clock`` the caller uses. Keeps the last ``keep`` samples; ``close`` stops it."""

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.time,
                 keep: int = 3600) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-gauge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ms = sample_cores()
            with self._lock:
                self._samples.append((self.clock(), ms))
            self._stop.wait(self.interval_s)

    def samples(self) -> list[tuple[float, float]]:
        with self._lock:
            return list(self._samples)

    def cost_ms(self, t0: float, t1: float) -> float | None:
        return window_cost(self.samples(), t0, t1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=None,
                        help="stop after this long (default: until terminated)")
    args = parser.parse_args(argv)
    if not args.interval_s > 0:
        parser.error("--interval-s must be positive")
    end = None if args.duration_s is None else time.monotonic() + args.duration_s
    with open(args.out, "a") as out:
        while end is None or time.monotonic() < end:
            out.write(json.dumps({"at": round(time.time(), 3),
                                  "ms": round(sample_cores(), 4)}) + "\n")
            out.flush()
            time.sleep(args.interval_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
