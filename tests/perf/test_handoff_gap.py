from __future__ import annotations

import pytest

from pdserve.bench.records import RequestRecord
from pdserve.server.repo import instances_from_spec
from perf.experiments import e1_disagg_vs_agg as e1
from perf.handoff_gap import describe, gaps_ms, spec


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


def test_spec_adds_an_on_commit_pair_on_e1s_cores() -> None:
    instances = {i.name: i for i in instances_from_spec(spec(e1.FULL))}
    assert instances["prefill_0"].decode_start == "on_landing"
    assert instances["prefill_1"].decode_start == "on_commit"
    assert instances["prefill_1"].cpu_cores == instances["prefill_0"].cpu_cores == (0,)
    assert instances["decode_1"].cpu_cores == instances["decode_0"].cpu_cores == (1,)
    assert instances["pdserve"].routes["commit"].prefill == ("prefill_1",)
