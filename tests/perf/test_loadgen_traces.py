"""Trace readers (Azure CSV, JSONL) and replay scaling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.traces import (
    TraceRow,
    TraceScaling,
    read_azure_csv,
    read_jsonl,
    read_trace,
    trace_requests,
)
from pdserve.errors import InvalidArgument

# The first rows of ../shared/traces/AzureLLMInferenceTrace_code.csv, copied so
# this test does not depend on the shared folder.
CODE_HEAD = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
"""
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def test_azure_rows_parse_with_seven_digit_fractions(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text(CODE_HEAD)
    rows = read_trace(p)
    assert rows[0] == TraceRow(0.0, 4808, 10)
    assert (rows[1].input_len, rows[1].output_len) == (3180, 8)
    assert rows[1].timestamp_s == pytest.approx(0.052)


@pytest.mark.parametrize(
    "name,rows,span_s,in_mean,out_mean",
    [
        ("AzureLLMInferenceTrace_code.csv", 8819, 3436, 2048, 28),
        ("AzureLLMInferenceTrace_conv.csv", 19366, 3502, 1155, 211),
    ],
)
def test_real_traces_match_their_readme(
    name: str, rows: int, span_s: float, in_mean: float, out_mean: float
) -> None:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    trace = read_azure_csv(path)
    assert len(trace) == rows
    assert trace[-1].timestamp_s == pytest.approx(span_s, abs=1)
    assert sum(r.input_len for r in trace) / rows == pytest.approx(in_mean, abs=1)
    assert sum(r.output_len for r in trace) / rows == pytest.approx(out_mean, abs=1)
    assert len(read_azure_csv(path, max_rows=10)) == 10


def test_jsonl_reader(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 1000, "input_length": 10, "output_length": 3},
        {"timestamp": 1500, "input_length": 20, "output_length": 4},
        {"timestamp": 1250, "input_length": 30, "output_length": 5},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_jsonl(p)
    assert [r.timestamp_s for r in rows] == [0.0, 0.5, 0.25]
    specs = trace_requests(rows, TraceScaling())
    assert [(s.arrival_s, s.input_len) for s in specs] == [(0.0, 10), (0.25, 30), (0.5, 20)]
    assert [s.index for s in specs] == [0, 1, 2]


def test_scaling_and_caps() -> None:
    rows = [TraceRow(0.0, 4808, 10), TraceRow(0.052, 3180, 8), TraceRow(2.0, 1, 0)]
    scaling = TraceScaling(time_scale=10, length_scale=0.1, max_input_len=400, max_output_len=100)
    specs = trace_requests(rows, scaling)
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 0.52, 20.0])
    assert [s.input_len for s in specs] == [400, 318, 1]  # 480.8 capped, 318, min 1
    assert [s.output_len for s in specs] == [1, 1, 1]  # 1.0, 0.8 -> 1, 0 -> 1
    fast = trace_requests(rows, TraceScaling(time_scale=0.5))
    assert fast[2].arrival_s == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"time_scale": 0}, {"length_scale": -1}, {"max_input_len": 0}, {"time_scale": float("inf")}],
)
def test_bad_scaling(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TraceScaling(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("h.csv", "time,in,out\n1,2,3\n", "header"),
        ("r.csv", CODE_HEAD + "2023-11-16 18:17:05,12\n", ":4: expected 3 fields"),
        ("d.csv", CODE_HEAD + "yesterday,1,2\n", ":4: bad row"),
        ("j.jsonl", '{"timestamp": 1, "input_length": 2}\n', ":1: bad trace line"),
        ("x.txt", "whatever", "unknown trace format"),
    ],
)
def test_bad_traces_raise_typed_errors(tmp_path: Path, name: str, text: str, match: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(InvalidArgument, match=match):
        read_trace(p)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not found"):
        read_trace(tmp_path / "nope.csv")
