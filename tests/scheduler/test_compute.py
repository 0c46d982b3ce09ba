"""Compute counters for the ratio rule's compute check (scheduler/compute.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdserve.errors import InvalidArgument
from pdserve.scheduler.compute import (
    CpuCounters,
    busy_shares,
    merge_counters,
    own_shares,
    parse_proc_stat,
    parse_process_ticks,
)
from pdserve.scheduler.instance import InstanceLoad

STAT = """cpu  300 0 30 700 10 0 5 2 0 0
cpu0 100 1 10 300 5 2 3 1 0 0
cpu1 200 0 20 400 5 0 2 1 0 0
cpu10 1 0 0 1 0 0 0 0 0 0
intr 11063979 0 0
"""


def test_parse_proc_stat_sums_busy_and_idle_fields_per_core() -> None:
    ticks = parse_proc_stat(STAT, [0, 1, 7])
    # busy = user nice system irq softirq steal; total adds idle and iowait
    assert ticks == {0: (100 + 1 + 10 + 2 + 3 + 1, 117 + 300 + 5),
                     1: (200 + 20 + 2 + 1, 223 + 400 + 5)}
    assert parse_proc_stat(STAT, [10]) == {10: (1, 2)}  # cpu10 is not cpu1
    assert parse_proc_stat("garbage\ncpuX 1 2\n", [0]) == {}


def test_counters_name_host_and_core_and_are_read_at_most_every_interval(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    counters = CpuCounters(cores=[1], host="h", stat_path=str(stat), min_interval_s=60.0)
    assert counters.read() == {"h/cpu1": [223, 628]}
    stat.write_text(STAT.replace("cpu1 200", "cpu1 900"))
    assert counters.read() == {"h/cpu1": [223, 628]}  # within the interval: the last read
    fresh = CpuCounters(cores=[1], host="h", stat_path=str(stat), min_interval_s=0.0)
    assert fresh.read() == {"h/cpu1": [923, 1328]}
    gone = CpuCounters(cores=[0], host="h", stat_path=str(tmp_path / "missing"))
    assert gone.read() == {}  # not Linux / unreadable: not measured


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_counters_of_this_process_cover_its_affinity() -> None:
    counters = CpuCounters()
    read = counters.read()
    assert len(read) == len(os.sched_getaffinity(0))
    assert all(0 <= busy <= total for busy, total in read.values())


def test_busy_shares_between_two_samples() -> None:
    prev = {"h/cpu0": [100, 200], "h/cpu1": [50, 200], "h/cpu2": [10, 10]}
    cur = {"h/cpu0": [190, 300], "h/cpu1": [60, 300], "h/cpu2": [10, 10], "h/cpu3": [1, 2]}
    # cpu2 did not advance, cpu3 has no earlier sample: not measured
    assert busy_shares(prev, cur) == {"h/cpu0": pytest.approx(0.9), "h/cpu1": pytest.approx(0.1)}
    assert busy_shares({"h/cpu0": [500, 900]}, {"h/cpu0": [10, 1000]}) == {}  # went back


def test_merge_keeps_the_latest_sample_of_a_shared_unit() -> None:
    merged = merge_counters([{"h/cpu0": [5, 10]}, {"h/cpu0": [9, 14], "h/cpu1": [1, 2]},
                             {"h/cpu0": [7, 12]}])
    assert merged == {"h/cpu0": [9, 14], "h/cpu1": [1, 2]}


def test_heartbeat_carries_counters_and_rejects_malformed_ones() -> None:
    load = InstanceLoad("decode_0", "decode", "default", 4, compute={"h/cpu0": [3, 9]})
    assert InstanceLoad.from_bytes(load.to_bytes()) == load
    assert InstanceLoad.from_bytes(InstanceLoad("p", "prefill", "s", 4).to_bytes()).compute == {}
    for bad in ({"h/cpu0": [1]}, {"h/cpu0": [-1, 2]}):
        with pytest.raises(InvalidArgument, match="compute"):
            InstanceLoad("d", "decode", "s", 4, compute=bad)
    with pytest.raises(InvalidArgument):
        InstanceLoad.from_bytes(b'{"name":"d","role":"decode","scenario":"s",'
                                b'"max_batch_size":4,"compute":{"h/cpu0":"xy"}}')


def test_heartbeat_fields_this_version_does_not_know_are_left_out() -> None:
    newer = (b'{"name":"d","role":"decode","scenario":"s","max_batch_size":4,'
             b'"in_flight":2,"some_future_field":[1,2]}')
    load = InstanceLoad.from_bytes(newer)
    assert (load.name, load.in_flight, load.compute) == ("d", 2, {})
    for bad in (b"[1, 2]", b'{"role":"decode"}', b"not json"):
        with pytest.raises(InvalidArgument, match="malformed"):
            InstanceLoad.from_bytes(bad)


SELF_STAT = ("4242 (pdserve stub) (x)) S 1 4242 4242 0 -1 4194560 5000 0 0 0 "
             "1234 56 0 0 20 0 9 0 100 0 0 18446744073709551615\n")


def test_own_ticks_are_utime_plus_stime_whatever_the_command_name(tmp_path: Path) -> None:
    assert parse_process_ticks(SELF_STAT) == 1234 + 56
    stat = tmp_path / "self_stat"
    stat.write_text(SELF_STAT)
    assert CpuCounters(cores=[0], self_stat_path=str(stat)).read_own() == 1290
    assert CpuCounters(cores=[0], self_stat_path=str(tmp_path / "none")).read_own() == 0
    stat.write_text("garbage")
    assert CpuCounters(cores=[0], self_stat_path=str(stat)).read_own() == 0
    # This process: it has used some CPU by now, and it only grows.
    me = CpuCounters(cores=[0])
    first = me.read_own()
    sum(i * i for i in range(300_000))
    assert 0 < first <= me.read_own()


def test_own_shares_over_the_instances_units() -> None:
    prev_c = {"h/cpu0": [100, 1000], "h/cpu1": [100, 1000]}
    cur_c = {"h/cpu0": [180, 1100], "h/cpu1": [150, 1100]}
    units = {"p0": ["h/cpu0"], "d0": ["h/cpu0", "h/cpu1"], "new": ["h/cpu0"],
             "restarted": ["h/cpu0"], "unsampled": ["h/cpu9"]}
    prev = {"p0": ("a", 500), "d0": ("b", 10), "restarted": ("c", 900), "unsampled": ("e", 1)}
    cur = {"p0": ("a", 560), "d0": ("b", 110), "new": ("d", 5), "restarted": ("c2", 20),
           "unsampled": ("e", 9)}
    # p0: 60 ticks of core 0's 100; d0: 100 ticks over two cores' 200 (half of each)
    assert own_shares(prev, cur, prev_c, cur_c, units) == {"p0": 0.6, "d0": 0.5}


def test_heartbeat_carries_own_ticks() -> None:
    load = InstanceLoad("p", "prefill", "default", 4, own_ticks=77)
    assert InstanceLoad.from_bytes(load.to_bytes()).own_ticks == 77
    with pytest.raises(InvalidArgument, match="own_ticks"):
        InstanceLoad("p", "prefill", "default", 4, own_ticks=-1)
