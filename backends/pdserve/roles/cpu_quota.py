"""An instance's own share of the CPU: a cgroup with a CPU bandwidth limit.

``cpu_cores`` pins an instance to cores; instances pinned to the same core
still share it, so on a CPU deployment a P/D ratio moves slots, not compute
(E3 on two cores). ``cpu_quota`` gives the instance's process a fixed budget
of cores instead (0.45: 45 % of one core's time, spread over whatever cores
it may run on), the way an NPU or GPU instance owns its device: the instance
can use no more, and the others cannot take it away as long as the budgets
sum to at most the machine's cores.

The stub puts itself in a cgroup of its own, a child of the cgroup it runs in,
named ``pdserve-<server pid>-<instance>``, with

  cgroup v1 ``cpu`` controller: ``cpu.cfs_period_us`` / ``cpu.cfs_quota_us``
  cgroup v2:                    ``cpu.max`` ("<quota> <period>")

and leaves it on finalize (moves back to the parent, removes the directory).

A budget alone is a cap, not a reservation: within it the group competes at the
default CPU weight with everything else on its cores. E3 with owned compute
(perf/RESULTS.md, 2026-12-07) put four instances of 0.3 cores on two cores with
the router, Triton and the load generator unpinned: busy decodes got 0.25-0.29
cores of their 0.3, at a TPOT p50 of 5.1-5.5 ms, and how much they lost moved
with where the scheduler put the unpinned processes. A *reserved* group
(``reserve``) takes the largest weight (v1 ``cpu.shares`` 262144, v2
``cpu.weight`` 10000; a task at the default has 1024 / 100): within its budget
the scheduler picks it ahead of default-weight tasks on its cores, so it gets
its budget whenever it has work, and the budget still caps it. Decode and
aggregated instances reserve (``roles/instance.py``): their steps are the
tokens' latency. Measured on the same server, toggling the weight every 20 s
(``perf.experiments.cpu_weight``): a decode-bound 1P3D served 1.07-1.10x the
requests at a TPOT p50 of 4.2-4.5 ms (was 5.1-5.7), decodes at 0.30 cores;
reserving the prefills too cost a prompt-bound 3P1D 7 % of its throughput (the
prefills then crowd out the router that feeds them), reserving the decodes
alone cost it none.

The period is 10 ms, not the kernel's default 100 ms: a process over its
budget waits for the next period, so a 100 ms period could hold a decode step
(a few ms) back by 55 ms at 0.45 cores, more than a TPOT SLO; at 10 ms the
wait is at most 5.5 ms. A stub killed without finalize leaves an empty
directory: its restart (same server, same instance) uses it again, and any
join removes the empty ones whose server is gone.

Needs write access to the cgroup filesystem (root, or a delegated subtree);
where there is none the instance fails to load and says why. On cgroup v2 the
parent must have the ``cpu`` controller enabled for its children
(``cgroup.subtree_control``).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pdserve.kvtransfer.shm import pid_alive

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000
MIN_QUOTA_US = 1_000  # the kernel's smallest cfs quota
# (file, default weight, reserved weight) per cgroup version; the reserved one is
# the largest each version accepts.
WEIGHTS = {1: ("cpu.shares", 1024, 262144), 2: ("cpu.weight", 100, 10000)}
PREFIX = "pdserve-"


class CpuQuotaError(RuntimeError):
    """The quota could not be set up (no cgroup, no permission...)."""


@dataclass(frozen=True)
class Hierarchy:
    """Where this process's CPU bandwidth is controlled."""

    version: int  # 1 or 2
    current: Path  # the cgroup directory this process is in now


