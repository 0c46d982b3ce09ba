"""Every failure gives a clear TransferError on the other side and frees the extent."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest
import torch

from pdserve.errors import InvalidArgument, OutOfKVSpace, TransferError
from pdserve.kvtransfer import KVLayout, make_sender, wire
from pdserve.kvtransfer.config import parse_endpoint
from pdserve.kvtransfer.handle import KVHandle
from pdserve.kvtransfer.sender import ControlStream
from pdserve.kvtransfer.shm import ShmSender
from tests.kvtransfer import helpers
from tests.kvtransfer.conftest import TRANSPORTS, Pair, close_pair, open_pair

ONE_SIDED = [k for k in TRANSPORTS if getattr(k, "values", (k,))[0] != "tcp"]


def raw_begin(pair: Pair, handle: KVHandle, secret: bytes = helpers.SECRET) -> wire.Connection:
    """A hand-driven tcp sender: authenticated connection, BEGIN sent (tcp has no GRANT)."""
    conn = wire.Connection.connect(parse_endpoint(handle.endpoint), secret, 2, 3)
    conn.send_frame(wire.BEGIN, meta={
        "request_id": handle.request_id, "fingerprint": handle.model_fingerprint,
        "layout": dataclasses.asdict(handle.layout), "mode": "whole",
        "checksum": handle.checksum, "extent_offset": handle.extent_offset})
    return conn


def expect_failed(pair: Pair, request_id: str, match: str, timeout_s: float = 5) -> None:
    with pytest.raises(TransferError, match=match):
        pair.receiver.wait(request_id, timeout_s=timeout_s)
    helpers.assert_released(pair.arena)
    with pytest.raises(TransferError):
        pair.receiver.claim(request_id)


@pytest.fixture
def tcp_pair():
    p = open_pair("tcp")
    yield p
    close_pair(p)


def test_wrong_secret_is_refused(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 16, 4)
    intruder = make_sender(pair.kind, pair.layout, helpers.fingerprint(),
                           helpers.config(secret=b"not-the-secret-at-all"))
    with pytest.raises(TransferError, match="authentication"):
        intruder.begin(handle, "whole")
    intruder.close()
    assert helpers.wait_until(lambda: pair.receiver.num_auth_failures == 1)
    assert pair.receiver.cancel("r")
    helpers.assert_released(pair.arena)


def test_unauthenticated_bytes_are_dropped(tcp_pair: Pair) -> None:
    tcp_pair.receiver.reserve("r", 16, 4)
    with socket.create_connection(parse_endpoint(tcp_pair.receiver.endpoint), timeout=3) as s:
        s.recv(64)  # greeting + nonce
        s.sendall(b"\x00" * 64 + b"KV" + b"\x03" * 100)  # garbage proof, then a frame
        assert s.recv(64) == wire.REFUSED
        assert s.recv(64) == b""  # closed on us
    assert tcp_pair.receiver.cancel("r")


def test_model_fingerprint_and_layout_mismatch_refused(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 16, 4)
    other_model = make_sender(pair.kind, pair.layout, "other-model", helpers.config())
    with pytest.raises(InvalidArgument, match="fingerprint mismatch"):
        other_model.begin(handle, "whole")
    # A forged handle gets past the sender's own check; the receiver refuses it (tcp: after
    # draining the pipelined DATA, so the reason arrives intact and the extent is untouched).
    forged = dataclasses.replace(handle, model_fingerprint="other-model")
    with pytest.raises(TransferError, match="fingerprint mismatch"):
        other_model.send(forged, helpers.random_kv(pair.layout, 16), "whole")
    other_model.close()
    other_layout = KVLayout(3, 2, 16, "bfloat16")
    wrong = make_sender(pair.kind, other_layout, helpers.fingerprint(), helpers.config())
    with pytest.raises(InvalidArgument, match="layout mismatch"):
        wrong.begin(handle, "whole")
    wrong.close()
    # The reservation is still usable by the right sender.
    pair.sender.send(handle, helpers.random_kv(pair.layout, 16), "whole")
    pair.receiver.wait("r", 5)
    pair.arena.free(pair.receiver.claim("r"))


def test_reservation_expires_and_frees(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 100, 4, ttl_s=0.2)
    assert pair.arena.bytes_in_use > 0
    helpers.assert_released(pair.arena)
    expect_failed(pair, "r", "expired")
    with pytest.raises(TransferError, match="expired"):
        pair.sender.send(handle, helpers.random_kv(pair.layout, 100), "whole")


def test_landed_but_unclaimed_expires(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 16, 4, ttl_s=0.5)
    pair.sender.send(handle, helpers.random_kv(pair.layout, 16), "whole")
    pair.receiver.wait("r", 5)
    time.sleep(0.6)
    helpers.assert_released(pair.arena)
    with pytest.raises(TransferError, match="not claimed"):
        pair.receiver.claim("r")


def test_wait_timeout_fails_and_frees(pair: Pair) -> None:
    pair.receiver.reserve("r", 16, 4)
    start = time.monotonic()
    expect_failed(pair, "r", "within 0.2s", timeout_s=0.2)
    assert time.monotonic() - start < 2


def test_cancel_mid_transfer_stops_sender(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 100, 4)
    kv = helpers.random_kv(pair.layout, 100)
    stream = pair.sender.begin(handle, "layerwise")
    stream.send_layer(0, kv[0])
    assert pair.receiver.cancel("r")
    with pytest.raises(TransferError):
        for layer in range(1, pair.layout.num_layers):
            stream.send_layer(layer, kv[layer])
        stream.finish()
    expect_failed(pair, "r", "cancelled")


def test_receiver_goes_away(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 100, 4)
    kv = helpers.random_kv(pair.layout, 100)
    stream = pair.sender.begin(handle, "layerwise")
    stream.send_layer(0, kv[0])
    pair.receiver.close()
    helpers.assert_released(pair.arena)
    with pytest.raises(TransferError):
        for layer in range(1, pair.layout.num_layers):
            stream.send_layer(layer, kv[layer])
        stream.finish()
    with pytest.raises(TransferError, match=r"closed|connect"):
        pair.sender.send(handle, kv, "whole")


def test_incomplete_stream_is_rejected(pair: Pair) -> None:
    handle = pair.receiver.reserve("r", 17, 4)
    kv = helpers.random_kv(pair.layout, 17)
    stream = pair.sender.begin(handle, "layerwise")
    with pytest.raises(InvalidArgument, match="in order"):
        stream.send_layer(1, kv[1])
    with pytest.raises(InvalidArgument, match="does not match"):
        stream.send_layer(0, kv[0, :, :5])
    stream.send_layer(0, kv[0])
    with pytest.raises(InvalidArgument, match="only"):
        stream.finish()
    expect_failed(pair, "r", "sender aborted")


def test_corrupted_payload_detected_by_checksum(tcp_pair: Pair) -> None:
    handle = tcp_pair.receiver.reserve("r", 100, 4)
    conn = raw_begin(tcp_pair, handle)
    flat = wire.byte_view(helpers.random_kv(tcp_pair.layout, 100)).clone()
    crc = wire.checksum(wire.as_memoryview(flat), handle.checksum)
    flat[1234] ^= 0x40  # a bit flipped on the way
    conn.send_frame(wire.DATA, offset=handle.extent_offset, payload=wire.as_memoryview(flat))
    conn.send_frame(wire.END, meta={"nbytes": flat.numel(), "checksum": crc})
    with pytest.raises(TransferError, match="checksum mismatch"):
        conn.expect(wire.DONE)
    conn.close()
    expect_failed(tcp_pair, "r", "checksum mismatch")


@pytest.mark.parametrize("kind", ONE_SIDED)
def test_at_end_verify_detects_change_before_end(kind: str) -> None:
    """verify="at_end": a bit flipped in the landed bytes before END is caught."""
    pair = open_pair(kind, verify="at_end")
    try:
        handle = pair.receiver.reserve("r", 100, 4)
        stream = pair.sender.begin(handle, "whole")
        stream.send_all(helpers.random_kv(pair.layout, 100))
        pair.arena.buffer[handle.extent_offset + 1234] ^= 0x40
        with pytest.raises(TransferError, match="checksum mismatch"):
            stream.finish()
        expect_failed(pair, "r", "checksum mismatch")
    finally:
        close_pair(pair)


def test_streaming_verify_detects_a_bad_copy() -> None:
    """verify="streaming" (the default): the receiver hashes each span at its NOTE; a
    copy that went wrong before the NOTE (a flipped bit in shm) must fail the transfer."""
    pair = open_pair("shm")
    try:
        handle = pair.receiver.reserve("r", 100, 4)
        sender = pair.sender
        assert isinstance(sender, ShmSender)
        real_note = sender._note

        def corrupt_then_note(stream: ControlStream, offset: int, nbytes: int,
                              ack: bool) -> None:
            pair.arena.buffer[offset + nbytes // 2] ^= 0x40
            real_note(stream, offset, nbytes, ack)

        sender._note = corrupt_then_note
        with pytest.raises(TransferError, match="checksum mismatch"):
            sender.send(handle, helpers.random_kv(pair.layout, 100), "whole")
        expect_failed(pair, "r", "checksum mismatch")
    finally:
        close_pair(pair)


def test_refused_transfer_keeps_connection_in_step(tcp_pair: Pair) -> None:
    """A refused pipelined transfer (big DATA behind the BEGIN) is drained, not broken."""
    handle = tcp_pair.receiver.reserve("r", 2000, 0)
    tcp_pair.receiver.cancel("r")
    kv = helpers.random_kv(tcp_pair.layout, 2000)  # 768 KB of DATA behind the refused BEGIN
    with pytest.raises(TransferError, match="cancelled"):
        tcp_pair.sender.send(handle, kv, "whole")
    helpers.assert_released(tcp_pair.arena)
    ok = tcp_pair.receiver.reserve("ok", 16, 0)
    tcp_pair.sender.send(ok, helpers.random_kv(tcp_pair.layout, 16), "whole")
    tcp_pair.receiver.wait("ok", 5)
    tcp_pair.arena.free(tcp_pair.receiver.claim("ok"))


def test_oversized_message_refused(tcp_pair: Pair) -> None:
    handle = tcp_pair.receiver.reserve("r", 16, 4)
    conn = raw_begin(tcp_pair, handle)
    # Header claims more bytes than the prompt region: refused before any is read.
    conn.sock.sendall(wire._HEADER.pack(wire.MAGIC, wire.DATA, 0, 0, handle.extent_offset,
                                        handle.prompt_nbytes + 64))
    with pytest.raises(TransferError, match=r"span .* refused"):
        conn.expect(wire.ACK)
    conn.close()
    expect_failed(tcp_pair, "r", "refused")


def test_oversized_metadata_refused(tcp_pair: Pair) -> None:
    handle = tcp_pair.receiver.reserve("r", 16, 4)
    conn = raw_begin(tcp_pair, handle)
    conn.sock.sendall(wire._HEADER.pack(wire.MAGIC, wire.END, 0, 1 << 30, 0, 0))
    with pytest.raises(TransferError, match="exceeds"):
        conn.expect(wire.DONE)
    conn.close()
    expect_failed(tcp_pair, "r", "exceeds")


def test_truncated_message_detected(tcp_pair: Pair) -> None:
    handle = tcp_pair.receiver.reserve("r", 16, 4)
    conn = raw_begin(tcp_pair, handle)
    flat = wire.byte_view(helpers.random_kv(tcp_pair.layout, 16))
    conn.sock.sendall(wire._HEADER.pack(wire.MAGIC, wire.DATA, 0, 0, handle.extent_offset,
                                        flat.numel()))
    conn.sock.sendall(wire.as_memoryview(flat)[: flat.numel() // 2])
    conn.close()  # the sender dies half way through the payload
    expect_failed(tcp_pair, "r", "closed the connection after")


def test_short_transfer_detected_at_end(tcp_pair: Pair) -> None:
    handle = tcp_pair.receiver.reserve("r", 16, 4)
    conn = raw_begin(tcp_pair, handle)
    flat = wire.byte_view(helpers.random_kv(tcp_pair.layout, 16))
    half = wire.as_memoryview(flat)[: flat.numel() // 2]
    conn.send_frame(wire.DATA, offset=handle.extent_offset, payload=half)
    conn.send_frame(wire.END, meta={"nbytes": flat.numel() // 2, "checksum": 0})
    with pytest.raises(TransferError, match="truncated"):
        conn.expect(wire.DONE)
    conn.close()
    expect_failed(tcp_pair, "r", "truncated")


def test_stalled_sender_times_out(tcp_pair: Pair) -> None:
    tcp_pair.receiver.close()
    close_pair(tcp_pair)
    pair = open_pair("tcp", io_timeout_s=0.3)
    try:
        handle = pair.receiver.reserve("r", 16, 4)
        conn = raw_begin(pair, handle)  # granted, then silence
        expect_failed(pair, "r", "timed out")
        conn.close()
    finally:
        close_pair(pair)


def test_reserve_errors(pair: Pair) -> None:
    pair.receiver.reserve("r", 16, 4)
    with pytest.raises(InvalidArgument, match="already"):
        pair.receiver.reserve("r", 16, 4)
    with pytest.raises(OutOfKVSpace):
        pair.receiver.reserve("huge", 1 << 20, 0)
    with pytest.raises(InvalidArgument):
        pair.receiver.reserve("bad id", 16, 4)
    with pytest.raises(InvalidArgument):
        pair.receiver.reserve("zero", 0, 4)
    assert pair.receiver.cancel("r") and not pair.receiver.cancel("r")


def test_shm_handle_cannot_escape_dev_shm() -> None:
    pair = open_pair("shm")
    try:
        handle = pair.receiver.reserve("r", 16, 4)
        with pytest.raises(InvalidArgument, match="segment name"):
            pair.sender.begin(dataclasses.replace(handle, data_endpoint="../../etc/passwd"))
        pair.receiver.cancel("r")
    finally:
        close_pair(pair)


def test_other_protocol_version_fails_at_connect(tcp_pair: Pair) -> None:
    """A receiver speaking another protocol version is refused at once, not on a timeout."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        handle = dataclasses.replace(tcp_pair.receiver.reserve("r", 16, 4),
                                     endpoint=f"127.0.0.1:{port}")

        def old_receiver() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"PDKV1" + bytes(wire.NONCE_BYTES))
                conn.recv(64)

        thread = threading.Thread(target=old_receiver)
        thread.start()
        start = time.monotonic()
        with pytest.raises(TransferError, match="PDKV2"):
            tcp_pair.sender.send(handle, helpers.random_kv(tcp_pair.layout, 16), "whole")
        thread.join()
        assert time.monotonic() - start < 2
    assert tcp_pair.receiver.cancel("r")


