"""What to simulate: scenarios with their instance counts and loads, and policies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pdserve.bench.metrics import Slo
from pdserve.scheduler.controller.health import HealthPolicy
from pdserve.scheduler.forwarding import ForwardingPolicy
from pdserve.scheduler.ratio import RatioPolicy
from pdserve.scheduler.sim.profile import TRANSFER_MODES, TransferMode
from pdserve.scheduler.sim.workload import ScenarioLoad

Admission = Literal["on_demand", "local_queue"]
RatioMode = Literal["static", "dynamic"]


@dataclass(frozen=True)
class HostCores:
    """A scenario on one small host: which cores its instances, router and client use.

    Instance k of a role runs on core ``<role>[k % len]`` (E2: ``prefill=(0,)``
    puts both prefills on core 0); ``router`` lists the cores the router and the
    load-generating client may run on (empty: any core, i.e. unpinned). Every
    core is shared by processor sharing (``cores.Core``). The router and client
    CPU work beyond the engine's is ``request_s`` per request that reaches a
    prefill (put on a router core when its prefill batch starts; nobody waits for
    it, it only takes its share of the core), ``token_s`` per streamed token
    (put there at each change of a decode batch, for the tokens made since) and
    ``sweep_s`` per sweep: each time a waiting request looks over the prefills
    again (woken by a freed slot or by its back-off), it ranks them, skips the
    full ones and tries the others, and each time a request waiting for decode
    room looks over the decodes again (a router waking a backlog of waiting
    requests keeps its core busy even though none of them is served: E2 under
    overload). ``background_s`` is work that comes every ``background_period_s``
    whatever the traffic, on the least busy of ``background_cores`` (a measuring
    tool beside the server: E1's and E2's host gauge takes ~50 ms of CPU a
    second, unpinned), from a first piece half a period in, while the run has
    anything else left to do.
    """

    prefill: tuple[int, ...] = ()
    decode: tuple[int, ...] = ()
    aggregated: tuple[int, ...] = ()
    router: tuple[int, ...] = ()
    request_s: float = 0.0
    token_s: float = 0.0
    sweep_s: float = 0.0
    background_s: float = 0.0
    background_period_s: float = 1.0
    background_cores: tuple[int, ...] = ()  # where it may run (empty: any core)

    def __post_init__(self) -> None:
        every = (self.prefill + self.decode + self.aggregated + self.router
                 + self.background_cores)
        if any(c < 0 for c in every):
            raise ValueError(f"core numbers must be >= 0, got {every}")
        if not self.request_s >= 0 or not self.token_s >= 0 or not self.sweep_s >= 0:
            raise ValueError(f"request_s, token_s and sweep_s must be >= 0, got "
                             f"{self.request_s}, {self.token_s}, {self.sweep_s}")
        if not self.background_s >= 0 or not self.background_period_s > 0:
            raise ValueError(f"background_s must be >= 0 and background_period_s > 0, got "
                             f"{self.background_s}, {self.background_period_s}")

    @property
    def num_cores(self) -> int:
        every = (self.prefill + self.decode + self.aggregated + self.router
                 + self.background_cores)
        return 1 + max(every, default=0)

    def core_of(self, role: str, k: int) -> int:
        cores: tuple[int, ...] = getattr(self, role)
        if not cores:
            raise ValueError(f"host declares no cores for role {role}")
        return cores[k % len(cores)]


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    n_prefill: int = 0
    n_decode: int = 0
    n_aggregated: int = 0
    load: ScenarioLoad | None = None  # None: fed only by a trace
    # 0: each prefill instance has its own cores. k > 0: the scenario's prefill
    # instances share k cores (pinned together, as E2 pins 2 prefills on one core):
    # a batch that starts while n prefills compute runs max(1, n / k) times longer.
    prefill_cores: int = 0
    # None: instances own their cores and the router costs no instance time. A
    # HostCores: the cores are shared as it says (supersedes ``prefill_cores``).
    host: HostCores | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("scenario name must not be empty")
        if min(self.n_prefill, self.n_decode, self.n_aggregated, self.prefill_cores) < 0:
            raise ValueError(f"scenario {self.name}: instance counts must be >= 0")
        disagg = self.n_prefill > 0 and self.n_decode > 0
        if not disagg and self.n_aggregated == 0:
            raise ValueError(
                f"scenario {self.name}: needs >= 1 prefill and >= 1 decode, or aggregated ones")
        if self.n_aggregated and (self.n_prefill or self.n_decode):
            raise ValueError(f"scenario {self.name}: mixing aggregated with P/D is not modelled")
        if self.host is not None:
            for role, n in (("prefill", self.n_prefill), ("decode", self.n_decode),
                            ("aggregated", self.n_aggregated)):
                if n and not getattr(self.host, role):
                    raise ValueError(f"scenario {self.name}: host declares no {role} cores")

    @property
    def num_instances(self) -> int:
        return self.n_prefill + self.n_decode + self.n_aggregated


@dataclass(frozen=True)
class SimConfig:
    scenarios: tuple[ScenarioSpec, ...]
    duration_s: float  # arrivals stop here; requests in flight are then let finish
    admission: Admission = "on_demand"
    transfer_mode: TransferMode = "block_free"
    ratio: RatioMode = "static"
    forwarding: ForwardingPolicy = field(default_factory=ForwardingPolicy)
    ratio_policy: RatioPolicy = field(default_factory=RatioPolicy)
    ratio_interval_s: float = 30.0
    drain_timeout_s: float = 60.0
    # A drained donor is switched in the decision's tick if idle, else at the first
    # of these checks that finds it idle (the live ``ControllerOptions.switch_tick_s``;
    # 0: at the probe ticks only, ``health.probe_interval_s``).
    switch_tick_s: float = 0.25
    health: HealthPolicy = field(default_factory=HealthPolicy)
    failures_per_hour_per_1000: float = 0.0
    slo: Slo = field(default_factory=Slo)
    seed: int = 0
    max_drain_s: float = 3600.0  # after duration_s: end of the simulation at the latest

    def __post_init__(self) -> None:
        if not self.scenarios:
            raise ValueError("at least one scenario")
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate scenario names: {names}")
        if not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.admission not in ("on_demand", "local_queue"):
            raise ValueError(f"admission must be on_demand or local_queue, got {self.admission}")
        if self.transfer_mode not in TRANSFER_MODES:
            raise ValueError(f"transfer_mode must be one of {TRANSFER_MODES}")
        if self.ratio not in ("static", "dynamic"):
            raise ValueError(f"ratio must be static or dynamic, got {self.ratio}")
        if not self.ratio_interval_s > 0 or not self.drain_timeout_s > 0:
            raise ValueError("ratio_interval_s and drain_timeout_s must be > 0")
        if self.switch_tick_s < 0:
            raise ValueError(f"switch_tick_s must be >= 0, got {self.switch_tick_s}")
        if self.failures_per_hour_per_1000 < 0 or self.max_drain_s < 0:
            raise ValueError("failure rate and max_drain_s must be >= 0")

    @property
    def num_instances(self) -> int:
        return sum(s.num_instances for s in self.scenarios)
