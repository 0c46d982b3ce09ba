"""Dynamic P/D ratio per scenario (P/D-Serve §4.1).

Each stage's capacity is P/D-Serve's ``b / T``: requests finished per second by
one instance (b requests per batch, T seconds per batch; for decode T is the
time to generate a request's output). A scenario is balanced when

    n_p * b_p / T_p  ≈  n_d * b_d / T_d

i.e. when both stages are equally utilised by the observed arrival rate. The
controller moves one instance at a time toward balance (with ``max_step``, as
many as its model predicts best, in one decision), only when that lowers the
busier stage's utilisation by more than a tolerance (hysteresis), and not
within a cool-down after the last change. An online signal backs the model
up: end-to-end latency rising while the TTFT share of it grows calls for a
prefill; rising while the share shrinks calls for a decode. The trigger
compares latencies of the SAME request mix only: when the mean prompt or output
length moves by more than ``mix_change`` (a day/night shift), E2E rises or falls
with the lengths whatever the ratio, so the baseline is taken again and the
balance rule (which measures the new mix) decides. Neither rule acts on a
window whose mix differs from the window before it: at a shift one window
holds the end of the old traffic and the start of the new (E3 switched a
decode to prefill 8 s into the output-heavy phase on such a window), so the
decision waits for a window of one mix. The window after it is the first of
one mix when it reads the new mix and the straddling one reads between the old
and the new (within ``mix_change``): a step shift, whose new mix is then judged
a window sooner. On E3's shifts the straddling window read 720/36 or 424/88
between 900/4 and 16/160, and the next one 16/160, which differs from the
straddling one and waited another window before. A scenario never drops below
one prefill and one decode.

The mix's prompt length is counted as requests arrive; the output length as
tokens are generated, so it trails a shift by a request's life: the tokens of
the old requests still decoding count with the first tokens of the new ones.
On E3's shifts the window after the mixed one read 900/7 for 900/4 (or 646/25
for 16/160), and every reaction waited a second short window. Where the router
also counts the output lengths the requests ask for as they arrive
(``ScenarioSignal.requested_tokens``), the mix takes that figure while it
predicts what the requests generate (``RatioController._asked_leads``: the
generated figure, once settled, is not more than ``mix_change`` below it). It
stops predicting when requests end at EOS well before their ``max_tokens``
(a client that always asks for 2048 tokens): after two settled windows of
that the mix goes back to the generated figure.

The online trigger picks a direction from the TTFT share, but TTFT here also
holds the router's wait for decode room: with the decodes saturated, TTFT's
share rises too, and "more prefill" would starve the stage that is short (E3,
output-heavy phase: a decode was switched to prefill and back 22 s later). So
when the window measured both stages' occupancy, a trigger that points at the
less utilised stage is overruled and the balance rule decides.

Both rules count slots, as if each instance owned its compute. Where the
window also measured the compute units each instance runs on
(``ComputeView``, ``compute.py``), a switch is refused when the stage it would
grow is already saturated (its units at least ``compute_busy`` busy) and no
donor brings a unit the stage does not run on yet, or one with room: on shared
compute that switch adds slots the stage cannot run any faster (E3 on two
cores: 1P3D no faster than 2P2D for output-heavy traffic). The loop then picks
the donor that does bring compute (``ComputeView.adds``).

Where each instance owns its compute (``ComputeView.owned``: a CPU quota each,
or a core each) a stage's utilisation is its compute's busy share, not its
slots' (``RatioController._utilisation``). Slots mislead both ways there. They
can be held by waiting rather than work (a decode slot is reserved before the
prefill), and a stage whose slots are full while its compute idles is not what
limits throughput. And they can be nearly empty while the compute is full: one
900-token prompt at a time fills a prefill's 0.4-core quota, so its 4 slots
read 0.19 busy while its compute is 0.6-0.75 busy and throttled in a third of
its periods (E3 with owned compute, 3P1D, prompt-heavy); the slot figure then
called the decode the bottleneck and moved a prefill back (3P1D -> 2P2D, "a
switch cuts the peak by 50 %"), which served no more.

Predictions keep each stage's time per request as measured at the current
ratio; where that time moves with the ratio they can point back and forth. So
the controller remembers how each ratio did with the current request mix
(``RatioController._score``) and does not switch back to one that did no better
within ``remember_s``: measured outcomes overrule the model.

Traffic mixes come back (day and night): with ``recall_s`` the controller keeps
what each ratio did with a mix for that long after the mix went away, and when
the mix returns it moves, ``max_step`` switches per window, to the ratio that
did best with it, without waiting for the balance rule to rediscover it from
the slots one prediction at a time (E3, prompt-heavy traffic back after an output-heavy
phase: 1P3D -> 3P1D took 19-32 s, two windows of prediction each). Only ratios
not yet measured since the mix returned are recalled; once the target has
windows of its own, the usual rules (and the memory above) take over. Scores
compare windows at different loads, so the recall is for mixes that return at
a similar load (a closed loop, or a similar rate); it is off by default.

The model can also under-promise: with owned compute it predicted 9 % for the
switch 2P2D -> 3P1D that measured 46 % better (E3, prompt-heavy), so the
tolerance held 2P2D for 40 s. With ``explore_gain`` a predicted cut above it
but within the tolerance tries the neighbour ratio toward the busier stage
when it has not been measured with this mix (a negative ``explore_gain`` also
tries one predicted to lose up to that much: the prediction's own error is of
that size: 2P2D -> 3P1D read 2-16 % from one window to the next), once
the current ratio has two windows of its own; after two windows there the two
means decide, and the controller goes back if the neighbour did worse
(``RatioController._explore_verdict``). A ratio tried keeps its windows for
``remember_s``, so it is not tried again until they expire.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["none", "add_prefill", "add_decode"]


@dataclass(frozen=True)
class RoleCapacity:
    """Measured capacity of one instance in one role."""

    batch_size: float  # b: requests per batch
    batch_time_s: float  # T: seconds per batch (decode: the whole output of the batch)

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.batch_time_s <= 0:
            raise ValueError(
                f"batch_size and batch_time_s must be positive, got "
                f"{self.batch_size} and {self.batch_time_s}"
            )

    @property
    def requests_per_s(self) -> float:
        return self.batch_size / self.batch_time_s


@dataclass(frozen=True)
class RatioPolicy:
    tolerance: float = 0.15  # act only when it cuts peak utilisation by this share
    # Act only when the busier stage is at least this utilised: below it neither
    # stage is the bottleneck (the CPU, the router or the clients are), so a
    # switch cannot raise throughput and costs an instance's drain and reload.
    # 0 (the default) acts on any imbalance, as the capacity model alone says.
    min_peak: float = 0.0
    cooldown_s: float = 30.0
    e2e_rise: float = 1.25  # online trigger: E2E above baseline by this factor
    share_delta: float = 0.05  # TTFT-share change that counts as rising/falling
    mix_change: float = 0.25  # relative change of mean prompt/output length: a new mix
    min_prefill: int = 1
    min_decode: int = 1
    # A stage whose compute units are this busy is saturated: a switch that
    # gives it no other unit (with room) is refused. None: count slots only.
    compute_busy: float | None = 0.85
    # A ratio measured in the last ``remember_s`` seconds with the same request mix
    # is not switched back to unless it did better than the ratio now by more than
    # ``tolerance`` (requests/s per second of E2E: ``RatioController._score``);
    # 0: predictions alone decide.
    remember_s: float = 120.0
    # What each ratio did with a mix is kept this long after the mix went away;
    # when the mix returns, the controller moves to the ratio that did best with
    # it by more than ``tolerance`` (``RatioController._recall_step``). 0: off.
    recall_s: float = 0.0
    # A switch the model predicts to cut the peak by more than this but no more
    # than ``tolerance`` is tried when its ratio has no windows with this mix, and
    # undone if it measures worse (``RatioController._explore_verdict``). Negative:
    # also a switch predicted to raise the peak by less than -explore_gain (the
    # model's error). 0: off.
    explore_gain: float = 0.0
    # Instances one decision may move. The balance rule goes to the count its model
    # predicts best within this many switches, and a recalled ratio is reached in
    # one decision: E3 with owned compute crossed 3P1D -> 1P3D in two decisions one
    # window apart, 8-12 s of a 120 s phase at a ratio serving half as much.
    # Explorations stay one switch. 1: one at a time.
    max_step: int = 1
    # After a window whose request mix was changing, the next window lasts this long
    # instead of the loop's interval (``is_mix_changing``): the shift is judged as
    # soon as a short window of one mix is in. E3 with owned compute waited a whole
    # 4 s window after the mixed one, 8 s of each ~12 s reaction. 0: off.
    mix_window_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.min_peak < 0:
            raise ValueError(f"min_peak must be >= 0, got {self.min_peak}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")
        if self.mix_change <= 0:
            raise ValueError(f"mix_change must be positive, got {self.mix_change}")
        if self.e2e_rise <= 1:
            raise ValueError(f"e2e_rise must exceed 1, got {self.e2e_rise}")
        if self.min_prefill < 1 or self.min_decode < 1:
            raise ValueError("a scenario keeps at least one prefill and one decode")
        if self.remember_s < 0:
            raise ValueError(f"remember_s must be >= 0, got {self.remember_s}")
        if self.recall_s < 0:
            raise ValueError(f"recall_s must be >= 0, got {self.recall_s}")
        if not -self.tolerance <= self.explore_gain <= self.tolerance:
            raise ValueError(f"explore_gain must be in [-tolerance, tolerance] = "
                             f"[{-self.tolerance}, {self.tolerance}], got {self.explore_gain}")
        if self.max_step < 1:
            raise ValueError(f"max_step must be >= 1, got {self.max_step}")
        if self.mix_window_s < 0:
            raise ValueError(f"mix_window_s must be >= 0, got {self.mix_window_s}")
        if self.compute_busy is not None and not 0 < self.compute_busy <= 1:
            raise ValueError(f"compute_busy must be in (0, 1] or None, got {self.compute_busy}")


@dataclass(frozen=True)
class ComputeView:
    """The compute units each routable instance runs on, and each unit's busy
    share over the window (``compute.py``)."""

    roles: Mapping[str, str] = field(default_factory=dict)  # instance -> role now
    units: Mapping[str, frozenset[str]] = field(default_factory=dict)  # instance -> units
    busy: Mapping[str, float] = field(default_factory=dict)  # unit -> busy share
    # instance -> share of each of its units that was its own process's work (it
    # leaves with it when it switches); missing: not measured, nothing subtracted
    own: Mapping[str, float] = field(default_factory=dict)

    def stage_units(self, role: str) -> frozenset[str]:
        return frozenset().union(*(self.units.get(n, frozenset())
                                   for n, r in self.roles.items() if r == role))

    def stage_busy(self, role: str) -> float | None:
        """Mean busy share of the stage's units; None unless every one was measured."""
        units = self.stage_units(role)
        if not units or any(u not in self.busy for u in units):
            return None
        return sum(self.busy[u] for u in units) / len(units)

    def owned(self) -> bool:
        """Every routable instance runs on units of its own (no unit shared by two
        instances: a CPU quota each, or one pinned core each) and every unit was
        measured: each stage's compute then moves with its instances."""
        seen: set[str] = set()
        for name in self.roles:
            units = self.units.get(name, frozenset())
            if not units or units & seen or any(u not in self.busy for u in units):
                return False
            seen |= units
        return bool(seen)

    def adds(self, donor: str, to_role: str, saturated: float) -> bool:
        """Moving ``donor`` to ``to_role`` gives that stage a unit it does not run
        on yet that is not saturated by others' work (the donor's own work leaves
        with it; unmeasured units count as room)."""
        new = self.units.get(donor, frozenset()) - self.stage_units(to_role)
        own = self.own.get(donor, 0.0)
        return any(self.busy.get(u, 0.0) - own < saturated for u in new)