def test_a_handle_of_an_earlier_reservation_under_the_same_id_is_refused(pair: Pair) -> None:
    """X is reserved, cancelled; Y gets X's space; X is reserved again elsewhere.
    The sender still holding X's first handle must not write into Y's KV (it
    was granted: the receiver knew only the id)."""
    first = pair.receiver.reserve("X", 16, 4)
    assert pair.receiver.cancel("X")
    other = pair.receiver.reserve("Y", 16, 4)
    assert other.extent_offset == first.extent_offset  # the space is reused
    kv_y = helpers.random_kv(pair.layout, 16, seed=1)
    pair.sender.send(other, kv_y, "whole")
    pair.receiver.wait("Y", timeout_s=5)
    again = pair.receiver.reserve("X", 16, 4)
    assert again.extent_offset != first.extent_offset
    with pytest.raises(TransferError, match="earlier one"):
        pair.sender.send(first, helpers.random_kv(pair.layout, 16, seed=2), "whole")
    extent_y = pair.receiver.claim("Y")
    assert torch.equal(pair.layout.view(pair.arena.buffer, extent_y.offset, 16), kv_y)
    kv_x = helpers.random_kv(pair.layout, 16, seed=3)
    pair.sender.send(again, kv_x, "whole")  # its own handle still works
    extent_x = pair.receiver.claim("X")
    assert torch.equal(pair.layout.view(pair.arena.buffer, extent_x.offset, 16), kv_x)
    pair.arena.free(extent_x)
    pair.arena.free(extent_y)
    helpers.assert_released(pair.arena)


