"""The host-speed gauge: samples on every core, window medians, the JSON-lines CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pdserve.scheduler import host_speed


def test_window_median_and_unslowed_reference() -> None:
    samples = [(float(t), 1.5 if 40 <= t < 60 else 1.0) for t in range(100)]
    assert host_speed.window_cost(samples, 40, 59) == 1.5
    assert host_speed.window_cost(samples, 0, 99) == 1.0
    assert host_speed.window_cost(samples, 200, 300) is None
    assert host_speed.reference_ms(samples) == 1.0  # a long slow episode is not the reference
    assert host_speed.reference_ms([]) is None


def test_a_sample_is_thread_cpu_time_of_the_fixed_work() -> None:
    ms = host_speed.sample()
    assert 0.05 < ms < 100  # ~0.85 ms on the CI box; not wall time of anything else


def test_cli_writes_json_lines_for_its_duration(tmp_path: Path) -> None:
    out = tmp_path / "g.jsonl"
    assert host_speed.main(["--out", str(out), "--interval-s", "0.05", "--duration-s", "0.3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) >= 2 and all(rec["ms"] > 0 and rec["at"] > 1e9 for rec in lines)


def test_sample_cores_visits_each_core_and_restores_the_affinity() -> None:
    before = os.sched_getaffinity(0)
    assert 0.05 < host_speed.sample_cores() < 100
    assert os.sched_getaffinity(0) == before
    one = min(before)
    assert 0.05 < host_speed.sample_cores({one, 10_000}) < 100  # cores not ours are skipped
    assert os.sched_getaffinity(0) == before
