"""perf/experiments/process_cpu.py: each process's CPU over a load, by name."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from perf.experiments import process_cpu

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

SPIN = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass"


def test_names_from_command_lines() -> None:
    stub = ["/x/backends/python/triton_python_backend_stub",
            "/tmp/e3/repo/prefill_1/1/model.py", "pdserve_1_a_b", "1048576"]
    assert process_cpu.name_of(stub) == "prefill_1"
    assert process_cpu.name_of(["/venv/bin/tritonserver", "--model-repository=/r"]) == \
        "tritonserver"
    assert process_cpu.name_of([sys.executable, "-m", "pdserve.cli", "controller",
                                "--repository", "/r"]) == "controller"
    assert process_cpu.name_of([sys.executable, "-m", "pdserve.scheduler.host_speed",
                                "--out", "f"]) == "host_speed"
    assert process_cpu.name_of(["/usr/bin/sleep", "5"]) == "sleep"
    assert process_cpu.name_of([]) == "?"


def test_a_busy_child_is_counted_and_an_idle_one_is_not() -> None:
    burn = subprocess.Popen([sys.executable, "-c", SPIN.format(s=0.3)])
    idle = subprocess.Popen(["sleep", "5"])
    try:
        time.sleep(0.1)
        before = process_cpu.snapshot()
        assert before[burn.pid][0] == Path(sys.executable).name
        assert before[idle.pid][0] == "sleep"
        burn.wait(timeout=10)  # gone by the second snapshot: not counted
        time.sleep(0.05)
        mid = process_cpu.snapshot()
        assert burn.pid not in mid and idle.pid in mid
    finally:
        burn.kill()
        idle.kill()
        idle.wait()
    # Counted while alive at both ends: a second burner across the two snapshots.
    burn2 = subprocess.Popen([sys.executable, "-c", SPIN.format(s=0.8)])
    try:
        time.sleep(0.1)
        s0, t0 = process_cpu.snapshot(), time.monotonic()
        time.sleep(0.5)
        s1 = process_cpu.snapshot()
        used = process_cpu.cores(s0, s1, time.monotonic() - t0)
    finally:
        burn2.kill()
        burn2.wait()
    name = Path(sys.executable).name
    assert used[name] > 0.3, used  # about one core while it spun
    assert "sleep" not in used and "client" in used  # this process is the client


def test_cores_leave_out_processes_not_alive_at_both_ends_and_sum_names() -> None:
    before = {1: ("client", 10.0), 2: ("prefill_0", 5.0), 3: ("prefill_1", 1.0),
              4: ("prefill_1", 2.0)}
    after = {1: ("client", 10.5), 2: ("prefill_0", 6.0), 3: ("prefill_1", 1.5),
             4: ("prefill_1", 2.5), 5: ("decode_0", 9.0)}  # 5: started in between
    used = process_cpu.cores(before, after, 2.0)
    assert used == {"client": 0.25, "prefill_0": 0.5, "prefill_1": 0.5}
    assert process_cpu.cores(before, after, 0.0) == {}
    # A pid reused by another process between the snapshots is not counted.
    assert process_cpu.cores({7: ("sleep", 1.0)}, {7: ("decode_0", 3.0)}, 1.0) == {}
    groups = process_cpu.groups({**used, "pdserve": 0.3, "tritonserver": 0.2,
                                 "controller": 0.01}, {"prefill_0", "prefill_1"})
    assert groups == {"instances": 1.0, "router": 0.3, "tritonserver": 0.2, "client": 0.25,
                      "other": 0.01}
    # By default the spec's instance names are the instances.
    assert process_cpu.groups({"prefill_0": 0.5, "aggregated_1": 0.25, "decode_3": 0.25,
                               "sleep": 0.1})["instances"] == 1.0
