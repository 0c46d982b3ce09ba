"""What the router and the controller know about one P/D instance.

An instance is one Triton model (``prefill_0``, ``decode_3``...). It reports an
``InstanceLoad``; the routing policies only ever look at these snapshots, so
the same code runs in the router, the controller and the simulator.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Literal, cast

from pdserve.errors import InvalidArgument

Role = Literal["prefill", "decode", "aggregated"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "aggregated")


@dataclass(frozen=True, init=False)
class InstanceLoad:
    """A snapshot of one instance's state, as reported by the instance itself."""

    name: str
    role: Role
    scenario: str
    max_batch_size: int
    in_flight: int = 0  # requests admitted and not finished
    queued: int = 0  # only the local-queue baseline ever queues
    kv_free_bytes: int = 0
    kv_total_bytes: int = 0
    healthy: bool = True
    draining: bool = False
    # The weights it serves (preset name or checkpoint dir): during a rolling
    # upgrade a prefill hands KV only to a decode of the same weights.
    model: str = ""
    # Random per stub process: a heartbeat answered by another incarnation than
    # the one a call went to means that stub died (and was restarted in place),
    # so the call will never be answered.
    incarnation: str = ""
    # Cumulative [busy, total] ticks of each compute unit it runs on
    # (``scheduler/compute.py``): the ratio rule's check that a switch adds
    # compute, not only slots. Empty: not measured.
    compute: dict[str, list[int]] = field(default_factory=dict)
    # Cumulative CPU ticks of its own process (utime + stime, the clock ticks of
    # ``compute``): the part of its units' busy time that leaves with it. 0: not measured.
    own_ticks: int = 0

    def __init__(
        self,
        name: str,
        role: Role,
        scenario: str,
        max_batch_size: int,
        in_flight: int = 0,
        queued: int = 0,
        kv_free_bytes: int = 0,
        kv_total_bytes: int = 0,
        healthy: bool = True,
        draining: bool = False,
        model: str = "",
        incarnation: str = "",
        compute: dict[str, list[int]] | None = None,
        own_ticks: int = 0,
    ) -> None:
        # Written by hand (same fields, order and defaults as the dataclass's, tested)
        # because the simulator builds millions of these: the generated frozen
        # ``__init__`` sets each field through ``object.__setattr__`` (1.9 µs a
        # snapshot); filling the instance dict directly is 0.8 µs. Still frozen:
        # assignment after construction raises ``FrozenInstanceError``.
        d = self.__dict__
        d["name"] = name
        d["role"] = role
        d["scenario"] = scenario
        d["max_batch_size"] = max_batch_size
        d["in_flight"] = in_flight
        d["queued"] = queued
        d["kv_free_bytes"] = kv_free_bytes
        d["kv_total_bytes"] = kv_total_bytes
        d["healthy"] = healthy
        d["draining"] = draining
        d["model"] = model
        d["incarnation"] = incarnation
        d["compute"] = {} if compute is None else compute
        d["own_ticks"] = own_ticks
        # One cheap test of the common case; the detailed checks only when
        # something is off or measured.
        if (not name or role not in ROLES or max_batch_size <= 0
                or in_flight < 0 or queued < 0 or kv_free_bytes < 0
                or kv_total_bytes < 0 or compute or own_ticks):
            self._validate()

    def _validate(self) -> None:
        if not self.name:
            raise InvalidArgument("instance name must not be empty")
        if self.role not in ROLES:
            raise InvalidArgument(f"role must be one of {ROLES}, got {self.role!r}")
        if self.max_batch_size <= 0:
            raise InvalidArgument(f"max_batch_size must be positive, got {self.max_batch_size}")
        for name in ("in_flight", "queued", "kv_free_bytes", "kv_total_bytes", "own_ticks"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        for unit, ticks in self.compute.items():
            if not isinstance(unit, str) or len(ticks) != 2 or min(ticks) < 0:
                raise InvalidArgument(f"compute[{unit!r}] must be [busy, total] ticks, got {ticks}")

    @property
    def is_routable(self) -> bool:
        return self.healthy and not self.draining

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch_size - self.in_flight)

    @property
    def batch_utilization(self) -> float:
        return self.in_flight / self.max_batch_size

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> InstanceLoad:
        try:
            fields = json.loads(data)
            # A field this version does not know (a newer instance's heartbeat)
            # is left out, not an error: the rest of the report still holds.
            return cls(**{k: v for k, v in fields.items() if k in _LOAD_FIELDS})
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"malformed instance load report: {exc}") from exc


_LOAD_FIELDS = frozenset(f.name for f in dataclasses.fields(InstanceLoad))


def as_role(value: str) -> Role:
    if value not in ROLES:
        raise InvalidArgument(f"role must be one of {ROLES}, got {value!r}")
    return cast(Role, value)