def find_hierarchy(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> Hierarchy:
    """The cgroup (v1 ``cpu`` controller, else v2) this process is in, from
    ``/proc/self/cgroup``."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text(encoding="ascii")
        except OSError as exc:
            raise CpuQuotaError(f"cannot read /proc/self/cgroup: {exc}") from None
    v2_path = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "cpu" in controllers.split(","):
            for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                if (mount / "cpu.cfs_quota_us").exists():
                    return Hierarchy(1, mount / path.lstrip("/"))
        if controllers == "":
            v2_path = path
    if v2_path is not None:
        for mount in (root, root / "unified"):
            if "cpu" in _read(mount / "cgroup.controllers").split():
                return Hierarchy(2, mount / v2_path.lstrip("/"))
    raise CpuQuotaError(f"no cgroup CPU controller under {root} (cgroup v1 'cpu' or v2 "
                        "with 'cpu' enabled)")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii")
    except OSError:
        return ""


def quota_us(cores: float, period_us: int = PERIOD_US) -> int:
    """CPU time per period for ``cores`` cores (at least the kernel's minimum)."""
    if not cores > 0:
        raise ValueError(f"cpu_quota must be positive, got {cores}")
    return max(MIN_QUOTA_US, round(cores * period_us))


class CpuQuota:
    """This process in a cgroup of its own limited to ``cores`` cores (``reserved``:
    and given them first, see ``reserve``); ``release()`` puts it back."""

    def __init__(self, instance: str, cores: float, *, reserved: bool = False,
                 root: Path = CGROUP_ROOT, proc_cgroup: str | None = None,
                 pid: int | None = None, server_pid: int | None = None,
                 period_us: int = PERIOD_US) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", instance):
            raise ValueError(f"instance name {instance!r} cannot name a cgroup")
        self.cores = cores
        self.quota_us = quota_us(cores, period_us)
        self.period_us = period_us
        self.reserved = reserved
        self.pid = os.getpid() if pid is None else pid
        server = os.getppid() if server_pid is None else server_pid
        self.hierarchy = find_hierarchy(root, proc_cgroup)
        self.parent = self.hierarchy.current
        self.path = self.parent / f"{PREFIX}{server}-{instance}"
        self._joined = False
        sweep_stale(self.parent)
        try:
            self._join()
        except OSError as exc:
            self._remove()
            raise CpuQuotaError(f"cannot limit {instance} to {cores:g} cores in {self.path}: "
                                f"{exc.strerror or exc}") from None

    def _join(self) -> None:
        for attempt in range(2):
            self.path.mkdir(exist_ok=True)
            try:
                if self.hierarchy.version == 1:
                    (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
                    (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
                else:
                    (self.path / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
                # Always written: a directory left by a killed stub keeps its weight.
                self._write_weight(self.reserved)
                (self.path / "cgroup.procs").write_text(str(self.pid))
                self._joined = True
                return
            except FileNotFoundError:
                # Another instance's sweep removed the empty directory between our
                # mkdir and our write: make it again, once.
                if attempt:
                    raise

    def _write_weight(self, reserved: bool) -> None:
        name, default, high = WEIGHTS[self.hierarchy.version]
        (self.path / name).write_text(str(high if reserved else default))

    def reserve(self, on: bool) -> None:
        """Give the budget first (``on``: the largest CPU weight, so within its
        budget the scheduler picks the group ahead of default-weight tasks) or
        compete for it at the default weight. For an instance that switches roles
        in place."""
        if not self._joined:
            raise CpuQuotaError(f"{self.path} was released")
        try:
            self._write_weight(on)
        except OSError as exc:
            raise CpuQuotaError(f"cannot set the CPU weight of {self.path}: "
                                f"{exc.strerror or exc}") from None
        self.reserved = on

    def release(self) -> None:
        """Back to the parent cgroup; the directory is removed. Idempotent."""
        if self._joined:
            try:
                (self.parent / "cgroup.procs").write_text(str(self.pid))
            except OSError as exc:
                log.warning("cannot move pid %d back to %s: %s", self.pid, self.parent, exc)
            self._joined = False
        self._remove()

    def _remove(self) -> None:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cannot remove %s: %s", self.path, exc)


def sweep_stale(parent: Path) -> list[Path]:
    """Remove ``pdserve-<pid>-*`` directories under ``parent`` whose server is gone
    and that hold no process (left by stubs killed without finalize)."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = re.fullmatch(rf"{PREFIX}(\d+)-.+", entry.name)
        if m is None or not entry.is_dir() or pid_alive(int(m.group(1))):
            continue
        if _read(entry / "cgroup.procs").strip():
            continue
        try:
            entry.rmdir()
            removed.append(entry)
        except OSError:
            pass
    return removed


def sweep_quota_cgroups(root: Path = CGROUP_ROOT) -> list[Path]:
    """``sweep_stale`` in this process's cgroup (where the stubs of a server it
    started made theirs); nothing where there is no CPU controller."""
    try:
        return sweep_stale(find_hierarchy(root).current)
    except CpuQuotaError:
        return []
