"""The simulated cluster: a request's path through the real routing policies.

    arrival -> scenario (ScenarioClassifier) -> decode choice (can_take /
    decode_rank_key, KV reserved) -> forward_on_demand (rank_prefills order,
    PrefillRejected, back-off, early intervention) or shortest_queue (the
    local-queue baseline) -> prefill batch -> KV transfer -> first token ->
    decode batch -> last token

``forward_on_demand`` is the router's own coroutine, driven here without an
event loop: its injected ``sleep`` yields a ``_Sleep`` that becomes a heap
event, and an accepted attempt parks (``_Park``) until the prompt's KV has
reached the decode instance, or raises ``Unavailable`` into the coroutine when
the prefill instance fails, which makes the policy try the next one. It gets
the router's other two arguments too: ``is_full`` (a prefill this router's
calls fill is skipped) and a slot signal (``_SlotSignal``: a request that
found every prefill full waits until a prefill call ends or its back-off runs
out, and every waiter then sweeps again, oldest first).
Recovery and the P/D ratio are in ``control``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Coroutine, Generator, Iterator
from functools import partial
from typing import Any

from pdserve.bench.records import RequestSpec
from pdserve.errors import Unavailable
from pdserve.scheduler.controller.health import InstanceHealth
from pdserve.scheduler.decode_choice import can_take, decode_rank_key
from pdserve.scheduler.forwarding import (
    PrefillRejected,
    forward_on_demand,
    is_prefill_candidate,
    prefill_rank_key,
    shortest_queue,
)
from pdserve.scheduler.instance import InstanceLoad, Role
from pdserve.scheduler.scenario import ScenarioClassifier, ScenarioRule
from pdserve.scheduler.sim.arrivals import scenario_arrivals_native
from pdserve.scheduler.sim.config import ScenarioSpec, SimConfig
from pdserve.scheduler.sim.cores import Host
from pdserve.scheduler.sim.events import EventLoop
from pdserve.scheduler.sim.index import RankedIndex, ranked_index
from pdserve.scheduler.sim.instance import SimInstance, SimRequest
from pdserve.scheduler.sim.profile import Profile
from pdserve.scheduler.sim.results import Outcomes, PolicyCost
from pdserve.scheduler.sim.workload import spec_arrivals


class _Sleep:
    __slots__ = ("delay",)

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __await__(self) -> Generator[Any, Any, None]:
        yield self


class _Park:
    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self)


_PARK = _Park()


class _SlotWait:
    """A request waiting between two sweeps (``_SlotSignal.wait``): yielded to the
    driver, which resumes it at the first slot freed or after ``delay``."""

    __slots__ = ("coro", "delay", "done", "req", "signal")

    def __init__(self, signal: _SlotSignal, delay: float) -> None:
        self.signal = signal
        self.delay = delay
        self.done = False
        self.req: SimRequest | None = None
        self.coro: Coroutine[Any, Any, Any] | None = None

    def __await__(self) -> Generator[Any, Any, None]:
        yield self


class _SlotSignal:
    """The router's ``SlotSignal`` on the simulated clock, one per scenario.

    The router passes ``forward_on_demand`` a signal that its prefill calls
    notify when they end, so a request that found every prefill full starts
    again when a slot frees, oldest waiter first, not only when its back-off
    runs out. ``Cluster._notify`` is that end here. A waiter the timeout woke
    stays in ``waiters`` (``done``) until the next notify drops it, or until the
    done ones outnumber the waiting ones (``add``), so a long spell without a
    freed slot (every prefill down) does not grow the list without bound.
    """

    __slots__ = ("num_waiting", "waiters")

    def __init__(self) -> None:
        self.waiters: list[_SlotWait] = []
        self.num_waiting = 0

    def add(self, w: _SlotWait) -> None:
        self.waiters.append(w)
        self.num_waiting += 1
        if len(self.waiters) > 2 * self.num_waiting + 64:
            self.waiters = [x for x in self.waiters if not x.done]

    def wait(self, timeout_s: float) -> _SlotWait:
        return _SlotWait(self, max(0.0, timeout_s))


def _sleep(delay: float) -> _Sleep:
    return _Sleep(delay)


class ScenarioState:
    """One scenario's instances and the structures its decisions read."""

    def __init__(self, spec: ScenarioSpec) -> None:
        self.spec = spec
        self.disaggregated = spec.n_aggregated == 0  # decodes chosen at admission
        self.prefill_cores = spec.prefill_cores
        self.members: list[SimInstance] = []
        self.loads: dict[str, InstanceLoad] = {}
        self.prefills: RankedIndex = ranked_index(prefill_rank_key)
        self.decodes: RankedIndex = ranked_index(decode_rank_key)
        # window counters for the ratio loop
        self.win_first = 0
        self.win_ttft = 0.0
        self.win_tpot = 0.0
        self.win_tpot_n = 0
        self.win_tokens = 0
        # what the live controller also reads: the router's offered-request, prompt-
        # and requested-output-token counters, and the prefills' busy slots at each
        # heartbeat
        self.win_offered = 0
        self.win_prompt = 0
        self.win_requested = 0
        self.win_occupancy: list[float] = []
        self.host: Host | None = None  # spec.host declared: its cores, shared
        self.request_s = spec.host.request_s if spec.host is not None else 0.0  # router, a prompt
        self.sweep_s = spec.host.sweep_s if spec.host is not None else 0.0  # router, a sweep
        self.slot_freed = _SlotSignal()  # the router's wake-up when a prefill call ends
        self.rng: random.Random | None = None  # prefill times drawn (Profile.prefill_cv)


