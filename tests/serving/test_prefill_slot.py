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


def test_the_slot_is_free_when_the_answer_is_sent(mods: dict[str, Any]) -> None:
    c = mods["c"]
    cfg = mods["InstanceConfig"]
    threads = threading.active_count()
    decode = mods["DecodeRole"](cfg(name="decode_0", role="decode", model="tiny",
                                    max_batch_size=4, kv_capacity_bytes=8 << 20))
    prefill = mods["PrefillRole"](cfg(name="prefill_0", role="prefill", model="tiny",
                                      max_batch_size=1, kv_capacity_bytes=8 << 20))
    server = mods["ChannelServer"]("router", mods["transfer_config"](decode.cfg).secret,
                                   roles={"decode_0": "decode"})

    async def reserve(rid: str) -> tuple[Any, str]:
        out = fake_pb_utils.PayloadOut()
        stream = server.open(rid, lambda ids: None)
        await decode.handle("reserve", c.GenerateCall(rid, PROMPT, SAMPLING,
                                                      channel=server.address).to_bytes(), out)
        accepted = c.Accepted.from_bytes(out.payloads[0])
        await server.bind(stream, "decode_0", bytes.fromhex(accepted.incarnation))
        return stream, accepted.handle

    async def prefill_call(rid: str, handle: str) -> _Answer:
        answer = _Answer(prefill, asyncio.get_running_loop())
        await prefill.handle("prefill", c.PrefillCall(rid, PROMPT, SAMPLING, handle).to_bytes(),
                             answer)
        return answer

    async def body() -> None:
        await server.start()
        try:
            s1, h1 = await reserve("req-1")
            s2, h2 = await reserve("req-2")
            first = await prefill_call("req-1", h1)
            # one slot, held: the next prompt is refused at once
            with pytest.raises(mods["PrefillRejected"]):
                await prefill_call("req-2", h2)
            await asyncio.wait_for(first.done.wait(), 30)
            assert first.error is None and first.is_final
            assert c.PrefillResult.from_bytes(first.payload).request_id == "req-1"
            assert first.in_flight_at_answer == 0  # free before the answer left
            # the prompt a router sends on hearing the answer is taken
            second = await prefill_call("req-2", h2)
            await asyncio.wait_for(second.done.wait(), 30)
            assert second.error is None and second.in_flight_at_answer == 0
            for stream in (s1, s2):
                stream.release()
                assert await asyncio.wait_for(stream.done, 30) == ("length", -1)
        finally:
            await server.close()

    try:
        asyncio.run(body())
        assert prefill.load().in_flight == 0
        assert prefill.engine.arena.bytes_in_use == 0
    finally:
        prefill.close()
        decode.close()
    for _ in range(100):  # every thread the roles took is given back
        if threading.active_count() <= threads:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]