def test_shm_sender_stops_within_a_chunk_once_the_receiver_says_err() -> None:
    """A one-sided write has no receiver thread to stop it: the receiver frees the
    extent of a failed reservation and says ERR, and the sender must stop
    copying at the next chunk (it copied the rest of the span first)."""
    from types import SimpleNamespace

    sender = ShmSender.__new__(ShmSender)  # _put needs only the segment and the stream
    dst = torch.zeros(6 * wire.CHUNK_BYTES, dtype=torch.uint8)
    sender._segment = lambda name: SimpleNamespace(tensor=dst)  # type: ignore[method-assign]
    polls: list[int] = []

    def poll_error() -> None:
        polls.append(1)
        if len(polls) == 2:
            raise wire.Refused("receiver aborted: reservation expired")

    notes: list[int] = []
    conn = SimpleNamespace(poll_error=poll_error,
                           send_frame=lambda kind, **kw: notes.append(kind))
    stream = SimpleNamespace(handle=SimpleNamespace(data_endpoint="seg"),
                             hasher=SimpleNamespace(enabled=False), conn=conn)
    with pytest.raises(wire.Refused, match="expired"):
        sender._put(stream, 0, torch.ones(5 * wire.CHUNK_BYTES, dtype=torch.uint8), False)
    assert int(dst.sum()) == 2 * wire.CHUNK_BYTES  # two chunks, then it stopped
    assert notes == []  # nothing announced for a write that did not finish


