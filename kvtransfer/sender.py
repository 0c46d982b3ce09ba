"""The sender core shared by every transport: pooled connections and streams.

A ``ControlSender`` keeps authenticated connections to each receiver it has
talked to (a prefill instance sends to the same few decode instances over and
over, so the TCP + HMAC handshake is paid once per pair, not per request).

Control round trips per transfer (a Python round trip is ~0.1-0.3 ms, the
memcpy of a 512-token prompt ~1 ms, so they matter):

    tcp         BEGIN, DATA..., END  ->  DONE | ERR      one round trip
    shm,        BEGIN  ->  GRANT | ERR                   awaited only before the
    mooncake                                             first write (in layer-wise
                                                         mode, hidden behind layer 0)
                NOTE..., END  ->  DONE | ERR             one round trip

tcp needs no GRANT: the receiver checks BEGIN before it reads any DATA, and
drains the data of a refused transfer so the ERR reaches the sender intact.
The one-sided transports must wait for it: without it a sender holding a
stale handle (reservation expired or cancelled, extent handed to another
request) would write over someone else's KV before anyone could say no.

A stream writes the prompt region strictly in region order, which is what lets
the receiver verify that the spans tile the region and lets both sides keep a
running checksum:

    whole        one span        [offset, offset + L*layer_bytes)
    layerwise    L spans         layer_span(l), as each layer is handed over
    block_fixed  L*2*ceil(Tp/P)  pages of P tokens of K or V of one layer,
                 spans           one message + one confirmation each

Transports implement ``_put(stream, offset, flat, ack)``: move ``flat`` (bytes
of the sender's KV) to ``offset`` in the receiver's arena and, for the
one-sided ones, send the NOTE naming the span.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from pdserve.errors import InvalidArgument, PdserveError, TransferError
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.config import TransferConfig, parse_endpoint
from pdserve.kvtransfer.handle import KVHandle
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.transport import MODES, KVSender, SendStream, TransferMode, TransferResult

MAX_IDLE_PER_ENDPOINT = 8


class ControlSender(KVSender):
    """Prefill side of a transport: handle checks, connection pool, streams."""

    transport = "abstract"
    one_sided = False  # writes land without the receiver reading them: wait for GRANT

    def __init__(self, layout: KVLayout, model_fingerprint: str, config: TransferConfig) -> None:
        if not model_fingerprint:
            raise ValueError("model_fingerprint must not be empty")
        self.layout, self.model_fingerprint, self.config = layout, model_fingerprint, config
        self._lock = threading.Lock()
        self._idle: dict[str, list[wire.Connection]] = {}
        self._closed = False

    # -- transport hooks -----------------------------------------------------------
    @abc.abstractmethod
    def _put(self, stream: ControlStream, offset: int, flat: torch.Tensor, ack: bool) -> None:
        """Write ``flat`` (1-D uint8) at arena ``offset`` of the stream's receiver and
        feed it to ``stream.hasher`` (fused with the move, chunk by chunk)."""

    def _prepare(self, handle: KVHandle) -> None:
        """Open what writing to this handle's receiver needs (called by ``begin``)."""

    def _release_transport(self) -> None:
        """Free transport resources at ``close``."""

    # -- KVSender ------------------------------------------------------------------
    def begin(self, handle: KVHandle, mode: TransferMode = "layerwise") -> ControlStream:
        self._check_handle(handle, mode)
        self._prepare(handle)
        conn = self._open(handle, mode)
        return ControlStream(self, handle, mode, conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        self._release_transport()

    @property
    def num_idle_connections(self) -> int:
        with self._lock:
            return sum(len(c) for c in self._idle.values())

    # -- internals -------------------------------------------------------------------
    def _check_handle(self, handle: KVHandle, mode: str) -> None:
        if not isinstance(handle, KVHandle):
            raise InvalidArgument(f"expected a KVHandle, got {type(handle).__name__}")
        if self._closed:
            raise TransferError("KV sender is closed")
        if handle.transport != self.transport:
            raise InvalidArgument(f"handle is for transport {handle.transport!r}, "
                                  f"this sender is {self.transport!r}")
        if handle.model_fingerprint != self.model_fingerprint:
            raise InvalidArgument(
                f"model fingerprint mismatch: handle {handle.model_fingerprint!r}, this "
                f"instance {self.model_fingerprint!r}; refusing to send KV to another model"
            )
        if handle.layout != self.layout:
            raise InvalidArgument(f"KV layout mismatch: handle {handle.layout}, "
                                  f"this instance {self.layout}")
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}, got {mode!r}")

    def _open(self, handle: KVHandle, mode: str) -> wire.Connection:
        """A connection on which BEGIN has been sent (the answer is read later)."""
        begin = {
            "request_id": handle.request_id, "fingerprint": self.model_fingerprint,
            "layout": {"num_layers": handle.num_layers, "num_kv_heads": handle.num_kv_heads,
                       "head_dim": handle.head_dim, "dtype": handle.dtype},
            "mode": mode, "checksum": handle.checksum,
            # Which reservation this handle is for: one made again under the same id
            # has its own extent, and a stale handle must not write into the old one.
            "extent_offset": handle.extent_offset,
        }
        conn = self._checkout(handle.endpoint) or self._connect(handle.endpoint)
        try:
            conn.send_frame(wire.BEGIN, meta=begin)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self, endpoint: str) -> wire.Connection:
        try:
            address = parse_endpoint(endpoint)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return wire.Connection.connect(address, self.config.secret,
                                       self.config.connect_timeout_s, self.config.io_timeout_s)

    def _checkout(self, endpoint: str) -> wire.Connection | None:
        """An idle pooled connection the receiver has not closed meanwhile."""
        while True:
            with self._lock:
                conns = self._idle.get(endpoint)
                conn = conns.pop() if conns else None
            if conn is None or not conn.is_stale():
                return conn
            conn.close()  # receiver restarted or closed it: try the next one

    def _checkin(self, endpoint: str, conn: wire.Connection) -> None:
        with self._lock:
            conns = self._idle.setdefault(endpoint, [])
            if not self._closed and len(conns) < MAX_IDLE_PER_ENDPOINT:
                conns.append(conn)
                return
        conn.close()


