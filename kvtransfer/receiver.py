"""The receiver core shared by every transport: control server + reservations.

A ``ControlReceiver`` listens on one authenticated TCP socket (``wire.py``).
Each accepted connection gets a thread that serves transfers one after the
other (senders pool connections):

    BEGIN {request_id, fingerprint, layout, mode, ...}  -> GRANT (one-sided only) | ERR
    DATA  offset, payload   (tcp: received straight into the arena, hashed per chunk)
    NOTE  offset, nbytes    (shm, mooncake: the sender already wrote the bytes)
          ... with FLAG_ACK -> ACK per message (block-fixed baseline)
    END   {nbytes, checksum[, notice]}                  -> DONE {checksum[, taken]} | ERR
    ABORT {reason}

A refused BEGIN is answered ERR, then the frames the sender pipelined behind
it are read and dropped up to its END/ABORT, so the connection stays in step
and the sender gets the reason rather than a broken pipe.

Spans must arrive in region order and tile the prompt region exactly; END
verifies the byte count and the checksum over the landed bytes before the KV
counts as landed. Any failure (bad frame, oversized span, EOF, timeout, a
cancel or TTL expiry meanwhile) fails the reservation, whose extent the
reservation table frees once this thread has left it.

An END with a ``notice`` (the prefill's first token and sampler state, say)
hands it to the owner's ``on_landed`` hook once the KV has landed, on this
thread and before DONE, so the decode can start the sequence without another
round trip; DONE says whether the hook took the request (``taken``).

Transports subclass it only to say how peers reach the arena's memory
(``data_endpoint``, ``remote_base``) and to release what that needs.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

from pdserve.errors import InvalidArgument, PdserveError, TransferError
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.arena import Arena, Extent
from pdserve.kvtransfer.config import TransferConfig, format_endpoint
from pdserve.kvtransfer.handle import KVHandle
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.reservations import Reservation, ReservationTable
from pdserve.kvtransfer.transport import DEFAULT_TTL_S, MODES, KVReceiver, TransferResult

log = logging.getLogger(__name__)
ACCEPT_POLL_S = 0.1
IDLE_POLL_S = 0.2
DRAIN_CHUNK_BYTES = 256 << 10


class _Transfer:
    """One transfer being received on one connection."""

    def __init__(self, res: Reservation, layout: KVLayout, mode: str, checksum: str) -> None:
        self.res = res
        self.start, self.nbytes = layout.prompt_span(res.extent.offset, res.prompt_tokens)
        self.next = self.start  # spans arrive in region order
        self.mode = mode
        self.hasher = wire.Hasher(checksum)  # over the landed bytes, in region order
        self.num_messages = 0
        self.began = time.perf_counter()
        self.notice: str | None = None  # END's, for the on_landed hook

    def accept_span(self, offset: int, nbytes: int) -> None:
        end = self.start + self.nbytes
        if offset != self.next or nbytes <= 0 or offset + nbytes > end:
            raise wire.ProtocolError(
                f"span [{offset}, {offset + nbytes}) refused: expected the next bytes at "
                f"{self.next} within the prompt region [{self.start}, {end})"
            )
        self.next += nbytes
        self.num_messages += 1


class ControlReceiver(KVReceiver):
    """Decode side of a transport: reservations + authenticated control server."""

    transport = "abstract"
    data_frame = wire.DATA  # DATA (bytes on this connection) or NOTE (written one-sided)

    def __init__(self, arena: Arena, layout: KVLayout, model_fingerprint: str,
                 config: TransferConfig, instance: str = "decode") -> None:
        if not model_fingerprint:
            raise ValueError("model_fingerprint must not be empty")
        self.arena, self.layout, self.config = arena, layout, config
        self.model_fingerprint, self.instance = model_fingerprint, instance
        self.reservations = ReservationTable(arena, name=f"{self.transport}-{instance}")
        self._stop = threading.Event()
        self._conn_lock = threading.Lock()
        self._conns: dict[int, tuple[wire.Connection, threading.Thread]] = {}
        self.num_auth_failures = 0
        self.num_stuck_senders = 0  # one-sided senders that did not stop after our ERR
        try:
            self._listener = socket.create_server((config.host, config.port))
        except OSError as exc:
            self.reservations.close()
            raise TransferError(
                f"cannot bind KV receiver to {config.host}:{config.port}: {exc}"
            ) from None
        self._listener.settimeout(ACCEPT_POLL_S)
        self.port = self._listener.getsockname()[1]
        self.endpoint = format_endpoint(config.public_host, self.port)
        self._arena_view = wire.as_memoryview(arena.buffer)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"kv-{self.transport}-accept-{self.port}")
        self._acceptor.start()

    # -- transport hooks -----------------------------------------------------------
    @property
    def data_endpoint(self) -> str:
        return ""

    @property
    def remote_base(self) -> int:
        return 0

    def _release_transport(self) -> None:
        """Free what the transport holds (shm segment, registered memory)."""

    # -- KVReceiver ----------------------------------------------------------------
    def reserve(self, request_id: str, prompt_tokens: int, max_new_tokens: int,
                ttl_s: float = DEFAULT_TTL_S) -> KVHandle:
        if not isinstance(prompt_tokens, int) or prompt_tokens <= 0:
            raise InvalidArgument(f"prompt_tokens must be a positive int, got {prompt_tokens!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidArgument(
                f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}"
            )
        nbytes = self.layout.extent_bytes(prompt_tokens, max_new_tokens)
        res = self.reservations.reserve(request_id, prompt_tokens, max_new_tokens, nbytes, ttl_s)
        return KVHandle(
            request_id=request_id, instance=self.instance, transport=self.transport,
            endpoint=self.endpoint, extent_offset=res.extent.offset,
            extent_nbytes=res.extent.nbytes, prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens, num_layers=self.layout.num_layers,
            num_kv_heads=self.layout.num_kv_heads, head_dim=self.layout.head_dim,
            dtype=self.layout.dtype, model_fingerprint=self.model_fingerprint,
            checksum=self.config.checksum, data_endpoint=self.data_endpoint,
            remote_base=self.remote_base,
        )

    def wait(self, request_id: str, timeout_s: float) -> TransferResult:
        return self.reservations.wait(request_id, timeout_s)

    def claim(self, request_id: str) -> Extent:
        return self.reservations.claim(request_id)

    def cancel(self, request_id: str) -> bool:
        return self.reservations.cancel(request_id)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._acceptor.join()
        self._listener.close()
        with self._conn_lock:
            conns = list(self._conns.values())
        for conn, _ in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        for _, thread in conns:
            thread.join()
        self.reservations.close()
        self._release_transport()

    @property
    def num_connections(self) -> int:
        with self._conn_lock:
            return len(self._conns)

    # -- server --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._conn_lock:
                if len(self._conns) >= self.config.max_connections:
                    log.warning("KV receiver at %d connections: refusing one", len(self._conns))
                    sock.close()
                    continue
                conn = wire.Connection(sock, self.config.io_timeout_s)
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                          name=f"kv-{self.transport}-conn-{sock.fileno()}")
                self._conns[id(conn)] = (conn, thread)
            thread.start()

    def _serve(self, conn: wire.Connection) -> None:
        try:
            if not conn.accept_handshake(self.config.secret):
                self.num_auth_failures += 1
                log.warning("KV receiver %s: peer failed authentication", self.endpoint)
                return
            while not self._stop.is_set():
                if conn.readable_within(IDLE_POLL_S):
                    self._serve_transfer(conn)
        except (PdserveError, OSError) as exc:
            log.debug("KV connection closed: %s", exc)
        finally:
            conn.close()
            with self._conn_lock:
                self._conns.pop(id(conn), None)

    def _serve_transfer(self, conn: wire.Connection) -> None:
        """Serve one BEGIN..END exchange; on failure fail the reservation and raise."""
        header, meta = conn.recv_frame()
        if header.kind != wire.BEGIN:
            raise wire.ProtocolError(f"expected BEGIN, got {wire.FRAME_NAMES[header.kind]}")
        try:
            res = self._check_begin(meta)
        except PdserveError as exc:
            conn.send_frame(wire.ERR, meta={"message": str(exc)})
            self._drain(conn)  # nothing was granted; the connection stays usable
            return
        xfer = _Transfer(res, self.layout, meta["mode"], meta["checksum"])
        result: TransferResult | None = None
        error = "connection lost"
        try:
            if self.data_frame == wire.NOTE:
                conn.send_frame(wire.GRANT)  # one-sided writers wait for it (sender.py)
            result = self._receive(conn, xfer)
        except PdserveError as exc:
            error = str(exc)
            with contextlib.suppress(PdserveError, OSError):
                conn.send_frame(wire.ERR, meta={"message": error})
            if self.data_frame == wire.NOTE:
                self._await_sender_stop(conn)
            raise
        finally:
            self.reservations.end_write(res, result, error)
        assert result is not None
        done: dict[str, Any] = {"checksum": result.checksum}
        if xfer.notice is not None and self._hand_over(res.request_id, xfer.notice):
            done["taken"] = True
        conn.send_frame(wire.DONE, meta=done)

    def _await_sender_stop(self, conn: wire.Connection) -> None:
        """One-sided transports: the sender writes into the extent itself, so it is
        freed only once the sender has stopped. A sender that reads our ERR stops
        between two chunks and drops the connection (``ControlStream._failing``), or
        sends ABORT; wait for that. A sender that does not within the I/O timeout
        (hung inside one copy) keeps its extent reserved until it does, or until
        this receiver closes: a leaked extent is recoverable, KV written into one
        given to another request is not."""
        warned = False
        with contextlib.suppress(PdserveError, OSError):
            while not self._stop.is_set():
                if not conn.readable_within(self.config.io_timeout_s):
                    if not warned:
                        warned = True
                        self.num_stuck_senders += 1
                        log.warning("KV sender did not stop within %.0fs of our ERR; its "
                                    "extent stays reserved until it does",
                                    self.config.io_timeout_s)
                    continue
                header, _ = conn.recv_frame()  # NOTEs of spans it finished meanwhile
                if header.kind == wire.ABORT:
                    return

    def _hand_over(self, request_id: str, notice: str) -> bool:
        """Give a landed transfer's notice to the owner's hook: True if it took it."""
        hook = self.on_landed
        if hook is None:
            return False
        try:
            return hook(request_id, notice) is True
        except Exception:  # the owner's bug: the reservation stays for wait/claim
            log.exception("on_landed hook failed for %r", request_id)
            return False

    def _check_begin(self, meta: dict[str, Any]) -> Reservation:
        try:
            request_id, fingerprint = str(meta["request_id"]), meta["fingerprint"]
            layout = KVLayout(**meta["layout"])
            mode, checksum = meta["mode"], meta["checksum"]
            extent_offset = int(meta["extent_offset"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed BEGIN: {exc}") from None
        if fingerprint != self.model_fingerprint:
            raise InvalidArgument(
                f"model fingerprint mismatch: sender {fingerprint!r}, receiver "
                f"{self.model_fingerprint!r}; refusing KV from a different model"
            )
        if layout != self.layout:
            raise InvalidArgument(f"KV layout mismatch: sender {layout}, receiver {self.layout}")
        if mode not in MODES or checksum != self.config.checksum:
            raise InvalidArgument(f"mode {mode!r} / checksum {checksum!r} not accepted here")
        return self.reservations.begin_write(request_id, extent_offset)

    def _drain(self, conn: wire.Connection) -> None:
        """Drop what a refused sender pipelined behind its BEGIN, up to END/ABORT."""
        budget = self.arena.capacity  # no honest transfer carries more than this
        scratch = memoryview(bytearray(DRAIN_CHUNK_BYTES))
        while True:
            header, _ = conn.recv_frame()
            if header.kind in (wire.END, wire.ABORT):
                return
            if header.kind not in (wire.DATA, wire.NOTE) or header.payload_len > budget:
                raise wire.ProtocolError(
                    f"unexpected {wire.FRAME_NAMES[header.kind]} frame after a refused BEGIN"
                )
            budget -= header.payload_len
            left = header.payload_len
            while left:
                n = min(left, DRAIN_CHUNK_BYTES)
                conn.recv_payload_into(scratch[:n], wire.Hasher("none"), lambda: False)
                left -= n

    def _receive(self, conn: wire.Connection, xfer: _Transfer) -> TransferResult:
        res = xfer.res
        while True:
            header, meta = conn.recv_frame()
            if res.is_failed:
                raise TransferError(f"transfer of {res.request_id!r} stopped: {res.error}")
            if header.kind in (wire.DATA, wire.NOTE) and header.kind != self.data_frame:
                raise wire.ProtocolError(
                    f"{wire.FRAME_NAMES[header.kind]} frames are not used by {self.transport}"
                )
            if header.kind != wire.DATA and header.payload_len:
                raise wire.ProtocolError(f"{wire.FRAME_NAMES[header.kind]} frame carries a payload")
            if header.kind == wire.DATA:
                xfer.accept_span(header.offset, header.payload_len)
                view = self._arena_view[header.offset : header.offset + header.payload_len]
                conn.recv_payload_into(view, xfer.hasher, lambda: res.is_failed)
            elif header.kind == wire.NOTE:
                nbytes = meta.get("nbytes")
                if type(nbytes) is not int:
                    raise wire.ProtocolError(f"NOTE without an integer nbytes: {nbytes!r}")
                xfer.accept_span(header.offset, nbytes)
                if self.config.verify == "streaming":
                    xfer.hasher.update(self._arena_view[header.offset : header.offset + nbytes])
            elif header.kind == wire.END:
                return self._verify(xfer, meta)
            elif header.kind == wire.ABORT:
                raise TransferError(f"sender aborted: {meta.get('reason', 'no reason given')}")
            else:
                raise wire.ProtocolError(f"unexpected {wire.FRAME_NAMES[header.kind]} frame")
            if header.wants_ack:
                conn.send_frame(wire.ACK)

    def _verify(self, xfer: _Transfer, meta: dict[str, Any]) -> TransferResult:
        got = xfer.next - xfer.start
        if got != xfer.nbytes or meta.get("nbytes") != xfer.nbytes:
            raise TransferError(
                f"truncated KV transfer: {got} bytes landed, sender claims "
                f"{meta.get('nbytes')}, the prompt region is {xfer.nbytes}"
            )
        if self.data_frame == wire.NOTE and self.config.verify == "at_end":
            # One pass over the landed region now: catches any change up to END.
            xfer.hasher.update(self._arena_view[xfer.start : xfer.start + xfer.nbytes])
        notice = meta.get("notice")
        if notice is not None and not (isinstance(notice, str)
                                       and len(notice) <= wire.MAX_NOTICE_CHARS):
            raise wire.ProtocolError("END carries a notice that is not a string of at most "
                                     f"{wire.MAX_NOTICE_CHARS} characters")
        xfer.notice = notice
        value = xfer.hasher.value()
        if value is not None and value != meta.get("checksum"):
            raise TransferError(
                f"KV checksum mismatch for {xfer.res.request_id!r}: landed {value:#018x}, "
                f"sender {meta.get('checksum')}; the bytes are corrupt"
            )
        return TransferResult(xfer.res.request_id, xfer.nbytes, xfer.mode, xfer.num_messages,
                              value, time.perf_counter() - xfer.began)
