"""The host-speed gauge: samples on every core, window medians, the JSON-lines CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_the_gauge_process_stops_when_its_parent_dies(tmp_path: Path) -> None:
    """An experiment killed with SIGKILL cannot stop its gauge: the gauge stops itself."""
    out = tmp_path / "g.jsonl"
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         f"p = subprocess.Popen([sys.executable, '-m', 'pdserve.scheduler.host_speed', "
         f"'--out', {str(out)!r}, '--interval-s', '0.05'])\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    gauge = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 20
        while (not out.exists() or not out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_text(), "the gauge never sampled"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(gauge) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(gauge)
    finally:  # whatever happened, nothing of the test keeps running
        parent.kill()
        parent.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(gauge, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_record_is_the_loop_and_with_torch_the_two_products() -> None:
    engine = host_speed.engine_work()
    assert engine is not None  # torch is a dependency of the project
    rec = host_speed.record(engine)
    assert set(rec) == {"ms", "gemv_ms", "gemm_ms"} and all(0 < v < 1000 for v in rec.values())
    assert set(host_speed.record(None)) == {"ms"}


@pytest.mark.parametrize("flags,with_products", [(["--engine-every", "2"], [True, False]),
                                                  (["--no-engine"], [False, False])])
def test_cli_times_the_products_every_nth_sample(tmp_path: Path, flags: list[str],
                                                 with_products: list[bool]) -> None:
    out = tmp_path / "g.jsonl"
    assert host_speed.main(["--out", str(out), "--interval-s", "0.01", "--duration-s", "1.0",
                            *flags]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) >= 2
    assert ["gemv_ms" in rec for rec in lines[:2]] == with_products
    with pytest.raises(SystemExit):
        host_speed.main(["--out", str(out), "--engine-every", "0"])
