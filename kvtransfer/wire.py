"""The control-channel wire protocol: framing, authentication, checksums.

Every transport talks over one authenticated TCP connection per transfer
(pooled by the sender). Only the tcp transport also carries the KV bytes on it;
shm and mooncake write them one-sided and send a NOTE naming the span.

Integrity: a streaming xxHash3-64 (``Hasher``) over the prompt region in
region order, fed in ``CHUNK_BYTES`` pieces while the bytes are hot in cache
(sender: right after copying / right before sending a chunk; tcp receiver:
right after ``recv_into`` of a chunk). crc32 stays accepted; "none" exists for
the benchmark only.

Handshake (mutual HMAC-SHA256 challenge-response; the secret never travels):

    receiver -> sender   b"PDKV2" + nonce_r[32]   (2: tcp has no GRANT; see sender.py)
    sender   -> receiver nonce_s[32] + HMAC(secret, b"s" + nonce_r + nonce_s)
    receiver -> sender   HMAC(secret, b"r" + nonce_r + nonce_s)   (32 zero bytes = refused)

Frame (24-byte header, then ``meta_len`` bytes of JSON, then ``payload_len`` bytes):

    | magic "KV" | type u8 | flags u8 | meta_len u32 | offset u64 | payload_len u64 |

``offset`` is a byte offset in the receiver's arena. DATA frames carry payload
(tcp); NOTE frames carry none (shm/mooncake wrote the bytes already). Either
with FLAG_ACK asks for one ACK frame: that is the block-fixed baseline's
per-page confirmation.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import select
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from pdserve.errors import TransferError

GREETING = b"PDKV2"  # bumped with the protocol: a mixed pair fails at connect, not on a timeout
NONCE_BYTES = 32
MAC_BYTES = 32
REFUSED = bytes(MAC_BYTES)
MAX_META_BYTES = 64 * 1024
MAX_NOTICE_CHARS = 32 * 1024  # END's ASCII notice (transport.py): fits the metadata

_HEADER = struct.Struct("!2sBBIQQ")
HEADER_BYTES = _HEADER.size
MAGIC = b"KV"

BEGIN, GRANT, DATA, NOTE, ACK, END, DONE, ERR, ABORT = range(1, 10)
FRAME_NAMES = {
    BEGIN: "BEGIN", GRANT: "GRANT", DATA: "DATA", NOTE: "NOTE", ACK: "ACK",
    END: "END", DONE: "DONE", ERR: "ERR", ABORT: "ABORT",
}  # fmt: skip
FLAG_ACK = 1
CHUNK_BYTES = 1 << 20  # hash/send/recv granularity: fits L2, amortises Python per call
CHECKSUMS = ("xxh3", "crc32", "none")


class ProtocolError(TransferError):
    """The peer sent something this protocol does not allow."""


class Refused(TransferError):
    """The receiver answered ERR: it refused or aborted the transfer."""


@dataclass(frozen=True)
class Header:
    kind: int
    flags: int
    meta_len: int
    offset: int
    payload_len: int

    @property
    def wants_ack(self) -> bool:
        return bool(self.flags & FLAG_ACK)


class Hasher:
    """Streaming checksum of the prompt region, fed in region order."""

    def __init__(self, kind: str) -> None:
        if kind not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {CHECKSUMS}, got {kind!r}")
        self.kind = kind
        self._xxh = xxhash.xxh3_64() if kind == "xxh3" else None
        self._crc = 0

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def update(self, data: memoryview) -> None:
        if self._xxh is not None:
            self._xxh.update(data)
        elif self.kind == "crc32":
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> int | None:
        """The checksum so far; None when checksums are off."""
        if self._xxh is not None:
            return int(self._xxh.intdigest())
        return self._crc if self.kind == "crc32" else None


def checksum(data: memoryview, kind: str) -> int | None:
    """One-shot checksum of ``data`` (equal to streaming it through a ``Hasher``)."""
    hasher = Hasher(kind)
    hasher.update(data)
    return hasher.value()


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a flat uint8 tensor; zero-copy when contiguous, one copy otherwise."""
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()  # KV on an accelerator is staged through host memory
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def as_memoryview(flat: torch.Tensor) -> memoryview:
    """A writable memoryview of a 1-D uint8 CPU tensor (shares its memory)."""
    array: Any = flat.numpy()
    return memoryview(array).cast("B")


KEEPALIVE_IDLE_S = 30  # silence before TCP keepalive probes (10 s apart, 3 of them)


