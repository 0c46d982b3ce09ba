"""Pieces shared by the instance roles (prefill, decode, aggregated)."""

from __future__ import annotations

from pdserve.roles.contracts import TokenChunk
from pdserve.roles.triton import Responder, payload_out


def ack(responder: Responder) -> None:
    responder.send(payload_out(TokenChunk().to_bytes()), final=True)