@dataclass(frozen=True)
class ScenarioSignal:
    """What the controller observed for one scenario over the last window."""

    now: float
    n_prefill: int
    n_decode: int
    arrival_rate: float  # requests/s
    prefill: RoleCapacity
    decode: RoleCapacity
    e2e_s: float | None = None  # mean end-to-end latency in the window
    ttft_share: float | None = None  # mean TTFT / E2E in the window
    prompt_tokens: float | None = None  # mean prompt length of the window's requests
    output_tokens: float | None = None  # mean output length of the window's requests
    # mean output length the window's arrived requests asked for (max_tokens), if counted
    requested_tokens: float | None = None
    compute: ComputeView | None = None  # None: not measured, the rules count slots


@dataclass(frozen=True)
class RatioDecision:
    action: Action
    n_prefill: int  # the counts it leads to (``RatioPolicy.max_step``: may be several
    n_decode: int  # switches away from the signal's)
    reason: str

    @property
    def counts(self) -> tuple[int, int]:
        return self.n_prefill, self.n_decode

    def steps(self, n_prefill: int) -> int:
        """Instances it moves from a scenario with ``n_prefill`` prefills now."""
        return abs(self.n_prefill - n_prefill)


MIX_CHANGING = "request mix changing"


def is_mix_changing(decision: RatioDecision) -> bool:
    """``decision`` waits for a window of one request mix (``RatioPolicy.mix_change``)."""
    return decision.action == "none" and decision.reason.startswith(MIX_CHANGING)


