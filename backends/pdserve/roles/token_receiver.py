"""Router side of the token channel: accept instances, demultiplex their steps (asyncio).

    server = ChannelServer("pdserve", secret, family="unix")
    address = await server.start()            # "unix:/tmp/pdserve-tok-xyz/pdserve.sock"
    stream = server.open(request_id, on_tokens, on_finish)
    ...                                       # control call answers (name, incarnation)
    await server.bind(stream, "decode_0", incarnation)
    await stream.done                         # finish reason, or raises the error

One reader task per connected instance, no thread per stream. A reader parses
every frame already buffered before it delivers, so a request the router is
behind on gets all its pending tokens in ONE client response. EOF (the
instance's stub died or closed) fails every stream bound to that connection at
once with ``Unavailable("decode instance decode_0 failed: ...")`` and records
the failure in ``failed`` (the router stops choosing the instance for a while).

Security: unix sockets live in a fresh 0700 directory (only this user can
connect); tcp peers must pass the kvtransfer HMAC handshake before a byte of
theirs is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pdserve.errors import Cancelled, PdserveError, Unavailable
from pdserve.kvtransfer.wire import Connection
from pdserve.roles.token_wire import (
    FRAME,
    MAX_FRAME_BYTES,
    ChannelError,
    Entry,
    decode_hello,
    decode_step,
)
from pdserve.server.config import RUNTIME_DIR_ENV

log = logging.getLogger(__name__)

BIND_TIMEOUT_S = 10.0  # hello of an instance that answered a control call must arrive by then
HANDSHAKE_TIMEOUT_S = 10.0


class InstanceLost(Unavailable):
    """The instance streaming this request is gone (its channel hit EOF)."""


@dataclass(eq=False)
class TokenStream:
    """One request's view of the channel: callbacks for data, a future for the end."""

    request_id: str
    on_tokens: Callable[[tuple[int, ...]], None]
    done: asyncio.Future[tuple[str, int]]  # (finish reason, text_len), or the error
    peer: _Peer | None = None
    # Entries that came before ``bind``: an aggregated instance starts streaming as
    # soon as it accepts, possibly before the router has read its answer.
    early: list[tuple[_Peer, list[Entry]]] = field(default_factory=list)
    # Deliveries kept back until ``release`` (None: delivered at once). A decode that
    # starts when the KV lands may stream token 2 before the router has the prefill's
    # answer with token 1.
    held: list[list[Entry]] | None = None

    def deliver(self, entries: list[Entry]) -> None:
        if self.done.done():  # ended (finished, failed, cancelled): nothing more to pass on
            return
        if self.held is not None:
            self.held.append(entries)
            return
        ids: list[int] = []
        for e in entries:
            ids.extend(e.token_ids)
        if ids:
            self.on_tokens(tuple(ids))
        last = entries[-1]
        if last.error is not None:
            self.done.set_exception(last.error)
        elif last.finish_reason:
            self.done.set_result((last.finish_reason, last.text_len))

    def release(self) -> None:
        """Deliver what was held, in order, and everything after it at once."""
        held, self.held = self.held, None
        for entries in held or ():
            self.deliver(entries)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


@dataclass(eq=False)
class _Peer:
    name: str
    incarnation: bytes
    streams: set[TokenStream] = field(default_factory=set)
    closed: bool = False


