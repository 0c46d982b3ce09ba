"""The heartbeat contract between the controller and a P/D instance.

Readiness alone cannot tell a healthy instance from one whose stub process
died: Triton keeps such a model READY while every request to it fails with
"Stub process '<name>' is not healthy". So the controller also sends each
instance a real inference, the heartbeat:

    request   input  ``control``  BYTES [1]   HealthCall.to_bytes()  {"op": "health"}
    response  output ``load``     BYTES [1]   InstanceLoad.to_bytes()

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

ControlOp = Literal["health"]
CONTROL_OPS: tuple[ControlOp, ...] = ("health",)

CONTROL_IO_PBTXT = """\
input [ { name: "control" data_type: TYPE_STRING dims: [ 1 ] optional: true } ]
output [ { name: "load" data_type: TYPE_STRING dims: [ 1 ] } ]
"""


@dataclass(frozen=True)
class HealthCall:
    """What the controller sends; ``op`` leaves room for later control ops."""

    op: ControlOp = "health"

    def __post_init__(self) -> None:
        if self.op not in CONTROL_OPS:
            raise InvalidArgument(f"control op must be one of {CONTROL_OPS}, got {self.op!r}")

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> HealthCall:
        if len(data) > MAX_CONTROL_BYTES:
            raise InvalidArgument(f"control message of {len(data)} bytes is too large")
        try:
            raw = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"control message is not JSON: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - {"op"}:
            raise InvalidArgument(f"control message must be {{'op': ...}}, got {raw!r}")
        return cls(**raw)


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