def next_window_s(policy: RatioPolicy, interval_s: float, decision: RatioDecision) -> float:
    """How long the window after ``decision`` lasts: ``policy.mix_window_s`` after a
    window of a changing mix (when set and shorter), else the loop's interval."""
    if policy.mix_window_s and is_mix_changing(decision):
        return min(policy.mix_window_s, interval_s)
    return interval_s


def utilisation(signal: ScenarioSignal, n_prefill: int, n_decode: int) -> tuple[float, float]:
    """(prefill, decode) utilisation by the arrival rate with the given counts."""
    u_p = signal.arrival_rate / (n_prefill * signal.prefill.requests_per_s)
    u_d = signal.arrival_rate / (n_decode * signal.decode.requests_per_s)
    return u_p, u_d


def balanced_split(
    n_total: int, prefill: RoleCapacity, decode: RoleCapacity, policy: RatioPolicy | None = None
) -> tuple[int, int]:
    """Counts (n_p, n_d) summing to ``n_total`` that maximise end-to-end throughput."""
    policy = policy or RatioPolicy()
    if n_total < policy.min_prefill + policy.min_decode:
        raise ValueError(f"need at least {policy.min_prefill + policy.min_decode} instances")

    def throughput(n_p: int) -> tuple[float, float]:
        rate_p, rate_d = n_p * prefill.requests_per_s, (n_total - n_p) * decode.requests_per_s
        return min(rate_p, rate_d), -abs(rate_p - rate_d)

    n_p = max(range(policy.min_prefill, n_total - policy.min_decode + 1), key=throughput)
    return n_p, n_total - n_p


