"""Benchmark output: console table, JSON and CSV, laid out like genai-perf's.

The JSON holds the run's config (so a result file says how it was made), the
summary, and one derived row per request (not every response time: a trace
replay would make that file hundreds of MB).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import (
    Stats,
    Summary,
    inter_token_latency_s,
    request_latency_s,
    ttft_s,
)
from pdserve.bench.records import RequestRecord

# (label, Summary field) of the per-request distributions, in genai-perf's order.
STAT_ROWS: tuple[tuple[str, str], ...] = (
    ("Time to first token (ms)", "time_to_first_token_ms"),
    ("Inter token latency (ms)", "inter_token_latency_ms"),
    ("Request latency (ms)", "request_latency_ms"),
    ("Output token throughput per user (tokens/s)", "output_token_throughput_per_user"),
    ("Output sequence length (tokens)", "output_sequence_length"),
    ("Input sequence length (tokens)", "input_sequence_length"),
    ("Send lag behind schedule (ms)", "send_lag_ms"),
)
STAT_COLUMNS = ("avg", "min", "max", "p99", "p95", "p90", "p50", "std")


def _value_rows(summary: Summary) -> list[tuple[str, str]]:
    s = summary
    counts = f"{s.num_requests} / {s.num_ok} / {s.num_errors} / {s.num_cancelled}"
    rows = [
        ("Benchmark duration (s)", f"{summary.duration_s:.3f}"),
        ("Requests: sent / ok / errors / cancelled", counts),
        ("Request throughput (requests/s)", f"{summary.request_throughput:.3f}"),
        ("Output token throughput (tokens/s)", f"{summary.output_token_throughput:.2f}"),
        ("Total token throughput (tokens/s)", f"{summary.total_token_throughput:.2f}"),
    ]
    if summary.errors_by_kind:
        kinds = ", ".join(f"{k}={n}" for k, n in summary.errors_by_kind.items())
        rows.append(("Errors by kind", kinds))
    if summary.num_ok_without_tokens:
        rows.append(("Successful requests without tokens", str(summary.num_ok_without_tokens)))
    if summary.slo.is_set:
        slo = summary.slo
        limits = ", ".join(
            f"{name} <= {value:g} ms"
            for name, value in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms))
            if value is not None
        )
        rows.append(("SLO", limits))
        rows.append(("Goodput (requests/s)", _fmt(summary.goodput, ".3f")))
        rows.append(("SLO attainment", _pct(summary.slo_attainment)))
        if slo.ttft_ms is not None:
            rows.append(("TTFT attainment", _pct(summary.ttft_attainment)))
        if slo.tpot_ms is not None:
            rows.append(("TPOT attainment", _pct(summary.tpot_attainment)))
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def format_table(summary: Summary, title: str = "pdserve bench | LLM metrics") -> str:
    """The console report: a statistics table, then the run-level figures."""
    stat_rows = [
        (label, getattr(summary, name))
        for label, name in STAT_ROWS
        if getattr(summary, name) is not None
    ]
    label_w = max([len("Statistic"), *(len(label) for label, _ in stat_rows)])
    col_w = 10
    head = "Statistic".ljust(label_w) + "".join(c.rjust(col_w) for c in STAT_COLUMNS)
    lines = [title, "=" * len(head), head, "-" * len(head)]
    for label, st in stat_rows:
        cells = "".join(f"{getattr(st, c):{col_w}.2f}" for c in STAT_COLUMNS)
        lines.append(label.ljust(label_w) + cells)
    if not stat_rows:
        lines.append("(no successful request: no latency statistics)")
    lines.append("-" * len(head))
    values = _value_rows(summary)
    value_w = max(len(label) for label, _ in values)
    lines += [f"{label.ljust(value_w)}  {value}" for label, value in values]
    return "\n".join(lines)


def request_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """One flat row per request with its derived metrics (ms)."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 4)

    return [
        {
            "index": r.index,
            "status": r.status,
            "error_kind": r.error_kind,
            "error_message": r.error_message,
            "finish_reason": r.finish_reason,
            "input_len": r.input_len,
            "requested_output_len": r.requested_output_len,
            "output_tokens": r.output_tokens,
            "num_responses": len(r.response_s),
            "scheduled_s": r.scheduled_s,
            "send_s": round(r.send_s, 6),
            "end_s": round(r.end_s, 6),
            "ttft_ms": ms(ttft_s(r)),
            "itl_ms": ms(inter_token_latency_s(r)),
            "request_latency_ms": ms(request_latency_s(r)),
        }
        for r in records
    ]


def to_json(
    summary: Summary,
    config: dict[str, Any],
    records: Sequence[RequestRecord],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"config": config, "summary": summary.to_dict()}
    if extra:
        doc.update(extra)
    doc["requests"] = request_rows(records)
    return doc


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def format_csv(summary: Summary) -> str:
    """genai-perf's CSV shape: a statistics block, a blank line, then Metric,Value rows."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Metric", *STAT_COLUMNS])
    for label, name in STAT_ROWS:
        st: Stats | None = getattr(summary, name)
        if st is not None:
            writer.writerow([label, *(f"{getattr(st, c):.4f}" for c in STAT_COLUMNS)])
    writer.writerow([])
    writer.writerow(["Metric", "Value"])
    for label, value in _csv_value_rows(summary):
        writer.writerow([label, "" if value is None else value])
    return out.getvalue()


def _csv_value_rows(summary: Summary) -> list[tuple[str, float | int | None]]:
    """Run-level figures as plain numbers (the console form mixes text in)."""
    rows: list[tuple[str, float | int | None]] = [
        ("Benchmark duration (s)", summary.duration_s),
        ("Requests sent", summary.num_requests),
        ("Requests ok", summary.num_ok),
        ("Requests with errors", summary.num_errors),
        ("Requests cancelled", summary.num_cancelled),
        ("Request throughput (per sec)", summary.request_throughput),
        ("Output token throughput (per sec)", summary.output_token_throughput),
        ("Total token throughput (per sec)", summary.total_token_throughput),
    ]
    rows += [(f"Errors {kind}", n) for kind, n in summary.errors_by_kind.items()]
    if summary.slo.is_set:
        rows += [
            ("SLO TTFT (ms)", summary.slo.ttft_ms),
            ("SLO TPOT (ms)", summary.slo.tpot_ms),
            ("Goodput (requests per sec)", summary.goodput),
            ("SLO attainment", summary.slo_attainment),
            ("TTFT attainment", summary.ttft_attainment),
            ("TPOT attainment", summary.tpot_attainment),
        ]
    return rows


def write_csv(path: str | Path, summary: Summary) -> None:
    Path(path).write_text(format_csv(summary))
