"""How fast the host runs a fixed piece of CPU work, sampled all through an experiment.

On the shared machines these experiments run on, the same deployment measured
minutes apart serves up to 46 % less (E3's static passes, RESULTS.md), and
nothing pdserve counts says why: this VM's ``/proc/stat`` shows no steal time,
and its load average is its own processes. This gauge measures the host itself.
It times a fixed pure-Python loop in *thread CPU time*, which leaves out any
wait for a core (the experiment's own load) but takes in a core running slower
under it (another tenant on its sibling hyperthread, the host taking the
vCPU away). Measured 2026-12-06 22:00-22:22 UTC: 0.84 ms normally, 1.2-1.4 ms
in episodes of 20 s to several minutes, with this VM busy and with it idle
alike; the E3 rows measured in those episodes were the slow ones.

A sample is the fastest of three runs of the loop after one unmeasured run
(the first after a sleep pays for cold caches), once per ``interval_s``.
``HostSpeed`` runs the gauge in a process of its own (no GIL shared with the
load generator it measures beside), writing one JSON line per sample, and
always stops it::

    with HostSpeed(path) as gauge:
        ...                                    # the experiment
        gauge.cost_ms(t0, t1)                  # median sample in [t0, t1] (wall clock)

    python -m perf.experiments.host_speed --out FILE [--interval-s 1] [--duration-s N]

``e3_dynamic_ratio`` runs it through every E3 run and gives each row its
``host_slowdown``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

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


class HostSpeed:
    """The gauge in a child process for the length of a ``with`` block."""

    def __init__(self, path: Path, interval_s: float = 1.0) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.path = path
        self.interval_s = interval_s
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HostSpeed:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        # This file as a script: it imports nothing of the repository.
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--out", str(self.path),
             "--interval-s", str(self.interval_s)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def samples(self) -> list[tuple[float, float]]:
        """(wall-clock time, ms) of every sample so far."""
        out = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    out.append((float(rec["at"]), float(rec["ms"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the stop
        return out

    def cost_ms(self, t0: float, t1: float) -> float | None:
        """Median sample taken in [t0, t1]; None: none."""
        return window_cost(self.samples(), t0, t1)


def window_cost(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    inside = [ms for at, ms in samples if t0 <= at <= t1]
    return statistics.median(inside) if inside else None


def reference_ms(samples: list[tuple[float, float]]) -> float | None:
    """The host's unslowed cost: the 10th percentile of the samples (a slow episode
    can last minutes, so not the median)."""
    values = sorted(ms for _, ms in samples)
    return values[len(values) // 10] if values else None


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
            out.write(json.dumps({"at": round(time.time(), 3), "ms": round(sample(), 4)}) + "\n")
            out.flush()
            time.sleep(args.interval_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
