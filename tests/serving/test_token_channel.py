"""The token channel without Triton: wire format, hub -> server, coalescing, EOF, auth."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pdserve.errors import Cancelled, InvalidArgument, Unavailable
from pdserve.roles.contracts import TokenChunk
from pdserve.roles.token_receiver import ChannelServer, InstanceLost, TokenStream
from pdserve.roles.token_sender import ChannelHub, ChannelSink
from pdserve.roles.token_wire import (
    FRAME,
    ChannelError,
    Entry,
    decode_hello,
    decode_step,
    encode_hello,
    encode_step,
    parse_address,
)

SECRET = b"s" * 32


def test_step_round_trip() -> None:
    entries = [Entry("a", (1, 2, 3)), Entry("b", (7,), "stop", 5), Entry("c", (), "abort"),
               Entry("d", error=Unavailable("KV reservation expired"))]
    frame = encode_step(entries)
    back = decode_step(frame[4:])
    assert [(e.request_id, e.token_ids, e.finish_reason, e.text_len) for e in back[:3]] == [
        ("a", (1, 2, 3), "", -1), ("b", (7,), "stop", 5), ("c", (), "abort", -1)]
    assert isinstance(back[3].error, Unavailable) and "expired" in str(back[3].error)
    assert decode_hello(encode_hello("decode_0", b"x" * 16)[4:]) == ("decode_0", b"x" * 16)


@pytest.mark.parametrize("body", [b"\x00", b"\x00\x01\x09\x00\x00\x00\x00\x00\x00\x00\x00a",
                                  b"\x00\x01\x00\xff\xff\xff\xff\x00\x00\x00\x05a\x00"])
def test_bad_step_is_channel_error(body: bytes) -> None:
    with pytest.raises(ChannelError):
        decode_step(body)


def test_bad_hello_and_address() -> None:
    with pytest.raises(ChannelError):
        decode_hello(b"HTTP/1.1 200")
    with pytest.raises(InvalidArgument):
        parse_address("udp:1.2.3.4:5")
    assert parse_address("tcp:10.0.0.1:9000") == ("tcp", ("10.0.0.1", 9000))


FAMILIES = pytest.mark.parametrize("family", ["unix", "tcp"])


def _with_server(family: str, body: Callable[[ChannelServer], Awaitable[None]]) -> None:
    """No pytest-asyncio here: each test runs its own loop around one server."""

    async def main() -> None:
        srv = ChannelServer("router", SECRET, family=family,  # type: ignore[arg-type]
                            roles={"decode_0": "decode"})
        await srv.start()
        try:
            await asyncio.wait_for(body(srv), 30)
        finally:
            await srv.close()

    asyncio.run(main())


async def _in_thread(fn: object, *args: object) -> object:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)  # type: ignore[arg-type]


async def _tokens_flow_and_finish(server: ChannelServer) -> None:
    hub = ChannelHub("decode_0", SECRET)
    await hub.ensure(server.address)
    await hub.ensure(server.address)  # idempotent: one connection
    assert hub.num_channels == 1 and hub.is_connected(server.address)
    got: list[tuple[int, ...]] = []
    stream = server.open("r1", got.append)
    await server.bind(stream, "decode_0", hub.incarnation)
    sink = hub.sink(server.address, "r1")
    sink.chunk(TokenChunk(token_ids=(5, 6)), final=False)
    hub.flush()
    sink.chunk(TokenChunk(token_ids=(7,), finish_reason="length"), final=True)
    hub.flush()
    assert await asyncio.wait_for(stream.done, 5) == ("length", -1)
    assert [t for chunk in got for t in chunk] == [5, 6, 7]
    server.close_stream(stream)
    hub.close()
    if server.family == "unix":
        sock_dir = Path(server.address[len("unix:"):]).parent
        assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700


async def _bound_stream(server: ChannelServer) -> tuple[ChannelHub, TokenStream,
                                                         list[tuple[int, ...]], ChannelSink]:
    """A hub connected to ``server`` and request "r1" streaming on it: (hub, the
    router's stream, what it delivered, the instance's sink)."""
    hub = ChannelHub("decode_0", SECRET)
    await _in_thread(hub.connect, server.address)
    got: list[tuple[int, ...]] = []
    stream = server.open("r1", got.append)
    await server.bind(stream, "decode_0", hub.incarnation)
    return hub, stream, got, hub.sink(server.address, "r1")


async def _router_behind_gets_one_coalesced_delivery(server: ChannelServer) -> None:
    hub, stream, got, sink = await _bound_stream(server)
    for t in range(10):  # ten steps written while the loop is not reading
        sink.chunk(TokenChunk(token_ids=(t,)), final=False)
        hub.flush()
    sink.chunk(TokenChunk(finish_reason="stop", text_len=3), final=True)
    hub.flush()
    assert await asyncio.wait_for(stream.done, 5) == ("stop", 3)
    assert got == [tuple(range(10))]
    server.close_stream(stream)
    hub.close()


async def _eof_fails_bound_streams_at_once(server: ChannelServer) -> None:
    hub = ChannelHub("decode_0", SECRET)
    await _in_thread(hub.connect, server.address)
    streams = [server.open(f"r{i}", lambda ids: None) for i in range(3)]
    for s in streams:
        await server.bind(s, "decode_0", hub.incarnation)
    hub.close()  # what a SIGKILLed stub looks like to the router: EOF
    for s in streams:
        with pytest.raises(InstanceLost, match="decode instance decode_0 failed"):
            await asyncio.wait_for(s.done, 5)
        server.close_stream(s)
    assert server.failure("decode_0", within_s=10) is not None
    # A request whose reserve that stub answered just before dying fails at once too.
    orphan = server.open("r8", lambda ids: None)
    with pytest.raises(InstanceLost):
        await asyncio.wait_for(server.bind(orphan, "decode_0", hub.incarnation), 2)
    server.close_stream(orphan)
    # A fresh stub of the instance connecting clears the failure.
    hub2 = ChannelHub("decode_0", SECRET)
    await _in_thread(hub2.connect, server.address)
    late = server.open("r9", lambda ids: None)
    await server.bind(late, "decode_0", hub2.incarnation)
    assert server.failure("decode_0", within_s=10) is None
    server.close_stream(late)
    hub2.close()


async def _wrong_secret() -> None:
    srv = ChannelServer("router", SECRET, family="tcp")
    await srv.start()
    try:
        hub = ChannelHub("decode_0", b"w" * 32)
        with pytest.raises(Unavailable, match="authentication"):
            await _in_thread(hub.connect, srv.address)
        assert hub.num_channels == 0
    finally:
        await srv.close()


async def _router_gone() -> None:
    srv = ChannelServer("router", SECRET)
    await srv.start()
    orphans: list[str] = []
    hub = ChannelHub("decode_0", SECRET, on_broken=orphans.extend)
    await _in_thread(hub.connect, srv.address)
    sinks = [hub.sink(srv.address, f"r{i}") for i in range(2)]
    sinks[1].chunk(TokenChunk(finish_reason="length"), final=True)  # r1 ended already
    stream = srv.open("r0", lambda ids: None)
    await srv.bind(stream, "decode_0", hub.incarnation)  # the router has the connection
    await srv.close()
    await asyncio.sleep(0.1)
    for _ in range(50):  # the first write after the peer closed may still succeed
        sinks[0].chunk(TokenChunk(token_ids=(1,)), final=False)
        await _in_thread(hub.flush)
        if orphans:
            break
        await asyncio.sleep(0.02)
    assert orphans == ["r0"]
    assert hub.num_channels == 0
    with pytest.raises(Unavailable):
        hub.sink(srv.address, "r2")
    assert not Path(srv.address[len("unix:"):]).parent.exists()
    hub.close()


@FAMILIES
def test_tokens_flow_and_finish(family: str) -> None:
    _with_server(family, _tokens_flow_and_finish)


@FAMILIES
def test_router_behind_gets_one_coalesced_delivery(family: str) -> None:
    _with_server(family, _router_behind_gets_one_coalesced_delivery)


@FAMILIES
def test_eof_fails_bound_streams_at_once(family: str) -> None:
    _with_server(family, _eof_fails_bound_streams_at_once)


def test_wrong_secret_is_refused_on_tcp() -> None:
    asyncio.run(_wrong_secret())


def test_router_gone_aborts_live_requests() -> None:
    asyncio.run(_router_gone())


async def _tokens_before_bind(server: ChannelServer) -> None:
    hub = ChannelHub("decode_0", SECRET)
    await _in_thread(hub.connect, server.address)
    got: list[tuple[int, ...]] = []
    stream = server.open("r1", got.append)
    sink = hub.sink(server.address, "r1")
    sink.chunk(TokenChunk(token_ids=(1, 2)), final=False)  # before the router binds
    hub.flush()
    await asyncio.sleep(0.1)
    await server.bind(stream, "decode_0", hub.incarnation)
    sink.chunk(TokenChunk(token_ids=(3,), finish_reason="length"), final=True)
    hub.flush()
    assert await asyncio.wait_for(stream.done, 5) == ("length", -1)
    assert [t for chunk in got for t in chunk] == [1, 2, 3]
    server.close_stream(stream)
    hub.close()


def test_tokens_before_bind_are_kept() -> None:
    _with_server("unix", _tokens_before_bind)


def test_token_channel_config_is_validated() -> None:
    from pdserve.server.config import parse_parameters

    cfg = parse_parameters("pdserve", {"role": "router", "token_channel": "tcp",
                                       "token_host": "10.0.0.5",
                                       "routes": '{"default": {"aggregated": ["a"]}}'})
    assert (cfg.token_channel, cfg.token_host) == ("tcp", "10.0.0.5")
    with pytest.raises(ValueError, match="token_channel must be one of"):
        parse_parameters("pdserve", {"role": "prefill", "token_channel": "udp"})


async def _concurrent_connects(server: ChannelServer) -> None:
    hub = ChannelHub("decode_0", SECRET)
    await asyncio.gather(*(hub.ensure(server.address) for _ in range(8)))
    assert hub.num_channels == 1
    stream = server.open("r1", lambda ids: None)
    await server.bind(stream, "decode_0", hub.incarnation)  # not torn down by a twin
    await asyncio.sleep(0.1)
    assert server.failure("decode_0", within_s=10) is None
    server.close_stream(stream)
    hub.close()


def test_concurrent_connects_make_one_channel() -> None:
    _with_server("unix", _concurrent_connects)


async def _held_until_release(server: ChannelServer) -> None:
    """A decode that starts on landing may stream, and even finish, before the
    router sent the prefill's first token: nothing is delivered until release."""
    hub = ChannelHub("decode_0", SECRET)
    await _in_thread(hub.connect, server.address)
    got: list[tuple[int, ...]] = []
    stream = server.open("r1", got.append, hold=True)
    await server.bind(stream, "decode_0", hub.incarnation)
    sink = hub.sink(server.address, "r1")
    sink.chunk(TokenChunk(token_ids=(2,)), final=False)
    hub.flush()
    sink.chunk(TokenChunk(token_ids=(3,), finish_reason="length"), final=True)
    hub.flush()
    await asyncio.sleep(0.2)
    assert got == [] and not stream.done.done()
    got.append((1,))  # the router's first token
    stream.release()
    assert await asyncio.wait_for(stream.done, 5) == ("length", -1)
    assert [t for chunk in got for t in chunk] == [1, 2, 3]
    server.close_stream(stream)
    hub.close()