class ChannelServer:
    def __init__(self, name: str, secret: bytes, family: Literal["unix", "tcp"] = "unix",
                 host: str = "127.0.0.1", roles: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.roles = dict(roles or {})  # instance -> "decode"/"aggregated", for messages
        self.family = family
        self.host = host
        self._secret = secret
        self._server: asyncio.AbstractServer | None = None
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._dir: str | None = None
        self.address = ""
        self._streams: dict[str, TokenStream] = {}
        self._peers: dict[tuple[str, bytes], _Peer] = {}
        self._hello = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._lost: set[tuple[str, bytes]] = set()  # stubs whose channel closed (few: restarts)
        self.failed: dict[str, tuple[float, str]] = {}  # instance -> (monotonic time, why)

    async def start(self) -> str:
        if self.address:
            return self.address
        if self.family == "unix":
            # mode 0700; under the launcher's runtime dir when there is one, so a
            # SIGKILLed router leaves nothing behind once the server stops.
            parent = os.environ.get(RUNTIME_DIR_ENV) or None
            if parent is not None and (not os.path.isdir(parent) or len(parent) > 60):
                parent = None  # sun_path holds 107 bytes
            self._dir = tempfile.mkdtemp(prefix="pdserve-tok-", dir=parent)
            path = os.path.join(self._dir, f"{self.name}.sock")
            self._server = await asyncio.start_unix_server(self._on_connect, path=path,
                                                           limit=MAX_FRAME_BYTES)
            self.address = f"unix:{path}"
        else:
            # The handshake runs on a plain blocking socket before asyncio owns it
            # (an asyncio transport would already be reading the peer's bytes).
            listener = socket.create_server((self.host, 0))
            self._listener = listener
            self._acceptor = threading.Thread(
                target=self._accept_tcp, args=(listener, asyncio.get_running_loop()),
                name=f"{self.name}-token-accept", daemon=True)
            self._acceptor.start()
            self.address = f"tcp:{self.host}:{listener.getsockname()[1]}"
        return self.address

    def _accept_tcp(self, listener: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed by close()
            try:
                ok = Connection(sock, HANDSHAKE_TIMEOUT_S).accept_handshake(self._secret)
            except (OSError, PdserveError):
                ok = False
            if not ok:
                sock.close()
                continue
            sock.settimeout(None)
            sock.setblocking(False)
            asyncio.run_coroutine_threadsafe(self._adopt(sock), loop)

    async def _adopt(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_FRAME_BYTES)
        await self._on_connect(reader, writer)

    # -- streams ---------------------------------------------------------------------
    def open(self, request_id: str, on_tokens: Callable[[tuple[int, ...]], None],
             hold: bool = False) -> TokenStream:
        """``hold``: keep deliveries back until ``stream.release()``."""
        if request_id in self._streams:
            raise Unavailable(f"request id {request_id!r} is already streaming")
        stream = TokenStream(request_id, on_tokens, asyncio.get_running_loop().create_future(),
                             held=[] if hold else None)
        self._streams[request_id] = stream
        return stream

    async def bind(self, stream: TokenStream, instance: str, incarnation: bytes) -> None:
        """Attach ``stream`` to the connection of ``instance``'s stub ``incarnation``."""
        key = (instance, incarnation)
        try:
            async with self._hello:
                await asyncio.wait_for(
                    self._hello.wait_for(lambda: key in self._peers or key in self._lost),
                    BIND_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(f"instance {instance} accepted a request but its token channel "
                              f"did not connect within {BIND_TIMEOUT_S:.0f}s") from None
        peer = self._peers.get(key)
        if peer is None or peer.closed:
            raise InstanceLost(f"{self.roles.get(instance, 'pdserve')} instance {instance} "
                               "failed: token channel closed")
        stream.peer = peer
        peer.streams.add(stream)
        for source, entries in stream.early:
            if source is peer:
                stream.deliver(entries)
        stream.early.clear()

    def end(self, request_id: str, exc: BaseException) -> None:
        """Fail the open stream of ``request_id`` (if any) with ``exc``: its waiter
        wakes now and whatever still arrives for it is dropped."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.fail(exc)

    def close_stream(self, stream: TokenStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        if stream.peer is not None:
            stream.peer.streams.discard(stream)
        if not stream.done.done():
            stream.done.cancel()
        elif not stream.done.cancelled():
            stream.done.exception()  # mark retrieved: no "never retrieved" log

    def failure(self, instance: str, within_s: float) -> str | None:
        """Why ``instance`` failed, if its channel broke less than ``within_s`` ago."""
        entry = self.failed.get(instance)
        if entry is None or time.monotonic() - entry[0] > within_s:
            return None
        return entry[1]

    # -- connections -----------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self._closed:  # accepted just before close(): its task started too late
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer: _Peer | None = None
        why = "token channel closed"
        try:
            name, incarnation = decode_hello(await _read_frame(reader))
            if (name, incarnation) in self._peers:  # hubs connect once; refuse a twin
                raise ChannelError(f"{name} connected twice with one incarnation")
            peer = _Peer(name, incarnation)
            async with self._hello:
                self._peers[(name, incarnation)] = peer
                self._hello.notify_all()
            self.failed.pop(name, None)
            await self._pump(reader, peer)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            why = f"token channel closed ({type(exc).__name__})"
        except ChannelError as exc:
            why = f"token channel broke: {exc}"
        except asyncio.CancelledError:
            why = "router is shutting down"
        except Exception as exc:  # a bug here must still fail the streams, and say why
            log.exception("token channel reader failed")
            why = f"token channel reader failed: {type(exc).__name__}: {exc}"
        finally:
            writer.close()
            if peer is not None:
                self._lose(peer, why)
                if not self._closed:  # wake a bind() waiting for this stub
                    notify = asyncio.get_running_loop().create_task(self._notify_hello())
                    self._tasks.add(notify)
                    notify.add_done_callback(self._tasks.discard)
            if task is not None:
                self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, peer: _Peer) -> None:
        while True:
            pending: dict[str, list[Entry]] = {}
            for e in decode_step(await _read_frame(reader)):
                pending.setdefault(e.request_id, []).append(e)
            # Coalesce: every whole frame already buffered goes out with this delivery.
            while _has_frame(reader):
                for e in decode_step(await _read_frame(reader)):
                    pending.setdefault(e.request_id, []).append(e)
            for rid, entries in pending.items():
                stream = self._streams.get(rid)
                if stream is None:
                    continue  # ended here already (e.g. cancelled)
                if stream.peer is peer:
                    stream.deliver(entries)
                elif stream.peer is None:
                    stream.early.append((peer, entries))

    async def _notify_hello(self) -> None:
        async with self._hello:
            self._hello.notify_all()

    def _lose(self, peer: _Peer, why: str) -> None:
        peer.closed = True
        self._peers.pop((peer.name, peer.incarnation), None)
        self._lost.add((peer.name, peer.incarnation))
        message = f"{self.roles.get(peer.name, 'pdserve')} instance {peer.name} failed: {why}"
        if why != "router is shutting down":
            self.failed[peer.name] = (time.monotonic(), message)
        for stream in list(peer.streams):
            stream.fail(InstanceLost(message) if why != "router is shutting down"
                        else Cancelled(message))
        peer.streams.clear()

    def close_now(self) -> None:
        """Synchronous part of ``close`` (stub finalize, no loop): stop listening."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        if self._acceptor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._acceptor.join, 5)
            self._acceptor = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    if n > MAX_FRAME_BYTES:
        raise ChannelError(f"frame of {n} bytes exceeds {MAX_FRAME_BYTES}")
    return await reader.readexactly(n)


def _has_frame(reader: asyncio.StreamReader) -> bool:
    """A whole frame is already buffered (reading it will not wait).

    StreamReader has no public view of its buffer; peeking at ``_buffer`` is
    what lets one delivery carry several steps when the router is behind.
    """
    buf: bytearray = reader._buffer  # type: ignore[attr-defined]
    if len(buf) < FRAME.size:
        return False
    (n,) = FRAME.unpack_from(buf)
    return len(buf) >= FRAME.size + n
