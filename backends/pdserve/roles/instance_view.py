"""The router's view of its instances: roles, routability and load (no Triton import).

Three sources, each re-read only when it changed:

    model repository   which instance has which role/scenario (the controller
                       switches roles there); stat of the root and of each
                       config.pbtxt, at most every ``check_every_s``
    state file         ControllerState.is_routable (draining, failed)
    heartbeats         each instance's own InstanceLoad (the router asks every
                       ``HEARTBEAT_S``, the same control call the controller sends)

An instance gets work for role R only when the repository says R (or the
controller switched it to R in place: the state file's ``acting_role``), its
last heartbeat (if any) was answered as R (a role switch in progress answers as
the old role, or not at all, until Triton has reloaded it), the controller lets
it, and the router has not seen it fail (token-channel EOF, failed call) since
its last good heartbeat. A stale ``acting_role`` (controller gone, instance
reloaded in its home role) is harmless: the heartbeat must agree with it.
Without a repository (``routes`` only) the routes fixed at start are the roles.

Loads are the last report corrected by what this router did since: ``in_flight``
is the report's count minus this router's calls at that time (other routers'
work) plus this router's calls now, and KV it reserved since the report lowers
``kv_free_bytes``, so a burst between two heartbeats spreads out and a slot
freed here is seen at once. So is KV freed here: a call that ends gives its
KV back to the view (``started`` returns the handle ``finished`` takes), from
the reservations since the report if the report never saw it, else on top of
the report. Without that, an instance whose request just ended keeps looking
full of KV until its next heartbeat, and decode (or aggregated) choice, which
ranks by free KV first, sends the next request to a busier instance.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from pdserve.scheduler.controller.repository import Repository, RepositoryError
from pdserve.scheduler.controller.state import ControllerState, default_state_path, read_state
from pdserve.scheduler.instance import InstanceLoad, Role, as_role
from pdserve.server.config import Route

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
# Before an instance's first heartbeat its KV is unknown: assume room (it refuses
# a reservation it cannot hold, and the first heartbeat comes within HEARTBEAT_S).
UNKNOWN_KV_BYTES = 1 << 60


@dataclass
class _Seen:
    """What this router knows of one instance beyond the repository."""

    report: InstanceLoad | None = None  # last heartbeat answer
    failed: str | None = None  # why it failed, until a good heartbeat
    local: int = 0  # this router's calls in flight there
    local_at_report: int = 0  # ``local`` when ``report`` came: the rest is other routers'
    reserved_bytes: int = 0  # KV this router reserved there since ``report``
    released_bytes: int = 0  # KV of this router's calls that ended since ``report``, which it saw
    reports: int = 0  # heartbeat answers so far (which report a call started under)
    # +1 at every failure seen and every change of stub incarnation: a call sent
    # at epoch E whose instance is now past E went to a stub that is gone.
    epoch: int = 0


@dataclass(frozen=True)
class Call:
    """One call this router has in flight at ``name`` (``InstanceView.started``)."""

    name: str
    kv_bytes: int
    report: int  # ``_Seen.reports`` when it started


@dataclass(frozen=True)
class Member:
    name: str
    role: Role
    scenario: str
    max_batch_size: int


class InstanceView:
    def __init__(self, routes: Mapping[str, Route], max_batch_size: int,
                 repository: Path | None = None, state_path: Path | None = None,
                 check_every_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self._default_batch = max_batch_size
        self._repo = Repository(repository) if repository is not None else None
        self._state_path = (state_path if state_path is not None else
                            default_state_path(repository) if repository is not None else None)
        self.check_every_s = check_every_s
        self._clock = clock
        self._checked = float("-inf")
        self._stamp: tuple[object, ...] = ()
        self._state_stamp: float | None = None
        self.state = ControllerState()
        self.members: dict[str, Member] = {}
        for scenario, route in routes.items():
            for role in ("prefill", "decode", "aggregated"):
                for name in getattr(route, role):
                    self.members[name] = Member(name, role, scenario, max_batch_size)
        self._seen: dict[str, _Seen] = {}
        self.refresh(force=True)

    # -- sources ------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Re-read the repository and the state file if they changed (cheap stats)."""
        now = self._clock()
        if not force and now - self._checked < self.check_every_s:
            return
        self._checked = now
        if self._repo is not None:
            stamp = self._repo_stamp()
            if force or stamp != self._stamp:
                self._stamp = stamp
                self._read_repository()
        if self._state_path is not None:
            try:
                mtime: float | None = os.stat(self._state_path).st_mtime
            except OSError:
                mtime = None
            if force or mtime != self._state_stamp:
                self._state_stamp = mtime
                try:
                    self.state = read_state(self._state_path)
                except Exception as exc:  # a bad file must not stop routing
                    log.warning("controller state %s unreadable: %s", self._state_path, exc)

    def _repo_stamp(self) -> tuple[object, ...]:
        assert self._repo is not None
        root = self._repo.root
        stamps: list[object] = []
        try:
            stamps.append(os.stat(root).st_mtime_ns)
            for name in sorted(os.listdir(root)):
                with_cfg = root / name / "config.pbtxt"
                try:
                    st = os.stat(with_cfg)
                    stamps.append((name, st.st_mtime_ns, st.st_ino))
                except OSError:
                    continue
        except OSError:
            pass
        return tuple(stamps)

    def _read_repository(self) -> None:
        assert self._repo is not None
        try:
            entries = self._repo.instances()
        except (RepositoryError, OSError) as exc:
            log.warning("model repository %s unreadable, keeping the last view: %s",
                        self._repo.root, exc)
            return
        self.members = {
            name: Member(name, as_role(e.role), e.scenario, e.max_batch_size)
            for name, e in entries.items()}

    # -- what the router reports --------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.members)

    def record_load(self, name: str, load: InstanceLoad) -> None:
        seen = self._seen.setdefault(name, _Seen())
        if (seen.report is not None and seen.report.incarnation
                and load.incarnation != seen.report.incarnation):
            seen.epoch += 1  # a new stub answers: the old one died since the last beat
        seen.report, seen.failed = load, None
        seen.reserved_bytes = seen.released_bytes = 0
        seen.reports += 1
        seen.local_at_report = seen.local

    def record_failure(self, name: str, why: str) -> None:
        """Seen dead (channel EOF, failed call, failed heartbeat): no work until healthy."""
        seen = self._seen.setdefault(name, _Seen())
        seen.failed = why
        seen.epoch += 1

    def epoch(self, name: str) -> int:
        """Grows whenever ``name``'s stub is seen failed or replaced (see ``_Seen.epoch``)."""
        seen = self._seen.get(name)
        return 0 if seen is None else seen.epoch

    def is_gone_since(self, name: str, epoch: int) -> bool:
        """Whether the stub that served ``name`` at ``epoch`` has failed since:
        a call made to it then will never be answered."""
        return self.epoch(name) != epoch

    def failure(self, name: str) -> str | None:
        seen = self._seen.get(name)
        return None if seen is None else seen.failed

    def started(self, name: str, kv_bytes: int = 0) -> Call:
        """A call to ``name`` holding ``kv_bytes`` of its KV; pass the result to
        ``finished`` when it ends, however it ends."""
        seen = self._seen.setdefault(name, _Seen())
        seen.local += 1
        seen.reserved_bytes += kv_bytes
        return Call(name, kv_bytes, seen.reports)

    def finished(self, call: Call) -> None:
        seen = self._seen.setdefault(call.name, _Seen())
        seen.local -= 1
        if not call.kv_bytes:
            return
        if call.report == seen.reports:  # no report since it started: never seen there
            seen.reserved_bytes = max(0, seen.reserved_bytes - call.kv_bytes)
        else:  # a report since then counted it as used (freed there now)
            seen.released_bytes += call.kv_bytes

    def model(self, name: str) -> str:
        """The weights ``name`` said it serves in its last heartbeat ("" if unknown)."""
        seen = self._seen.get(name)
        return "" if seen is None or seen.report is None else seen.report.model

    def local_in_flight(self, name: str) -> int:
        seen = self._seen.get(name)
        return 0 if seen is None else seen.local

    def is_full_here(self, name: str) -> bool:
        """This router's own calls hold every slot of ``name`` (what other routers
        hold there is known only from the last report, and may have ended)."""
        seen = self._seen.get(name)
        if seen is None or seen.local == 0:
            return False
        member = self.members.get(name)
        slots = (seen.report.max_batch_size if seen.report is not None
                 else member.max_batch_size if member is not None else 0)
        return slots > 0 and seen.local >= slots

    # -- what routing asks ------------------------------------------------------------
    def is_aggregated(self, scenario: str) -> bool:
        roles = {m.role for m in self.members.values() if m.scenario == scenario}
        return "aggregated" in roles and not {"prefill", "decode"} <= roles

    def role_of(self, m: Member) -> Role:
        """The repository's role, or the one the controller switched ``m`` to in
        place, once ``m``'s own heartbeat answers in it."""
        status = self.state.instances.get(m.name)
        if status is None or not status.acting_role or m.role == "aggregated":
            return m.role
        seen = self._seen.get(m.name)
        report = None if seen is None else seen.report
        if report is not None and report.role == status.acting_role:
            return as_role(status.acting_role)
        return m.role

    def group(self, scenario: str, role: Role) -> list[str]:
        return sorted(m.name for m in self.members.values()
                      if m.scenario == scenario and self.role_of(m) == role)

    def loads(self, scenario: str, role: Role) -> list[InstanceLoad]:
        """Every member of (scenario, role); ``is_routable`` says who may get work now."""
        return [self._load(self.members[n]) for n in self.group(scenario, role)]

    def _load(self, m: Member) -> InstanceLoad:
        seen = self._seen.get(m.name) or _Seen()
        report = seen.report
        role = self.role_of(m)
        if report is None:  # no heartbeat yet: the repository's word, this router's counts
            base = InstanceLoad(m.name, role, m.scenario, m.max_batch_size,
                                kv_free_bytes=UNKNOWN_KV_BYTES, kv_total_bytes=UNKNOWN_KV_BYTES)
        else:
            base = report
        healthy = (seen.failed is None and self.state.is_routable(m.name)
                   and (report is None or report.role == role))
        return replace(
            base, role=role, scenario=m.scenario, healthy=healthy,
            in_flight=max(0, base.in_flight - seen.local_at_report) + seen.local,
            kv_free_bytes=min(base.kv_total_bytes, max(
                0, base.kv_free_bytes - seen.reserved_bytes + seen.released_bytes)),
            kv_total_bytes=base.kv_total_bytes)
