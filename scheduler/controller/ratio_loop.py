"""P/D ratio per scenario, applied one role switch at a time, drain first.

Each scenario has its own ``RatioController`` (cool-down, hysteresis, online
trigger). When it asks for one more prefill (decode), the loop picks a donor:
the routable decode (prefill) of that scenario with the least in flight. The
donor is drained (no new work; in-flight requests finish), and switched
through the repository when idle or after ``drain_timeout_s``::

    decide --> pick donor --> draining ... idle or timeout --> switch_role --> loading --> healthy

One switch per scenario is in progress at a time, from the decision until the
instance is healthy in its new role (a reload takes 15-20 s on a busy CPU; a
decision made meanwhile counts the reloading instance in neither role and
switched a second instance the same way, E3), and the cool-down runs from
then. A scenario never drops
below ``min_prefill`` / ``min_decode`` routable instances: the donor must be
routable and the counts are of routable instances. Where the window measured
the instances' compute, a donor that brings the stage a compute unit it lacks
goes first (``ComputeView.adds``).

A prefill hands KV only to a decode of the same weights, so during a rolling
upgrade (old and new weights side by side) a donor that is the last routable
instance of its role on its weights, while routable ones of the other role run
those weights, is passed over: switching it would strand them (the router
could use them for nothing). When every donor would, the switch waits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pdserve.scheduler.ratio import RatioController, RatioDecision, RatioPolicy, ScenarioSignal


@dataclass(frozen=True)
class Candidate:
    """What the loop needs to know about one instance of a scenario."""

    name: str
    role: str
    routable: bool
    in_flight: int
    model: str = ""  # the weights it runs ("" where one model serves all)


@dataclass(frozen=True)
class PendingSwitch:
    scenario: str
    name: str
    to_role: str
    started: float
    reason: str
    switched: bool = False  # the new role is set (repository edit, or in place)
    in_place: bool = False  # switched in place: serving already, drain lifts soon
    switched_at: float = 0.0


class RatioLoop:
    def __init__(self, policy: RatioPolicy | None = None, drain_timeout_s: float = 60.0) -> None:
        if not drain_timeout_s > 0:
            raise ValueError(f"drain_timeout_s must be positive, got {drain_timeout_s}")
        self.policy = policy or RatioPolicy()
        self.drain_timeout_s = drain_timeout_s
        self._controllers: dict[str, RatioController] = {}
        self.pending: dict[str, PendingSwitch] = {}

    @staticmethod
    def counts(candidates: Sequence[Candidate]) -> tuple[int, int]:
        """Routable (prefill, decode) instances."""
        n_p = sum(1 for c in candidates if c.routable and c.role == "prefill")
        n_d = sum(1 for c in candidates if c.routable and c.role == "decode")
        return n_p, n_d

    def decide(
        self, scenario: str, signal: ScenarioSignal, candidates: Sequence[Candidate]
    ) -> tuple[RatioDecision, PendingSwitch | None]:
        """The controller's decision and, when it acts, the switch to start (donor chosen)."""
        n_p, n_d = signal.n_prefill, signal.n_decode
        if scenario in self.pending:
            p = self.pending[scenario]
            return RatioDecision("none", n_p, n_d, f"switch of {p.name} in progress"), None
        if n_p < self.policy.min_prefill or n_d < self.policy.min_decode:
            # Not a ratio question: failed instances are being replaced.
            return RatioDecision("none", n_p, n_d,
                                 f"below the minimum routable 1P/1D ({n_p}P/{n_d}D)"), None
        controller = self._controllers.setdefault(scenario, RatioController(self.policy))
        decision = controller.decide(signal)
        if decision.action == "none":
            return decision, None
        from_role, to_role = (("decode", "prefill") if decision.action == "add_prefill"
                              else ("prefill", "decode"))
        view, saturated = signal.compute, self.policy.compute_busy

        def brings_nothing(c: Candidate) -> bool:
            """A donor that gives the stage no compute it lacks goes last."""
            return view is not None and saturated is not None \
                and not view.adds(c.name, to_role, saturated)

        donors = sorted((c for c in candidates if c.routable and c.role == from_role),
                        key=lambda c: (brings_nothing(c), c.in_flight, c.name))
        remaining = (n_d if from_role == "decode" else n_p) - 1
        minimum = self.policy.min_decode if from_role == "decode" else self.policy.min_prefill
        if not donors or remaining < minimum:
            return RatioDecision("none", n_p, n_d,
                                 f"no {from_role} can go without breaking the minimum"), None
        on = Counter((c.model, c.role) for c in candidates if c.routable)
        donors = [c for c in donors if not strands(c, on)]
        if not donors:
            return RatioDecision("none", n_p, n_d,
                                 f"no {from_role} can go without stranding the {to_role}s of "
                                 f"its weights (mixed weights: an upgrade in progress?); "
                                 f"{decision.reason}"), None
        switch = PendingSwitch(scenario, donors[0].name, to_role, signal.now, decision.reason)
        self.pending[scenario] = switch
        return decision, switch

    def ready(self, switch: PendingSwitch, idle: bool, now: float) -> bool:
        """Switch once the donor is idle, or when draining took too long."""
        return idle or self.timed_out(switch, now)

    def timed_out(self, switch: PendingSwitch, now: float) -> bool:
        """Draining has taken ``drain_timeout_s``: switch whatever is in flight."""
        return now - switch.started >= self.drain_timeout_s

    def switched(self, scenario: str, now: float = 0.0, in_place: bool = False) -> None:
        """The repository edit is made (the switch lasts until the instance serves),
        or the instance switched in place (it serves already)."""
        if scenario in self.pending:
            self.pending[scenario] = replace(self.pending[scenario], switched=True,
                                             in_place=in_place, switched_at=now)

    def finish(self, scenario: str, now: float | None = None) -> None:
        """The switch is over (``now``: it completed, the cool-down starts now)."""
        self.pending.pop(scenario, None)
        controller = self._controllers.get(scenario)
        if now is not None and controller is not None:
            controller.changed(now)


def strands(donor: Candidate, on: Counter[tuple[str, str]]) -> bool:
    """``donor`` is the last routable instance of its role on its weights while
    routable instances of another role run them: they could serve nothing.
    ``on``: routable instances per (weights, role)."""
    return on[(donor.model, donor.role)] == 1 and any(
        n for (model, role), n in on.items() if model == donor.model and role != donor.role)
