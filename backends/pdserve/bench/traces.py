"""Request traces: the Azure LLM inference CSV and a JSONL form.

Azure CSV (Splitwise, 2023)::

    TIMESTAMP,ContextTokens,GeneratedTokens
    2023-11-16 18:17:03.9799600,4808,10

JSONL, one object a line: ``{"timestamp": <ms>, "input_length": n, "output_length": m}``.

A CPU serves far less than the traced cluster, so ``TraceScaling`` stretches
time and shrinks or caps lengths; the files themselves stay unmodified.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pdserve.bench.records import RequestSpec
from pdserve.errors import InvalidArgument

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRow:
    """One traced request; ``timestamp_s`` is relative to the trace's first row."""

    timestamp_s: float
    input_len: int
    output_len: int


@dataclass(frozen=True)
class TraceScaling:
    """How a trace is replayed.

    ``time_scale`` multiplies every arrival offset: 10 replays the trace ten
    times slower (a tenth of its rate), 0.5 twice as fast. ``length_scale``
    multiplies token counts (rounded, at least 1) before the caps apply.
    """

    time_scale: float = 1.0
    length_scale: float = 1.0
    max_input_len: int | None = None
    max_output_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("time_scale", "length_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name in ("max_input_len", "max_output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def length(self, tokens: int, cap: int | None) -> int:
        scaled = max(1, round(tokens * self.length_scale))
        return scaled if cap is None else min(cap, scaled)


def read_trace(path: str | Path, max_rows: int | None = None) -> list[TraceRow]:
    """Read a trace, choosing the format by suffix (.csv or .jsonl/.json)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"trace file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return read_azure_csv(p, max_rows)
    if suffix in (".jsonl", ".json"):
        return read_jsonl(p, max_rows)
    raise InvalidArgument(f"unknown trace format {suffix!r} for {p}: expected .csv or .jsonl")


def read_azure_csv(path: str | Path, max_rows: int | None = None) -> list[TraceRow]:
    rows: list[tuple[datetime, int, int]] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != AZURE_COLUMNS:
            raise InvalidArgument(
                f"{path}: expected header {','.join(AZURE_COLUMNS)}, got {header}"
            )
        for line_no, fields in enumerate(reader, start=2):
            if not fields or all(not f.strip() for f in fields):
                continue
            if max_rows is not None and len(rows) >= max_rows:
                break
            if len(fields) != 3:
                raise InvalidArgument(f"{path}:{line_no}: expected 3 fields, got {len(fields)}")
            try:
                # fromisoformat keeps microseconds of the 7-digit fractions (100 ns dropped).
                stamp = datetime.fromisoformat(fields[0].strip())
                rows.append((stamp, int(fields[1]), int(fields[2])))
            except ValueError as e:
                raise InvalidArgument(f"{path}:{line_no}: bad row {fields}: {e}") from None
    if not rows:
        return []
    # Offsets from the earliest row, so a file that is not sorted still replays.
    t0 = min(r[0] for r in rows)
    return [_row(path, (t - t0).total_seconds(), i, o) for t, i, o in rows]


def read_jsonl(path: str | Path, max_rows: int | None = None) -> list[TraceRow]:
    raw: list[tuple[float, int, int]] = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if max_rows is not None and len(raw) >= max_rows:
                break
            try:
                obj = json.loads(line)
                ts_ms = float(obj["timestamp"])
                raw.append((ts_ms / 1000.0, int(obj["input_length"]), int(obj["output_length"])))
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidArgument(
                    f"{path}:{line_no}: bad trace line ({e!r}): {line.strip()[:80]}"
                ) from None
    if not raw:
        return []
    t0 = min(r[0] for r in raw)
    return [_row(path, t - t0, i, o) for t, i, o in raw]


def _row(path: str | Path, t: float, input_len: int, output_len: int) -> TraceRow:
    if not math.isfinite(t):
        raise InvalidArgument(f"{path}: timestamp offset {t} is not finite")
    if input_len < 0 or output_len < 0:
        raise InvalidArgument(f"{path}: negative token count ({input_len}, {output_len})")
    return TraceRow(t, input_len, output_len)


def trace_requests(
    rows: list[TraceRow], scaling: TraceScaling, first_index: int = 0
) -> list[RequestSpec]:
    """RequestSpecs that replay ``rows`` under ``scaling``, in arrival order.

    Zero-token rows become 1 token: a request needs a prompt and produces
    at least one token.
    """
    ordered = sorted(rows, key=lambda r: r.timestamp_s)
    return [
        RequestSpec(
            index=first_index + i,
            input_len=scaling.length(r.input_len, scaling.max_input_len),
            output_len=scaling.length(r.output_len, scaling.max_output_len),
            arrival_s=r.timestamp_s * scaling.time_scale,
        )
        for i, r in enumerate(ordered)
    ]
