"""Simulated outcomes in the load generator's terms.

Each request ends exactly once (ok, or an error with a kind), recorded in flat
lists. ``records()`` turns them into ``pdserve.bench`` ``RequestRecord``s:
an ok request has two responses, the first token and the rest at the last
token's time, which gives exactly genai-perf's TTFT, ITL and latency (they
depend on nothing else). ``summary()`` is ``pdserve.bench.metrics.summarize``
of those records; above ``FAST_SUMMARY_ABOVE`` requests the same ``Summary``
is computed with numpy from the lists (identical definitions, tested equal),
since millions of record objects would not fit the run's time and memory.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pdserve.bench.metrics import Slo, Stats, Summary, summarize
from pdserve.bench.records import RequestRecord
from pdserve.bench.report import to_json

FAST_SUMMARY_ABOVE = 200_000


class Outcomes:
    """One row per request, in flat columns (``array``: 8 bytes a number, so tens of
    millions of requests fit, and a worker process sends them back as bytes)."""

    def __init__(self) -> None:
        self.send = array("d")
        self.input_len = array("q")
        self.requested = array("q")
        self.first = array("d")  # -1: no token
        self.last = array("d")  # end time (last token, or the error)
        self.tokens = array("q")
        self.kind: list[str | None] = []  # None while running, "" ok, else error kind
        self.messages: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.send)

    def new(self, t: float, input_len: int, output_len: int) -> int:
        self.send.append(t)
        self.input_len.append(input_len)
        self.requested.append(output_len)
        self.first.append(-1.0)
        self.last.append(-1.0)
        self.tokens.append(0)
        self.kind.append(None)
        return len(self.kind) - 1

    def ok(self, i: int, first: float, last: float, tokens: int) -> None:
        if self.kind[i] is not None:
            raise AssertionError(f"request {i} ended twice")
        self.first[i], self.last[i], self.tokens[i], self.kind[i] = first, last, tokens, ""

    def error(self, i: int, t: float, kind: str, message: str, first: float | None) -> None:
        if self.kind[i] is not None:
            raise AssertionError(f"request {i} ended twice")
        self.kind[i] = kind
        self.last[i] = t
        self.first[i] = -1.0 if first is None else first
        self.tokens[i] = 1 if first is not None else 0
        self.messages[i] = message

    def extend(self, other: Outcomes) -> None:
        """Append ``other``'s requests (renumbered after this one's)."""
        base = len(self)
        for name in ("send", "input_len", "requested", "first", "last", "tokens"):
            getattr(self, name).extend(getattr(other, name))
        self.kind.extend(other.kind)
        self.messages.update({base + i: m for i, m in other.messages.items()})

    @property
    def num_unfinished(self) -> int:
        return sum(1 for k in self.kind if k is None)

    def counts(self) -> dict[str, int]:
        c = Counter("ok" if k == "" else ("unfinished" if k is None else k) for k in self.kind)
        return dict(sorted(c.items()))

    def records(self) -> list[RequestRecord]:
        out = []
        for i, kind in enumerate(self.kind):
            send, first, last, n = self.send[i], self.first[i], self.last[i], self.tokens[i]
            if kind == "":
                times: tuple[float, ...] = (first, last) if n > 1 else (first,)
                toks: tuple[int, ...] = (1, n - 1) if n > 1 else (1,)
                out.append(RequestRecord(i, self.input_len[i], self.requested[i], send, times,
                                         toks, last, "ok", finish_reason="length"))
            else:
                got = first >= 0
                out.append(RequestRecord(
                    i, self.input_len[i], self.requested[i], send,
                    (first,) if got else (), (1,) if got else (),
                    max(last, send), "error", error_kind=kind or "UNFINISHED",
                    error_message=self.messages.get(i, "still running when the simulation ended"),
                ))
        return out

    def summary(self, slo: Slo) -> Summary:
        if len(self) <= FAST_SUMMARY_ABOVE:
            return summarize(self.records(), slo)
        return fast_summary(self, slo)


def _stats(values: np.ndarray) -> Stats | None:
    if values.size == 0:
        return None
    # no full sort: percentile selects (linear, as metrics.percentile); at 31 M values a
    # sort took 3 s per field, 20 s of the scale run's summary
    v = values
    p = np.percentile(v, [50, 90, 95, 99])
    return Stats(count=int(v.size), avg=float(v.mean()), min=float(v.min()), max=float(v.max()),
                 p50=float(p[0]), p90=float(p[1]), p95=float(p[2]), p99=float(p[3]),
                 std=float(v.std()))


def fast_summary(o: Outcomes, slo: Slo) -> Summary:
    send = np.asarray(o.send)
    first = np.asarray(o.first)
    last = np.asarray(o.last)
    tokens = np.asarray(o.tokens)
    inp = np.asarray(o.input_len)
    kinds = o.kind
    ok = np.fromiter((k == "" for k in kinds), bool, len(kinds))
    end = np.maximum(np.maximum(send, last), first)
    duration = float(end.max() - send.min()) if len(send) else 0.0
    ttft = (first - send)[ok]
    lat = (last - send)[ok]
    multi = ok & (tokens >= 2)
    itl = ((last - first)[multi]) / (tokens[multi] - 1)
    n_ok = int(ok.sum())
    errors = Counter(k for k in kinds if k)
    errors.update({"UNFINISHED": sum(1 for k in kinds if k is None)} if None in kinds else {})

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    out_tokens = int(tokens[ok].sum())
    s = Summary(
        num_requests=len(kinds), num_ok=n_ok, num_errors=len(kinds) - n_ok, num_cancelled=0,
        num_ok_without_tokens=0, errors_by_kind=dict(sorted(errors.items())),
        duration_s=duration, request_throughput=rate(n_ok),
        output_token_throughput=rate(out_tokens),
        total_token_throughput=rate(out_tokens + int(inp[ok].sum())),
        time_to_first_token_ms=_stats(ttft * 1000.0), inter_token_latency_ms=_stats(itl * 1000.0),
        request_latency_ms=_stats(lat * 1000.0),
        output_token_throughput_per_user=_stats(1.0 / itl[itl > 0]),
        input_sequence_length=_stats(inp[ok].astype(float)),
        output_sequence_length=_stats(tokens[ok].astype(float)), send_lag_ms=None, slo=slo,
    )
    if not slo.is_set:
        return s
    ttft_ok = ok & ((first - send) * 1000.0 <= slo.ttft_ms if slo.ttft_ms is not None else True)
    itl_all = np.where(tokens >= 2, (last - first) / np.maximum(tokens - 1, 1), 0.0)
    tpot_ok = ok & (tokens > 0)
    if slo.tpot_ms is not None:
        tpot_ok &= (tokens < 2) | (itl_all * 1000.0 <= slo.tpot_ms)
    good = int((ttft_ok & tpot_ok).sum())
    total = len(kinds)
    return replace(
        s, num_good=good, goodput=rate(good), slo_attainment=good / total if total else None,
        ttft_attainment=float(ttft_ok.sum()) / total if slo.ttft_ms is not None else None,
        tpot_attainment=float(tpot_ok.sum()) / total if slo.tpot_ms is not None else None,
    )


@dataclass
class PolicyCost:
    """Wall time spent inside policy decisions, by decision kind."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, dt: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + dt
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"calls": self.calls[k], "total_s": round(self.seconds[k], 4),
                    "us_per_call": round(1e6 * self.seconds[k] / self.calls[k], 3)}
                for k in sorted(self.calls)}


def report(summary: Summary, config: dict[str, Any], outcomes: Outcomes,
           extra: dict[str, Any], per_request: bool) -> dict[str, Any]:
    """The ``pdserve bench`` JSON document (``requests`` empty unless ``per_request``)."""
    return to_json(summary, config, outcomes.records() if per_request else [], extra)