class ControlStream(SendStream):
    """One granted transfer; not thread-safe (one stream per request)."""

    def __init__(self, sender: ControlSender, handle: KVHandle, mode: TransferMode,
                 conn: wire.Connection) -> None:
        self.sender, self.handle, self.mode, self.conn = sender, handle, mode, conn
        self.layout = handle.layout
        self.start, self.nbytes = self.layout.prompt_span(handle.extent_offset,
                                                          handle.prompt_tokens)
        self.next = self.start
        self.next_layer = 0
        self.hasher = wire.Hasher(handle.checksum)
        self.granted = not sender.one_sided
        self.num_messages = 0
        self.began = time.perf_counter()
        self._open = True
        token_bytes = self.layout.num_kv_heads * self.layout.head_dim * self.layout.itemsize
        self._kv_bytes = handle.prompt_tokens * token_bytes  # K (or V) of one layer
        self._page_bytes = sender.config.page_tokens * token_bytes

    # -- SendStream ------------------------------------------------------------------
    def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        """kv_layer [2, Tp, Hkv, D] of layer ``layer``; layers must come in order."""
        self._check_open()
        if self.mode == "whole":
            raise InvalidArgument("mode 'whole' sends the prompt at once: use send_all")
        if layer != self.next_layer:
            raise InvalidArgument(f"layers must be sent in order: expected {self.next_layer}, "
                                  f"got {layer}")
        lay, tp = self.layout, self.handle.prompt_tokens
        self._check_tensor(kv_layer, (2, tp, lay.num_kv_heads, lay.head_dim))
        with self._failing():
            self._send_layer_bytes(wire.byte_view(kv_layer))
        self.next_layer += 1

    def send_all(self, kv: torch.Tensor) -> None:
        """kv [L, 2, Tp, Hkv, D]: the whole prompt's KV."""
        self._check_open()
        lay = self.layout
        self._check_tensor(kv, (lay.num_layers, 2, self.handle.prompt_tokens,
                                lay.num_kv_heads, lay.head_dim))
        if self.mode == "whole":
            if self.next != self.start:
                raise InvalidArgument("send_all after part of the prompt was sent")
            with self._failing():
                self._write(wire.byte_view(kv), ack=False)
            self.next_layer = lay.num_layers
            return
        for layer in range(self.next_layer, lay.num_layers):
            self.send_layer(layer, kv[layer])

    def finish(self, notice: str | None = None) -> TransferResult:
        """Completion notice; returns once the receiver verified length and checksum
        (and, with ``notice``, once its ``on_landed`` hook answered: ``taken``)."""
        self._check_open()
        if self.next != self.start + self.nbytes:
            sent = self.next - self.start
            self.abort(f"finish() after {sent} of {self.nbytes} bytes")
            raise InvalidArgument(f"finish() called after only {sent} of {self.nbytes} bytes "
                                  f"({self.next_layer} of {self.layout.num_layers} layers)")
        value = self.hasher.value()
        if notice is not None and not (isinstance(notice, str) and notice.isascii()
                                       and len(notice) <= wire.MAX_NOTICE_CHARS):
            self.abort("finish() with an invalid notice")
            raise InvalidArgument(f"notice must be an ASCII string of at most "
                                  f"{wire.MAX_NOTICE_CHARS} characters")
        end: dict[str, Any] = {"nbytes": self.nbytes, "checksum": value}
        if notice is not None:
            end["notice"] = notice
        with self._failing():
            self.conn.send_frame(wire.END, meta=end)
            _, done = self.conn.expect(wire.DONE)
        self._open = False
        self.sender._checkin(self.handle.endpoint, self.conn)
        return TransferResult(self.handle.request_id, self.nbytes, self.mode, self.num_messages,
                              value, time.perf_counter() - self.began,
                              taken=done.get("taken") is True)

    def abort(self, reason: str = "aborted by sender") -> None:
        if not self._open:
            return
        self._open = False
        with contextlib.suppress(PdserveError, OSError):
            self.conn.send_frame(wire.ABORT, meta={"reason": reason[:1000]})
        self.conn.close()  # its state is unknown now: never back to the pool

    # -- internals -------------------------------------------------------------------
    def _send_layer_bytes(self, flat: torch.Tensor) -> None:
        if self.mode != "block_fixed":
            self._write(flat, ack=False)
            return
        for half in range(2):  # K then V
            base, end = half * self._kv_bytes, (half + 1) * self._kv_bytes
            for page in range(base, end, self._page_bytes):
                self._write(flat[page : min(page + self._page_bytes, end)], ack=True)

    def _write(self, flat: torch.Tensor, ack: bool) -> None:
        if not self.granted:
            self.conn.expect(wire.GRANT)  # raises Refused: nothing was written
            self.granted = True
        if not ack:
            self.conn.poll_error()  # a cancel/expiry on the receiver stops us before writing
        self.sender._put(self, self.next, flat, ack)
        self.next += flat.numel()
        self.num_messages += 1

    def _check_open(self) -> None:
        if not self._open:
            raise TransferError(f"stream for {self.handle.request_id!r} is closed")

    def _check_tensor(self, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgument(f"KV must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape or tensor.dtype != self.layout.torch_dtype:
            raise InvalidArgument(f"KV tensor {tuple(tensor.shape)} {tensor.dtype} does not "
                                  f"match {shape} {self.layout.torch_dtype}")

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """Any failure ends the stream: the connection is dropped, never pooled."""
        try:
            yield
        except BaseException:
            self._open = False
            self.conn.close()
            raise
