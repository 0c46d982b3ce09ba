"""A prefill's slot is free when its answer leaves, in-process.

The router sends a waiting request's prompt as soon as one of its prefill calls
answers (``SlotSignal``). If the prefill answered first and freed the slot
after, that prompt could be refused for a slot held only until the prefill's
thread took its lock back: on a busy core, milliseconds, and the refused
request went to the back of the router's waiters. The answer is checked here
at the moment it is sent: the instance must already report the slot free and
accept the next prompt.

Built like ``test_decode_landing``: the real prefill and decode roles against
``fake_pb_utils``, the prompt's KV sent into a real decode reservation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.serving import fake_pb_utils

PROMPT = (3, 14, 15, 92, 65, 35)
SAMPLING = {"temperature": 0.0, "max_tokens": 2, "ignore_eos": True}


@pytest.fixture(scope="module")
def mods() -> Iterator[dict[str, Any]]:
    with fake_pb_utils.installed():
        from pdserve.roles import contracts
        from pdserve.roles.decode import DecodeRole
        from pdserve.roles.instance import transfer_config
        from pdserve.roles.prefill import PrefillRole
        from pdserve.roles.token_receiver import ChannelServer
        from pdserve.scheduler.forwarding import PrefillRejected
        from pdserve.server.config import InstanceConfig
        yield {"c": contracts, "DecodeRole": DecodeRole, "PrefillRole": PrefillRole,
               "transfer_config": transfer_config, "ChannelServer": ChannelServer,
               "PrefillRejected": PrefillRejected, "InstanceConfig": InstanceConfig}


class _Answer:
    """A Responder stand-in that looks at the prefill when the answer is sent: what
    the router would find if it sent the next prompt right then."""

    def __init__(self, prefill: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.prefill = prefill
        self.loop = loop
        self.done = asyncio.Event()
        self.payload: bytes | None = None
        self.error: BaseException | None = None
        self.in_flight_at_answer: int | None = None
        self.is_final = False

    def _seen(self) -> None:
        self.in_flight_at_answer = self.prefill.load().in_flight
        self.loop.call_soon_threadsafe(self.done.set)

    def send(self, outputs: dict[str, np.ndarray], final: bool = False) -> None:
        self.payload = outputs["payload"][0]
        self.is_final = final
        self._seen()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.is_final = True
        self._seen()


class _Roles:
    """A real decode and prefill (``max_batch_size`` slots) and the router's token
    channel server; ``reserve`` and ``call`` are the router's two steps."""

    def __init__(self, mods: dict[str, Any], max_batch_size: int) -> None:
        cfg = mods["InstanceConfig"]
        self.c = mods["c"]
        self.decode = mods["DecodeRole"](cfg(name="decode_0", role="decode", model="tiny",
                                             max_batch_size=4, kv_capacity_bytes=8 << 20))
        self.prefill = mods["PrefillRole"](cfg(name="prefill_0", role="prefill", model="tiny",
                                               max_batch_size=max_batch_size,
                                               kv_capacity_bytes=8 << 20))
        self.server = mods["ChannelServer"]("router",
                                            mods["transfer_config"](self.decode.cfg).secret,
                                            roles={"decode_0": "decode"})

    async def reserve(self, rid: str) -> tuple[Any, str]:
        out = fake_pb_utils.PayloadOut()
        stream = self.server.open(rid, lambda ids: None)
        await self.decode.handle("reserve", self.c.GenerateCall(
            rid, PROMPT, SAMPLING, channel=self.server.address).to_bytes(), out)
        accepted = self.c.Accepted.from_bytes(out.payloads[0])
        await self.server.bind(stream, "decode_0", bytes.fromhex(accepted.incarnation))
        return stream, accepted.handle

    async def call(self, rid: str, handle: str) -> _Answer:
        answer = _Answer(self.prefill, asyncio.get_running_loop())
        await self.prefill.handle("prefill", self.c.PrefillCall(
            rid, PROMPT, SAMPLING, handle).to_bytes(), answer)
        return answer

    async def end(self, streams: list[Any]) -> None:
        for stream in streams:
            stream.release()
            assert await asyncio.wait_for(stream.done, 30) == ("length", -1)


