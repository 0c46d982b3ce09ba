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
from pdserve.scheduler.sim.profile import Profile

_EPS = 1e-9
# what an instance's snapshot is built from: (role, in flight, pending, KV tokens, health)
Signature = tuple[Role, int, int, int, str]
PrefillView = tuple[InstanceLoad, bool, tuple[int, int, str]]  # load, candidate, rank key
_MAX_CACHED_LOADS = 256  # per prefill instance (the local-queue baseline's queues grow)


class SimRequest:
    __slots__ = (
        "arrival",
        "backoff",
        "coro",
        "ctx",
        "deadline",
        "decode",
        "first_token",
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
        "_prefill_loads", "alive", "core", "ctx", "decode_version", "ends", "epoch",
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
        self.health = health
        self.probe_phase = probe_phase
        self.alive = True
        self.epoch = 0  # bumped on failure/switch: events of an older epoch are stale
        self.generation = 0
        self.load: InstanceLoad | None = None
        self.sig: Signature | None = None  # what ``load`` was built from
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
        self.ends: list[tuple[float, int, SimRequest]] = []
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
        if self.role == "prefill":
            return self.profile.prefill.max_batch_size
        return self.profile.decode.max_batch_size

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
        per_token = self.profile.kv_bytes_per_token
        kv_total = self.profile.decode.kv_capacity_tokens * per_token
        prefill = role == "prefill"
        return InstanceLoad(
            self.name,
            role,
            self.scenario,
            self.max_batch_size,
            min(in_flight, 1 << 30),
            pending if prefill else 0,
            0 if prefill else max(0, kv_total - kv_used * per_token),
            0 if prefill else kv_total,
            state == "healthy" or state == "draining",
            state == "draining",
        )

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
        heapq.heappush(self.ends, (req.v_end, req.index, req))
        self.restep(now)

    def next_end_time(self) -> float | None:
        while self.ends and self.ends[0][2] not in self.running:
            heapq.heappop(self.ends)
        if not self.ends:
            return None
        return self.t_sync + max(0.0, self.ends[0][0] - self.v) * self.step_s

    def pop_finished(self, now: float) -> list[SimRequest]:
        self.sync(now)
        done = []
        while self.ends and self.ends[0][0] <= self.v + 1e-6:
            _, _, req = heapq.heappop(self.ends)
            if req in self.running:
                self.running.discard(req)
                self.ctx -= req.ctx + (req.output_len - 1)
                done.append(req)
        if not self.running:
            self.ctx = 0.0
        self.restep(now)
        return done
