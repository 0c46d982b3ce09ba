"""P/D ratio per scenario, applied by role switches, drain first.

Each scenario has its own ``RatioController`` (cool-down, hysteresis, online
trigger). When it asks for one more prefill (decode), the loop picks a donor:
the routable decode (prefill) of that scenario with the least in flight. The
donor is drained (no new work; in-flight requests finish), and switched
through the repository when idle or after ``drain_timeout_s``::

    decide --> pick donor --> draining ... idle or timeout --> switch_role --> loading --> healthy

A decision may move several instances (``RatioPolicy.max_step``): it picks as
many donors, least busy first, and they drain and switch side by side, so
crossing 3P1D -> 1P3D costs one drain, not two drains a window apart.

One decision's switches per scenario are in progress at a time, from the
decision until each instance is healthy in its new role (a reload takes 15-20 s
on a busy CPU; a decision made meanwhile counts the reloading instance in
neither role and switched a second instance the same way, E3), and the
cool-down runs from the last of them. A scenario never drops below
``min_prefill`` / ``min_decode`` routable instances: the donors must be
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
        self.pending: dict[str, PendingSwitch] = {}  # by instance

    @staticmethod
    def counts(candidates: Sequence[Candidate]) -> tuple[int, int]:
        """Routable (prefill, decode) instances."""
        n_p = sum(1 for c in candidates if c.routable and c.role == "prefill")
        n_d = sum(1 for c in candidates if c.routable and c.role == "decode")
        return n_p, n_d

    def decide(
        self, scenario: str, signal: ScenarioSignal, candidates: Sequence[Candidate]
    ) -> tuple[RatioDecision, tuple[PendingSwitch, ...]]:
        """The controller's decision and, when it acts, the switches to start (donors
        chosen; several where the decision moves several instances)."""
        n_p, n_d = signal.n_prefill, signal.n_decode
        if busy := self.of_scenario(scenario):
            return RatioDecision("none", n_p, n_d,
                                 f"switch of {', '.join(p.name for p in busy)} in progress"), ()
        if n_p < self.policy.min_prefill or n_d < self.policy.min_decode:
            # Not a ratio question: failed instances are being replaced.
            return RatioDecision("none", n_p, n_d,
                                 f"below the minimum routable 1P/1D ({n_p}P/{n_d}D)"), ()
        controller = self._controllers.setdefault(scenario, RatioController(self.policy))
        decision = controller.decide(signal)
        if decision.action == "none":
            return decision, ()
        from_role, to_role = (("decode", "prefill") if decision.action == "add_prefill"
                              else ("prefill", "decode"))
        view, saturated = signal.compute, self.policy.compute_busy

        def brings_nothing(c: Candidate) -> bool:
            """A donor that gives the stage no compute it lacks goes last."""
            return view is not None and saturated is not None \
                and not view.adds(c.name, to_role, saturated)

        donors = sorted((c for c in candidates if c.routable and c.role == from_role),
                        key=lambda c: (brings_nothing(c), c.in_flight, c.name))
        minimum = self.policy.min_decode if from_role == "decode" else self.policy.min_prefill
        wanted = min(decision.steps(n_p), len(donors) - minimum)
        if wanted < 1:
            return RatioDecision("none", n_p, n_d,
                                 f"no {from_role} can go without breaking the minimum"), ()
        on = Counter((c.model, c.role) for c in candidates if c.routable)
        chosen: list[Candidate] = []
        for c in donors:
            if len(chosen) == wanted:
                break
            if not strands(c, on):
                chosen.append(c)
                on[(c.model, c.role)] -= 1  # the next donor is judged without it
        if not chosen:
            return RatioDecision("none", n_p, n_d,
                                 f"no {from_role} can go without stranding the {to_role}s of "
                                 f"its weights (mixed weights: an upgrade in progress?); "
                                 f"{decision.reason}"), ()
        if len(chosen) < decision.steps(n_p):
            step = len(chosen) if decision.action == "add_prefill" else -len(chosen)
            decision = replace(decision, n_prefill=n_p + step, n_decode=n_d - step,
                               reason=f"{decision.reason} ({len(chosen)} of "
                                      f"{decision.steps(n_p)} switches: no other {from_role} "
                                      f"can go)")
        switches = tuple(PendingSwitch(scenario, c.name, to_role, signal.now, decision.reason)
                         for c in chosen)
        for switch in switches:
            self.pending[switch.name] = switch
        return decision, switches

    def of_scenario(self, scenario: str) -> list[PendingSwitch]:
        """The scenario's switches in progress."""
        return [p for p in self.pending.values() if p.scenario == scenario]

    def ready(self, switch: PendingSwitch, idle: bool, now: float) -> bool:
        """Switch once the donor is idle, or when draining took too long."""
        return idle or self.timed_out(switch, now)

    def timed_out(self, switch: PendingSwitch, now: float) -> bool:
        """Draining has taken ``drain_timeout_s``: switch whatever is in flight."""
        return now - switch.started >= self.drain_timeout_s

    def switched(self, name: str, now: float = 0.0, in_place: bool = False) -> None:
        """The repository edit for ``name`` is made (its switch lasts until it
        serves), or it switched in place (it serves already)."""
        if name in self.pending:
            self.pending[name] = replace(self.pending[name], switched=True,
                                         in_place=in_place, switched_at=now)

    def finish(self, name: str, now: float | None = None) -> None:
        """The switch of ``name`` is over (``now``: it completed, the cool-down
        starts now; with several switched by one decision, from the last)."""
        switch = self.pending.pop(name, None)
        controller = self._controllers.get(switch.scenario) if switch is not None else None
        if now is not None and controller is not None:
            controller.changed(now)


def strands(donor: Candidate, on: Counter[tuple[str, str]]) -> bool:
    """``donor`` is the last routable instance of its role on its weights while
    routable instances of another role run them: they could serve nothing.
    ``on``: routable instances per (weights, role)."""
    return on[(donor.model, donor.role)] == 1 and any(
        n for (model, role), n in on.items() if model == donor.model and role != donor.role)
