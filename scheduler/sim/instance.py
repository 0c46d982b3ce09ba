"""One simulated instance: prefill batches and a fluid continuous decode batch.

Prefill: accepted prompts wait in ``pending`` and run in batches (up to the
profile's tokens per batch); a prompt holds its slot until its KV has left
(transfer done), as the prefill side keeps the KV until then.

Decode (continuous batching) is simulated per membership change, not per
step: between two changes the batch size B and the step time are constant,
so the batch advances a *virtual step counter* ``v`` at 1 / step_time per
second. A sequence that joins at step ceil(v) with n tokens to generate ends
when v reaches ceil(v) + n; the instance keeps those ends in a heap and
schedules one event at the earliest. Context growth (B tokens per step) is
added at each change, so the step time follows it piecewise.

    v:   0    1    2    3    4    5 ...
         |----|----|----|--|--|--|      step time falls when a sequence leaves
    A    ==========)                    A ends at v = 2
    B         ==============)           B joined at v = 1, ends at v = 4

The aggregated role mixes prefill chunks into decode steps (chunked prefill):
while prompts are in progress each step also processes ``chunk_tokens`` of
them, so the decode step slows by the chunk's prefill time.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Coroutine
from typing import Any

from pdserve.scheduler.controller.health import InstanceHealth
from pdserve.scheduler.forwarding import is_prefill_candidate, prefill_rank_key
from pdserve.scheduler.instance import InstanceLoad, Role
from pdserve.scheduler.sim.events import COMPILED, Timed, heap_pop, heap_push
from pdserve.scheduler.sim.profile import Profile

_EPS = 1e-9
# what an instance's snapshot is built from: (role, in flight, pending, KV tokens, health)
Signature = tuple[Role, int, int, int, str]
PrefillView = tuple[InstanceLoad, bool, tuple[int, int, str]]  # load, candidate, rank key
_MAX_CACHED_LOADS = 256  # per prefill instance (the local-queue baseline's queues grow)
# ``SimInstance.sig`` before its first snapshot: equal to no signature (in flight -1)
_NO_SIGNATURE: Signature = ("prefill", -1, -1, -1, "")


class SimRequest:
    __slots__ = (
        "accepted",
        "arrival",
        "backoff",
        "coro",
        "ctx",
        "deadline",
        "decode",
        "first_token",
        "hop",
        "index",
        "input_len",
        "kv_tokens",
        "output_len",
        "prefill",
        "scenario",
        "v_end",
    )

    def __init__(
        self, index: int, scenario: str, arrival: float, input_len: int, output_len: int
    ) -> None:
        self.index = index
        self.scenario = scenario
        self.arrival = arrival
        self.accepted = arrival  # when a prefill took its prompt (the router's phases)
        self.hop = 0.0  # its prefill call's way back to the router (Profile.prefill_call_s)
        self.input_len = input_len
        self.output_len = output_len
        self.kv_tokens = input_len + output_len  # reserved on decode: prompt + max tokens
        self.deadline = math.inf
        self.backoff = 0.0  # current wait between decode-choice tries
        self.coro: Coroutine[Any, Any, Any] | None = None  # its forwarding, while parked
        self.prefill: SimInstance | None = None
        self.decode: SimInstance | None = None
        self.first_token = -1.0
        self.v_end = 0.0
        self.ctx = 0  # context tokens it adds to its decode batch


class SimInstance:
    __slots__ = (
        "_decode_slots", "_kv_per_token", "_kv_total", "_prefill_loads", "_prefill_slots",
        "_typed_ends", "alive", "core", "ctx", "decode_version", "end_tuples", "ends", "epoch",
        "generation", "health", "kv_used", "load", "local_queue", "mix_extra_s",
        "mixing_until", "name", "pending", "pf_busy", "pf_in_flight", "pf_running",
        "probe_phase", "profile", "reserved", "role", "running", "scenario", "sig", "speed",
        "state", "step_s", "t_sync", "tokens", "tokens_charged", "transferring", "v",
    )

    def __init__(self, name: str, scenario: str, role: Role, profile: Profile,
                 health: InstanceHealth, probe_phase: float) -> None:
        self.name = name
        self.scenario = scenario
        self.role: Role = role
        self.profile = profile
        # the profile's figures a snapshot reads (fixed for the run)
        self._prefill_slots = profile.prefill.max_batch_size
        self._decode_slots = profile.decode.max_batch_size
        self._kv_per_token = profile.kv_bytes_per_token
        self._kv_total = profile.decode.kv_capacity_tokens * profile.kv_bytes_per_token
        self.health = health
        self.probe_phase = probe_phase
        self.alive = True
        self.epoch = 0  # bumped on failure/switch: events of an older epoch are stale
        self.generation = 0
        self.load: InstanceLoad | None = None
        self.sig: Signature = _NO_SIGNATURE  # what ``load`` was built from
        # a prefill's snapshots repeat (a few slots, no KV): built once per signature,
        # with what the forwarding policy reads of them (candidate? rank key)
        self._prefill_loads: dict[Signature, PrefillView] = {}
        self.state: Any = None  # its scenario's cluster.ScenarioState
        # prefill side
        self.pf_in_flight = 0  # accepted, not yet handed to decode
        self.pending: deque[SimRequest] = deque()
        self.pf_running: list[SimRequest] = []
        self.transferring: set[SimRequest] = set()
        self.pf_busy = False
        self.local_queue = False  # baseline: prompts queue here instead of being refused
        # decode side (fluid batch)
        self.reserved: set[SimRequest] = set()  # KV reserved, prompt not arrived yet
        self.running: set[SimRequest] = set()
        self.kv_used = 0
        self.ctx = 0.0
        self.v = 0.0
        self.t_sync = 0.0
        self.step_s = 0.0
        # the running requests' ends, a heap by (v_end, index): of ``Timed`` entries
        # (events.heap_push / heap_pop) in the native build, else of (v_end, index,
        # request) tuples for ``heapq`` (as events.EventLoop: the same order either way)
        self._typed_ends = COMPILED
        self.ends: list[Timed] = []
        self.end_tuples: list[tuple[float, int, SimRequest]] = []
        self.decode_version = 0
        self.mixing_until = -1.0  # aggregated: prefill chunks mixed into steps until then
        self.mix_extra_s = 0.0
        # shared cores (ScenarioSpec.host) only: its core, its share of it while the
        # batch runs (cores.Core sets it), and tokens made / charged to the router
        self.core: Any = None
        self.speed = 1.0
        self.tokens = 0.0
        self.tokens_charged = 0.0

    # -- what the policies see -------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self._prefill_slots if self.role == "prefill" else self._decode_slots

    @property
    def in_flight(self) -> int:
        return self.signature()[1]

    @property
    def is_routable(self) -> bool:
        return self.health.is_routable

    def signature(self) -> Signature:
        """Everything ``snapshot`` reads that changes during a run:
        (role, in flight, pending prompts, KV tokens used, health state)."""
        role = self.role
        if role != "prefill":
            n = len(self.running) + len(self.reserved)  # reserved: prompts still in prefill
        elif self.local_queue:  # queued prompts are reported as ``queued``
            n = len(self.pf_running) + len(self.transferring)
        else:
            n = self.pf_in_flight
        return (role, n, len(self.pending), self.kv_used, self.health.state)

    def snapshot(self, sig: Signature | None = None) -> InstanceLoad:
        """The ``InstanceLoad`` of ``sig`` (default: the current ``signature()``)."""
        if sig is None:
            sig = self.signature()
        if sig[0] != "prefill":
            return self._build_load(sig)
        return self.prefill_view(sig)[0]

    def prefill_view(self, sig: Signature) -> PrefillView:
        """A prefill's snapshot of ``sig`` with ``is_prefill_candidate`` and
        ``prefill_rank_key`` of it, computed once per signature."""
        view = self._prefill_loads.get(sig)
        if view is None:
            load = self._build_load(sig)
            view = (load, is_prefill_candidate(load), prefill_rank_key(load))
            if len(self._prefill_loads) < _MAX_CACHED_LOADS:
                self._prefill_loads[sig] = view
        return view

    def _build_load(self, sig: Signature) -> InstanceLoad:
        role, in_flight, pending, kv_used, state = sig
        kv_total = self._kv_total
        prefill = role == "prefill"
        return InstanceLoad(
            self.name,
            role,
            self.scenario,
            self._prefill_slots if prefill else self._decode_slots,
            min(in_flight, 1 << 30),
            pending if prefill else 0,
            0 if prefill else max(0, kv_total - kv_used * self._kv_per_token),
            0 if prefill else kv_total,
            state == "healthy" or state == "draining",
            state == "draining",
        )

    def can_decode_more(self, sig: Signature) -> bool:
        """``load.is_routable and load.free_slots > 0`` of the decode (or aggregated)
        snapshot of ``sig``, read from ``sig`` (the properties are Python calls):
        routable is healthy and not draining, the health state "healthy"; a free
        slot is fewer in flight than the decode batch size (tested equal)."""
        return sig[4] == "healthy" and sig[1] < self._decode_slots

    @property
    def is_idle(self) -> bool:
        return self.in_flight == 0 and not self.pending and not self.transferring

    # -- decode: the fluid batch ---------------------------------------------
    def sync(self, now: float) -> None:
        """Advance the virtual step counter to ``now``."""
        if self.running and self.step_s > 0:
            steps = (now - self.t_sync) / self.step_s
            self.v += steps
            self.ctx += steps * len(self.running)
            self.tokens += steps * len(self.running)
        self.t_sync = now

    def restep(self, now: float) -> None:
        extra = self.mix_extra_s if now < self.mixing_until - _EPS else 0.0
        self.step_s = self.profile.decode.step_time(len(self.running), self.ctx) + extra
        if self.speed != 1.0:  # its core is shared: a step takes 1/speed as long
            self.step_s /= self.speed

    def speed_change(self, now: float, speed: float) -> None:
        """Its core's share changed (cores.Core): re-time the batch from ``now``."""
        self.sync(now)
        self.speed = speed
        self.restep(now)

    def join(self, req: SimRequest, now: float) -> None:
        self.sync(now)
        start = math.ceil(self.v - _EPS)
        req.v_end = float(start + req.output_len - 1)  # a float attribute (native build)
        req.ctx = req.input_len + 1
        self.ctx += req.ctx
        self.running.add(req)
        if self._typed_ends:
            heap_push(self.ends, Timed(req.v_end, req.index, None, req))
        else:
            heapq.heappush(self.end_tuples, (req.v_end, req.index, req))
        self.restep(now)

    def _first_end(self) -> SimRequest | None:
        """The request of the earliest end in the heap (maybe no longer running)."""
        if self._typed_ends:
            if not self.ends:
                return None
            first: SimRequest = self.ends[0].arg
            return first
        return self.end_tuples[0][2] if self.end_tuples else None

    def _pop_first_end(self) -> SimRequest:
        if self._typed_ends:
            req: SimRequest = heap_pop(self.ends).arg
            return req
        return heapq.heappop(self.end_tuples)[2]

    def clear_ends(self) -> None:
        self.ends.clear()
        self.end_tuples.clear()

    def next_end_time(self) -> float | None:
        first = self._first_end()
        while first is not None and first not in self.running:
            self._pop_first_end()
            first = self._first_end()
        if first is None:
            return None
        return self.t_sync + max(0.0, first.v_end - self.v) * self.step_s

    def pop_finished(self, now: float) -> list[SimRequest]:
        self.sync(now)
        done = []
        first = self._first_end()
        while first is not None and first.v_end <= self.v + 1e-6:
            req = self._pop_first_end()
            first = self._first_end()
            if req in self.running:
                self.running.discard(req)
                self.ctx -= req.ctx + (req.output_len - 1)
                done.append(req)
        if not self.running:
            self.ctx = 0.0
        self.restep(now)
        return done
