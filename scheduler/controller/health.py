"""Health of one instance on one server: a small state machine fed by probes.

A probe is readiness plus a heartbeat inference (see ``protocol``), plus the
``generation`` of the config Triton has loaded, so a reload can be told apart
from the old stub still answering.

    loading --ok--> healthy --fail--> suspect --fail (x fail_threshold)--> failed
       |               ^   <---ok---     |                                 |
       | load timeout  |                 +--ok--> healthy       controller reloads it
       v               +------------ok (new generation)--- replacing <-----+
     failed                                                 | replace timeout -> failed

    draining: set by the controller/upgrade; probes go on (the heartbeat's
    ``in_flight`` says when it is idle); a dead draining instance is failed.

Only ``healthy`` is routable: an instance leaves routing on its FIRST failed
probe (suspect) and is failed, i.e. replaced, after ``fail_threshold``
consecutive ones, so within two probe periods with the default of 2.

Slow is not dead. A probe that got no answer within its timeout says only that
the instance (or Triton) is busy: on two loaded cores a stub answers late now
and then. Replacing it would throw away its work in flight, and reloading a
router while its BLS calls are still out crashed tritonserver 2.51 (SIGSEGV in
the Python backend's instance finalize, seen when probes timed out). So a
streak of failed probes that all timed out fails the instance only once it has
lasted ``hang_timeout_s``; one answered failure in the streak (not ready, a
dead stub, an error) makes the threshold count as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from pdserve.scheduler.instance import InstanceLoad

State = Literal["loading", "healthy", "suspect", "failed", "replacing", "draining"]
STATES: tuple[State, ...] = ("loading", "healthy", "suspect", "failed", "replacing", "draining")


@dataclass(frozen=True)
class HealthPolicy:
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 2.0
    fail_threshold: int = 2  # consecutive failed probes that make an instance failed
    load_timeout_s: float = 300.0  # loading/replacing longer than this is a failure
    # Failed probes that only timed out (no answer, no error) fail the instance once
    # they have gone on this long: a busy instance answers late, not never.
    hang_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.probe_interval_s > 0:
            raise ValueError(f"probe_interval_s must be positive, got {self.probe_interval_s}")
        if not self.probe_timeout_s > 0:
            raise ValueError(f"probe_timeout_s must be positive, got {self.probe_timeout_s}")
        if self.fail_threshold < 1:
            raise ValueError(f"fail_threshold must be >= 1, got {self.fail_threshold}")
        if not self.load_timeout_s > 0:
            raise ValueError(f"load_timeout_s must be positive, got {self.load_timeout_s}")
        if not self.hang_timeout_s > 0:
            raise ValueError(f"hang_timeout_s must be positive, got {self.hang_timeout_s}")


@dataclass(frozen=True)
class ProbeResult:
    """One probe of one model on one server."""

    ok: bool  # ready AND the heartbeat answered with a valid load report
    load: InstanceLoad | None = None
    generation: int | None = None  # of the config Triton has loaded; None: unknown
    error: str = ""
    timed_out: bool = False  # failed with no answer within the probe's timeout


class ProbeClient(Protocol):
    """Probes a model on a server; never raises for a sick instance (``ok=False``)."""

    def probe(self, server: str, model: str) -> ProbeResult: ...

    def probe_router(self, server: str, model: str) -> ProbeResult:
        """The same for a router model (its heartbeat carries no instance load)."""
        ...

    def set_role(self, server: str, model: str, role: str) -> ProbeResult:
        """Switch ``model`` to ``role`` in place; ``load`` is its answer in the new role."""
        ...

    def close(self) -> None: ...


class InstanceHealth:
    """The state of one (server, model); ``observe`` returns the new state."""

    def __init__(self, policy: HealthPolicy, now: float, state: State = "loading") -> None:
        self.policy = policy
        self.state: State = state
        self.since = now
        self.failures = 0
        self.expected_generation: int | None = None
        self.last_load: InstanceLoad | None = None
        self.last_generation: int | None = None
        self.last_error = ""
        # The streak of failed probes: when it began, and whether one was answered
        # (an error, not a timeout).
        self._streak_since: float | None = None
        self._answered_failure = False

    @property
    def is_routable(self) -> bool:
        return self.state == "healthy"

    @property
    def is_idle(self) -> bool:
        """Nothing in flight, as the last heartbeat said (unknown counts as busy)."""
        return self.last_load is not None and self.last_load.in_flight == 0

    def observe(self, result: ProbeResult, now: float) -> State:
        if result.generation is not None:
            self.last_generation = result.generation
        if result.ok:
            self._clear_failures()
            self.last_load = result.load
            self.last_error = ""
            if self.state in ("loading", "replacing") and not self._is_new(result):
                return self._timeout_check(now)  # the old stub still answers: keep waiting
            if self.state != "draining":
                self._enter("healthy", now)
            return self.state
        self.failures += 1
        self.last_error = result.error
        if self._streak_since is None:
            self._streak_since = now
        self._answered_failure |= not result.timed_out
        if self.state in ("loading", "replacing"):
            return self._timeout_check(now)
        if self.state == "failed":
            return self.state
        if self.failures >= self.policy.fail_threshold and (
                self._answered_failure
                or now - self._streak_since >= self.policy.hang_timeout_s):
            self._enter("failed", now)
        elif self.state == "healthy":
            self._enter("suspect", now)
        return self.state

    def begin_replacing(self, generation: int, now: float) -> None:
        self.expected_generation = generation
        self._clear_failures()
        self._enter("replacing", now)

    def begin_loading(self, generation: int, now: float) -> None:
        """The repository changed the model (switch, upgrade): wait for the new one."""
        self.expected_generation = generation
        self._clear_failures()
        self._enter("loading", now)

    def begin_draining(self, now: float) -> None:
        if self.state != "failed":
            self._enter("draining", now)

    def end_draining(self, now: float) -> None:
        """Back to routing, unless the model was changed meanwhile (then: loading)."""
        if self.state != "draining":
            return
        stale = (self.expected_generation is not None and self.last_generation is not None
                 and self.last_generation < self.expected_generation)
        self._enter("loading" if stale else "healthy", now)

    def _clear_failures(self) -> None:
        self.failures = 0
        self._streak_since, self._answered_failure = None, False

    def _is_new(self, result: ProbeResult) -> bool:
        if self.expected_generation is None or result.generation is None:
            return True
        return result.generation >= self.expected_generation

    def _timeout_check(self, now: float) -> State:
        if now - self.since > self.policy.load_timeout_s:
            self._enter("failed", now)
        return self.state

    def _enter(self, state: State, now: float) -> None:
        if state != self.state:
            self.state = state
            self.since = now
