"""Failures, recovery and the P/D ratio, as the controller does them.

Recovery uses the controller's ``InstanceHealth`` state machine: a failed
instance keeps being routed to until a probe fails (suspect: out of routing),
is replaced after ``fail_threshold`` failed probes (``begin_replacing``,
reload for ``profile.reload_s``) and returns on the first probe that sees the
new generation. Probes of healthy instances are not simulated: an ``ok``
probe of a healthy instance leaves the state machine unchanged, so skipping
them is exact and saves 10,000 instances / 2 s of events.

The ratio uses the controller's ``RatioLoop`` (donor choice, one switch at a
time, drain, minimums) fed by ``signals.scenario_signal`` with the inputs the
live controller has: the window's TTFT/TPOT and tokens, the requests offered
(ended early included), their prompt tokens and the output tokens they ask
for (the router's counters), and
the prefills' busy share of their slots sampled every probe interval (the
heartbeats' in-flight counts), and, where the scenario's instances share a
host's cores, each core's busy share over the window (what the heartbeats'
``/proc/stat`` counters give the live controller's compute check).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from pdserve.errors import Unavailable
from pdserve.scheduler.controller.health import ProbeResult
from pdserve.scheduler.controller.ratio_loop import Candidate, PendingSwitch, RatioLoop
from pdserve.scheduler.controller.signals import Window, scenario_signal
from pdserve.scheduler.ratio import ComputeView, next_window_s
from pdserve.scheduler.sim.instance import SimInstance, SimRequest
from pdserve.scheduler.sim.workload import failure_times

if TYPE_CHECKING:
    from pdserve.scheduler.sim.cluster import Cluster, ScenarioState


class Control:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        cfg = cluster.config
        self.ratio_loop = RatioLoop(cfg.ratio_policy, cfg.drain_timeout_s)
        self.decisions: list[dict[str, object]] = []
        self.num_failures = 0
        self.num_replaced = 0
        self.detect_s: list[float] = []  # failure -> out of routing
        self.recover_s: list[float] = []  # failure -> routable again
        self._failed_at: dict[str, float] = {}
        self.fail_log: list[float] = []  # when each injected failure happened
        self._stopped = False
        self._core_busy: dict[tuple[str, int], tuple[float, float]] = {}  # -> (busy s, at)
        self._last_tick: dict[str, float] = {}  # scenario -> its last ratio tick (windows)

    def start(self) -> None:
        cfg, loop = self.c.config, self.c.loop
        for t, k in failure_times(self.c.num_instances_total, cfg.failures_per_hour_per_1000,
                                  cfg.duration_s, cfg.seed):
            inst = self.c.numbered.get(k)
            if inst is not None:  # else: another part's instance (Cluster ``part``)
                loop.at(t, self._fail_event, inst)
        if cfg.ratio == "dynamic":
            for name in self.c.scenarios:
                loop.at(cfg.ratio_interval_s, self._ratio_tick, name)
                loop.at(cfg.health.probe_interval_s, self._occupancy_tick, name)

    def stop(self) -> None:
        self._stopped = True

    # -- failures ----------------------------------------------------------------
    def _fail_event(self, inst: SimInstance) -> None:
        if not inst.alive or inst.health.state != "healthy":
            return  # already down or being switched: the injected failure is moot
        self.num_failures += 1
        self._failed_at[inst.name] = self.c.loop.now
        self.fail_log.append(self.c.loop.now)
        inst.alive = False
        self.evict(inst, "INSTANCE_FAILED")
        self._schedule_probe(inst)

    def evict(self, inst: SimInstance, kind: str) -> None:
        """Everything on ``inst`` is lost: prompts are retried elsewhere, streams end."""
        c = self.c
        inst.epoch += 1
        inst.decode_version += 1
        prompts = [*inst.pending, *inst.pf_running, *inst.transferring]
        inst.pending.clear()
        inst.pf_running = []
        inst.transferring.clear()
        inst.pf_busy = False
        inst.pf_in_flight = 0
        streams = sorted(inst.running, key=lambda r: r.index)
        reserved = sorted(inst.reserved, key=lambda r: r.index)
        inst.running.clear()
        inst.reserved.clear()
        inst.clear_ends()
        inst.kv_used = 0
        inst.ctx = 0.0
        inst.mixing_until = -1.0
        if inst.core is not None:  # shared cores: its batch no longer runs (a lost
            inst.core.set_fluid(inst, False)  # prefill job still ends, as stale)
        c.touch(inst)
        for req in streams:
            c._end(req, kind, f"{inst.name} failed while decoding")
        for req in reserved:  # their prompts are in prefill elsewhere (or here)
            req.decode = None
        for req in sorted(prompts, key=lambda r: r.index):
            req.prefill = None
            self._retry_prompt(req, inst)

    def _retry_prompt(self, req: SimRequest, inst: SimInstance) -> None:
        c = self.c
        if req.decode is None:  # decode gone too (aggregated, same instance): lost
            if req.coro is not None:
                req.coro.close()
                req.coro = None
            c._end(req, "INSTANCE_FAILED", f"{inst.name} failed during prefill")
        elif req.coro is not None:  # the router's policy tries the next prefill
            c._drive(req, req.coro, Unavailable(f"{inst.name} failed during prefill"))
        else:
            c._enqueue_local(req)

    def _schedule_probe(self, inst: SimInstance) -> None:
        interval = self.c.config.health.probe_interval_s
        now = self.c.loop.now
        k = math.floor((now - inst.probe_phase) / interval) + 1
        t = inst.probe_phase + k * interval
        if t <= now + 1e-6:  # round-off put us on this very probe again
            t += interval
        self.c.loop.at(t, self._probe, inst)

    def _probe(self, inst: SimInstance) -> None:
        c, now = self.c, self.c.loop.now
        t0 = time.perf_counter()
        result = (ProbeResult(ok=True, generation=inst.generation) if inst.alive
                  else ProbeResult(ok=False, error="heartbeat timed out"))
        was = inst.health.state
        state = inst.health.observe(result, now)
        if state == "failed":
            inst.health.begin_replacing(inst.generation + 1, now)
            c.loop.after(c.profile.reload_s, self._reloaded, inst)
        c.cost.add("health", time.perf_counter() - t0)
        if was == "healthy" and state != "healthy":
            self.detect_s.append(now - self._failed_at.get(inst.name, now))
        if state == "healthy":
            self.recover_s.append(now - self._failed_at.pop(inst.name, now))
            self.num_replaced += 1
        else:
            self._schedule_probe(inst)
        c.touch(inst)

    def _reloaded(self, inst: SimInstance) -> None:
        inst.alive = True
        inst.generation += 1

    # -- P/D ratio -----------------------------------------------------------------
    def _ratio_tick(self, scenario: str) -> None:
        c = self.c
        cfg = c.config
        if self._stopped or c.loop.now > cfg.duration_s:
            return
        sc = c.scenarios[scenario]
        seconds = c.loop.now - self._last_tick.get(scenario, 0.0)
        self._last_tick[scenario] = c.loop.now
        window, occupancy = self._take_window(sc, seconds)
        next_s = cfg.ratio_interval_s
        try:
            next_s = self._decide(scenario, sc, window, occupancy)
        finally:
            c.loop.after(next_s, self._ratio_tick, scenario)

    def _decide(self, scenario: str, sc: ScenarioState, window: Window | None,
                occupancy: float | None) -> float:
        """One ratio decision on the window just taken; returns how long the next
        window lasts (``next_window_s``)."""
        c = self.c
        cfg = c.config
        t0 = time.perf_counter()
        candidates = [Candidate(i.name, i.role, i.is_routable, i.in_flight) for i in sc.members]
        compute = self._compute_view(sc, candidates)  # every tick: the cores' next baseline
        if window is None:
            return cfg.ratio_interval_s
        n_p, n_d = RatioLoop.counts(candidates)
        signal = scenario_signal(window, c.loop.now, n_p, n_d, c.profile.prefill.max_batch_size,
                                 c.profile.decode.max_batch_size, occupancy, compute)
        if signal is None:
            return cfg.ratio_interval_s
        decision, switches = self.ratio_loop.decide(scenario, signal, candidates)
        c.cost.add("ratio", time.perf_counter() - t0)
        self.decisions.append({"t": round(float(c.loop.now), 3), "scenario": scenario,
                               "action": decision.action, "n_prefill": decision.n_prefill,
                               "n_decode": decision.n_decode, "reason": decision.reason})
        for switch in switches:
            donor = c.by_name[switch.name]
            donor.health.begin_draining(c.loop.now)
            c.touch(donor)
            c.loop.after(0.0, self._switch_check, switch)  # the decision's tick
        return next_window_s(self.ratio_loop.policy, cfg.ratio_interval_s, decision)

    def _compute_view(self, sc: ScenarioState,
                      candidates: list[Candidate]) -> ComputeView | None:
        """Shared host cores only: each routable instance's core and each core's busy
        share since the last ratio tick (None where instances own their hardware)."""
        if sc.host is None:
            return None
        now = self.c.loop.now
        busy: dict[str, float] = {}
        for core in sc.host.cores:
            # Read, not advanced: advancing would re-round the shared jobs' work.
            total = core.busy_s + (now - core.t if core.num_runnable else 0.0)
            key = (sc.spec.name, core.number)
            before = self._core_busy.get(key)
            self._core_busy[key] = (total, now)
            if before is not None and now > before[1]:
                busy[f"{sc.spec.name}/cpu{core.number}"] = (total - before[0]) / (now - before[1])
        units = {i.name: frozenset({f"{sc.spec.name}/cpu{i.core.number}"})
                 for i in sc.members if i.core is not None and i.is_routable}
        return ComputeView(roles={c.name: c.role for c in candidates if c.routable},
                           units=units, busy=busy)

    def _occupancy_tick(self, scenario: str) -> None:
        """As ``Controller._sample_occupancy``: in flight / slots of the routable prefills."""
        c = self.c
        if self._stopped or c.loop.now > c.config.duration_s:
            return
        c.loop.after(c.config.health.probe_interval_s, self._occupancy_tick, scenario)
        sc = c.scenarios[scenario]
        busy = slots = 0
        for inst in sc.members:
            if inst.role == "prefill" and inst.is_routable:
                busy += inst.in_flight
                slots += inst.max_batch_size
        if slots > 0:
            sc.win_occupancy.append(min(busy / slots, 1.0))

    def _take_window(self, sc: ScenarioState,
                     seconds: float) -> tuple[Window | None, float | None]:
        """The window of ``seconds`` since the last tick and the prefills' mean
        occupancy in it."""
        w = None
        if sc.win_first > 0 and sc.win_tpot_n > 0 and seconds > 0:
            w = Window(seconds=seconds, requests=sc.win_first,
                       ttft_s=sc.win_ttft / sc.win_first, tpot_s=sc.win_tpot / sc.win_tpot_n,
                       output_tokens=sc.win_tokens / sc.win_first,
                       offered=sc.win_offered or None,
                       prompt_tokens=sc.win_prompt / sc.win_offered if sc.win_offered else None,
                       requested_tokens=(sc.win_requested / sc.win_offered
                                         if sc.win_offered else None))
        occupancy = (sum(sc.win_occupancy) / len(sc.win_occupancy)
                     if sc.win_occupancy else None)
        sc.win_first = sc.win_tpot_n = sc.win_tokens = sc.win_offered = sc.win_prompt = 0
        sc.win_requested = 0
        sc.win_ttft = sc.win_tpot = 0.0
        sc.win_occupancy = []
        return w, occupancy

    def _switch_check(self, switch: PendingSwitch) -> None:
        c = self.c
        donor = c.by_name[switch.name]
        if donor.health.state != "draining":  # failed meanwhile: recovery owns it now
            self.ratio_loop.finish(switch.name)
            return
        if not self.ratio_loop.ready(switch, donor.is_idle, c.loop.now):
            cfg = c.config
            c.loop.after(cfg.switch_tick_s or cfg.health.probe_interval_s, self._switch_check,
                         switch)
            return
        if not donor.is_idle:
            self.evict(donor, "DRAIN_TIMEOUT")
        donor.role = "prefill" if switch.to_role == "prefill" else "decode"
        donor.epoch += 1
        donor.health.begin_loading(donor.generation + 1, c.loop.now)
        c.touch(donor)
        c.loop.after(c.profile.role_switch_s, self._switched, switch)

    def _switched(self, switch: PendingSwitch) -> None:
        c = self.c
        donor = c.by_name[switch.name]
        donor.generation += 1
        donor.health.observe(ProbeResult(ok=True, generation=donor.generation), c.loop.now)
        self.ratio_loop.finish(switch.name)
        c.touch(donor)
