"""Pure functions from per-request records to a benchmark summary.

Definitions follow genai-perf (and its successor AIPerf), per request:

  time to first token (TTFT) = first response carrying a token - send time
  request latency            = last response carrying a token - send time
  inter-token latency (ITL)  = (request latency - TTFT) / (output tokens - 1),
                               only for requests with >= 2 output tokens
  output token throughput per user = 1 / ITL
  input / output sequence length   = prompt tokens / tokens received

Empty responses (the bare FINAL flag) are ignored, as genai-perf does.
Latency metrics use successful requests only. Over the run:

  benchmark duration      = last request's end - first request's send
  request throughput      = successful requests / duration
  output token throughput = output tokens of successful requests / duration
  goodput                 = successful requests meeting every given SLO / duration
  SLO attainment          = requests meeting every SLO / requests that finished

TPOT in the SLO is the request's ITL (vLLM's TPOT is the same formula); a
one-token request has no ITL and meets any TPOT SLO. "Finished" excludes the
requests the client cut at --max-duration-s (kind DEADLINE): their outcome is
unknown. Errors and per-request timeouts count as misses.

Percentiles interpolate linearly between order statistics (numpy's default,
which genai-perf uses).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pdserve.bench.records import RequestRecord

DEADLINE_KIND = "DEADLINE"


@dataclass(frozen=True)
class Stats:
    count: int
    avg: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float
    std: float


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {name} must be a finite number > 0, got {value}")

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


@dataclass(frozen=True)
class Summary:
    num_requests: int
    num_ok: int
    num_errors: int
    num_cancelled: int
    num_ok_without_tokens: int
    errors_by_kind: dict[str, int]
    duration_s: float
    request_throughput: float  # successful requests / s
    output_token_throughput: float  # tokens / s
    total_token_throughput: float  # (input + output) tokens of successful requests / s
    time_to_first_token_ms: Stats | None
    inter_token_latency_ms: Stats | None
    request_latency_ms: Stats | None
    output_token_throughput_per_user: Stats | None  # tokens / s
    input_sequence_length: Stats | None
    output_sequence_length: Stats | None
    send_lag_ms: Stats | None  # open loop: actual - scheduled send time
    slo: Slo = field(default_factory=Slo)
    num_good: int | None = None
    goodput: float | None = None  # requests / s
    slo_attainment: float | None = None
    ttft_attainment: float | None = None
    tpot_attainment: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending values, linear interpolation."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def stats(values: Sequence[float]) -> Stats | None:
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    avg = math.fsum(ordered) / n
    std = math.sqrt(math.fsum((v - avg) ** 2 for v in ordered) / n)
    return Stats(
        count=n,
        avg=avg,
        min=ordered[0],
        max=ordered[-1],
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        std=std,
    )


def ttft_s(record: RequestRecord) -> float | None:
    first = record.first_token_s
    return None if first is None else first - record.send_s


def request_latency_s(record: RequestRecord) -> float | None:
    last = record.last_token_s
    return None if last is None else last - record.send_s


def inter_token_latency_s(record: RequestRecord) -> float | None:
    ttft, latency, n = ttft_s(record), request_latency_s(record), record.output_tokens
    if ttft is None or latency is None or n < 2:
        return None
    return (latency - ttft) / (n - 1)


def meets_ttft(record: RequestRecord, slo: Slo) -> bool:
    if not record.is_ok:
        return False
    if slo.ttft_ms is None:
        return True
    ttft = ttft_s(record)
    return ttft is not None and ttft * 1000.0 <= slo.ttft_ms


def meets_tpot(record: RequestRecord, slo: Slo) -> bool:
    if not record.is_ok or record.output_tokens == 0:
        return False
    if slo.tpot_ms is None:
        return True
    itl = inter_token_latency_s(record)
    return itl is None or itl * 1000.0 <= slo.tpot_ms


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    return meets_ttft(record, slo) and meets_tpot(record, slo)


def benchmark_duration_s(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    return max(r.end_s for r in records) - min(r.send_s for r in records)


def _ms(values: Sequence[float | None]) -> list[float]:
    return [v * 1000.0 for v in values if v is not None]


def _rate(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


def summarize(records: Sequence[RequestRecord], slo: Slo | None = None) -> Summary:
    slo = slo or Slo()
    ok = [r for r in records if r.is_ok]
    duration = benchmark_duration_s(records)
    itls = [inter_token_latency_s(r) for r in ok]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.input_len for r in ok)
    lags = [r.send_s - r.scheduled_s for r in records if r.scheduled_s is not None]
    summary = Summary(
        num_requests=len(records),
        num_ok=len(ok),
        num_errors=sum(1 for r in records if r.status == "error"),
        num_cancelled=sum(1 for r in records if r.status == "cancelled"),
        num_ok_without_tokens=sum(1 for r in ok if r.output_tokens == 0),
        errors_by_kind=dict(sorted(Counter(r.error_kind for r in records if r.error_kind).items())),
        duration_s=duration,
        request_throughput=_rate(len(ok), duration),
        output_token_throughput=_rate(output_tokens, duration),
        total_token_throughput=_rate(output_tokens + input_tokens, duration),
        time_to_first_token_ms=stats(_ms([ttft_s(r) for r in ok])),
        inter_token_latency_ms=stats(_ms(itls)),
        request_latency_ms=stats(_ms([request_latency_s(r) for r in ok])),
        output_token_throughput_per_user=stats([1.0 / v for v in itls if v is not None and v > 0]),
        input_sequence_length=stats([float(r.input_len) for r in ok]),
        output_sequence_length=stats([float(r.output_tokens) for r in ok]),
        send_lag_ms=stats(_ms(lags)),
        slo=slo,
    )
    if not slo.is_set:
        return summary
    finished = [r for r in records if r.error_kind != DEADLINE_KIND]
    num_good = sum(1 for r in finished if meets_slo(r, slo))
    total = len(finished)
    return replace(
        summary,
        num_good=num_good,
        goodput=_rate(num_good, duration),
        slo_attainment=num_good / total if total else None,
        ttft_attainment=_share(finished, meets_ttft, slo) if slo.ttft_ms is not None else None,
        tpot_attainment=_share(finished, meets_tpot, slo) if slo.tpot_ms is not None else None,
    )


def _share(
    records: Sequence[RequestRecord], test: Callable[[RequestRecord, Slo], bool], slo: Slo
) -> float | None:
    return sum(1 for r in records if test(r, slo)) / len(records) if records else None
