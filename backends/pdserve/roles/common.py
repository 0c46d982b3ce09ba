"""Pieces shared by the instance roles (prefill, decode, aggregated)."""

from __future__ import annotations

from pdserve.roles.contracts import TokenChunk
from pdserve.roles.triton import Responder, payload_out


class ResponderSink:
    """A ``batch_worker.Sink`` writing ``TokenChunk`` payloads to a Triton request."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder

    def chunk(self, chunk: TokenChunk, final: bool) -> None:
        self.responder.send(payload_out(chunk.to_bytes()), final=final)

    def fail(self, exc: BaseException) -> None:
        self.responder.fail(exc)


def ack(responder: Responder) -> None:
    responder.send(payload_out(TokenChunk().to_bytes()), final=True)
