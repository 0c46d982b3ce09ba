"""CPU cores shared by processor sharing: a small host's instances, router and client.

Only scenarios that declare a ``HostCores`` (``ScenarioSpec.host``) use this;
elsewhere every instance owns its hardware and nothing here runs.

Each core serves its runnable items by processor sharing: with n runnable, each
progresses at 1/n of its own speed, and n is re-evaluated at every change (an
item starting or ending), not only when an item starts.

    core 1:  decode batch ========------------========    speed 1, 1/2, 1
             router job           --------                (work w takes 2w while shared)

Two kinds of item:
  - *jobs*: a fixed amount of work (a prefill batch, the router's and client's
    work for one request); the core calls back when one is done;
  - *fluid* items: a decoding instance, runnable while its batch is not empty;
    the core sets its ``speed`` (1/n) and calls ``on_speed`` so the instance
    re-times its step (``SimInstance.restep`` divides the step time by it).

Router and client work may be allowed on several cores (unpinned processes):
a job is placed, when it starts, on the allowed core with the fewest runnable
items (lowest number on ties) and stays there; the OS would migrate it, which
this does not model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdserve.scheduler.sim.events import EventLoop

_EPS = 1e-9  # work left below this is float round-off: the job is done
Callback = Callable[[Any], None]


class Core:
    def __init__(self, loop: EventLoop, number: int, on_speed: Callback) -> None:
        self.loop = loop
        self.number = number
        self.on_speed = on_speed  # called with a fluid item whose speed changed
        self.jobs: dict[int, list[Any]] = {}  # id -> [work left (s at full speed), fn, arg]
        self.fluid: dict[Any, None] = {}  # insertion-ordered set: deterministic
        self.t = 0.0
        self.version = 0
        self._next_id = 0
        self.busy_s = 0.0  # time with at least one runnable item (for tests and reports)
        self.router_jobs = 0  # of the jobs, the router's (Host.router_job)

    @property
    def num_runnable(self) -> int:
        return len(self.jobs) + len(self.fluid)

    def add_job(self, work_s: float, fn: Callback, arg: Any = None) -> int:
        self._advance()
        self._next_id += 1
        self.jobs[self._next_id] = [max(0.0, work_s), fn, arg]
        self._changed()
        return self._next_id

    def set_fluid(self, item: Any, runnable: bool) -> None:
        if runnable == (item in self.fluid):
            return
        self._advance()
        if runnable:
            self.fluid[item] = None
        else:
            del self.fluid[item]
            item.speed = 1.0
        self._changed()

    def _advance(self) -> None:
        now = self.loop.now
        n = self.num_runnable
        if n:
            dt = now - self.t
            self.busy_s += dt
            share = dt / n
            for job in self.jobs.values():
                job[0] -= share
        self.t = now

    def _changed(self) -> None:
        """Re-time the fluid items and schedule the next job's end."""
        n = self.num_runnable
        speed = 1.0 / n if n else 1.0
        for item in self.fluid:
            if item.speed != speed:
                item.speed_change(self.loop.now, speed)
                self.on_speed(item)
        self.version += 1
        if self.jobs:
            left = min(job[0] for job in self.jobs.values())
            self.loop.at(self.t + max(0.0, left) * n, self._job_done, self.version)

    def _job_done(self, version: int) -> None:
        if version != self.version:
            return  # something changed since: a newer event is in the heap
        self._advance()
        done = [k for k, job in self.jobs.items() if job[0] <= _EPS]
        finished = [self.jobs.pop(k) for k in done]
        self._changed()
        for _, fn, arg in finished:
            fn(arg)


class Host:
    """The cores of one scenario's host, and where its router and client may run."""

    def __init__(self, loop: EventLoop, num_cores: int, router_cores: tuple[int, ...],
                 on_speed: Callback) -> None:
        self.cores = [Core(loop, i, on_speed) for i in range(num_cores)]
        self.router_cores = router_cores or tuple(range(num_cores))

    def router_job(self, work_s: float) -> None:
        """Router/client work nobody waits for: it only takes its share of a core."""
        if work_s <= 0:
            return
        core = min((self.cores[i] for i in self.router_cores),
                   key=lambda c: (c.num_runnable, c.number))
        core.router_jobs += 1
        core.add_job(work_s, _router_job_done, core)

    def background_job(self, work_s: float, cores: tuple[int, ...] = ()) -> None:
        """Work of another program (``HostCores.background_s``): its share of the
        least busy of ``cores`` (empty: any core), nobody waiting for it."""
        if work_s <= 0:
            return
        core = min((self.cores[i] for i in cores or range(len(self.cores))),
                   key=lambda c: (c.num_runnable, c.number))
        core.add_job(work_s, _nothing)

    def hop_factor(self) -> float:
        """How many times longer a short piece of router work on the path of a
        request (a call's way through Triton) takes now than on an idle core:
        processor sharing with what runs on the least busy core the router may use,
        the router's own pending work counted once (its threads wait on each other
        more than they run side by side)."""
        return 1.0 + min(c.num_runnable - c.router_jobs + (1 if c.router_jobs else 0)
                         for c in (self.cores[i] for i in self.router_cores))


def _router_job_done(core: Core) -> None:
    core.router_jobs -= 1


def _nothing(_: Any) -> None:
    return None