def tune_socket(sock: socket.socket) -> None:
    """Options every KV socket uses (the benchmark's raw-socket limit uses them too).

    TCP_NODELAY: control frames (END, DONE, GRANT) go out at once. Buffer sizes
    are left to the kernel's autotuning: fixed SO_SNDBUF/SO_RCVBUF of 1 or 4 MiB
    (which switch autotuning off) were no faster over loopback (2.1-2.2 vs
    2.2-2.5 GB/s for 32 MiB, same minutes, perf/RESULTS.md).

    Keepalive: a receiver waits on idle pooled connections without a time
    limit; a peer whose host died or was cut off never closes its end, and the
    half-open connection would hold a receiver thread and a connection slot for
    good. Probes after KEEPALIVE_IDLE_S of silence find it within a minute.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", 10),
                          ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _mac(secret: bytes, role: bytes, nonce_r: bytes, nonce_s: bytes) -> bytes:
    return hmac.new(secret, role + nonce_r + nonce_s, hashlib.sha256).digest()


class Connection:
    """One framed, authenticated control connection (either side)."""

    def __init__(self, sock: socket.socket, io_timeout_s: float) -> None:
        self.sock = sock
        self.io_timeout_s = io_timeout_s
        sock.settimeout(io_timeout_s)
        tune_socket(sock)
        self._header_buf = bytearray(HEADER_BYTES)

    # -- handshake ---------------------------------------------------------------
    @classmethod
    def connect(cls, endpoint: tuple[str, int], secret: bytes, connect_timeout_s: float,
                io_timeout_s: float) -> Connection:
        """Dial a receiver and authenticate both ways; raises ``TransferError``."""
        try:
            sock = socket.create_connection(endpoint, timeout=connect_timeout_s)
        except OSError as exc:
            raise TransferError(f"cannot connect to KV receiver {endpoint}: {exc}") from None
        conn = cls(sock, io_timeout_s)
        try:
            greeting = conn.recv_exact(len(GREETING) + NONCE_BYTES)
            if greeting[: len(GREETING)] != GREETING:
                raise ProtocolError(f"{endpoint} is not a pdserve KV receiver speaking "
                                    f"{GREETING.decode()} (got {greeting[:len(GREETING)]!r})")
            nonce_r, nonce_s = greeting[len(GREETING):], os.urandom(NONCE_BYTES)
            conn.sock.sendall(nonce_s + _mac(secret, b"s", nonce_r, nonce_s))
            proof = conn.recv_exact(MAC_BYTES)
        except TransferError as exc:
            conn.close()
            raise TransferError(f"authentication with {endpoint} failed: {exc}") from None
        if not hmac.compare_digest(proof, _mac(secret, b"r", nonce_r, nonce_s)):
            conn.close()
            raise TransferError(
                f"authentication with {endpoint} failed: "
                + ("the receiver refused our secret" if proof == REFUSED else "bad receiver proof")
            )
        return conn

    def accept_handshake(self, secret: bytes) -> bool:
        """Receiver side of the handshake; False (peer refused) on a wrong secret."""
        nonce_r = os.urandom(NONCE_BYTES)
        self.sock.sendall(GREETING + nonce_r)
        reply = self.recv_exact(NONCE_BYTES + MAC_BYTES)
        nonce_s, mac = reply[:NONCE_BYTES], reply[NONCE_BYTES:]
        if not hmac.compare_digest(mac, _mac(secret, b"s", nonce_r, nonce_s)):
            self.sock.sendall(REFUSED)
            return False
        self.sock.sendall(_mac(secret, b"r", nonce_r, nonce_s))
        return True

    # -- frames ------------------------------------------------------------------
    def send_frame(self, kind: int, *, meta: dict[str, Any] | None = None, offset: int = 0,
                   payload: memoryview | None = None, flags: int = 0) -> None:
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
        payload_len = 0 if payload is None else payload.nbytes
        header = _HEADER.pack(MAGIC, kind, flags, len(meta_bytes), offset, payload_len)
        buffers: list[Any] = [header + meta_bytes]
        if payload_len:
            assert payload is not None
            buffers.append(payload)
        self._send_all(buffers)

    def recv_header(self) -> Header:
        self._recv_into_exact(memoryview(self._header_buf))
        magic, kind, flags, meta_len, offset, payload_len = _HEADER.unpack(self._header_buf)
        if magic != MAGIC or kind not in FRAME_NAMES:
            raise ProtocolError(f"bad frame header (magic {magic!r}, type {kind})")
        if meta_len > MAX_META_BYTES:
            raise ProtocolError(f"frame metadata of {meta_len} bytes exceeds {MAX_META_BYTES}")
        return Header(kind, flags, meta_len, offset, payload_len)

    def recv_meta(self, header: Header) -> dict[str, Any]:
        if not header.meta_len:
            return {}
        try:
            meta = json.loads(self.recv_exact(header.meta_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"frame metadata is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise ProtocolError("frame metadata must be a JSON object")
        return meta

    def recv_frame(self) -> tuple[Header, dict[str, Any]]:
        header = self.recv_header()
        return header, self.recv_meta(header)

    def expect(self, kind: int) -> tuple[Header, dict[str, Any]]:
        """Next frame, which must be ``kind``; an ERR frame raises its message."""
        header, meta = self.recv_frame()
        if header.kind == ERR:
            raise Refused(f"receiver refused: {meta.get('message', 'no reason given')}")
        if header.kind != kind or header.payload_len:
            raise ProtocolError(f"expected {FRAME_NAMES[kind]}, got {FRAME_NAMES[header.kind]}")
        return header, meta

    def poll_error(self) -> None:
        """Raise if the receiver already sent ERR (or hung up); never blocks."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:
            header, meta = self.recv_frame()
            if header.kind == ERR:
                raise Refused(f"receiver aborted: {meta.get('message', 'no reason given')}")
            raise ProtocolError(f"unexpected {FRAME_NAMES[header.kind]} from receiver")

    def readable_within(self, timeout_s: float) -> bool:
        readable, _, _ = select.select([self.sock], [], [], timeout_s)
        return bool(readable)

    # -- bytes -------------------------------------------------------------------
    def recv_exact(self, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self._recv_into_exact(memoryview(buf))
        return bytes(buf)

    def recv_payload_into(self, view: memoryview, hasher: Hasher,
                          should_stop: Callable[[], bool]) -> None:
        """Receive exactly ``len(view)`` bytes straight into ``view`` (the arena).

        With a checksum, chunk by chunk: each chunk is hashed right after it
        landed, while it is still in cache, instead of one cold pass at the end.
        """
        if not hasher.enabled:
            self._recv_into_exact(view, should_stop)
            return
        for start in range(0, view.nbytes, CHUNK_BYTES):
            chunk = view[start : start + CHUNK_BYTES]
            self._recv_into_exact(chunk, should_stop)
            hasher.update(chunk)

    def send_payload(self, kind: int, offset: int, payload: memoryview, hasher: Hasher,
                     flags: int = 0) -> None:
        """One frame carrying ``payload``; hashes each chunk just before sending it."""
        if not hasher.enabled:
            self.send_frame(kind, offset=offset, payload=payload, flags=flags)
            return
        header = _HEADER.pack(MAGIC, kind, flags, 0, offset, payload.nbytes)
        first = payload[:CHUNK_BYTES]
        hasher.update(first)
        self._send_all([header, first])
        for start in range(CHUNK_BYTES, payload.nbytes, CHUNK_BYTES):
            chunk = payload[start : start + CHUNK_BYTES]
            hasher.update(chunk)
            self._send_all([chunk])

    def is_stale(self) -> bool:
        """A pooled connection the peer closed (or wrote to) while idle."""
        try:
            return self.readable_within(0)
        except (OSError, ValueError):
            return True

    def _recv_into_exact(self, view: memoryview,
                         should_stop: Callable[[], bool] | None = None) -> None:
        pos, total = 0, view.nbytes
        try:
            while pos < total:
                n = self.sock.recv_into(view[pos:])
                if n == 0:
                    raise TransferError(f"peer closed the connection after {pos} of {total} bytes")
                pos += n
                if should_stop is not None and should_stop():
                    raise TransferError("transfer aborted by the receiver")
        except TimeoutError:
            raise TransferError(
                f"timed out after {self.io_timeout_s}s waiting for data ({pos} of {total} bytes)"
            ) from None
        except OSError as exc:
            raise TransferError(f"connection failed: {exc}") from None

    def _send_all(self, buffers: list[Any]) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                while sent:
                    if sent >= views[0].nbytes:
                        sent -= views[0].nbytes
                        views.pop(0)
                    else:
                        views[0], sent = views[0][sent:], 0
        except TimeoutError:
            raise TransferError(f"timed out after {self.io_timeout_s}s sending to peer") from None
        except OSError as exc:
            raise TransferError(f"connection failed: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
