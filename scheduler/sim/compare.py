"""Simulated vs measured, field by field (both are ``pdserve bench`` JSON)."""

from __future__ import annotations

from typing import Any

# (label, path in the summary)
FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    *((f"TTFT {q} (ms)", ("time_to_first_token_ms", q)) for q in ("p50", "p90", "p99", "avg")),
    *((f"ITL/TPOT {q} (ms)", ("inter_token_latency_ms", q)) for q in ("p50", "p90", "p99", "avg")),
    *((f"request latency {q} (ms)", ("request_latency_ms", q)) for q in ("p50", "p90")),
    ("request throughput (req/s)", ("request_throughput",)),
    ("output token throughput (tok/s)", ("output_token_throughput",)),
    ("goodput (req/s)", ("goodput",)),
    ("SLO attainment", ("slo_attainment",)),
)


def _get(doc: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = doc.get("summary", {})
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return float(node)


def compare_docs(sim: dict[str, Any], bench: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, path in FIELDS:
        s, b = _get(sim, path), _get(bench, path)
        rel = None if s is None or b is None or b == 0 else (s - b) / b
        rows.append({"field": label, "simulated": s, "measured": b, "relative_error": rel})
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [f"{'field':34}{'simulated':>14}{'measured':>14}{'rel. error':>12}"]
    for r in rows:
        lines.append(f"{r['field']:34}{f(r['simulated'], '.3f'):>14}"
                     f"{f(r['measured'], '.3f'):>14}{f(r['relative_error'], '+.1%'):>12}")
    return "\n".join(lines)