def test_shm_sender_drops_mappings_of_segments_their_owners_unlinked() -> None:
    """Each decode incarnation (restart, role switch) has a new segment; a prefill
    kept every old one mapped, so its pages never went back to the system."""
    from pdserve.kvtransfer.shm import ShmSegment

    sender = ShmSender(helpers.LAYOUT, helpers.fingerprint(), helpers.config())
    old, new = ShmSegment.create(1 << 20), ShmSegment.create(1 << 20)
    try:
        sender._segment(old.name)
        sender._segment(new.name)
        assert set(sender._segments) == {old.name, new.name}  # both owners alive
        old.close()  # that decode released its arena (unlinked)
        third = ShmSegment.create(1 << 20)
        try:
            sender._segment(third.name)
            assert set(sender._segments) == {new.name, third.name}
        finally:
            third.close()
    finally:
        sender.close()
        old.close()
        new.close()


def test_kv_connections_probe_a_silent_peer(tcp_pair: Pair) -> None:
    """A receiver waits on pooled connections without a time limit: one whose
    peer's host died would hold its thread and slot for good without keepalive."""
    handle = tcp_pair.receiver.reserve("k", 16, 4)
    tcp_pair.sender.send(handle, helpers.random_kv(tcp_pair.layout, 16), "whole")
    tcp_pair.receiver.wait("k", timeout_s=5)
    tcp_pair.arena.free(tcp_pair.receiver.claim("k"))
    with tcp_pair.receiver._conn_lock:
        socks = [conn.sock for conn, _ in tcp_pair.receiver._conns.values()]
    assert socks  # the sender's pooled connection, idle on the receiver now
    for sock in socks:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == \
                wire.KEEPALIVE_IDLE_S


