"""Instance configuration: config.pbtxt ``parameters`` -> one frozen dataclass.

``parse_parameters`` is the ONE place that turns the string map Triton hands a
model (``{"role": "prefill", "cpu_cores": "0-1", ...}``) into typed config;
``to_parameters`` is its inverse, used by ``repo build`` to write config.pbtxt.
Bad values raise ``ValueError`` naming the key and the value.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal, cast

Role = Literal["router", "prefill", "decode", "aggregated"]
ROLES: tuple[Role, ...] = ("router", "prefill", "decode", "aggregated")
Transport = Literal["shm", "tcp", "mooncake"]
TRANSPORTS: tuple[Transport, ...] = ("shm", "tcp", "mooncake")
SendMode = Literal["whole", "layerwise"]
SEND_MODES: tuple[SendMode, ...] = ("whole", "layerwise")
TokenChannel = Literal["unix", "tcp"]
TOKEN_CHANNELS: tuple[TokenChannel, ...] = ("unix", "tcp")
# "on_demand": a prefill accepts only with a free batch slot (P/D-Serve);
# "queue": per-prefill local FIFO up to queue_cap, shortest-queue routing (baseline only).
Admission = Literal["on_demand", "queue"]
ADMISSIONS: tuple[Admission, ...] = ("on_demand", "queue")
# When a decode starts a sequence: as soon as its KV landed (the prefill's first
# token and sampler state come with the transfer's completion), or when the
# router's commit arrives after the prefill answered it (one more round trip).
DecodeStart = Literal["on_landing", "on_commit"]
DECODE_STARTS: tuple[DecodeStart, ...] = ("on_landing", "on_commit")
# Parameters that exist only to make Triton's poll mode reload a model (the
# controller bumps "generation" on every reload/replace/role switch/upgrade);
# accepted, never read.
RELOAD_ONLY_KEYS = frozenset({"generation"})

# The Python backend runs every BLS call a stub makes AND every response the stub
# sends on one thread pool per model instance (``thread-pool-size``, 32 unless set).
# A decoupled BLS call holds a pool thread until its callee answers, so a router
# with more calls waiting than the pool has threads (prefill calls queued at a
# local-queue baseline, or many prefill slots) stalls its own response sends: each
# waits for some prefill to answer. Measured on E2 (2026-12-06): at 2x the prefill
# capacity, ~20 ms a send and tokens in bursts (TPOT p50 0.9 ms, TTFT p50 10.0 s),
# against 27 ms and 7.1 s with room in the pool. The launcher sizes the pool
# (``pdserve serve --pool-threads``) and tells the stubs (``POOL_ENV``); a router
# keeps its calls at once ``POOL_RESERVE`` below it (``bls_threads``).
POOL_ENV = "PDSERVE_POOL_THREADS"
RUNTIME_DIR_ENV = "PDSERVE_RUNTIME_DIR"  # where stubs keep sockets (removed on stop)
# Written into the runtime dir by the launcher just before it stops tritonserver:
# routers then send no more heartbeats (``server_stopping``).
STOPPING_MARKER = "stopping"
TRITON_POOL_DEFAULT = 32
POOL_RESERVE = 16  # pool threads kept free for the router's response sends


def parse_cpu_cores(spec: str) -> tuple[int, ...]:
    """``"0"``, ``"0-3"``, ``"0,2-3"`` -> sorted unique core ids."""
    cores: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"cpu_cores {spec!r} has an empty entry")
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"cpu_cores {spec!r}: {part!r} is not N or N-M") from None
        if first < 0 or last < first:
            raise ValueError(f"cpu_cores {spec!r}: bad range {part!r}")
        cores.update(range(first, last + 1))
    return tuple(sorted(cores))


def format_cpu_cores(cores: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cores)


@dataclass(frozen=True)
class Route:
    """Where the router sends one scenario: P and D instances, or aggregated ones."""

    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    aggregated: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        disaggregated = bool(self.prefill) and bool(self.decode)
        if disaggregated == bool(self.aggregated):
            raise ValueError(
                "a route needs prefill AND decode instances, or aggregated ones only; got "
                f"prefill={list(self.prefill)} decode={list(self.decode)} "
                f"aggregated={list(self.aggregated)}"
            )

    @property
    def is_aggregated(self) -> bool:
        return bool(self.aggregated)

    def to_json(self) -> dict[str, list[str]]:
        keys = ("prefill", "decode", "aggregated")
        return {k: list(getattr(self, k)) for k in keys if getattr(self, k)}

    @classmethod
    def from_json(cls, raw: object) -> Route:
        if not isinstance(raw, dict) or set(raw) - {"prefill", "decode", "aggregated"}:
            raise ValueError(f"route must map prefill/decode/aggregated to names, got {raw!r}")
        lists = {}
        for key, names in raw.items():
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"route {key!r} must be a list of model names, got {names!r}")
            lists[key] = tuple(names)
        return cls(**lists)


@dataclass(frozen=True)
class InstanceConfig:
    """Everything one Triton model instance of pdserve needs to start."""

    name: str
    role: Role
    scenario: str = "default"
    model: str = "tiny"  # built-in preset name or a checkpoint directory
    dtype: str = "float32"
    device: str = "cpu"
    cpu_cores: tuple[int, ...] | None = None  # None: leave affinity alone
    # cores of CPU time this instance may use (a cgroup of its own, roles/cpu_quota.py):
    # the instance owns that much compute as it would own a device; None: no limit
    cpu_quota: float | None = None
    num_threads: int | None = None  # None: one per usable core
    max_batch_size: int = 32  # prefill: concurrent prompts; decode: running batch
    max_step_tokens: int = 2048  # aggregated/decode: tokens per batcher step
    kv_capacity_bytes: int = 256 << 20
    # prefill/decode/aggregated: prompt tokens of the request run once at load, before
    # the instance is ready, so its first client request does not pay the first forward
    # pass's one-time costs (roles.instance.warm_up); 0: no warm-up
    warmup_tokens: int = 16
    kv_transport: Transport = "shm"
    kv_send_mode: SendMode = "whole"
    decode_start: DecodeStart = "on_landing"  # prefill: see DECODE_STARTS
    kv_ttl_s: float = 30.0
    kv_secret: str = "pdserve-local"  # shared by every instance of one deployment
    max_tokens_limit: int = 1024  # router: largest max_tokens a client may ask for
    ttft_budget_s: float = 30.0  # router: how long a request may look for a prefill slot
    stream_threads: int = 512  # router: threads that iterate BLS response streams
    # router: how instances send it tokens; "unix" (one host, 0700 dir) or "tcp"
    # (across hosts, HMAC handshake with kv_secret), listening on token_host
    token_channel: TokenChannel = "unix"
    token_host: str = "127.0.0.1"
    admission: Admission = "on_demand"
    queue_cap: int = 0  # prefill, admission "queue": prompts waiting beyond the running batch
    routes: Mapping[str, Route] = field(default_factory=dict)  # router only

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {TRANSPORTS}, got {self.kv_transport!r}")
        if self.token_channel not in TOKEN_CHANNELS:
            raise ValueError(
                f"token_channel must be one of {TOKEN_CHANNELS}, got {self.token_channel!r}")
        if not self.token_host:
            raise ValueError("token_host must not be empty")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")
        if self.queue_cap < 0:
            raise ValueError(f"queue_cap must be >= 0, got {self.queue_cap}")
        if self.warmup_tokens < 0:
            raise ValueError(f"warmup_tokens must be >= 0, got {self.warmup_tokens}")
        if self.admission == "on_demand" and self.queue_cap:
            raise ValueError("queue_cap needs admission 'queue' (on-demand prefills never queue)")
        if self.decode_start not in DECODE_STARTS:
            raise ValueError(
                f"decode_start must be one of {DECODE_STARTS}, got {self.decode_start!r}")
        if self.kv_send_mode not in SEND_MODES:
            raise ValueError(f"kv_send_mode must be one of {SEND_MODES}, got {self.kv_send_mode!r}")
        for key in ("max_batch_size", "max_step_tokens", "kv_capacity_bytes", "max_tokens_limit",
                    "stream_threads"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("kv_ttl_s", "ttft_budget_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")
        if self.cpu_cores is not None and not self.cpu_cores:
            raise ValueError("cpu_cores must not be empty")
        if self.cpu_quota is not None:
            if not 0.01 <= self.cpu_quota <= 1024:
                raise ValueError(f"cpu_quota must be between 0.01 and 1024 cores, "
                                 f"got {self.cpu_quota}")
            if self.role == "router":
                raise ValueError("cpu_quota is for prefill, decode and aggregated instances")
        if self.role == "router":
            if not self.routes:
                raise ValueError("a router needs 'routes' (scenario -> instances)")
            if "default" not in self.routes:
                raise ValueError(
                    f"routes must include a 'default' scenario, got {sorted(self.routes)}"
                )

    @property
    def threads(self) -> int:
        """Torch threads: explicit, else one per pinned (or usable) core, at most one
        per whole core of the CPU quota (rounded up)."""
        if self.num_threads is not None:
            return self.num_threads
        cores = len(self.cpu_cores) if self.cpu_cores is not None else len(os.sched_getaffinity(0))
        if self.cpu_quota is not None:
            cores = min(cores, math.ceil(self.cpu_quota))
        return cores

    @property
    def instance_names(self) -> tuple[str, ...]:
        """Every instance a router may call, in route order."""
        names: list[str] = []
        for route in self.routes.values():
            for n in (*route.prefill, *route.decode, *route.aggregated):
                if n not in names:
                    names.append(n)
        return tuple(names)


_INT_KEYS = ("num_threads", "max_batch_size", "max_step_tokens", "kv_capacity_bytes",
             "max_tokens_limit", "stream_threads", "queue_cap", "warmup_tokens")
_FLOAT_KEYS = ("kv_ttl_s", "ttft_budget_s")
_KNOWN = {f.name for f in fields(InstanceConfig)} - {"name"}


def parse_parameters(name: str, params: Mapping[str, str]) -> InstanceConfig:
    """The config.pbtxt ``parameters`` of model ``name`` -> ``InstanceConfig``."""
    params = {k: v for k, v in params.items() if k not in RELOAD_ONLY_KEYS}
    unknown = sorted(set(params) - _KNOWN)
    if unknown:
        raise ValueError(f"model {name!r}: unknown parameters {unknown}; known: {sorted(_KNOWN)}")
    kw: dict[str, object] = {}
    for key, raw in params.items():
        value = raw.strip()
        if key in _INT_KEYS:
            try:
                kw[key] = int(value)
            except ValueError:
                raise ValueError(f"model {name!r}: {key} must be an integer, got {raw!r}") from None
        elif key in _FLOAT_KEYS:
            try:
                kw[key] = float(value)
            except ValueError:
                raise ValueError(f"model {name!r}: {key} must be a number, got {raw!r}") from None
        elif key == "cpu_cores":
            kw[key] = parse_cpu_cores(value) if value else None
        elif key == "cpu_quota":
            try:
                kw[key] = float(value) if value else None
            except ValueError:
                raise ValueError(f"model {name!r}: cpu_quota must be a number of cores, "
                                 f"got {raw!r}") from None
        elif key == "routes":
            kw[key] = _parse_routes(name, value)
        else:
            kw[key] = value
    if "role" not in kw:
        raise ValueError(f"model {name!r}: parameter 'role' is required (one of {ROLES})")
    kw["role"] = cast(Role, kw["role"])
    try:
        return InstanceConfig(name=name, **kw)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None


def server_stopping(env: Mapping[str, str] | None = None) -> bool:
    """Whether the launcher is stopping this stub's server. A router's heartbeat
    call that is still out when Triton unloads the instance it asks never
    returns (2.51), and tritonserver then died with SIGSEGV in the router's
    instance finalize at stop (2 of 18 servers of one test suite run)."""
    env = os.environ if env is None else env
    runtime = env.get(RUNTIME_DIR_ENV, "")
    return bool(runtime) and os.path.exists(os.path.join(runtime, STOPPING_MARKER))


def pool_threads(env: Mapping[str, str] | None = None) -> int:
    """The Python backend's thread pool of this model instance: what the launcher
    set (``POOL_ENV``), else Triton's default."""
    env = os.environ if env is None else env
    raw = env.get(POOL_ENV, "")
    if not raw:
        return TRITON_POOL_DEFAULT
    try:
        threads = int(raw)
    except ValueError:
        raise ValueError(f"{POOL_ENV} must be an integer, got {raw!r}") from None
    if threads <= POOL_RESERVE:
        raise ValueError(f"{POOL_ENV} must be above {POOL_RESERVE}, got {threads}")
    return threads


def bls_threads(stream_threads: int, pool_threads: int) -> int:
    """How many BLS calls a router may have waiting at once: ``stream_threads``, but
    ``POOL_RESERVE`` below the backend's pool so that its response sends never wait
    for a callee to answer."""
    return max(1, min(stream_threads, pool_threads - POOL_RESERVE))


def to_parameters(cfg: InstanceConfig) -> dict[str, str]:
    """Inverse of ``parse_parameters``: only values that differ from the defaults."""
    default = InstanceConfig(name="x", role="prefill")
    out: dict[str, str] = {"role": cfg.role}
    for f in fields(InstanceConfig):
        if f.name in ("name", "role", "routes"):
            continue
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name):
            continue
        out[f.name] = format_cpu_cores(value) if f.name == "cpu_cores" else str(value)
    if cfg.routes:
        out["routes"] = json.dumps({k: r.to_json() for k, r in cfg.routes.items()}, sort_keys=True)
    return out


def _parse_routes(name: str, value: str) -> dict[str, Route]:
    try:
        raw = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"model {name!r}: routes is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"model {name!r}: routes must map scenario -> route, got {raw!r}")
    return {str(k): Route.from_json(v) for k, v in raw.items()}
