"""The host's speed through an experiment, per measured row (``pdserve.scheduler.host_speed``).

The same deployment measured minutes apart on these shared machines serves up
to 46 % less, and the gauge in ``pdserve.scheduler.host_speed`` says when the
host itself ran slower (a fixed piece of CPU work timed in thread CPU time).
``HostSpeed`` runs that gauge in a process of its own beside the experiment (no
GIL shared with the load generator), one JSON line a sample, and always stops
it; ``annotate`` gives each measured row its ``host_slowdown`` and ``note``
says them in the results. E1, E2 and E3 use it::

    with HostSpeed(path) as gauge:
        ...                                    # the experiment
        gauge.cost_ms(t0, t1)                  # median sample in [t0, t1] (wall clock)
    annotate_all(rows, gauge)                  # each row's host_slowdown, gemv_ and gemm_slowdown

A sample times a pure-Python loop (``ms``: the router's, the client's and the
stubs' Python) and, where torch is installed, two torch products (``gemv_ms``:
memory-bound like a decode step; ``gemm_ms``: compute-bound like a prefill);
each row gets a slowdown per gauge.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from pdserve.scheduler.host_speed import reference_ms, window_cost

__all__ = ["GAUGES", "HostSpeed", "annotate", "annotate_all", "note", "reference_ms",
           "window_cost"]

# (key in a sample, the row field it sets): the loop, then the torch products
GAUGES = (("ms", "host_slowdown"), ("gemv_ms", "gemv_slowdown"), ("gemm_ms", "gemm_slowdown"))


class HostSpeed:
    """The gauge in a child process for the length of a ``with`` block."""

    def __init__(self, path: Path, interval_s: float = 1.0, engine_every: int = 5) -> None:
        """``engine_every``: the torch products in every n-th sample (E1 and E2: 1, so
        that every calibration run of a few seconds has them; ~0.04 cores)."""
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if engine_every < 1:
            raise ValueError(f"engine_every must be >= 1, got {engine_every}")
        self.path = path
        self.interval_s = interval_s
        self.engine_every = engine_every
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HostSpeed:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.scheduler.host_speed", "--out", str(self.path),
             "--interval-s", str(self.interval_s), "--engine-every", str(self.engine_every)],
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

    def samples(self, key: str = "ms") -> list[tuple[float, float]]:
        """(wall-clock time, ``key``'s ms) of every sample so far (``ms``: the loop;
        ``gemv_ms``, ``gemm_ms``: the torch products, none without torch)."""
        out = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    out.append((float(rec["at"]), float(rec[key])))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the stop, or a gauge without torch
        return out

    def cost_ms(self, t0: float, t1: float) -> float | None:
        """Median sample taken in [t0, t1]; None: none."""
        return window_cost(self.samples(), t0, t1)


def annotate(rows: list[dict[str, Any]], samples: list[tuple[float, float]],
             field: str = "host_slowdown") -> dict[str, Any]:
    """Give each measured row (``started_at``, and ``seconds`` or ``wall_s``) how slow
    the host ran during it: ``host_slowdown`` = the median sample in the row's
    window / ``reference_ms`` (1.00: as fast as the host gets; 1.6: its cores ran
    the fixed work 1.6x slower). Rows without samples in their window get none.
    Returns what the run's document keeps of the gauge."""
    ref = reference_ms(samples)
    for row in rows:
        length = row.get("seconds", row.get("wall_s"))
        if ref is None or "started_at" not in row or length is None:
            continue
        cost = window_cost(samples, row["started_at"], row["started_at"] + length)
        if cost is not None:
            row[field] = round(cost / ref, 3)
    return {"reference_ms": ref, "samples": len(samples),
            "median_ms": statistics.median(ms for _, ms in samples) if samples else None}


def annotate_all(rows: list[dict[str, Any]], gauge: HostSpeed) -> dict[str, Any]:
    """``annotate`` for every gauge (``GAUGES``): the loop's as before, and where the
    samples have them, the torch products' (``gemv_slowdown``, ``gemm_slowdown``).
    Returns the loop's summary with ``gemv`` and ``gemm`` summaries beside it."""
    doc = annotate(rows, gauge.samples())
    for key, field in GAUGES[1:]:
        samples = gauge.samples(key)
        if samples:
            doc[key.removesuffix("_ms")] = annotate(rows, samples, field)
    return doc


def note(doc: dict[str, Any], rows: list[dict[str, Any]], name: Callable[[dict[str, Any]], str]
         ) -> list[str]:
    """Markdown lines: the host's slowdown during each row (named by ``name``); none
    for a run without the gauge."""
    gauge = doc.get("host_speed") or {}
    if not gauge.get("reference_ms"):
        return []
    each = ", ".join(f"{name(r)} {r['host_slowdown']:.2f}x" for r in rows if "host_slowdown" in r)
    return ["", f"Host slowdown during each point (a fixed piece of CPU work timed once a "
            f"second in thread CPU time against its fastest, {gauge['reference_ms']:.2f} ms; "
            f"the run's own load does not count, a slowed host does; "
            f"`perf/experiments/host_speed.py`): {each or 'no point had samples'}."]
