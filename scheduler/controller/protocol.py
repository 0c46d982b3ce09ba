"""The heartbeat contract between the controller and a P/D instance.

Readiness alone cannot tell a healthy instance from one whose stub process
died: Triton keeps such a model READY while every request to it fails with
"Stub process '<name>' is not healthy". So the controller also sends each
instance a real inference, the heartbeat:

    request   input  ``control``  BYTES [1]   ControlCall.to_bytes()  {"op": "health"}
    response  output ``load``     BYTES [1]   InstanceLoad.to_bytes()

The same call switches a prefill or decode instance to the other role in place
(``{"op": "set_role", "role": "decode"}``): it keeps its weights, releases the
old role's KV and channels, and answers with its load in the new role. It is
refused (UNAVAILABLE) while the instance has work in flight: drain it first.

The router model answers the same heartbeat, op ``health`` only, with a
``RouterLoad``: its stub dies like any other (then every client request fails,
"Stub process 'pdserve_0_0' is not healthy", and Triton 2.51 does not start it
again by itself). ``pdserve serve`` restarts the server on it (which also ends
the dead router's streams); the controller reloads it where nobody supervises.

An instance answers with exactly one response (FINAL flag set), also when its
model is decoupled. ``CONTROL_IO_PBTXT`` is the config.pbtxt fragment an
instance model declares for it (``optional: true`` so the data-path inputs of
the serving roles may stay required-by-convention and be absent here).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

from pdserve.errors import InvalidArgument
from pdserve.scheduler.instance import InstanceLoad

CONTROL_INPUT = "control"
LOAD_OUTPUT = "load"
MAX_CONTROL_BYTES = 4096

ControlOp = Literal["health", "set_role"]
CONTROL_OPS: tuple[ControlOp, ...] = ("health", "set_role")
SWITCHABLE_ROLES = ("prefill", "decode")

CONTROL_IO_PBTXT = """\
input [ { name: "control" data_type: TYPE_STRING dims: [ 1 ] optional: true } ]
output [ { name: "load" data_type: TYPE_STRING dims: [ 1 ] } ]
"""


@dataclass(frozen=True)
class ControlCall:
    """What the controller sends: a heartbeat, or a role switch in place."""

    op: ControlOp = "health"
    role: str = ""  # set_role only: "prefill" or "decode"

    def __post_init__(self) -> None:
        if self.op not in CONTROL_OPS:
            raise InvalidArgument(f"control op must be one of {CONTROL_OPS}, got {self.op!r}")
        if self.op == "set_role" and self.role not in SWITCHABLE_ROLES:
            raise InvalidArgument(f"set_role needs a role in {SWITCHABLE_ROLES}, "
                                  f"got {self.role!r}")
        if self.op != "set_role" and self.role:
            raise InvalidArgument(f"control op {self.op!r} takes no role")

    def to_bytes(self) -> bytes:
        body = asdict(self) if self.role else {"op": self.op}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ControlCall:
        if len(data) > MAX_CONTROL_BYTES:
            raise InvalidArgument(f"control message of {len(data)} bytes is too large")
        try:
            raw = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"control message is not JSON: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - {"op", "role"} \
                or not all(isinstance(v, str) for v in raw.values()):
            raise InvalidArgument(f"control message must be {{'op': ..., 'role': ...}} with "
                                  f"strings, got {raw!r}")
        return cls(**raw)


@dataclass(frozen=True)
class RouterLoad:
    """A router's heartbeat answer: alive, which stub process, how busy."""

    name: str
    incarnation: str = ""
    in_flight: int = 0  # client requests it is serving
    role: str = "router"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RouterLoad:
        try:
            raw = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"router heartbeat is not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("role") != "router":
            raise InvalidArgument(f"not a router's heartbeat: {str(raw)[:200]}")
        name, incarnation, in_flight = (raw.get("name"), raw.get("incarnation", ""),
                                        raw.get("in_flight", 0))
        if not isinstance(name, str) or not name or not isinstance(incarnation, str) \
                or isinstance(in_flight, bool) or not isinstance(in_flight, int) \
                or in_flight < 0:
            raise InvalidArgument(f"malformed router heartbeat: {str(raw)[:200]}")
        return cls(name, incarnation, in_flight)


def answer_router_health(call: ControlCall, load: RouterLoad) -> bytes:
    """The router's ``load`` output for ``call``; a router only answers heartbeats."""
    if call.op != "health":
        raise InvalidArgument(f"a router answers only the 'health' control op, got {call.op!r}")
    return load.to_bytes()


def parse_router_reply(data: bytes, expected_name: str) -> RouterLoad:
    load = RouterLoad.from_bytes(data)
    if load.name != expected_name:
        raise InvalidArgument(f"heartbeat for {expected_name!r} was answered by {load.name!r}")
    return load


def answer_health(load: InstanceLoad) -> bytes:
    """The bytes an instance puts in its ``load`` output."""
    return load.to_bytes()


def parse_health_reply(data: bytes, expected_name: str) -> InstanceLoad:
    """Decode a ``load`` output; the reply must come from the instance that was asked."""
    load = InstanceLoad.from_bytes(data)
    if load.name != expected_name:
        raise InvalidArgument(
            f"heartbeat for {expected_name!r} was answered by {load.name!r}"
        )
    return load
