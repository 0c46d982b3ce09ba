"""The controller loop: probe, replace, rebalance, publish.

Every ``probe_interval_s`` one ``tick``:

  1. read the instances and routers from the repository (role, scenario,
     generation);
  2. probe every (server, instance) and (server, router) in parallel and feed
     the health machines;
  3. replace failed instances and routers: one ``reload`` edit (fresh stub) per
     model (Triton 2.51 never starts a dead router's stub again by itself: every
     client request fails until the model is reloaded);
  4. every ``ratio_interval_s``: scrape /metrics, decide per scenario, start a
     drain-first role switch; finish switches whose donor is idle, through the
     repository (``role_switch="reload"``: Triton reloads the instance in its
     new role) or in place (``"live"``: a ``set_role`` control call; the
     instance keeps its weights and serves the new role within a second, and
     the repository keeps its home role; a reload of any kind brings that
     back). Between two
     decisions each tick samples, per scenario, the share of routable prefill
     slots in flight (from the heartbeats' loads): the prefills' utilisation;
     each decision also gets how busy the instances' compute units were over
     the window (heartbeat counters, ``compute.py``);
  5. write the state file the routers read, and the controller's metrics.

While a switch is under way, ``tick_switches`` runs every ``switch_tick_s``
between the ticks for it alone: the switch goes as soon as its donor is idle,
not at the next tick.

``tick`` and ``tick_switches`` take ``now`` and do no sleeping, so tests drive
them with a fake clock, a fake probe client and a tmp_path repository.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pdserve.scheduler.compute import busy_shares, merge_counters, own_shares
from pdserve.scheduler.controller.health import (
    HealthPolicy,
    InstanceHealth,
    ProbeClient,
    ProbeResult,
)
from pdserve.scheduler.controller.metrics import ControllerMetrics, reason_kind
from pdserve.scheduler.controller.ratio_loop import Candidate, PendingSwitch, RatioLoop
from pdserve.scheduler.controller.repository import ModelEntry, Repository
from pdserve.scheduler.controller.signals import Totals, scenario_signal, totals_from_text, window
from pdserve.scheduler.controller.state import (
    ControllerState,
    DrainRequest,
    InstanceStatus,
    read_state,
    update_state,
    with_drain,
    without_drain,
)
from pdserve.scheduler.instance import InstanceLoad
from pdserve.scheduler.ratio import ComputeView, next_window_s

log = logging.getLogger(__name__)
OWNER = "controller"
Key = tuple[str, str]  # (server, model)


@dataclass(frozen=True)
class ControllerOptions:
    servers: tuple[str, ...]
    state_path: Path
    health: HealthPolicy = field(default_factory=HealthPolicy)
    ratio_interval_s: float = 30.0
    probe_workers: int = 8
    role_switch: Literal["reload", "live"] = "reload"
    # After a switch in place the drain stays this long, so that every router has
    # heard the instance answer in its new role (router heartbeats: 0.5 s).
    live_settle_s: float = 1.0
    # While a role switch is under way the loop also runs this often for the switch
    # alone (``tick_switches``): a heartbeat of the instance it moves, the switch as
    # soon as that one is idle, the drain lifted ``live_settle_s`` after a switch in
    # place. Otherwise a drained donor waited for the next probe tick, idle or not
    # (E3 with owned compute: ~1.1 s of each decode turned prefill). 0: off,
    # switches move on at the probe ticks only.
    switch_tick_s: float = 0.25

    def __post_init__(self) -> None:
        if self.role_switch not in ("reload", "live"):
            raise ValueError(f"role_switch must be 'reload' or 'live', got {self.role_switch!r}")
        if self.live_settle_s < 0:
            raise ValueError(f"live_settle_s must be >= 0, got {self.live_settle_s}")
        if self.switch_tick_s < 0:
            raise ValueError(f"switch_tick_s must be >= 0, got {self.switch_tick_s}")
        if not self.servers:
            raise ValueError("the controller needs at least one server")
        if not self.ratio_interval_s > 0:
            raise ValueError(f"ratio_interval_s must be positive, got {self.ratio_interval_s}")
        if self.probe_workers < 1:
            raise ValueError(f"probe_workers must be >= 1, got {self.probe_workers}")


class Controller:
    def __init__(
        self,
        repository: Repository,
        probe: ProbeClient,
        options: ControllerOptions,
        *,
        ratio: RatioLoop | None = None,
        metrics: ControllerMetrics | None = None,
        scrape: Callable[[], list[str]] | None = None,
    ) -> None:
        self.repo = repository
        self.probe_client = probe
        self.options = options
        self.ratio = ratio or RatioLoop()
        self.metrics = metrics or ControllerMetrics()
        self.scrape = scrape  # /metrics pages of every server; None: no ratio loop
        self.health: dict[Key, InstanceHealth] = {}
        # The router models, kept alive the same way; not routed to, not in the state file.
        self.router_health: dict[Key, InstanceHealth] = {}
        self.routers: dict[str, ModelEntry] = {}
        self.entries: dict[str, ModelEntry] = {}
        self._last_totals: Totals | None = None
        # scenario -> busy share of the prefill slots, sampled since the last decision
        self._occupancy: dict[str, list[float]] = {}
        self._ratio_due = float("-inf")  # when the next ratio window closes
        self._last_kind: dict[str, str] = {}  # scenario -> reason kind of its last decision
        self._last_compute: dict[str, list[int]] = {}  # unit -> [busy, total] at the last window
        self._last_own: dict[str, tuple[str, int]] = {}  # instance -> (incarnation, own ticks)
        self._pool = ThreadPoolExecutor(options.probe_workers, thread_name_prefix="probe")
        self.state = ControllerState()
        self._drains: dict[str, DrainRequest] = {}
        # Instances switched in place: name -> (role now, repository generation then).
        # ``entries`` show that role; a reload (new generation) or a heartbeat in
        # another role (the stub restarted in its home role) ends the override.
        self._acting: dict[str, tuple[str, int]] = {}

    # -- the loop ----------------------------------------------------------------

    def tick(self, now: float) -> ControllerState:
        self._sync(now)
        self._probe_all(now)
        self._sample_occupancy()
        self._apply_external_drains(now)
        self._replace_failed(now)
        self._replace_failed_routers(now)
        if self.scrape is not None and now >= self._ratio_due:
            self._ratio_due = now + self.options.ratio_interval_s
            self._rebalance(now)
        self._progress_switches(now)
        return self._publish(now)

    def tick_switches(self, now: float) -> ControllerState | None:
        """Between two ticks: the role switches under way, alone. A heartbeat of each
        instance they move (its load only: the health machines count the probe
        ticks' answers, so a slow answer here marks nothing), then each switch goes
        as far as it can. None: no switch under way."""
        if not self.ratio.pending:
            return None
        keys = sorted(k for k in self.health if k[1] in self.ratio.pending)
        for key, result in zip(keys, self._pool.map(lambda k: self._probe_one(*k), keys),
                               strict=True):
            if result.ok and result.load is not None:
                self.health[key].last_load = result.load
        self._progress_switches(now)
        return self._publish(now)

    def run(self, stop: threading.Event, clock: Callable[[], float]) -> None:
        """Tick every ``probe_interval_s`` until ``stop`` is set, and every
        ``switch_tick_s`` between them for the switches under way; an error in one
        tick is logged, not fatal."""
        due = clock()
        while not stop.is_set():
            now = clock()
            try:
                if now >= due:
                    due = now + self.options.health.probe_interval_s
                    self.tick(now)
                else:
                    self.tick_switches(now)
            except Exception:
                log.exception("controller tick failed")
            if clock() >= due:  # a tick that ran past the next one's time: a full pause
                due = clock() + self.options.health.probe_interval_s
            wait = due - clock()
            if self.ratio.pending and self.options.switch_tick_s:
                wait = min(wait, self.options.switch_tick_s)
            stop.wait(max(wait, 0.0))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.probe_client.close()
        self.metrics.close()

    # -- steps -------------------------------------------------------------------

    def _sync(self, now: float) -> None:
        entries = self.repo.entries()
        self.entries = self._with_acting_roles(
            {n: e for n, e in entries.items() if e.is_instance})
        self.routers = {n: e for n, e in entries.items() if e.role == "router"}
        self._sync_health(self.health, self.entries, now)
        self._sync_health(self.router_health, self.routers, now)

    def _sync_health(self, health: dict[Key, InstanceHealth],
                     entries: dict[str, ModelEntry], now: float) -> None:
        wanted = {(s, n) for s in self.options.servers for n in entries}
        for key in set(health) - wanted:
            del health[key]
        for key in sorted(wanted - set(health)):
            h = InstanceHealth(self.options.health, now)
            h.expected_generation = entries[key[1]].generation
            health[key] = h
        for (_, name), h in health.items():
            gen = entries[name].generation
            if h.expected_generation is not None and gen > h.expected_generation:
                # Someone (a switch, an upgrade, an operator) changed the model.
                if h.state in ("healthy", "suspect"):
                    h.begin_loading(gen, now)
                h.expected_generation = gen

    def _with_acting_roles(self, entries: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        for name, (role, generation) in list(self._acting.items()):
            entry = entries.get(name)
            if entry is None or entry.generation != generation or entry.role == role:
                del self._acting[name]  # reloaded (or removed) since: its home role again
            else:
                entries[name] = entry.with_role(role)
        return entries

    def acting_role(self, name: str) -> str:
        """The role ``name`` was switched to in place ("" if it serves its home role)."""
        acting = self._acting.get(name)
        return "" if acting is None else acting[0]

    def _probe_all(self, now: float) -> None:
        keys = sorted(self.health)
        routers = sorted(self.router_health)
        results = list(self._pool.map(lambda k: self._probe_one(*k), keys))
        router_results = list(self._pool.map(lambda k: self._probe_router(*k), routers))
        for key, result in zip(keys, results, strict=True):
            self._observe(self.health[key], key, self.entries[key[1]].role, result, now)
            self._follow_served_role(key[1], result)
        for key, result in zip(routers, router_results, strict=True):
            self._observe(self.router_health[key], key, "router", result, now)

    def _observe(self, h: InstanceHealth, key: Key, role: str, result: ProbeResult,
                 now: float) -> None:
        before = h.state
        after = h.observe(result, now)
        self.metrics.probes.labels("ok" if result.ok else "fail").inc()
        if after != before:
            log.info("%s on %s: %s -> %s %s", key[1], key[0], before, after, h.last_error)
        if after == "failed" and before != "failed":
            self.metrics.failures.labels(role).inc()
        if before == "replacing" and after == "healthy":
            self.metrics.recoveries.labels(role).inc()

    def _follow_served_role(self, name: str, result: ProbeResult) -> None:
        """The instance's heartbeat says which role it serves; ``entries`` follow it.

        Switched in place by us and now answering in another role: it is back in
        its home role (Triton restarted the stub). Answering in another role than
        the repository's at the generation it loaded, not switched by us: a
        controller before this one switched it in place (this one restarted), so
        take that role over; routers then keep routing it. A heartbeat of an older
        generation is a reload not done yet, and says nothing.
        """
        load, entry = result.load, self.entries[name]
        if load is None or load.role == entry.role:
            return
        if name in self._acting:
            log.warning("%s answers as %s, not %s: back in its home role (restarted?)",
                        name, load.role, entry.role)
            del self._acting[name]
            self.entries[name] = self.repo.instances()[name]
        elif {load.role, entry.role} == {"prefill", "decode"} \
                and result.generation == entry.generation:
            log.warning("%s serves %s, its repository role is %s: switched in place before "
                        "this controller started; taking that role over", name, load.role,
                        entry.role)
            self._acting[name] = (load.role, entry.generation)
            self.entries[name] = entry.with_role(load.role)

    def _sample_occupancy(self) -> None:
        """Per scenario: prompts in flight over slots of the routable prefills now."""
        busy: dict[str, list[int]] = {}
        for (_, name), h in self.health.items():
            entry = self.entries.get(name)
            if entry is None or entry.role != "prefill" or h.last_load is None \
                    or not h.is_routable or name in self._drains:
                continue
            acc = busy.setdefault(entry.scenario, [0, 0])
            acc[0] += h.last_load.in_flight
            acc[1] += h.last_load.max_batch_size
        for scenario, (in_flight, slots) in busy.items():
            if slots > 0:
                self._occupancy.setdefault(scenario, []).append(min(in_flight / slots, 1.0))

    def occupancy(self, scenario: str) -> float | None:
        """Mean busy share of the prefill slots since the last decision, if sampled."""
        samples = self._occupancy.get(scenario)
        return sum(samples) / len(samples) if samples else None

    def _probe_one(self, server: str, model: str) -> ProbeResult:
        try:
            return self.probe_client.probe(server, model)
        except Exception as exc:  # a probe client bug must not stop the loop
            return ProbeResult(ok=False, error=f"probe raised {exc!r}")

    def _probe_router(self, server: str, model: str) -> ProbeResult:
        try:
            return self.probe_client.probe_router(server, model)
        except Exception as exc:
            return ProbeResult(ok=False, error=f"probe raised {exc!r}")

    def _apply_external_drains(self, now: float) -> None:
        """Drains by others (``pdserve upgrade``) come in through the state file."""
        drains = read_state(self.options.state_path).draining
        ours = {p.name for p in self.ratio.pending.values()}
        for name in sorted(n for n, d in drains.items() if d.owner == OWNER and n not in ours):
            # Ours but no switch of ours pending: left by a controller that
            # stopped during a drain (this one restarted); nobody else lifts it.
            log.warning("lifting the drain of %s left by an earlier controller (%s)", name,
                        drains[name].reason)
            self._lift_drain(name)
        drains = {n: d for n, d in drains.items() if d.owner != OWNER or n in ours}
        self._drains = dict(drains)
        for (_, name), h in self.health.items():
            if name in drains and h.state in ("healthy", "suspect", "loading"):
                h.begin_draining(now)
            elif name not in drains and name not in ours and h.state == "draining":
                h.end_draining(now)

    def _replace_failed(self, now: float) -> None:
        drains = {k for k, v in self._drains.items() if v.owner != OWNER}
        for name, error in _failed(self.health).items():
            if name in drains:
                continue  # its owner (an upgrade) is reloading it; not ours to touch
            if name in self.ratio.pending:
                self._abandon_switch(name, f"{name} failed while draining")
            why = f"replace failed instance: {error[:200]}"
            if acting := self.acting_role(name):
                # A fresh stub starts in the repository's role: write the role it
                # was switched to in place, so the replacement keeps the ratio.
                entry = self.repo.set_params(name, {"role": acting}, "reload",
                                             f"{why} (keeps its role {acting})")
            else:
                entry = self.repo.reload(name, reason=why)
            self._replacing(self.health, name, entry.generation, now)

    def _replace_failed_routers(self, now: float) -> None:
        """A router whose stub died: every client request fails at once ("Stub
        process 'pdserve_0_0' is not healthy") and Triton 2.51 does not start it
        again; a reload does. Its streams in flight were lost with the stub."""
        for name, error in _failed(self.router_health).items():
            entry = self.repo.reload(name, reason=f"replace failed router: {error[:200]}")
            self._replacing(self.router_health, name, entry.generation, now)

    def _replacing(self, health: dict[Key, InstanceHealth], name: str, generation: int,
                   now: float) -> None:
        """``name`` was reloaded (a generation bump): on every server, wait for it."""
        self.metrics.edits.labels("reload").inc()
        for (_, n), h in health.items():
            if n == name:
                h.begin_replacing(generation, now)

    def _rebalance(self, now: float) -> None:
        assert self.scrape is not None
        try:
            texts = self.scrape()
        except OSError as exc:
            log.warning("metrics scrape failed: %s", exc)
            return
        scenarios = sorted({e.scenario for e in self.entries.values()})
        by_instance = {n: e.scenario for n, e in self.entries.items()}
        totals = totals_from_text(texts, now, by_instance, scenarios)
        prev, self._last_totals = self._last_totals, totals
        occupancy = {s: self.occupancy(s) for s in scenarios}
        self._occupancy.clear()
        counters = merge_counters(h.last_load.compute for h in self.health.values()
                                  if h.last_load is not None)
        busy = busy_shares(self._last_compute, counters)
        own_now = self._own_ticks()
        own = own_shares(self._last_own, own_now, self._last_compute, counters,
                         {n: self._units(n) for n in own_now})
        self._last_compute, self._last_own = counters, own_now
        if prev is None:
            return
        # The next window: shorter after one whose request mix was changing
        # (``RatioPolicy.mix_window_s``), for every scenario (one scrape serves all).
        interval = self.options.ratio_interval_s
        next_s = interval
        for scenario in scenarios:
            cands = self.candidates(scenario)
            w = window(prev, totals, scenario)
            n_p, n_d = RatioLoop.counts(cands)
            batch = {r: max((self.entries[c.name].max_batch_size for c in cands if c.role == r),
                            default=1) for r in ("prefill", "decode")}
            sig = scenario_signal(w, now, n_p, n_d, batch["prefill"], batch["decode"],
                                  occupancy[scenario], self._compute_view(cands, busy, own)) \
                if w else None
            if sig is None or n_p + n_d == 0:
                self.metrics.decision(scenario, "none", "no signal in the window")
                continue
            decision, switches = self.ratio.decide(scenario, sig, cands)
            next_s = min(next_s, next_window_s(self.ratio.policy, interval, decision))
            self.metrics.decision(scenario, decision.action, decision.reason)
            kind = reason_kind(decision.reason)
            if self._last_kind.get(scenario) != kind:  # a new kind of answer: say why
                self._last_kind[scenario] = kind
                log.info("ratio %s: %s %dP%dD (%s)", scenario, decision.action,
                         decision.n_prefill, decision.n_decode, decision.reason)
            for switch in switches:
                self._start_switch(switch, now)
        self._ratio_due = now + next_s

    def _compute_view(self, cands: list[Candidate], busy: dict[str, float],
                      own: dict[str, float]) -> ComputeView | None:
        """The routable instances' compute units (from their heartbeats), how busy
        each unit was since the last window and how much of that was each instance's
        own work; None where no instance reports any."""
        units = {c.name: self._units(c.name) for c in cands if c.routable}
        if not any(units.values()):
            return None
        return ComputeView(roles={c.name: c.role for c in cands if c.routable},
                           units=units, busy=busy,
                           own={n: share for n, share in own.items() if n in units})

    def _units(self, name: str) -> frozenset[str]:
        return frozenset().union(*(h.last_load.compute for h in self._healths(name)
                                   if h.last_load is not None))

    def _own_ticks(self) -> dict[str, tuple[str, int]]:
        """instance -> (incarnation, own CPU ticks) of the instances served by one
        stub that reports them (ticks of several stubs cannot be told apart)."""
        loads: dict[str, list[InstanceLoad]] = {}
        for (_, name), h in self.health.items():  # one pass: heartbeats of every server
            loads.setdefault(name, [])
            if h.last_load is not None:
                loads[name].append(h.last_load)
        return {name: (ls[0].incarnation, ls[0].own_ticks) for name, ls in loads.items()
                if len(ls) == 1 and ls[0].own_ticks > 0}

    def candidates(self, scenario: str) -> list[Candidate]:
        out = []
        for name, entry in sorted(self.entries.items()):
            if entry.scenario != scenario:
                continue
            hs = self._healths(name)
            in_flight = sum(h.last_load.in_flight for h in hs if h.last_load is not None)
            routable = all(h.is_routable for h in hs) and name not in self._drains
            out.append(Candidate(name, entry.role, routable, in_flight, entry.model))
        return out

    def _start_switch(self, switch: PendingSwitch, now: float) -> None:
        log.info("ratio: draining %s to make it %s (%s)", switch.name, switch.to_role,
                 switch.reason)
        for h in self._healths(switch.name):
            h.begin_draining(now)
        request = DrainRequest(OWNER, f"switch to {switch.to_role}: {switch.reason}", now)
        self.state = update_state(self.options.state_path,
                                  lambda s: with_drain(s, switch.name, request))

    def _progress_switches(self, now: float) -> None:
        for name, switch in list(self.ratio.pending.items()):
            scenario = switch.scenario
            hs = self._healths(name)
            if switch.switched and switch.in_place:
                # Serving in its new role already; routers learn it at their next
                # heartbeat, so the drain is lifted a little later.
                if now - switch.switched_at >= self.options.live_settle_s:
                    self._lift_drain(switch.name)
                    self.ratio.finish(name, now)
                    log.info("ratio: %s back in routing as %s", switch.name, switch.to_role)
                continue
            if switch.switched:
                # Over when it serves in its new role (cool-down from now), or
                # when it failed to (replacement is not the ratio loop's job).
                if not hs or all(h.state == "healthy" for h in hs) \
                        or any(h.state in ("failed", "replacing") for h in hs):
                    self.ratio.finish(name, now)
                continue
            if not hs or any(h.state not in ("draining",) for h in hs):
                self._abandon_switch(name, f"{switch.name} left draining")
                continue
            if not self.ratio.ready(switch, all(h.is_idle for h in hs), now):
                continue
            role = self.entries[switch.name].role
            if not any(c.routable and c.role == role and c.name != switch.name
                       for c in self.candidates(scenario)):
                # Decided with another routable one of its role, which failed or
                # left routing during the drain: never below 1P/1D.
                self._abandon_switch(name, f"it is the last routable {role} now")
                continue
            if self.options.role_switch == "live":
                outcome = self._switch_in_place(switch)
                if outcome == "switched":
                    self.ratio.switched(name, now, in_place=True)
                    continue
                if outcome == "busy" and not self.ratio.timed_out(switch, now):
                    # Requests routed to it before the routers heard of the drain:
                    # let them finish and try again next tick, still in place.
                    continue
            if self.repo.entry(switch.name).role == switch.to_role:
                # Switched in place before (it acts in another role now): a reload
                # brings back its repository role, which is the one wanted.
                entry = self.repo.reload(switch.name, reason=f"back to {switch.to_role}: "
                                                             f"{switch.reason}")
            else:
                entry = self.repo.switch_role(switch.name, switch.to_role, reason=switch.reason)
            self.metrics.edits.labels("switch_role").inc()
            for h in hs:
                h.begin_loading(entry.generation, now)
            self._lift_drain(switch.name)
            self.ratio.switched(name)

    def _switch_in_place(self, switch: PendingSwitch) -> Literal["switched", "busy", "failed"]:
        """``set_role`` on every server (a server that switched already answers at
        once). "busy": one refused because requests are still in flight there (a
        heartbeat right after the refusal says so), so the caller waits for the
        drain; "failed": one refused or failed otherwise, and the caller falls
        back to a reload through the repository, which makes every server agree."""
        for server in self.options.servers:
            result = self._set_role(server, switch)
            if not result.ok or result.load is None or result.load.role != switch.to_role:
                busy = self._in_flight_now(server, switch.name)
                if busy:
                    log.info("ratio: %s on %s still has %d in flight; switching it to %s "
                             "once they finish", switch.name, server, busy, switch.to_role)
                    return "busy"
                # Refused while requests were in flight that have finished since (CI:
                # "has 2 requests in flight", then 0 by the heartbeat): ask once more
                # before reloading it through the repository.
                result = self._set_role(server, switch)
            if not result.ok or result.load is None or result.load.role != switch.to_role:
                log.warning("ratio: %s on %s did not switch to %s in place (%s); reloading "
                            "it through the repository", switch.name, server, switch.to_role,
                            result.error or "answered in another role")
                return "failed"
            self.health[(server, switch.name)].last_load = result.load
        entry = self.entries[switch.name]
        self._acting[switch.name] = (switch.to_role, entry.generation)
        self.entries[switch.name] = entry.with_role(switch.to_role)
        self.metrics.edits.labels("switch_role_in_place").inc()
        log.info("ratio: %s serves %s (switched in place)", switch.name, switch.to_role)
        return "switched"

    def _set_role(self, server: str, switch: PendingSwitch) -> ProbeResult:
        try:
            return self.probe_client.set_role(server, switch.name, switch.to_role)
        except Exception as exc:  # a client bug must not stop the loop
            return ProbeResult(ok=False, error=f"set_role raised {exc!r}")

    def _in_flight_now(self, server: str, name: str) -> int:
        """Requests in flight on one instance as a heartbeat says now (0 when it
        does not answer); the heartbeat also refreshes the drain's idle check."""
        try:
            result = self.probe_client.probe(server, name)
        except Exception:  # a client bug must not stop the loop
            return 0
        if not result.ok or result.load is None:
            return 0
        self.health[(server, name)].last_load = result.load
        return result.load.in_flight

    def _abandon_switch(self, name: str, why: str) -> None:
        if name in self.ratio.pending:
            log.warning("ratio: switch of %s abandoned: %s", name, why)
            self._lift_drain(name)
            self.ratio.finish(name)

    def _lift_drain(self, name: str) -> None:
        self.state = update_state(self.options.state_path,
                                  lambda s: without_drain(s, name, OWNER))

    def _healths(self, name: str) -> list[InstanceHealth]:
        return [h for (_, n), h in sorted(self.health.items()) if n == name]

    def _publish(self, now: float) -> ControllerState:
        statuses: dict[str, InstanceStatus] = {}
        for name, entry in self.entries.items():
            hs = {s: self.health[(s, name)] for s in self.options.servers}
            worst = max(hs.values(), key=lambda h: _SEVERITY[h.state])
            statuses[name] = InstanceStatus(
                role=entry.role, acting_role=self.acting_role(name),
                scenario=entry.scenario, state=worst.state,
                routable=all(h.is_routable for h in hs.values()),
                generation=entry.generation, reason=worst.last_error[:300], since=worst.since,
                servers={s: h.state for s, h in hs.items()},
            )
        ratios: dict[str, dict[str, int]] = {}
        for st in statuses.values():
            if st.routable:
                counts = ratios.setdefault(st.scenario, {"prefill": 0, "decode": 0})
                counts[st.role] = counts.get(st.role, 0) + 1

        def change(s: ControllerState) -> ControllerState:
            return ControllerState(now, statuses, ratios, s.draining)

        self.state = update_state(self.options.state_path, change)
        self.metrics.set_instances((st.role, st.state) for st in statuses.values())
        for scenario, counts in ratios.items():
            for role, n in counts.items():
                self.metrics.ratio.labels(scenario, role).set(n)
        return self.state


def _failed(health: dict[Key, InstanceHealth]) -> dict[str, str]:
    """Each failed model, by name, with the error of its first failed (server, model)."""
    failed: dict[str, str] = {}
    for (_, name), h in sorted(health.items()):
        if h.state == "failed":
            failed.setdefault(name, h.last_error)
    return failed


_SEVERITY = {"healthy": 0, "draining": 1, "loading": 2, "suspect": 3, "replacing": 4,
             "failed": 5}


def servers_of(specs: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(specs))
