"""The token channel's wire format: decode/aggregated instance -> router (no Triton import).

Why a channel at all: streaming tokens as Triton BLS responses made every token
cross the Python backend's shared-memory IPC twice, and a stub SIGKILLed while
it sends through that IPC can take tritonserver 2.51 down with it. Measured
here with the real binary and a test-only Python model (4 decoupled streams,
caller stub iterating them over BLS, SIGKILL of the streaming stub):

    (a) in-flight request, stub idle (sleeping)      server survives; the request
                                                     never ends (no error, ever)
    (b) stub sending responses from a thread at a    server ABORTS 1 run in 2:
        high rate                                    ``boost::interprocess::lock_exception``
                                                     (the dead stub held an IPC mutex)
    (c) nothing in flight                            server survives; the python
                                                     backend restarts the stub on
                                                     the next request

So no decode request stays in flight in Triton while tokens stream: Triton only
carries short control calls, and the tokens travel on this channel, where the
stub's death is an EOF.

One connection per (instance, router). Every frame is length-prefixed::

    frame  = | body_len u32 | body |
    HELLO  = | b"PDTK1" | name_len u16 | name | incarnation 16 bytes |     (first frame)
    STEP   = entry*                                    (one frame per batcher step)
    entry  = | rid_len u16 | kind u8 | text_len i32 | n u32 | rid | payload |

``kind`` is a finish reason (NONE, STOP, LENGTH, ABORT: payload is ``n`` int32
token ids) or ERROR (payload is ``n`` bytes of UTF-8 ``"CODE message"``).
Integers are big-endian; token ids are native int32 arrays (both ends run on
one architecture family; the hello's magic would not match otherwise).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pdserve.errors import (
    Cancelled,
    InternalError,
    InvalidArgument,
    PdserveError,
    TransferError,
    Unavailable,
)

MAGIC = b"PDTK1" if sys.byteorder == "little" else b"PDTB1"
FRAME = struct.Struct("!I")
ENTRY = struct.Struct("!HBiI")
NAME_LEN = struct.Struct("!H")
INCARNATION_BYTES = 16
MAX_FRAME_BYTES = 64 << 20  # a step of 64 sequences x 1 token is ~2 KB; this is a sanity cap

NONE, STOP, LENGTH, ABORT, ERROR = range(5)
_REASONS = {NONE: "", STOP: "stop", LENGTH: "length", ABORT: "abort"}
_KINDS = {v: k for k, v in _REASONS.items()}
_ERRORS: dict[str, type[PdserveError]] = {
    "INVALID_ARG": InvalidArgument, "UNAVAILABLE": Unavailable, "CANCELLED": Cancelled,
    "INTERNAL": InternalError,
}  # fmt: skip

Kind = Literal[0, 1, 2, 3, 4]


class ChannelError(TransferError):
    """The token channel broke or carried bytes this format does not allow."""


@dataclass(frozen=True)
class Entry:
    """What one request got in one step: tokens, maybe a finish reason, or an error."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str = ""  # "", stop, length, abort
    text_len: int = -1  # >= 0 cuts the text at a stop string (as TokenChunk)
    error: PdserveError | None = None

    @property
    def is_final(self) -> bool:
        return bool(self.finish_reason) or self.error is not None


def encode_hello(name: str, incarnation: bytes) -> bytes:
    raw = name.encode()
    if len(incarnation) != INCARNATION_BYTES:
        raise ValueError(f"incarnation must be {INCARNATION_BYTES} bytes")
    body = MAGIC + NAME_LEN.pack(len(raw)) + raw + incarnation
    return FRAME.pack(len(body)) + body


def decode_hello(body: bytes) -> tuple[str, bytes]:
    """(instance name, incarnation) of a HELLO body; raises ``ChannelError``."""
    if body[: len(MAGIC)] != MAGIC:
        raise ChannelError("peer is not a pdserve token channel of this architecture")
    pos = len(MAGIC)
    if len(body) < pos + NAME_LEN.size:
        raise ChannelError("truncated hello")
    (n,) = NAME_LEN.unpack_from(body, pos)
    pos += NAME_LEN.size
    if len(body) != pos + n + INCARNATION_BYTES:
        raise ChannelError("hello has the wrong length")
    try:
        name = body[pos : pos + n].decode()
    except UnicodeDecodeError:
        raise ChannelError("hello name is not UTF-8") from None
    return name, bytes(body[pos + n :])


def encode_step(entries: list[Entry]) -> bytes:
    """One frame holding every entry (one batcher step for one router)."""
    parts: list[bytes] = []
    for e in entries:
        rid = e.request_id.encode()
        if e.error is not None:
            payload = f"{e.error.code} {e.error}".encode()
            parts += [ENTRY.pack(len(rid), ERROR, -1, len(payload)), rid, payload]
        else:
            ids = np.asarray(e.token_ids, dtype=np.int32).tobytes()
            parts += [ENTRY.pack(len(rid), _KINDS[e.finish_reason], e.text_len,
                                 len(e.token_ids)), rid, ids]
    body = b"".join(parts)
    return FRAME.pack(len(body)) + body


def decode_step(body: bytes | memoryview) -> list[Entry]:
    """Entries of a STEP body; raises ``ChannelError`` on any inconsistency."""
    view = memoryview(body)
    out: list[Entry] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < ENTRY.size:
            raise ChannelError("truncated entry header")
        rid_len, kind, text_len, n = ENTRY.unpack_from(view, pos)
        pos += ENTRY.size
        size = n if kind == ERROR else 4 * n
        if kind > ERROR or len(view) - pos < rid_len + size:
            raise ChannelError(f"bad entry (kind {kind}, {rid_len}+{size} bytes)")
        try:
            rid = bytes(view[pos : pos + rid_len]).decode()
        except UnicodeDecodeError:
            raise ChannelError("request id is not UTF-8") from None
        pos += rid_len
        payload = view[pos : pos + size]
        pos += size
        if kind == ERROR:
            code, _, message = bytes(payload).decode(errors="replace").partition(" ")
            out.append(Entry(rid, error=_ERRORS.get(code, InternalError)(message)))
        else:
            ids = np.frombuffer(payload, dtype=np.int32)
            if ids.size and int(ids.min()) < 0:
                raise ChannelError("negative token id")
            out.append(Entry(rid, tuple(ids.tolist()), _REASONS[kind], text_len))
    return out


def parse_address(address: str) -> tuple[Literal["unix", "tcp"], str | tuple[str, int]]:
    """``unix:/path`` or ``tcp:host:port`` -> (family, path or (host, port))."""
    family, _, rest = address.partition(":")
    if family == "unix" and rest.startswith("/"):
        return "unix", rest
    if family == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", (host.strip("[]"), int(port))
    raise InvalidArgument(f"token channel address must be unix:/PATH or tcp:HOST:PORT, "
                          f"got {address!r}")