@pytest.mark.parametrize("kind", ONE_SIDED)
@pytest.mark.parametrize("io_timeout_s", [None, 0.3])
def test_one_sided_extent_is_freed_only_once_the_sender_stopped(
        kind: str, io_timeout_s: float | None) -> None:
    """A one-sided sender writes into the extent itself: after a cancel mid-
    transfer the receiver says ERR and frees the extent once the sender has
    dropped the connection (it stops between chunks), not at once while the
    sender may still be copying into it. A sender that does not within the I/O
    timeout (0.3 s: hung inside one copy) keeps it reserved (counted, logged)
    until it goes; before, it was freed after the timeout, for another request."""
    pair = open_pair(kind, **({} if io_timeout_s is None else {"io_timeout_s": io_timeout_s}))
    try:
        handle = pair.receiver.reserve("r", 16, 4)
        conn = raw_begin(pair, handle)
        conn.expect(wire.GRANT)
        assert pair.receiver.cancel("r")
        conn.send_frame(wire.NOTE, offset=handle.extent_offset, meta={"nbytes": 64})
        with pytest.raises(wire.Refused, match="stopped"):
            conn.expect(wire.ACK)  # the answer is ERR
        # Still connected: still the sender's to write into (past 3 timeouts of 0.3 s).
        assert not helpers.wait_until(lambda: pair.arena.bytes_in_use == 0, 1.0)
        assert pair.receiver.num_stuck_senders == (0 if io_timeout_s is None else 1)
        conn.close()
        assert helpers.wait_until(lambda: pair.arena.bytes_in_use == 0, 3)
    finally:
        close_pair(pair)
