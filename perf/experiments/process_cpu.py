"""Where a measured load's CPU went: each process of the experiment, by name.

A deployment on two cores is as fast as the CPU its processes get, and the
instances are only some of them: tritonserver's frontends, the router's stub,
the load generator (this process) and the controller take their share too. E3
with owned compute gives each instance a quota of 0.4 cores and assumed the
0.4 cores left over were enough for the rest; this counter measured them at
~0.7 (router stub 0.33, tritonserver 0.19, load generator 0.16 at 3P1D,
prompt-heavy) with the machine at 1.74 of its 2 cores; E3-owned's quota is
0.3 cores since.

``snapshot()`` reads utime + stime of this process and every process below it
(tritonserver and the stubs it forks, the controller, the host-speed gauge)
from ``/proc``; ``cores(before, after, wall_s)`` turns two snapshots into
cores used per name over the load. Names: ``client`` (this process),
``tritonserver``, a stub by its model's name (``pdserve`` is the router), else
the program's name (``controller`` for ``pdserve controller``). A process that
was not alive at both snapshots (a stub reloaded in between) is left out.
Nothing is counted where there is no ``/proc``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

PROC = Path("/proc")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Snapshot = dict[int, tuple[str, float]]  # pid -> (name, CPU seconds so far)


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of ``pid``; None: gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def name_of(argv: list[str]) -> str:
    """A readable name for a process from its command line."""
    if not argv:
        return "?"
    program = Path(argv[0]).name
    if program == "triton_python_backend_stub" and len(argv) > 1:
        return Path(argv[1]).parents[1].name  # <repository>/<model>/1/model.py
    if program == "tritonserver":
        return "tritonserver"
    for known in ("controller", "host_speed"):
        if any(arg == known or arg.endswith("." + known) for arg in argv[1:]):
            return known
    return program


def _argv(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def snapshot(root: int | None = None) -> Snapshot:
    """CPU seconds so far of ``root`` (default: this process) and its descendants."""
    root = os.getpid() if root is None else root
    if not PROC.is_dir():
        return {}
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, float]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
            children.setdefault(st[0], []).append(int(entry.name))
    out: Snapshot = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid not in stats:
            continue
        out[pid] = ("client" if pid == root else name_of(_argv(pid)), stats[pid][1])
        stack += children.get(pid, [])
    return out


def cores(before: Snapshot, after: Snapshot, wall_s: float) -> dict[str, float]:
    """Cores each name used between two snapshots ``wall_s`` apart (processes
    alive at both; several of one name add up)."""
    if wall_s <= 0:
        return {}
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        if pid in before and before[pid][0] == name:
            used[name] = used.get(name, 0.0) + max(0.0, cpu - before[pid][1]) / wall_s
    return {name: round(value, 3) for name, value in sorted(used.items())}


INSTANCE = re.compile(r"(prefill|decode|aggregated)_\d+")  # the spec's instance names


def groups(used: Mapping[str, float], instances: set[str] | None = None,
           router: str = "pdserve") -> dict[str, float]:
    """``cores`` summed as instances / router / tritonserver / client / other
    (``instances``: by default every name the spec gives an instance)."""
    if instances is None:
        instances = {name for name in used if INSTANCE.fullmatch(name)}
    out = {"instances": 0.0, "router": 0.0, "tritonserver": 0.0, "client": 0.0, "other": 0.0}
    for name, value in used.items():
        key = ("instances" if name in instances else "router" if name == router
               else name if name in out else "other")
        out[key] += value
    return {k: round(v, 3) for k, v in out.items()}
