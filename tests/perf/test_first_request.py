from __future__ import annotations

import pytest

from pdserve.bench.records import RequestRecord, RequestStatus
from pdserve.server.repo import instances_from_spec
from perf.first_request import row, spec


def _record(times: tuple[float, ...], status: RequestStatus = "ok") -> RequestRecord:
    return RequestRecord(index=3, input_len=8, requested_output_len=len(times), send_s=10.0,
                         response_s=times, response_tokens=(1,) * len(times),
                         final_s=times[-1] if times else 10.0, status=status,
                         error_kind=None if status == "ok" else "UNAVAILABLE",
                         error_message=None if status == "ok" else "no prefill")


def test_spec_sets_the_warm_up_of_every_instance_of_e1s_deployment() -> None:
    for tokens in (0, 16):
        instances = instances_from_spec(spec(tokens))
        assert {i.name for i in instances} >= {"prefill_0", "decode_0", "aggregated_1"}
        assert {i.warmup_tokens for i in instances} == {tokens}


def test_row_is_ttft_and_first_gap_from_the_send() -> None:
    assert row(_record((10.25, 10.28, 10.31))) == pytest.approx(
        {"ttft_ms": 250.0, "first_gap_ms": 30.0})
    assert row(_record((10.1,))) == pytest.approx({"ttft_ms": 100.0, "first_gap_ms": None})
    with pytest.raises(RuntimeError, match="request 3 failed: no prefill"):
        row(_record((), status="error"))