class Cluster:
    def __init__(
        self,
        config: SimConfig,
        profile: Profile,
        trace: list[RequestSpec] | None = None,
        rules: tuple[ScenarioRule, ...] = (),
        part: tuple[int, int] = (0, 1),
    ) -> None:
        """``part`` (i, n): simulate only scenarios number k with k % n == i.

        Scenarios are independent P/D groups, so n processes each running one
        part give together exactly the whole run (runner.simulate_parallel):
        instance numbers, seeds and injected failures are those of the whole
        configuration, and a scenario's events keep their relative order.
        """
        i_part, n_parts = part
        if not 0 <= i_part < n_parts:
            raise ValueError(f"part must be (i, n) with 0 <= i < n, got {part}")
        self.config = config
        self.profile = profile
        self.loop = EventLoop()
        self.outcomes = Outcomes()
        self.cost = PolicyCost()
        # The router's first-token phases (its pdserve_request_*_seconds), summed over
        # the requests whose KV reached their decode: arrival to the accepted prefill
        # call (the live reserve and wait), and that call to the KV's landing.
        self.phase_n = 0
        self.phase_wait_s = 0.0
        self.phase_call_s = 0.0
        self.forward_n = 0  # prefill batches done, and their time (the live prefills'
        self.forward_s = 0.0  # pdserve_prefill_forward_seconds)
        self.scenarios: dict[str, ScenarioState] = {}
        self.instances: list[SimInstance] = []
        self.by_name: dict[str, SimInstance] = {}
        self.numbered: dict[int, SimInstance] = {}  # number in the whole configuration
        self.num_instances_total = config.num_instances
        self.scenario_numbers: dict[str, int] = {}
        self.classifier = ScenarioClassifier([s.name for s in config.scenarios], rules)
        self._trace = trace
        self._local = config.admission == "local_queue"
        self._rtt = profile.attempt_rtt_s + profile.serving_overhead_s
        self._call_s = profile.prefill_call_s
        self._pf_slots = profile.prefill.max_batch_size
        self._kv_total = profile.decode.kv_capacity_tokens * profile.kv_bytes_per_token
        # figures read per request, kept here (reading them from the frozen config and
        # profile objects is a Python attribute lookup each time in the native build)
        self._fw = config.forwarding
        self._ttft_budget_s = config.forwarding.ttft_budget_s
        self._kv_per_token = profile.kv_bytes_per_token
        self._pf = profile.prefill
        self._pf_tokens = profile.prefill.max_batch_tokens
        # lognormal with mean 1 and the profile's coefficient of variation
        self._pf_sigma = math.sqrt(math.log1p(profile.prefill_cv ** 2))
        number = 0
        for k, spec in enumerate(config.scenarios):
            if k % n_parts != i_part:
                number += spec.num_instances
                continue
            sc = ScenarioState(spec)
            if profile.prefill_cv > 0:  # per scenario: a part draws what the whole run does
                sc.rng = random.Random(config.seed * 1000003 + k + 7919)
            self.scenarios[spec.name] = sc
            self.scenario_numbers[spec.name] = k
            if spec.host is not None:
                sc.host = Host(self.loop, spec.host.num_cores, spec.host.router,
                               self._on_speed)
            roles: list[Role] = []  # built in steps: one expression types as list[str] in mypyc
            roles += ["prefill"] * spec.n_prefill
            roles += ["decode"] * spec.n_decode
            roles += ["aggregated"] * spec.n_aggregated
            for i, role in enumerate(roles):
                self._add_instance(sc, f"{spec.name}/{role[0]}{i}", role, number)
                if sc.host is not None and spec.host is not None:
                    nth = roles[:i].count(role)  # its number among the role's instances
                    self.instances[-1].core = sc.host.cores[spec.host.core_of(role, nth)]
                number += 1
        from pdserve.scheduler.sim.control import Control  # cycle: control needs Cluster

        self.control = Control(self)

    def _add_instance(self, sc: ScenarioState, name: str, role: Role, n: int) -> None:
        interval = self.config.health.probe_interval_s
        phase = ((n * 2654435761 + self.config.seed) % 1000003) / 1000003 * interval
        inst = SimInstance(name, sc.spec.name, role, self.profile,
                           InstanceHealth(self.config.health, 0.0, "healthy"), phase)
        inst.local_queue = self._local
        inst.state = sc
        self.instances.append(inst)
        self.numbered[n] = inst
        self.by_name[name] = inst
        sc.members.append(inst)
        self.touch(inst)

    # -- bookkeeping ---------------------------------------------------------
    def touch(self, inst: SimInstance) -> None:
        """Re-snapshot ``inst`` and re-rank it (call after any change the policies see).

        A change the policies cannot see (a prompt moving from waiting to running,
        a sequence from reserved to decoding) leaves the snapshot's fields equal:
        then nothing is rebuilt.
        """
        sig = inst.signature()
        old = inst.sig
        # field by field (native build: int and str tests, no tuple built or compared);
        # the counts first, which change most often
        if (sig[1] == old[1] and sig[3] == old[3] and sig[2] == old[2] and sig[0] == old[0]
                and sig[4] == old[4]):
            return
        inst.sig = sig
        role = sig[0]
        sc: ScenarioState = inst.state
        both = old[1] < 0 or old[0] != role  # new, or switched role: leave the other index
        if role == "prefill":  # the policy's view of it, cached per signature
            load, candidate, key = inst.prefill_view(sig)
            inst.load = load
            sc.loads[inst.name] = load
            sc.prefills.update(load, candidate, key)
            if both:
                sc.decodes.update(load, False)
            return
        load = inst.snapshot(sig)
        inst.load = load
        sc.loads[inst.name] = load
        if both or role == "aggregated":
            sc.prefills.update(load, is_prefill_candidate(load))
        # Only decodes with a free batch slot: ``can_take`` refuses every other
        # one, so the first that can take a request is the same as over all of
        # them (the order is the policy's), and a saturated scenario's decode
        # choice does not walk past every full instance at each retry.
        sc.decodes.update(load, inst.can_decode_more(sig))

    # -- running -------------------------------------------------------------
    def run(self) -> None:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for name, arrivals in self._arrival_streams():
            self._next_arrival((name, arrivals))
        self.control.start()
        for sc in self.scenarios.values():
            if sc.host is not None and sc.spec.host is not None and sc.spec.host.background_s > 0:
                self.loop.at(sc.spec.host.background_period_s / 2, self._background, sc)
        self.loop.run(self.config.duration_s + self.config.max_drain_s)
        self.control.stop()
        self.wall_s = time.perf_counter() - t0
        self.cpu_s = time.process_time() - cpu0

    def _background(self, sc: ScenarioState) -> None:
        """``HostCores.background_s``: one piece now, the next a period on, while
        the run has other events left (an arrival to come, a request in flight;
        past that, nothing is left to slow)."""
        host, spec = sc.host, sc.spec.host
        assert host is not None and spec is not None
        if not self.loop.pending:
            return
        host.background_job(spec.background_s, spec.background_cores)
        self.loop.after(spec.background_period_s, self._background, sc)

    def _arrival_streams(self) -> Iterator[tuple[str | None, Iterator[tuple[float, int, int]]]]:
        for name, k in self.scenario_numbers.items():
            spec = self.scenarios[name].spec
            if spec.load is not None:
                seed = self.config.seed * 1000003 + k
                # = scenario_arrivals(spec.load, duration, seed), drawn natively (tested)
                yield spec.name, scenario_arrivals_native(spec.load, self.config.duration_s,
                                                            seed)
        if self._trace is not None:
            yield None, spec_arrivals([s for s in self._trace
                                       if (s.arrival_s or 0.0) < self.config.duration_s])

    def _next_arrival(self, stream: tuple[str | None, Iterator[tuple[float, int, int]]]) -> None:
        item = next(stream[1], None)
        if item is not None:
            self.loop.at(item[0], self._arrive, (stream, item))

    def _arrive(self, arg: tuple[Any, tuple[float, int, int]]) -> None:
        stream, (t, input_len, output_len) = arg
        scenario = self.classifier.classify(stream[0], input_len)
        if scenario not in self.scenarios:  # a trace request of another part's scenario
            self._next_arrival(stream)
            return
        sc = self.scenarios[scenario]
        sc.win_offered += 1
        sc.win_prompt += input_len
        sc.win_requested += output_len  # a simulated request runs to its max_tokens
        req = SimRequest(self.outcomes.new(t, input_len, output_len), scenario, t,
                         input_len, output_len)
        req.deadline = t + self._ttft_budget_s
        self._next_arrival(stream)
        self._admit(req)

    def _admit(self, req: SimRequest) -> None:
        sc = self.scenarios[req.scenario]
        if sc.disaggregated and not self._reserve_decode(sc, req):
            # No decode has room: wait as the router does (``Router._choose``: doubling
            # back-off) while the TTFT budget allows, then end the request early. Each
            # look over the decodes is the router's work like a prefill sweep (``sweep_s``).
            if sc.host is not None:
                sc.host.router_job(sc.sweep_s)
            fw = self._fw
            req.backoff = min(max(req.backoff * 2, fw.min_backoff_s), fw.max_backoff_s)
            if self.loop.now + req.backoff < req.deadline:
                self.loop.after(req.backoff, self._admit, req)
            else:
                self._end(req, "UNAVAILABLE", "no decode instance could take the request "
                          "within its TTFT budget")
            return
        if self._local:
            self._enqueue_local(req)
            return
        c = self.cost
        t0 = time.perf_counter()
        coro = forward_on_demand(
            partial(self._sweep, sc),
            partial(self._attempt, req),
            self._fw,
            deadline=req.deadline,  # no prefill estimate: the router passes none either
            clock=self.loop.clock,
            sleep=_sleep,
            is_full=self._is_full,
            slot_freed=sc.slot_freed,
        )
        self._drive(req, coro)
        c.add("forward", time.perf_counter() - t0)

    def _reserve_decode(self, sc: ScenarioState, req: SimRequest) -> bool:
        t0 = time.perf_counter()
        need = req.kv_tokens * self._kv_per_token
        loads = sc.loads
        chosen = None
        for name in sc.decodes:  # best first: the first that can take it
            load = loads[name]
            if can_take(load, need):
                chosen = name
                break
            if load.kv_total_bytes == self._kv_total:
                # Every simulated instance has the profile's KV size, so the policy's
                # order (most free KV share first) is most free bytes first, and the
                # index holds only routable decodes with a free slot: this one lacks
                # the KV, so every one after it does too.
                break
        self.cost.add("decode_choice", time.perf_counter() - t0)
        if chosen is None:
            return False
        inst = self.by_name[chosen]
        inst.reserved.add(req)
        inst.kv_used += req.kv_tokens
        req.decode = inst
        self.touch(inst)
        return True

    def _release_decode(self, req: SimRequest) -> None:
        inst = req.decode
        if inst is not None and req in inst.reserved:
            inst.reserved.discard(req)
            inst.kv_used -= req.kv_tokens
            self.touch(inst)
        req.decode = None

    # -- on-demand forwarding ------------------------------------------------
    def _sweep(self, sc: ScenarioState) -> list[str]:
        """The prefills in the policy's order, asked once per sweep: the router's
        CPU for one (``sweep_s``) goes on its core."""
        if sc.host is not None:
            sc.host.router_job(sc.sweep_s)
        return sc.prefills.names()

    def _is_full(self, name: str) -> bool:
        """The router's ``is_full_here``: every slot holds one of its calls, so the
        instance is skipped without an attempt (one router: it knows them all)."""
        return self.by_name[name].pf_in_flight >= self._pf_slots

    def _notify(self, sc: ScenarioState) -> None:
        """A prefill call ended: every waiter sweeps again, oldest first, at this
        instant (the first takes the slot; the others find it full and wait), in
        one event after the current one (the router's loop runs them in turn)."""
        sig = sc.slot_freed
        if not sig.waiters:  # the usual case below capacity: nobody waits
            return
        waiters, sig.waiters = sig.waiters, []
        sig.num_waiting = 0
        woken = [w for w in waiters if not w.done]
        for w in woken:
            w.done = True
        if woken:
            self.loop.after(0.0, self._wake_all, woken)

    def _wake_all(self, woken: list[_SlotWait]) -> None:
        t0 = time.perf_counter()
        for w in woken:
            if w.req is not None and w.coro is not None:
                self._drive(w.req, w.coro)
        self.cost.add("forward_retry", time.perf_counter() - t0)

    def _wait_over(self, w: _SlotWait) -> None:
        """The back-off ran out before a slot freed."""
        if not w.done and w.req is not None and w.coro is not None:
            w.done = True
            w.signal.num_waiting -= 1
            self._resume((w.req, w.coro))

    async def _attempt(self, req: SimRequest, name: str) -> str:
        inst = self.by_name[name]
        # A refusal costs one round trip in reality; here it is instant (the
        # back-off between sweeps dominates), and the accepted attempt's round
        # trip is added to the first token (``_first_token``).
        if not inst.alive:
            raise Unavailable(f"{name}: instance not answering")
        if inst.pf_in_flight >= self._pf_slots or (
            inst.role == "aggregated" and not self._reserve_local(inst, req)
        ):
            raise PrefillRejected(f"{name}: no free prefill slot")
        inst.pf_in_flight += 1
        req.prefill = inst
        req.accepted = self.loop.now
        inst.pending.append(req)
        self._maybe_start_batch(inst)
        self.touch(inst)
        await _PARK  # resumed when the KV reached decode, or thrown into on failure
        return name

    def _reserve_local(self, inst: SimInstance, req: SimRequest) -> bool:
        """Aggregated role: the prompt's instance also decodes it."""
        need = req.kv_tokens * self.profile.kv_bytes_per_token
        if inst.load is None or not can_take(inst.load, need):
            return False
        inst.reserved.add(req)
        inst.kv_used += req.kv_tokens
        req.decode = inst
        return True

    def _drive(self, req: SimRequest, coro: Coroutine[Any, Any, Any],
               exc: BaseException | None = None) -> None:
        req.coro = None
        try:
            y = coro.send(None) if exc is None else coro.throw(exc)
        except StopIteration:
            self._first_token(req)
            return
        except Unavailable as e:
            self._release_decode(req)
            self._end(req, "UNAVAILABLE", str(e))
            return
        if isinstance(y, _Sleep):
            self.loop.after(y.delay, self._resume, (req, coro))
        elif isinstance(y, _SlotWait):
            y.req = req
            y.coro = coro
            y.signal.add(y)
            self.loop.after(y.delay, self._wait_over, y)
        else:
            req.coro = coro

    def _resume(self, arg: tuple[SimRequest, Coroutine[Any, Any, Any]]) -> None:
        t0 = time.perf_counter()
        self._drive(*arg)
        self.cost.add("forward_retry", time.perf_counter() - t0)

    # -- local-queue baseline --------------------------------------------------
    def _enqueue_local(self, req: SimRequest) -> None:
        sc = self.scenarios[req.scenario]
        t0 = time.perf_counter()
        try:
            name = shortest_queue(sc.loads.values())
        except Unavailable:
            name = None
        self.cost.add("shortest_queue", time.perf_counter() - t0)
        if name is None:  # every prefill of the scenario is down: wait for one
            self.loop.after(self.config.forwarding.max_backoff_s, self._enqueue_local, req)
            return
        inst = self.by_name[name]
        req.prefill = inst
        req.accepted = self.loop.now
        inst.pending.append(req)
        self._maybe_start_batch(inst)
        self.touch(inst)

    # -- prefill and transfer ------------------------------------------------
    def _maybe_start_batch(self, inst: SimInstance) -> None:
        """Start the next prefill batch if the instance is free (the caller then touches)."""
        if inst.pf_busy or not inst.pending or not inst.alive:
            return
        pf = self._pf
        slots = self._pf_slots - len(inst.transferring) if self._local else self._pf_slots
        batch: list[SimRequest] = []
        pending, max_tokens = inst.pending, self._pf_tokens
        tokens = tokens_sq = 0
        while pending and len(batch) < slots:
            nxt = pending[0].input_len
            if batch and tokens + nxt > max_tokens:
                break
            batch.append(pending.popleft())
            tokens += nxt
            tokens_sq += nxt * nxt
        if not batch:
            return
        dur = pf.batch_time(tokens, float(tokens_sq))
        sc: ScenarioState = inst.state
        if sc.rng is not None:
            sigma = self._pf_sigma
            dur *= sc.rng.lognormvariate(-sigma * sigma / 2, sigma)
        host = sc.host
        if host is not None and not (inst.role == "aggregated" and inst.running):
            # a job on its core, re-timed whenever the core's runnable count changes
            inst.pf_busy = True
            inst.pf_running = batch
            inst.core.add_job(dur, self._pf_job_done, (inst, inst.epoch, self.loop.now))
            # the router's work for these prompts: placed once the prefill is runnable
            host.router_job(sc.request_s * len(batch))
            return
        if inst.role == "aggregated":
            dur = self._mix_prefill(inst, tokens, dur)
        else:
            cores = sc.prefill_cores
            if cores:  # prefills pinned together share their cores while they compute
                busy = 1 + sum(1 for m in sc.members
                               if m.pf_busy and m is not inst and m.role == "prefill")
                dur *= max(1.0, busy / cores)
        inst.pf_busy = True
        inst.pf_running = batch
        self.loop.after(dur, self._batch_done, (inst, inst.epoch, dur))
        if host is not None:  # aggregated, mixed into its running batch
            host.router_job(sc.request_s * len(batch))

    def _mix_prefill(self, inst: SimInstance, tokens: int, prefill_s: float) -> float:
        """Chunked prefill: each chunk rides on one decode step of the running batch."""
        if not inst.running:
            return prefill_s
        n_iter = -(-tokens // self.profile.chunk_tokens)
        inst.sync(self.loop.now)
        base = self.profile.decode.step_time(len(inst.running), inst.ctx) / inst.speed
        inst.mix_extra_s = prefill_s / n_iter
        inst.mixing_until = self.loop.now + n_iter * (base + inst.mix_extra_s)
        inst.restep(self.loop.now)
        self._schedule_decode(inst)
        return inst.mixing_until - self.loop.now

    def _pf_job_done(self, arg: tuple[SimInstance, int, float]) -> None:
        inst, epoch, start = arg
        self._batch_done((inst, epoch, self.loop.now - start))

    def _batch_done(self, arg: tuple[SimInstance, int, float]) -> None:
        inst, epoch, dur = arg
        if epoch != inst.epoch:
            return
        if inst.role == "prefill":
            self.forward_n += 1
            self.forward_s += dur
        inst.pf_busy = False
        batch, inst.pf_running = inst.pf_running, []
        if inst.role == "aggregated" and inst.running:
            inst.sync(self.loop.now)
            inst.restep(self.loop.now)
            self._schedule_decode(inst)
        mode = self.config.transfer_mode
        for req in batch:
            if inst.role == "aggregated":
                t = 0.0  # the KV is already where it decodes
            else:
                t = self.profile.transfer_time(mode, req.input_len)
                if mode == "layerwise":  # all layers but the last moved during prefill
                    t = max(t / self.profile.num_layers, t - dur)
            inst.transferring.add(req)
            self.loop.after(t, self._transfer_done, (req, inst, epoch))
        self._maybe_start_batch(inst)
        self.touch(inst)

    def _transfer_done(self, arg: tuple[SimRequest, SimInstance, int]) -> None:
        req, inst, epoch = arg
        if epoch != inst.epoch:
            return
        inst.transferring.discard(req)
        call_s = self._call_s
        if call_s > 0:  # the answer's way back: the first token waits for it too
            host = inst.state.host
            req.hop = call_s if host is None else call_s * host.hop_factor()
        if not self._local:
            if call_s > 0:  # the router sees the slot free once the answer is back
                self.loop.after(req.hop, self._answered, (inst, epoch))
            else:
                inst.pf_in_flight -= 1
                self._notify(inst.state)
        req.prefill = None
        self._maybe_start_batch(inst)
        self.touch(inst)
        dec = req.decode
        if dec is None or not dec.alive or req not in dec.reserved:
            # the decode side died while this prompt was in prefill: the request is lost
            if req.coro is not None:
                req.coro.close()
                req.coro = None
            self._release_decode(req)
            self._end(req, "INSTANCE_FAILED", "decode instance failed before the KV arrived")
            return
        if req.coro is not None:
            self._drive(req, req.coro)
        else:
            self._first_token(req)

    def _answered(self, arg: tuple[SimInstance, int]) -> None:
        inst, epoch = arg
        if epoch != inst.epoch:
            return  # failed since: its slots were reset
        inst.pf_in_flight -= 1
        self._notify(inst.state)

    # -- decode ----------------------------------------------------------------
    def _first_token(self, req: SimRequest) -> None:
        """The KV landed on the decode, which goes on at once (decode_start:
        on_landing); the first token reaches the client after the prefill's
        answer came back (``req.hop``) and the fixed round trip."""
        now = self.loop.now
        req.first_token = now + req.hop + self._rtt
        dec = req.decode
        assert dec is not None and req in dec.reserved
        dec.reserved.discard(req)
        self.phase_n += 1
        self.phase_wait_s += req.accepted - req.arrival
        self.phase_call_s += now + req.hop - req.accepted
        sc = self.scenarios[req.scenario]
        sc.win_first += 1
        sc.win_ttft += req.first_token - req.arrival
        if req.output_len == 1:
            dec.kv_used -= req.kv_tokens
            self.touch(dec)
            self._finish(req, req.first_token)
            return
        dec.join(req, now)
        self.touch(dec)
        self._schedule_decode(dec)
        if dec.core is not None:
            dec.core.set_fluid(dec, True)

    def _schedule_decode(self, inst: SimInstance) -> None:
        inst.decode_version += 1
        t = inst.next_end_time()
        if t is not None:
            self.loop.at(t, self._decode_tick, (inst, inst.decode_version))

    def _decode_tick(self, arg: tuple[SimInstance, int]) -> None:
        inst, version = arg
        if version != inst.decode_version:
            return
        now = self.loop.now
        for req in inst.pop_finished(now):
            inst.kv_used -= req.kv_tokens
            # every token travels the same path as the first (self._rtt after it is made)
            self._finish(req, max(now + self._rtt, req.first_token))
        self.touch(inst)
        self._schedule_decode(inst)
        if inst.core is not None:
            self._cores_after_tick(inst)

    def _cores_after_tick(self, inst: SimInstance) -> None:
        """Shared cores: the router's work for the tokens streamed since, and the
        batch leaves its core's runnable set when it is empty."""
        host, spec_host = inst.state.host, inst.state.spec.host
        made = inst.tokens - inst.tokens_charged
        inst.tokens_charged = inst.tokens
        host.router_job(spec_host.token_s * made)
        inst.core.set_fluid(inst, bool(inst.running))

    def _on_speed(self, inst: SimInstance) -> None:
        self._schedule_decode(inst)

    def _finish(self, req: SimRequest, last: float) -> None:
        sc = self.scenarios[req.scenario]
        sc.win_tokens += req.output_len
        if req.output_len > 1:
            sc.win_tpot += (last - req.first_token) / (req.output_len - 1)
            sc.win_tpot_n += 1
        self.outcomes.ok(req.index, req.first_token, last, req.output_len)

    def _end(self, req: SimRequest, kind: str, message: str) -> None:
        first = req.first_token if req.first_token >= 0 else None
        self.outcomes.error(req.index, self.loop.now, kind, message, first)
