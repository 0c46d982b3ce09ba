"""Pieces shared by the instance roles (prefill, decode, aggregated)."""

from __future__ import annotations

from pdserve.errors import InvalidArgument, Unavailable
from pdserve.roles.contracts import TokenChunk
from pdserve.roles.triton import Responder, payload_out
from pdserve.scheduler.forwarding import PrefillRejected


def ack(responder: Responder) -> None:
    responder.send(payload_out(TokenChunk().to_bytes()), final=True)


# The ops each P/D role serves; an op of the other role is what a router with a
# stale view sends an instance that switched roles in place, so it is refused as
# UNAVAILABLE (the router tries elsewhere), not as a bad request.
ROLE_OPS = {"prefill": ("prefill",), "decode": ("reserve", "commit", "abort")}


def wrong_op(name: str, role: str, op: str) -> Exception:
    """The error for ``op`` sent to ``name`` serving ``role``."""
    if op == "prefill" and role != "prefill":  # a rejection: the router tries the next one
        return PrefillRejected(f"{name} serves {role} now, not prefill (switched roles?)")
    if any(op in ops for r, ops in ROLE_OPS.items() if r != role):
        return Unavailable(f"{name} serves {role} now, not {op!r} (switched roles?)")
    return InvalidArgument(f"{role} instance {name} does not serve op {op!r}")