def test_held_stream_delivers_in_order_on_release() -> None:
    _with_server("unix", _held_until_release)


def _read_frames(sock: socket.socket) -> list[bytes]:
    """Every frame body the peer sends until EOF."""
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    frames, i = [], 0
    while i < len(data):
        (n,) = FRAME.unpack_from(data, i)
        frames.append(data[i + FRAME.size:i + FRAME.size + n])
        i += FRAME.size + n
    assert i == len(data)
    return frames


def test_flush_without_wait_returns_while_the_router_reads_nothing(tmp_path: Path) -> None:
    """An abort flushes without waiting: with the router's socket full and the batch
    thread's flush stuck behind it, the abort goes on at once, and its final entry
    follows the stuck frame once the router reads again. close() ends the writer."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "router.sock"
    listener.bind(str(path))
    listener.listen(1)
    hub = ChannelHub("decode_0", SECRET)
    hub.connect(f"unix:{path}")
    conn, _ = listener.accept()  # and read nothing yet
    try:
        big, small = (hub.sink(f"unix:{path}", rid) for rid in ("big", "small"))
        big.chunk(TokenChunk(token_ids=tuple(range(1 << 20))), final=False)  # ~4 MB
        step = threading.Thread(target=hub.flush)  # the batch thread's flush: waits
        step.start()
        step.join(timeout=0.5)
        assert step.is_alive(), "the socket should be full: the stepping flush waits"
        small.chunk(TokenChunk(finish_reason="abort"), final=True)
        t0 = time.monotonic()
        hub.flush(wait=False)
        assert time.monotonic() - t0 < 0.2
        assert step.is_alive()
        reader = threading.Thread(target=lambda: frames.extend(_read_frames(conn)))
        frames: list[bytes] = []
        reader.start()
        step.join(timeout=10)
        assert not step.is_alive()
        hub.flush()  # written by now or with this: either way before close
        writer = hub._thread
        assert writer is not None and writer.is_alive()
        hub.close()
        reader.join(timeout=10)
        assert decode_hello(frames[0]) == ("decode_0", hub.incarnation)
        entries = [e for f in frames[1:] for e in decode_step(f)]
        assert [(e.request_id, len(e.token_ids), e.finish_reason) for e in entries] == [
            ("big", 1 << 20, ""), ("small", 0, "abort")]
        assert not writer.is_alive()
    finally:
        hub.close()
        conn.close()
        listener.close()


async def _ended_stream_drops_what_follows(server: ChannelServer) -> None:
    hub, stream, got, sink = await _bound_stream(server)
    sink.chunk(TokenChunk(token_ids=(1,)), final=False)
    hub.flush()
    await asyncio.sleep(0.1)
    server.end("r1", Cancelled("r1 was cancelled by the client"))
    server.end("nobody", Cancelled("no stream: nothing happens"))
    sink.chunk(TokenChunk(token_ids=(2,), finish_reason="length"), final=True)
    hub.flush()
    with pytest.raises(Cancelled):
        await asyncio.wait_for(stream.done, 5)
    await asyncio.sleep(0.1)
    assert got == [(1,)]
    server.close_stream(stream)
    hub.close()


def test_a_stream_ended_on_cancel_passes_nothing_more_on() -> None:
    _with_server("unix", _ended_stream_drops_what_follows)


async def _no_connection_after_close(server: ChannelServer) -> None:
    hub = ChannelHub("decode_0", SECRET)
    await hub.ensure(server.address)
    hub.close()
    with pytest.raises(Unavailable, match="shutting down"):
        await hub.ensure(server.address)  # a request that raced the release
    assert hub.num_channels == 0


def test_a_closed_hub_opens_no_connection() -> None:
    _with_server("unix", _no_connection_after_close)


async def _broken_channel_hook_fails() -> None:
    """An on_broken that raises (a bug) must not stop the writer thread: the other
    router's streams go on."""
    gone, kept = ChannelServer("router_a", SECRET), ChannelServer("router_b", SECRET)
    await gone.start()
    await kept.start()
    calls: list[list[str]] = []

    def on_broken(ids: list[str]) -> None:
        calls.append(ids)
        raise RuntimeError("bug in on_broken")

    hub = ChannelHub("decode_0", SECRET, on_broken=on_broken)
    try:
        await _in_thread(hub.connect, gone.address)
        await _in_thread(hub.connect, kept.address)
        doomed = hub.sink(gone.address, "r0")
        got: list[tuple[int, ...]] = []
        stream = kept.open("r1", got.append)
        await kept.bind(stream, "decode_0", hub.incarnation)
        alive = hub.sink(kept.address, "r1")
        await gone.close()
        for _ in range(50):  # the first write after the peer closed may still succeed
            doomed.chunk(TokenChunk(token_ids=(1,)), final=False)
            await _in_thread(hub.flush)
            if calls:
                break
            await asyncio.sleep(0.02)
        assert calls == [["r0"]]
        alive.chunk(TokenChunk(token_ids=(4,), finish_reason="length"), final=True)
        await _in_thread(hub.flush)
        assert await asyncio.wait_for(stream.done, 5) == ("length", -1)
        assert got == [(4,)]
        kept.close_stream(stream)
    finally:
        hub.close()
        await kept.close()


def test_a_failing_broken_channel_hook_does_not_stop_the_writer() -> None:
    asyncio.run(_broken_channel_hook_fails())
