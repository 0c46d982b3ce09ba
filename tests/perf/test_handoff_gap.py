from __future__ import annotations

import pytest

from pdserve.bench.records import RequestRecord
from perf.handoff_gap import describe, gaps_ms


def record(times: tuple[float, ...]) -> RequestRecord:
    return RequestRecord(index=0, input_len=8, requested_output_len=len(times), send_s=0.0,
                         response_s=times, response_tokens=(1,) * len(times),
                         final_s=times[-1] if times else 0.0, status="ok")


def test_first_gap_is_token_one_to_two_and_later_gaps_the_rest() -> None:
    first, later = gaps_ms([record((0.100, 0.130, 0.153, 0.177)), record((0.2, 0.25)),
                            record((0.3,))])
    assert first == pytest.approx([30.0, 50.0])  # the 1-token answer has no gap
    assert later == pytest.approx([23.0, 24.0])
    assert describe(first, later) == ("first gap median 40.0 ms, max 50.0 ms (2 requests); "
                                      "later gaps median 23.5 ms (2)")
    assert describe([], []) == "no request with 2 tokens"
