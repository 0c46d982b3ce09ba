"""TCP transport: KV between hosts over the authenticated control connection.

The sender hands the kernel its KV tensor's own memory (``sendmsg`` of a
memoryview: header and payload in one call, no staging copy); the receiver
``recv_into``s straight into the reserved extent of its arena (a memoryview of
the arena buffer), so no intermediate buffer exists on either side. With a
checksum both sides work in ``wire.CHUNK_BYTES`` pieces and hash each piece
while it is in cache (sender before ``sendmsg``, receiver after ``recv_into``):
no extra pass over the KV on either side.

One control round trip per transfer: BEGIN, DATA and END go out back to back
and only DONE is awaited (see ``sender.py``).

Security: peers prove the shared secret (HMAC challenge-response, see
``wire.py``); the receiver binds to the address it is given (127.0.0.1 by
default, never a wildcard unless told to and told what to advertise); a
payload may only land inside the prompt region of a granted reservation, in
order, so an oversized or stray message is refused and fails the transfer.

    receiver = TcpReceiver(arena, layout, fingerprint, config)   # decode
    handle = receiver.reserve("req-1", prompt_tokens=100, max_new_tokens=64)
    sender = TcpSender(layout, fingerprint, config)               # prefill
    sender.send(handle, kv)              # kv [L, 2, Tp, Hkv, D]
    receiver.wait("req-1", timeout_s=5); extent = receiver.claim("req-1")
"""

from __future__ import annotations

import torch

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.receiver import ControlReceiver
from pdserve.kvtransfer.sender import ControlSender, ControlStream


class TcpReceiver(ControlReceiver):
    """Decode side: KV bytes arrive on the control connection (DATA frames)."""

    transport = "tcp"
    data_frame = wire.DATA


class TcpSender(ControlSender):
    """Prefill side: one DATA frame per span, ACK awaited only for block-fixed pages."""

    transport = "tcp"

    def _put(self, stream: ControlStream, offset: int, flat: torch.Tensor, ack: bool) -> None:
        stream.conn.send_payload(wire.DATA, offset, wire.as_memoryview(flat), stream.hasher,
                                 flags=wire.FLAG_ACK if ack else 0)
        if ack:
            stream.conn.expect(wire.ACK)
