"""Metrics on hand-made records: genai-perf definitions, SLOs, report formats."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from pdserve.bench import report
from pdserve.bench.metrics import (
    Slo,
    benchmark_duration_s,
    inter_token_latency_s,
    percentile,
    request_latency_s,
    stats,
    summarize,
    ttft_s,
)
from pdserve.bench.records import RequestRecord


def rec(
    index: int,
    send: float,
    times: list[float],
    tokens: list[int] | None = None,
    status: str = "ok",
    kind: str | None = None,
    final: float | None = None,
    input_len: int = 10,
) -> RequestRecord:
    tokens = tokens if tokens is not None else [1] * len(times)
    return RequestRecord(
        index=index,
        input_len=input_len,
        requested_output_len=max(1, sum(tokens)),
        send_s=send,
        response_s=tuple(times),
        response_tokens=tuple(tokens),
        final_s=final if final is not None else (times[-1] if times else send),
        status=status,  # type: ignore[arg-type]
        error_kind=kind,
    )


def test_percentile_matches_numpy_linear() -> None:
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3, 5.8, 9.7, 9.3, 2.38])
    for q in (0, 1, 25, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_stats_on_1_to_100() -> None:
    st = stats([float(v) for v in range(1, 101)])
    assert st is not None
    assert (st.count, st.min, st.max, st.avg) == (100, 1.0, 100.0, 50.5)
    assert st.p50 == pytest.approx(50.5)
    assert st.p90 == pytest.approx(90.1)
    assert st.p99 == pytest.approx(99.01)
    assert st.std == pytest.approx(math.sqrt((100**2 - 1) / 12))
    assert stats([]) is None


def test_ttft_itl_latency_follow_genai_perf() -> None:
    # sent at 1.0; tokens arrive 1.2 (2 tokens), 1.3 (1), 1.6 (3); then an empty final at 1.7.
    r = rec(0, 1.0, [1.2, 1.3, 1.6], [2, 1, 3], final=1.7)
    assert r.output_tokens == 6
    assert ttft_s(r) == pytest.approx(0.2)
    assert request_latency_s(r) == pytest.approx(0.6)  # last token, not the empty final
    assert inter_token_latency_s(r) == pytest.approx((0.6 - 0.2) / 5)
    assert r.end_s == pytest.approx(1.7)


def test_leading_empty_response_is_not_the_first_token() -> None:
    r = rec(0, 0.0, [0.1, 0.5, 0.9], [0, 1, 1])
    assert ttft_s(r) == pytest.approx(0.5)
    assert inter_token_latency_s(r) == pytest.approx(0.4)


def test_single_token_request_has_no_itl() -> None:
    r = rec(0, 0.0, [0.3], [1])
    assert inter_token_latency_s(r) is None
    assert summarize([r]).inter_token_latency_ms is None


def test_summary_counts_throughput_and_errors() -> None:
    records = [
        rec(0, 0.0, [0.1, 0.2, 0.3, 0.4], input_len=100),  # 4 tokens
        rec(1, 0.5, [0.7, 0.9], input_len=50),  # 2 tokens
        rec(2, 1.0, [], status="error", kind="UNAVAILABLE", final=1.1),
        rec(3, 1.5, [1.6], [5], status="error", kind="UNAVAILABLE"),
        rec(4, 2.0, [], status="cancelled", kind="DEADLINE", final=4.0),
    ]
    s = summarize(records)
    assert (s.num_requests, s.num_ok, s.num_errors, s.num_cancelled) == (5, 2, 2, 1)
    assert s.errors_by_kind == {"DEADLINE": 1, "UNAVAILABLE": 2}
    assert s.duration_s == pytest.approx(4.0) == benchmark_duration_s(records)
    assert s.request_throughput == pytest.approx(2 / 4.0)
    # Only successful requests' tokens count (genai-perf): 4 + 2.
    assert s.output_token_throughput == pytest.approx(6 / 4.0)
    assert s.total_token_throughput == pytest.approx((6 + 150) / 4.0)
    assert s.time_to_first_token_ms is not None
    assert s.time_to_first_token_ms.avg == pytest.approx(150.0)  # (100 + 200) / 2
    assert s.request_latency_ms is not None
    assert s.request_latency_ms.max == pytest.approx(400.0)
    assert s.inter_token_latency_ms is not None
    assert s.inter_token_latency_ms.avg == pytest.approx(150.0)  # 100 and 200
    assert s.output_token_throughput_per_user is not None
    assert s.output_token_throughput_per_user.avg == pytest.approx((10 + 5) / 2)
    assert s.goodput is None and s.slo_attainment is None  # no SLO given


def test_goodput_and_attainment_with_slos() -> None:
    records = [
        rec(0, 0.0, [0.05, 0.06, 0.07]),  # ttft 50, itl 10  -> good
        rec(1, 0.0, [0.30, 0.31, 0.32]),  # ttft 300         -> misses TTFT
        rec(2, 0.0, [0.05, 0.25, 0.45]),  # itl 200          -> misses TPOT
        rec(3, 0.0, [0.08]),  # one token: no ITL, meets TPOT -> good
        rec(4, 0.0, [], status="error", kind="UNAVAILABLE", final=0.1),  # miss
        rec(5, 0.0, [], status="cancelled", kind="DEADLINE", final=1.0),  # not finished: excluded
    ]
    s = summarize(records, Slo(ttft_ms=100, tpot_ms=50))
    assert s.num_good == 2
    assert s.duration_s == pytest.approx(1.0)
    assert s.goodput == pytest.approx(2 / 1.0)
    assert s.slo_attainment == pytest.approx(2 / 5)
    assert s.ttft_attainment == pytest.approx(3 / 5)  # 0, 2, 3
    assert s.tpot_attainment == pytest.approx(3 / 5)  # 0, 1, 3
    only_ttft = summarize(records, Slo(ttft_ms=100))
    assert only_ttft.num_good == 3 and only_ttft.tpot_attainment is None


def test_timeout_counts_as_a_miss_and_slo_boundary_is_inclusive() -> None:
    records = [
        rec(0, 0.0, [0.1, 0.2]),  # exactly at both limits
        rec(1, 0.0, [0.05], status="cancelled", kind="TIMEOUT", final=0.5),
    ]
    s = summarize(records, Slo(ttft_ms=100, tpot_ms=100))
    assert s.num_good == 1 and s.slo_attainment == pytest.approx(0.5)


def test_open_loop_send_lag() -> None:
    r = RequestRecord(0, 5, 1, 2.004, (2.1,), (1,), 2.1, "ok", scheduled_s=2.0)
    s = summarize([r])
    assert s.send_lag_ms is not None and s.send_lag_ms.max == pytest.approx(4.0)


def test_bad_slo_and_bad_records_are_rejected() -> None:
    with pytest.raises(ValueError, match="ttft_ms"):
        Slo(ttft_ms=0)
    with pytest.raises(ValueError, match="precedes"):
        rec(0, 1.0, [0.5])
    with pytest.raises(ValueError, match="error_kind"):
        rec(0, 0.0, [], status="error", kind=None)


def test_empty_run_summarizes_to_zero() -> None:
    s = summarize([], Slo(ttft_ms=10))
    assert (s.num_requests, s.duration_s, s.request_throughput) == (0, 0.0, 0.0)
    assert s.slo_attainment is None
    assert "no successful request" in report.format_table(s)


def test_reports_carry_the_numbers() -> None:
    records = [rec(0, 0.0, [0.1, 0.2, 0.3]), rec(1, 0.1, [], status="error", kind="INVALID_ARG")]
    s = summarize(records, Slo(ttft_ms=150))
    table = report.format_table(s)
    assert "Time to first token (ms)" in table and "INVALID_ARG=1" in table
    assert "Goodput" in table and "50.0%" in table

    rows = list(csv.reader(io.StringIO(report.format_csv(s))))
    assert rows[0][:4] == ["Metric", "avg", "min", "max"]
    ttft_row = next(r for r in rows if r and r[0] == "Time to first token (ms)")
    assert float(ttft_row[1]) == pytest.approx(100.0)
    values = {r[0]: r[1] for r in rows if len(r) == 2}
    assert float(values["Requests with errors"]) == 1
    assert float(values["SLO attainment"]) == pytest.approx(0.5)

    doc = report.to_json(s, {"mode": "concurrency"}, records)
    text = json.dumps(doc, allow_nan=False)
    back = json.loads(text)
    assert back["config"]["mode"] == "concurrency"
    assert back["summary"]["num_ok"] == 1
    assert back["requests"][0]["ttft_ms"] == pytest.approx(100.0)
    assert back["requests"][1]["error_kind"] == "INVALID_ARG"
