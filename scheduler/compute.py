"""The compute each instance runs on, and how busy it is: the ratio rule's compute check.

P/D-Serve's ratio rule (``ratio.py``) counts slots: moving an instance to the
busier stage gives that stage one instance's batch more. That is throughput
when each instance owns its compute (an NPU or GPU instance on its own
devices). When instances share compute (CPU instances pinned to the same
cores, several instances on one device) it is not: a stage whose compute is
saturated gets slots it cannot run any faster, and the switch costs a drain
for nothing. E3 measured exactly that on two cores: for output-heavy traffic
the slot rule asks for 1P3D, which was no faster than 2P2D there (12.2 vs
12.3, 12.6 vs 11.5, 9.9 vs 11.6, 11.0 vs 13.4 req/s).

So each instance names its compute units and reports how busy they have been,
as cumulative counters in its heartbeat (``InstanceLoad.compute``: unit ->
``[busy_ticks, total_ticks]``), and the controller differences two samples a
ratio window apart. The ratio controller then refuses a switch that gives a
saturated stage no unit it does not already run on (``ComputeView`` in
``ratio.py``).

Units are ``"<host>/cpu<N>"``, the CPU cores in the stub's affinity (after
pinning), from ``/proc/stat``: busy = user + nice + system + irq + softirq +
steal, total = busy + idle + iowait. The counters are the machine's, so work
that is not pdserve's on those cores counts as busy too: compute a switch could
not use either. Accelerators are not measured (no NVML here); an instance that
reports no counters leaves the rule to count slots alone.

An instance with a CPU quota (``cpu_quota``, ``roles/cpu_quota.py``) owns its
compute as an accelerator instance owns its device: its one unit is
``"<host>/quota-<instance>"``, busy = its process's CPU ticks, total = the
ticks its quota allows (quota cores x elapsed time). A donor then always
brings a unit the stage does not run on, and the check never refuses its
switch; instead the ratio rule caps each stage's slot utilisation by its units'
busy share (``ratio.py``, ``ComputeView.owned``).

Each instance also reports its own process's CPU ticks (``InstanceLoad.own_ticks``:
utime + stime from ``/proc/self/stat``, the same clock ticks). A donor's units are
busy partly with the donor's own work, which leaves with it when it switches; the
check subtracts that share (``own_shares``) before it calls such a unit saturated.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

STAT_PATH = "/proc/stat"
SELF_STAT_PATH = "/proc/self/stat"
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal
_IDLE_FIELDS = (3, 4)  # idle iowait
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc's unit


def cpu_unit(host: str, core: int) -> str:
    return f"{host}/cpu{core}"


def quota_unit(host: str, instance: str) -> str:
    return f"{host}/quota-{instance}"


def parse_proc_stat(text: str, cores: Iterable[int]) -> dict[int, tuple[int, int]]:
    """core -> (busy, total) ticks for the wanted cores found in ``text``."""
    wanted = set(cores)
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            core = int(name[3:])
            ticks = [int(f) for f in fields]
        except ValueError:
            continue
        if core not in wanted or len(ticks) < 8:
            continue
        busy = sum(ticks[i] for i in _BUSY_FIELDS)
        out[core] = (busy, busy + sum(ticks[i] for i in _IDLE_FIELDS))
    return out


def parse_process_ticks(text: str) -> int:
    """utime + stime of a ``/proc/<pid>/stat`` line (all its threads), in clock ticks."""
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of the line


class CpuCounters:
    """Busy/total ticks of the cores this process may run on, for heartbeats.

    Read at most every ``min_interval_s`` (routers and the controller heartbeat
    every instance; one read serves them all). Empty where ``/proc/stat`` is
    missing (not Linux) or unreadable: the ratio rule then counts slots alone.
    """

    def __init__(self, cores: Sequence[int] | None = None, host: str | None = None,
                 stat_path: str = STAT_PATH, min_interval_s: float = 0.2,
                 self_stat_path: str = SELF_STAT_PATH,
                 quota: tuple[str, float] | None = None) -> None:
        """``quota``: (instance, cores) where the instance has a CPU quota: then its
        one unit is the quota (``quota_unit``), not the cores it may run on."""
        self.quota = quota
        self.cores = tuple(sorted(cores if cores is not None else os.sched_getaffinity(0)))
        self.host = host or socket.gethostname()
        self.stat_path = stat_path
        self.self_stat_path = self_stat_path
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._last: dict[str, list[int]] = {}

    def read_own(self) -> int:
        """This process's CPU ticks so far; 0 where they cannot be read."""
        try:
            with open(self.self_stat_path, encoding="ascii", errors="replace") as f:
                return parse_process_ticks(f.read())
        except (OSError, ValueError, IndexError):
            return 0

    def read(self) -> dict[str, list[int]]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.min_interval_s:
                self._at = now
                if self.quota is not None:
                    name, cores = self.quota
                    allowed = int(cores * now * CLOCK_TICKS)
                    self._last = {quota_unit(self.host, name): [self.read_own(), allowed]}
                    return dict(self._last)
                try:
                    with open(self.stat_path, encoding="ascii") as f:
                        ticks = parse_proc_stat(f.read(), self.cores)
                except OSError:
                    ticks = {}
                self._last = {cpu_unit(self.host, c): [b, t] for c, (b, t) in ticks.items()}
            return dict(self._last)


def busy_shares(prev: Mapping[str, Sequence[int]],
                cur: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """unit -> busy share between two samples, at most 1 (units whose counters did
    not advance, or went back, are left out: not measured)."""
    out: dict[str, float] = {}
    for unit, (busy, total) in cur.items():
        before = prev.get(unit)
        if before is None:
            continue
        d_busy, d_total = busy - before[0], total - before[1]
        if d_total > 0 and d_busy >= 0:
            # A quota unit's process may run a little past its budget within a
            # window (the kernel settles it a period later): busy, not more.
            out[unit] = min(1.0, d_busy / d_total)
    return out


def own_shares(prev: Mapping[str, tuple[str, int]], cur: Mapping[str, tuple[str, int]],
               prev_counters: Mapping[str, Sequence[int]],
               cur_counters: Mapping[str, Sequence[int]],
               units: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """instance -> the share of each of its units its own process kept busy between
    two samples: its ticks over its units' total ticks (spread evenly over them).

    ``prev``/``cur``: instance -> (incarnation, own ticks). An instance restarted in
    between (another incarnation), whose ticks went back, or one of whose units
    was not sampled both times is left out (not measured)."""
    out: dict[str, float] = {}
    for name, (inc, ticks) in cur.items():
        before = prev.get(name)
        if before is None or before[0] != inc or ticks < before[1]:
            continue
        total = 0
        for unit in units.get(name, ()):
            a, b = prev_counters.get(unit), cur_counters.get(unit)
            if a is None or b is None or b[1] <= a[1]:
                total = 0
                break
            total += b[1] - a[1]
        if total > 0:
            out[name] = min(1.0, (ticks - before[1]) / total)
    return out


def merge_counters(samples: Iterable[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """One counter pair per unit from several instances' reports: the latest
    (largest total), since instances on one host read the same counters at
    slightly different times."""
    out: dict[str, list[int]] = {}
    for sample in samples:
        for unit, (busy, total) in sample.items():
            if unit not in out or total > out[unit][1]:
                out[unit] = [busy, total]
    return out