class RatioController:
    """Stateful per-scenario decisions: baseline latency, cool-down, hysteresis."""

    def __init__(self, policy: RatioPolicy | None = None) -> None:
        self.policy = policy or RatioPolicy()
        self._last_change = -math.inf
        self._baseline_e2e: float | None = None
        self._baseline_share: float | None = None
        self._baseline_mix: tuple[float | None, float | None] = (None, None)
        # The last window's (prompt, asked, generated) mean lengths; the mix is
        # (prompt, asked) while ``_asked_leads``, else (prompt, generated).
        self._last_lengths: tuple[float | None, float | None, float | None] = (None, None, None)
        self._asked_leads = False
        self._asked_misses = 0  # settled windows in a row where asked did not lead
        self._mix: tuple[float | None, float | None] = (None, None)  # this window's
        # The mix of the window before the last changing one (``_after_step``).
        self._pre_change: tuple[float | None, float | None] | None = None
        # (n_prefill, n_decode) -> [(when, score)] of its windows with the current mix
        self._measured: dict[tuple[int, int], list[tuple[float, float]]] = {}
        self._measured_mix: tuple[float | None, float | None] = (None, None)
        # Earlier mixes' ``_measured`` (``recall_s``), oldest first.
        self._episodes: list[tuple[tuple[float | None, float | None],
                                   dict[tuple[int, int], list[tuple[float, float]]]]] = []
        # (from, to) of a switch made to measure ``to`` (``explore_gain``), until judged
        self._explored: tuple[tuple[int, int], tuple[int, int]] | None = None

    def decide(self, signal: ScenarioSignal) -> RatioDecision:
        n_p, n_d = signal.n_prefill, signal.n_decode
        lengths = (signal.prompt_tokens, signal.requested_tokens, signal.output_tokens)
        last, self._last_lengths = self._last_lengths, lengths
        before, mix = self._mix_of(last), self._mix_of(lengths)
        if not self._differs(before, mix):
            led = self._asked_leads
            self._learn_asked_leads(last, lengths)
            mix = self._mix_of(lengths)
            if self._asked_leads and not led:
                before = self._mix_of(last)  # taking the lead: both read the same way
            # Giving it up is a change of mix when the generated figure is not what
            # was asked: what each ratio did was for the asked reading.
        self._mix = mix
        if self._differs(before, mix) and not self._after_step(before, mix):
            self._pre_change = before
            self._archive(signal.now)  # what each ratio did was for the old mix
            self._explored = None
            return RatioDecision("none", n_p, n_d,
                                 f"{MIX_CHANGING} ({_fmt_mix(before)} -> {_fmt_mix(mix)} "
                                 "tokens in/out): waiting for a window of one mix")
        self._pre_change = None
        if signal.now - self._last_change < self.policy.cooldown_s:
            return RatioDecision("none", n_p, n_d, "cooling down after the last change")
        score = self._score(signal)
        if score is not None and (self.policy.remember_s or self.policy.recall_s):
            self._remember((n_p, n_d), signal.now, score)
            self._measured_mix = mix
        measured = self._explore_verdict(signal) or self._recall_step(signal, score)
        decision = measured or self._online(signal) or self._balance(signal)
        # A ratio measured doing better (recalled, or the origin of an exploration that
        # did worse): the model's vetoes do not apply.
        if measured is None and decision.action != "none" \
                and (why := self._no_compute(signal, decision)):
            decision = RatioDecision("none", n_p, n_d, why)
        if measured is None and decision.action != "none" \
                and (why := self._did_no_better(signal, decision, score)):
            decision = RatioDecision("none", n_p, n_d, why)
        if decision.action != "none" and decision.reason.startswith("explore:"):
            self._explored = ((n_p, n_d), (decision.n_prefill, decision.n_decode))
        if decision.action != "none":
            self.changed(signal.now)
        return decision

    def changed(self, now: float) -> None:
        """A change was decided or took effect at ``now``: cool down from then."""
        self._last_change = now
        # Latency after a change is the new normal to compare against.
        self._baseline_e2e = None
        self._baseline_share = None
        self._baseline_mix = (None, None)

    def _utilisation(self, signal: ScenarioSignal, n_p: int, n_d: int) -> tuple[float, float]:
        """``utilisation`` of the slots; where the instances own their compute
        (``ComputeView.owned``) each stage's compute busy share instead, scaled by
        its instance count for a predicted ratio (a stage's work spreads over its
        instances' compute). Slots there are held by waiting (a decode slot is
        reserved before the prefill: at 2P2D with prompt-heavy traffic the decodes'
        slots read 0.91 while their compute was ~0.2 busy, and 3P1D served 12-30 %
        more) or stand empty while the compute is full (at 3P1D the prefills'
        slots read 0.19 while one 900-token prompt at a time kept their quotas
        0.6-0.75 busy)."""
        caps = self._compute_caps(signal)
        if caps is None:
            return utilisation(signal, n_p, n_d)
        busy_p, busy_d = caps
        return busy_p * signal.n_prefill / n_p, busy_d * signal.n_decode / n_d

    def _compute_caps(self, signal: ScenarioSignal) -> tuple[float, float] | None:
        """(prefill, decode) compute busy shares where the instances own their compute."""
        view = signal.compute
        if view is None or self.policy.compute_busy is None or not view.owned():
            return None
        busy_p, busy_d = view.stage_busy("prefill"), view.stage_busy("decode")
        if busy_p is None or busy_d is None:
            return None
        return busy_p, busy_d

    def _balance(self, signal: ScenarioSignal) -> RatioDecision:
        n_p, n_d = signal.n_prefill, signal.n_decode
        if signal.arrival_rate <= 0:
            return RatioDecision("none", n_p, n_d, "no traffic in the window")
        u_p, u_d = self._utilisation(signal, n_p, n_d)
        peak = max(u_p, u_d)
        of = " (owned compute)" if self._compute_caps(signal) is not None else ""
        if peak < self.policy.min_peak:
            return RatioDecision("none", n_p, n_d,
                                 f"no stage saturated: prefill {u_p:.2f}, decode {u_d:.2f}{of}")
        action: Action
        if u_p > u_d and n_d > self.policy.min_decode:
            action, room = "add_prefill", n_d - self.policy.min_decode
        elif u_d > u_p and n_p > self.policy.min_prefill:
            action, room = "add_decode", n_p - self.policy.min_prefill
        else:
            return RatioDecision("none", n_p, n_d,
                                 f"balanced: prefill {u_p:.2f}, decode {u_d:.2f}{of}")
        # The predicted cut of the peak after 1, 2, ... switches toward the busier stage.
        gains = [(peak - max(self._utilisation(signal, *_switch(action, n_p, n_d, "", k).counts)))
                 / peak for k in range(1, min(room, self.policy.max_step) + 1)]
        steps = 1 + max(range(len(gains)), key=lambda i: (gains[i], -i))  # fewest of equal ones
        if steps > 1 and gains[steps - 1] > self.policy.tolerance:
            return _switch(action, n_p, n_d,
                           f"balance rule: prefill {u_p:.2f} vs decode {u_d:.2f} utilised{of}; "
                           f"{steps} switches cut the peak by {gains[steps - 1]:.0%}", steps)
        gain = gains[0]  # otherwise one switch, explored, made or not
        if gain <= self.policy.tolerance and (why := self._explorable(signal, action, gain)):
            return _switch(action, n_p, n_d,
                           f"explore: {why}; prefill {u_p:.2f} vs decode {u_d:.2f} utilised"
                           f"{of}, the model predicts a "
                           + (f"{gain:.0%} cut of the peak" if gain >= 0 else
                              f"{-gain:.0%} rise of the peak, within its error"))
        if gain <= self.policy.tolerance:
            return RatioDecision(
                "none",
                n_p,
                n_d,
                f"within tolerance: prefill {u_p:.2f}, decode {u_d:.2f}{of}, a switch gains "
                f"{gain:.0%}",
            )
        return _switch(
            action,
            n_p,
            n_d,
            f"balance rule: prefill {u_p:.2f} vs decode {u_d:.2f} "
            f"utilised{of}; a switch cuts the peak by {gain:.0%}",
        )

    def _explorable(self, signal: ScenarioSignal, action: Action, gain: float) -> str | None:
        """Why the switch within the tolerance is worth trying (None: it is not): the
        model predicts more than ``explore_gain`` (negative: a loss smaller than
        it), the ratio it leads to has no windows with this mix, neither now nor
        from when the mix was last seen (``recall_s``: E3 with owned compute tried
        2P2D again when the prompt-heavy traffic came back, 12 s at a ratio the
        first prompt-heavy phase had measured worse), and the current ratio has
        two."""
        if not self.policy.explore_gain or not self.policy.remember_s \
                or gain <= self.policy.explore_gain or self._explored is not None:
            return None
        n_p, n_d = signal.n_prefill, signal.n_decode
        target = _switch(action, n_p, n_d, "")
        here = self._mean_score((n_p, n_d), signal.now)
        if here is None or here[1] < 2 \
                or self._mean_score((target.n_prefill, target.n_decode), signal.now):
            return None
        if self.policy.recall_s and (target.n_prefill, target.n_decode) in self._recalled(
                self._mix, signal.now):
            return None
        return (f"{target.n_prefill}P{target.n_decode}D not measured with this mix, "
                f"{n_p}P{n_d}D over {here[1]} windows")

    def _explore_verdict(self, signal: ScenarioSignal) -> RatioDecision | None:
        """Two windows after an exploring switch: back to where it came from if the
        ratio tried did worse (means over each one's windows), else keep it."""
        if self._explored is None:
            return None
        origin, tried = self._explored
        n_p, n_d = signal.n_prefill, signal.n_decode
        if (n_p, n_d) != tried:
            self._explored = None  # moved on by other means
            return None
        there = self._mean_score(tried, signal.now)
        if there is None or there[1] < 2:
            return None
        self._explored = None
        back = self._mean_score(origin, signal.now)
        if back is None or back[0] <= there[0]:
            return None
        action: Action = "add_prefill" if origin[0] > n_p else "add_decode"
        return _switch(action, n_p, n_d,
                       f"explored {n_p}P{n_d}D did worse than {origin[0]}P{origin[1]}D with "
                       f"this mix ({there[0]:.3g} requests/s per s of E2E over {there[1]} "
                       f"windows vs {back[0]:.3g} over {back[1]}): back")

    def _no_compute(self, signal: ScenarioSignal, decision: RatioDecision) -> str | None:
        """Why the switch adds no compute to a saturated stage (None: it may)."""
        view, saturated = signal.compute, self.policy.compute_busy
        if view is None or saturated is None:
            return None
        to_role, from_role = (("prefill", "decode") if decision.action == "add_prefill"
                              else ("decode", "prefill"))
        busy = view.stage_busy(to_role)
        if busy is None or busy < saturated:
            return None  # not measured, or the stage has compute to use more slots
        donors = [n for n, r in view.roles.items() if r == from_role]
        if any(view.adds(d, to_role, saturated) for d in donors):
            return None
        return (f"{to_role} compute saturated ({busy:.0%} busy on "
                f"{len(view.stage_units(to_role))} units) and no {from_role} brings a unit "
                f"with room: a switch adds slots, not compute (slot rule: {decision.reason})")

    @staticmethod
    def _score(signal: ScenarioSignal) -> float | None:
        """Requests/s per second of mean E2E: higher is better both in a closed loop
        (throughput up, so latency down: N = X * R) and under an offered rate
        (the same X, latency down)."""
        if signal.arrival_rate <= 0 or not signal.e2e_s or signal.e2e_s <= 0:
            return None
        return signal.arrival_rate / signal.e2e_s

    def _remember(self, ratio: tuple[int, int], now: float, score: float) -> None:
        """Add a window's score; those older than the memory's horizon go (a ratio
        held for days under one mix keeps only its recent windows)."""
        windows = self._measured.setdefault(ratio, [])
        windows.append((now, score))
        keep = max(self.policy.remember_s, self.policy.recall_s)
        stale = 0
        while stale < len(windows) and now - windows[stale][0] > keep:
            stale += 1
        del windows[:stale]

    MAX_EPISODES = 32  # mixes recalled at most (the oldest goes first)

    def _archive(self, now: float) -> None:
        """The mix changed: keep what each ratio did with the old one for
        ``recall_s`` (merged into an earlier episode of the same mix, the newer
        windows of a ratio replacing its older ones), then start afresh."""
        measured, self._measured = self._measured, {}
        if not self.policy.recall_s or not measured:
            return
        for mix, ratios in reversed(self._episodes):
            if not self._differs(mix, self._measured_mix):
                ratios.update(measured)
                break
        else:
            self._episodes.append((self._measured_mix, measured))
        horizon = now - self.policy.recall_s
        for _, ratios in self._episodes:
            for ratio in [r for r, w in ratios.items() if not w or w[-1][0] < horizon]:
                del ratios[ratio]
        self._episodes = [e for e in self._episodes if e[1]][-self.MAX_EPISODES:]

    def _recalled(self, mix: tuple[float | None, float | None],
                  now: float) -> dict[tuple[int, int], tuple[float, int, float]]:
        """Ratio -> (mean score, windows, age of the newest s) from an earlier
        episode of ``mix``, windows within ``recall_s``."""
        for then, ratios in reversed(self._episodes):
            if self._differs(then, mix):
                continue
            out = {}
            for ratio, windows in ratios.items():
                recent = [v for t, v in windows if now - t <= self.policy.recall_s]
                if recent:
                    out[ratio] = (sum(recent) / len(recent), len(recent), now - windows[-1][0])
            return out
        return {}

    def _recall_step(self, signal: ScenarioSignal, score: float | None) -> RatioDecision | None:
        """Up to ``max_step`` switches toward the ratio that did best with this mix
        when it was last seen (of those within ``tolerance`` of the best, the one
        with the most windows), by more than ``tolerance`` over how the current
        ratio does now. Only ratios with the same instance count and not measured
        since the mix returned: those the usual rules judge from fresh windows."""
        if not self.policy.recall_s or score is None:
            return None
        n_p, n_d = signal.n_prefill, signal.n_decode
        now_score = self._mean_score((n_p, n_d), signal.now)
        if now_score is None:
            return None
        past = {r: v for r, v in self._recalled(self._mix, signal.now).items()
                if sum(r) == n_p + n_d and r not in self._measured
                and r[0] >= self.policy.min_prefill and r[1] >= self.policy.min_decode}
        if not past:
            return None
        # Of the ratios within ``tolerance`` of the best mean, the one measured over the
        # most windows: a mean of 2 windows that beats one of 25 by less than the
        # noise is no evidence (E3 with owned compute recalled 2P2D at 194 over 2
        # windows against 3P1D's 192 over 25, and went on to 3P1D a window later).
        best = max(mean for mean, _, _ in past.values())
        target = max((r for r in past if past[r][0] * (1 + self.policy.tolerance) >= best),
                     key=lambda r: (past[r][1], past[r][0]))
        mean, windows, age = past[target]
        if mean < now_score[0] * (1 + self.policy.tolerance):
            return None
        action: Action = "add_prefill" if target[0] > n_p else "add_decode"
        steps = min(abs(target[0] - n_p), self.policy.max_step)
        return _switch(action, n_p, n_d,
                       f"recall: {target[0]}P{target[1]}D did {mean / now_score[0]:.2f}x better "
                       f"with this mix {age:.0f} s ago ({mean:.3g} requests/s per s of E2E over "
                       f"{windows} windows vs {now_score[0]:.3g} over {now_score[1]} at "
                       f"{n_p}P{n_d}D now)", steps)

    def _mean_score(self, ratio: tuple[int, int], now: float) -> tuple[float, int] | None:
        """Mean score of ``ratio``'s windows with this mix within ``remember_s``, and
        how many; None: none."""
        recent = [v for t, v in self._measured.get(ratio, ()) if now - t <= self.policy.remember_s]
        if not recent:
            return None
        return sum(recent) / len(recent), len(recent)

    def _did_no_better(self, signal: ScenarioSignal, decision: RatioDecision,
                       score: float | None) -> str | None:
        """Why the switch goes back to a ratio that did worse with this mix lately,
        or better by no more than ``tolerance`` (None: it may). The rule's
        predictions keep each stage's time per request as measured at the current
        ratio; where that time moves with the ratio they can point back and forth
        (E3 with owned compute: 2P2D -> 3P1D -> 2P2D... every window). What a ratio
        did beats what it was predicted to do. Both sides are the mean over their
        windows: one ratio's score moves ~1.5x between 4 s windows on a shared
        machine, and the last window before leaving a ratio is a slow one (that is
        why it was left), so single windows sent E3 back and forth."""
        if score is None or not self.policy.remember_s:
            return None
        then = self._mean_score((decision.n_prefill, decision.n_decode), signal.now)
        now = self._mean_score((signal.n_prefill, signal.n_decode), signal.now)
        if then is None or now is None:
            return None
        if then[0] >= now[0] * (1 + self.policy.tolerance):
            return None  # it did better by more than the noise between windows
        return (f"{decision.n_prefill}P{decision.n_decode}D did no better with this mix "
                f"lately ({then[0]:.3g} requests/s per s of E2E over {then[1]} windows vs "
                f"{now[0]:.3g} over {now[1]} at {signal.n_prefill}P{signal.n_decode}D, "
                f"{self.policy.tolerance:.0%} margin; {decision.reason})")

    def _online(self, signal: ScenarioSignal) -> RatioDecision | None:
        if signal.e2e_s is None or signal.ttft_share is None:
            return None
        mix = self._mix
        if (self._baseline_e2e is None or self._baseline_share is None
                or self._mix_changed(mix)):
            self._baseline_e2e, self._baseline_share = signal.e2e_s, signal.ttft_share
            self._baseline_mix = mix
            return None
        n_p, n_d = signal.n_prefill, signal.n_decode
        if signal.e2e_s < self._baseline_e2e * self.policy.e2e_rise:
            # Track slow drifts downward so a later rise is measured from the best seen.
            self._baseline_e2e = min(self._baseline_e2e, signal.e2e_s)
            return None
        share_change = signal.ttft_share - self._baseline_share
        rise = signal.e2e_s / self._baseline_e2e
        action: Action
        if share_change > self.policy.share_delta and n_d > self.policy.min_decode:
            action, trend = "add_prefill", "up"
        elif share_change < -self.policy.share_delta and n_p > self.policy.min_prefill:
            action, trend = "add_decode", "down"
        else:
            return None
        if signal.arrival_rate > 0:
            u_p, u_d = self._utilisation(signal, n_p, n_d)
            if (u_d > u_p) if action == "add_prefill" else (u_p > u_d):
                return None  # it points at the idler stage: the balance rule decides
        return _switch(action, n_p, n_d,
                       f"E2E up {rise:.2f}x with TTFT share {trend} {share_change:+.2f}")


    def _mix_of(self, lengths: tuple[float | None, float | None, float | None]
                ) -> tuple[float | None, float | None]:
        """(prompt, output) mean lengths of a window: the output asked for while it
        leads (``_asked_leads``), else the output generated."""
        prompt, asked, generated = lengths
        return (prompt, asked if self._asked_leads and asked is not None else generated)

    ASKED_MISSES = 2  # settled windows in a row of asked not leading that end its lead

    def _learn_asked_leads(self, last: tuple[float | None, float | None, float | None],
                           lengths: tuple[float | None, float | None, float | None]) -> None:
        """On a window of one mix whose generated output length has settled too (within
        ``mix_change`` of the window before), whether the asked length predicts it:
        the generated is not more than ``mix_change`` below it (above it is only the
        trail of longer requests that arrived earlier). A lead is taken at once and
        given up after ``ASKED_MISSES`` such windows without it."""
        _, asked, generated = lengths
        if asked is None or generated is None or last[2] is None \
                or self._differs((None, last[2]), (None, generated)):
            return
        if generated * (1 + self.policy.mix_change) >= asked:
            self._asked_leads, self._asked_misses = True, 0
            return
        self._asked_misses += 1
        if self._asked_misses >= self.ASKED_MISSES:
            self._asked_leads = False

    def _after_step(self, straddling: tuple[float | None, float | None],
                    mix: tuple[float | None, float | None]) -> bool:
        """The last window changed the mix and read between the mix before it and
        this one, which is another than the one before: the last window straddled
        a step shift, and this one is the first of the new mix."""
        before = self._pre_change
        if before is None or not self._differs(before, mix):
            return False
        for old, between, new in zip(before, straddling, mix, strict=True):
            if old is None or between is None or new is None:
                continue
            low, high = sorted((old, new))
            if not low / (1 + self.policy.mix_change) <= between \
                    <= high * (1 + self.policy.mix_change):
                return False
        return True

    def _mix_changed(self, mix: tuple[float | None, float | None]) -> bool:
        """The window's mean prompt or output length is not the baseline's."""
        return self._differs(self._baseline_mix, mix)

    def _differs(self, a: tuple[float | None, float | None],
                 b: tuple[float | None, float | None]) -> bool:
        """Mean prompt or output lengths apart by more than ``mix_change``."""
        for then, now in zip(a, b, strict=True):
            if then is None or now is None:
                continue  # not measured: compare what is
            low, high = sorted((then, now))
            if high > low * (1 + self.policy.mix_change):
                return True
        return False


def _fmt_mix(mix: tuple[float | None, float | None]) -> str:
    return "/".join("?" if v is None else f"{v:.0f}" for v in mix)


def _switch(action: Action, n_p: int, n_d: int, reason: str, steps: int = 1) -> RatioDecision:
    """``steps`` instances moved toward the stage ``action`` names."""
    if action == "add_prefill":
        return RatioDecision(action, n_p + steps, n_d - steps, reason)
    return RatioDecision(action, n_p - steps, n_d + steps, reason)
