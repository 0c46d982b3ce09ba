"""Instance side of the token channel: decode/aggregated -> each router (no Triton import).

    hub = ChannelHub("decode_0", secret, on_broken=role.abort_many)
    hub.connect("unix:/tmp/pdserve-xyz/pdserve.sock")    # in reserve/generate
    sink = hub.sink(address, request_id)                  # a batch_worker.Sink
    ...                                                   # worker calls sink.chunk()
    hub.flush()                                           # once per batcher step

Sinks only queue; ``flush`` hands what was queued since the last flush to the
hub's writer thread, which writes ONE frame per router. The batch thread's
``flush()`` waits until its frame is written: a router that reads slowly slows
the steps (backpressure), no queue grows. Everything else (an abort, a
reservation's expiry, a failed start) calls ``flush(wait=False)`` and goes on:
an abort must free its KV and answer at once, not wait behind a full socket.
A write that fails (router gone, or reading nothing for ``SEND_TIMEOUT_S``)
drops that router's connection and hands the request ids still streaming to it
to ``on_broken``, which aborts them, so their KV is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from pdserve.errors import PdserveError, Unavailable
from pdserve.kvtransfer.wire import Connection
from pdserve.roles.contracts import TokenChunk
from pdserve.roles.token_wire import Entry, encode_hello, encode_step, parse_address

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0  # a router that reads nothing for this long is treated as gone


class _Writer:
    """One connection to one router, its queued entries and live request ids."""

    def __init__(self, address: str, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.queued: list[Entry] = []
        self.live: set[str] = set()
        self.broken = False


class ChannelHub:
    def __init__(self, name: str, secret: bytes,
                 on_broken: Callable[[list[str]], None] | None = None) -> None:
        self.name = name
        self.incarnation = os.urandom(16)  # tells the router this stub from a restarted one
        self._secret = secret
        self._on_broken = on_broken
        self._lock = threading.Lock()  # guards _writers, each writer's queue/live, tickets
        self._cond = threading.Condition(self._lock)
        self._connect_lock = threading.Lock()
        self._writers: dict[str, _Writer] = {}
        # Flush tickets: ``_asked`` counts flush() calls, ``_sent`` the last one whose
        # entries the writer thread has written (or found nothing to write for).
        self._asked = 0
        self._sent = 0
        self._closing = False
        self._thread: threading.Thread | None = None  # started with the first connection

    # -- connections -------------------------------------------------------------------
    def is_connected(self, address: str) -> bool:
        with self._lock:
            writer = self._writers.get(address)
            return writer is not None and not writer.broken

    async def ensure(self, address: str) -> None:
        """``connect`` off the event loop (a TCP dial + handshake may take a while)."""
        if not self.is_connected(address):
            await asyncio.get_running_loop().run_in_executor(None, self.connect, address)

    def connect(self, address: str) -> None:
        """Open the channel to ``address`` unless open; raises ``Unavailable``.

        Serialised: two connections of one stub to one router would share an
        incarnation, and the router cannot tell them apart.
        """
        with self._connect_lock:
            if self.is_connected(address):
                return
            sock = self._dial(address)
            try:
                sock.sendall(encode_hello(self.name, self.incarnation))
            except OSError as exc:
                sock.close()
                raise Unavailable(f"{self.name}: token channel to {address} failed: "
                                  f"{exc}") from None
            with self._lock:
                closing = self._closing
                if not closing:
                    self._writers[address] = _Writer(address, sock)
            if closing:  # a request that raced the instance's release
                sock.close()
                raise Unavailable(f"{self.name} is shutting down: no token channel to {address}")
            self._start_writer()

    def _dial(self, address: str) -> socket.socket:
        family, target = parse_address(address)
        try:
            if family == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(CONNECT_TIMEOUT_S)
                try:
                    sock.connect(str(target))
                except OSError:
                    sock.close()
                    raise
            else:
                assert isinstance(target, tuple)
                # Across hosts the router proves the deployment secret (and we ours):
                # the kvtransfer handshake, reused as is.
                conn = Connection.connect(target, self._secret, CONNECT_TIMEOUT_S, SEND_TIMEOUT_S)
                sock = conn.sock
        except (OSError, PdserveError) as exc:
            raise Unavailable(f"{self.name}: cannot open token channel to {address}: "
                              f"{exc}") from None
        sock.settimeout(SEND_TIMEOUT_S)
        return sock

    # -- entries -----------------------------------------------------------------------
    def sink(self, address: str, request_id: str) -> ChannelSink:
        with self._lock:
            writer = self._writers.get(address)
            if writer is None or writer.broken:
                raise Unavailable(f"{self.name}: no token channel to {address}")
            writer.live.add(request_id)
        return ChannelSink(self, writer, request_id)

    def _queue(self, writer: _Writer, entry: Entry) -> None:
        with self._lock:
            if writer.broken:
                return
            writer.queued.append(entry)
            if entry.is_final:
                writer.live.discard(entry.request_id)

    def flush(self, wait: bool = True) -> None:
        """Have every router's queued entries written, as one frame per router.

        ``wait``: return once they are (or their connection was dropped). Only the
        batch thread should wait; on the writer thread itself (``on_broken``) it
        never does."""
        with self._lock:
            self._asked += 1
            ticket = self._asked
            self._cond.notify_all()
            if not wait or self._thread is None or threading.current_thread() is self._thread:
                return
            while self._sent < ticket and not self._closing and self._thread.is_alive():
                self._cond.wait(timeout=1.0)

    def _start_writer(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._write_loop,
                                                name=f"{self.name}-tokens", daemon=True)
                self._thread.start()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while self._sent >= self._asked and not self._closing:
                    self._cond.wait()
                if self._sent >= self._asked:  # closing, and everything asked is written
                    return
                ticket = self._asked
                batches = [(w, w.queued) for w in self._writers.values() if w.queued]
                for w, _ in batches:
                    w.queued = []
            for writer, entries in batches:
                try:
                    writer.sock.sendall(encode_step(entries))
                except OSError as exc:
                    log.warning("%s: token channel to %s failed: %s", self.name,
                                writer.address, exc)
                    self._drop(writer)
                except Exception:  # a bug: that channel's streams end, the thread lives
                    log.exception("%s: token channel to %s: frame not written", self.name,
                                  writer.address)
                    self._drop(writer)
            with self._lock:
                self._sent = ticket
                self._cond.notify_all()

    def _drop(self, writer: _Writer) -> None:
        with self._lock:
            writer.broken = True
            if self._writers.get(writer.address) is writer:
                del self._writers[writer.address]
            orphans = sorted(writer.live)
            writer.live.clear()
        with contextlib.suppress(OSError):
            writer.sock.close()
        if orphans and self._on_broken is not None:
            try:
                self._on_broken(orphans)
            except Exception:  # the writer thread must live on for the other routers
                log.exception("%s: aborting the streams of a broken token channel failed",
                              self.name)

    @property
    def num_channels(self) -> int:
        with self._lock:
            return len(self._writers)

    def close(self) -> None:
        """Write what is queued, stop the writer thread, then close every
        connection (the routers see EOF)."""
        with self._lock:
            self._asked += 1
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=SEND_TIMEOUT_S + 5)
        with self._lock:
            writers = list(self._writers.values())
            self._writers.clear()
        for w in writers:
            with contextlib.suppress(OSError):
                w.sock.close()


class ChannelSink:
    """A ``batch_worker.Sink`` that queues one request's tokens on its router's channel."""

    def __init__(self, hub: ChannelHub, writer: _Writer, request_id: str) -> None:
        self._hub = hub
        self._writer = writer
        self.request_id = request_id

    def chunk(self, chunk: TokenChunk, final: bool) -> None:
        reason = chunk.finish_reason or ("abort" if final else "")
        self._hub._queue(self._writer, Entry(self.request_id, chunk.token_ids, reason,
                                             chunk.text_len))

    def fail(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, PdserveError) else Unavailable(
            f"{self._hub.name}: {type(exc).__name__}: {exc}")
        self._hub._queue(self._writer, Entry(self.request_id, error=error))