def _run(mods: dict[str, Any], max_batch_size: int, body: Any) -> _Roles:
    """``body(roles)`` on a fresh pair; afterwards every slot, extent and thread
    the roles took is given back."""
    threads = threading.active_count()
    roles = _Roles(mods, max_batch_size)

    async def main() -> None:
        await roles.server.start()
        try:
            await body(roles)
        finally:
            await roles.server.close()

    try:
        asyncio.run(main())
        assert roles.prefill.load().in_flight == 0
        assert roles.prefill.engine.arena.bytes_in_use == 0
    finally:
        roles.prefill.close()
        roles.decode.close()
    for _ in range(100):
        if threading.active_count() <= threads:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]
    return roles


def test_the_slot_is_free_when_the_answer_is_sent(mods: dict[str, Any]) -> None:
    async def body(r: _Roles) -> None:
        c = r.c
        s1, h1 = await r.reserve("req-1")
        s2, h2 = await r.reserve("req-2")
        first = await r.call("req-1", h1)
        # one slot, held: the next prompt is refused at once
        with pytest.raises(mods["PrefillRejected"]):
            await r.call("req-2", h2)
        await asyncio.wait_for(first.done.wait(), 30)
        assert first.error is None and first.is_final
        assert c.PrefillResult.from_bytes(first.payload).request_id == "req-1"
        assert first.in_flight_at_answer == 0  # free before the answer left
        # the prompt a router sends on hearing the answer is taken
        second = await r.call("req-2", h2)
        await asyncio.wait_for(second.done.wait(), 30)
        assert second.error is None and second.in_flight_at_answer == 0
        await r.end([s1, s2])

    _run(mods, 1, body)


def test_the_next_forward_does_not_wait_for_a_transfers_end(mods: dict[str, Any]) -> None:
    """A prompt's transfer ends with the decode's DONE, which a busy decode is slow to
    send. The forward thread hands that wait (and the answer) to the finisher, so
    the prompts waiting for the next forward are not held behind it."""
    # req-1's transfer end is held until `go`; every forward is counted
    entered, go = threading.Event(), threading.Event()
    forwards: list[list[str]] = []

    async def body(r: _Roles) -> None:
        c, prefill = r.c, r.prefill
        real_send, real_prefill = prefill.sender.send, prefill.engine.prefill

        def send(handle: Any, *a: Any, **kw: Any) -> Any:
            if handle.request_id == "req-1":
                entered.set()
                assert go.wait(30)
            return real_send(handle, *a, **kw)

        def counted(seqs: Any, *a: Any) -> Any:
            out = real_prefill(seqs, *a)
            forwards.append([s.request_id for s in seqs])
            return out

        prefill.sender.send, prefill.engine.prefill = send, counted
        try:
            s1, h1 = await r.reserve("req-1")
            s2, h2 = await r.reserve("req-2")
            first = await r.call("req-1", h1)
            assert await asyncio.to_thread(entered.wait, 30)  # req-1 forwarded, ending
            assert prefill.load().in_flight == 1  # it keeps its slot meanwhile
            second = await r.call("req-2", h2)
            for _ in range(600):  # req-2's forward runs while req-1's end still waits
                if len(forwards) == 2:
                    break
                await asyncio.sleep(0.05)
            assert forwards == [["req-1"], ["req-2"]]
            assert not first.done.is_set() and not second.done.is_set()
            assert prefill.load().in_flight == 2
            go.set()
            for answer, rid in ((first, "req-1"), (second, "req-2")):
                await asyncio.wait_for(answer.done.wait(), 30)
                assert answer.error is None
                assert c.PrefillResult.from_bytes(answer.payload).request_id == rid
            await r.end([s1, s2])
        finally:
            go.set()

    _run(mods, 2, body)  # and the finisher freed both extents and stopped
