"""The decode role's start on landing, in-process: what happens when it cannot start.

``DecodeRole._on_landed`` runs on the KV receiver's thread when a transfer's
completion notice arrives. It must either start the sequence (tokens reach the
router's channel), decline (the reservation stays for the router's commit), or
fail cleanly: the stream ends with the error, the landed KV goes back to the
arena, and the sender learns the request was taken (so no commit follows).

The role imports Triton's ``triton_python_backend_utils``, which exists only
inside a Triton stub; ``fake_pb_utils`` stands in for the parts a decode uses
(metrics, response tensors, error codes), installed for this module only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pdserve.errors import Unavailable
from tests.kvtransfer import helpers
from tests.serving import fake_pb_utils

RID = "req-1"
PROMPT = (3, 14, 15, 92, 65, 35)


@pytest.fixture(scope="module")
def mods() -> Iterator[dict[str, Any]]:
    """The decode role's modules, imported against the fake Triton utils and
    dropped again afterwards (no other test sees the fake)."""
    with fake_pb_utils.installed():
        from pdserve.kvtransfer import KVHandle
        from pdserve.kvtransfer.factory import make_sender
        from pdserve.roles import contracts
        from pdserve.roles.decode import DecodeRole
        from pdserve.roles.instance import transfer_config
        from pdserve.roles.token_receiver import ChannelServer
        from pdserve.server.config import InstanceConfig
        yield {"KVHandle": KVHandle, "make_sender": make_sender, "c": contracts,
               "DecodeRole": DecodeRole, "transfer_config": transfer_config,
               "ChannelServer": ChannelServer, "InstanceConfig": InstanceConfig}


class _Run:
    """One decode role and one router-side token channel, for one test."""

    def __init__(self, mods: dict[str, Any]) -> None:
        self.m = mods
        self.cfg = mods["InstanceConfig"](name="decode_0", role="decode", model="tiny",
                                          max_batch_size=4, kv_capacity_bytes=8 << 20)
        self.role = mods["DecodeRole"](self.cfg)
        self.sender = mods["make_sender"](self.cfg.kv_transport, self.role.engine.layout,
                                          self.role.engine.fingerprint,
                                          mods["transfer_config"](self.cfg))
        self.server = mods["ChannelServer"]("router", mods["transfer_config"](self.cfg).secret,
                                            roles={"decode_0": "decode"})
        self.tokens: list[int] = []
        self.started = _Count()
        self.role.metrics.started_on_landing = self.started

    async def reserve(self, sampling: dict[str, Any]) -> tuple[Any, Any]:
        """Reserve as the router does; the stream opened held, as the router opens it."""
        c = self.m["c"]
        call = c.GenerateCall(RID, PROMPT, sampling, channel=self.server.address)
        out = fake_pb_utils.PayloadOut()
        stream = self.server.open(RID, lambda ids: self.tokens.extend(ids))
        await self.role.handle("reserve", call.to_bytes(), out)
        accepted = c.Accepted.from_bytes(out.payloads[0])
        await self.server.bind(stream, "decode_0", bytes.fromhex(accepted.incarnation))
        return stream, self.m["KVHandle"].from_bytes(accepted.handle.encode())

    async def land(self, handle: Any, notice: str | None) -> bool:
        """Send the prompt's KV with ``notice``, as the prefill does; True if taken."""
        kv = helpers.random_kv(self.role.engine.layout, len(PROMPT), seed=7)
        result = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.sender.send(handle, kv, "whole", notice=notice))
        return bool(result.taken)

    def close(self) -> None:
        self.sender.close()
        self.role.close()


def _run(mods: dict[str, Any], body: Any) -> _Run:
    threads = threading.active_count()
    run = _Run(mods)

    async def main() -> None:
        await run.server.start()
        try:
            await asyncio.wait_for(body(run), 60)
        finally:
            await run.server.close()

    try:
        asyncio.run(main())
    finally:
        run.close()
    # every thread the role, its receiver, hub and reaper took is given back
    for _ in range(100):
        if threading.active_count() <= threads:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]
    return run


def _commit(mods: dict[str, Any], rng_state: str = "") -> str:
    return str(mods["c"].CommitCall(RID, 42, rng_state).to_bytes().decode())


class _Count:
    """Stands in for the role's started-on-landing counter (read at once, unbuffered)."""

    def __init__(self) -> None:
        self.value = 0.0

    def increment(self, value: float) -> None:
        self.value += value


def _started(run: _Run) -> float:
    return run.started.value


def test_notice_starts_the_sequence_and_frees_its_kv_when_done(mods: dict[str, Any]) -> None:
    async def body(run: _Run) -> None:
        started = _started(run)
        stream, handle = await run.reserve({"temperature": 0.0, "max_tokens": 4,
                                            "ignore_eos": True})
        assert await run.land(handle, _commit(mods)) is True
        stream.release()
        assert await asyncio.wait_for(stream.done, 30) == ("length", -1)
        assert len(run.tokens) == 3  # tokens 2..4: the first came from the prefill
        assert _started(run) == started + 1
        assert run.role.stats() == {"pending": 0, "streams": 0}
        assert run.role.arena.bytes_in_use == 0

    _run(mods, body)


def test_a_start_that_fails_ends_the_stream_frees_the_kv_and_counts_as_taken(
        mods: dict[str, Any]) -> None:
    async def body(run: _Run) -> None:
        started = _started(run)
        # a seeded request whose sampler state cannot be restored: _start fails
        # after claiming the landed extent
        stream, handle = await run.reserve({"temperature": 0.9, "seed": 5, "max_tokens": 4})
        assert run.role.arena.bytes_in_use > 0
        assert await run.land(handle, _commit(mods, rng_state="not-hex")) is True
        stream.release()
        # the router learns it on the stream: the instance failed this request
        with pytest.raises(Unavailable, match="decode_0: ValueError: non-hexadecimal"):
            await asyncio.wait_for(stream.done, 30)
        assert run.tokens == []
        assert _started(run) == started  # not counted as started
        assert run.role.stats() == {"pending": 0, "streams": 0}
        assert run.role.arena.bytes_in_use == 0
        # taken: the router sends no commit, and one would find nothing to start
        with pytest.raises(Exception, match="no reservation"):
            await run.role.handle("commit", _commit(mods).encode(), fake_pb_utils.PayloadOut())

    _run(mods, body)


@pytest.mark.parametrize("notice", ["{not json", "other"])
def test_a_notice_for_another_request_is_declined_and_commit_still_starts_it(
        mods: dict[str, Any], notice: str) -> None:
    async def body(run: _Run) -> None:
        started = _started(run)
        stream, handle = await run.reserve({"temperature": 0.0, "max_tokens": 3,
                                            "ignore_eos": True})
        bad = notice if notice != "other" else str(
            mods["c"].CommitCall("req-2", 42).to_bytes().decode())
        assert await run.land(handle, bad) is False
        assert run.role.stats() == {"pending": 1, "streams": 0}  # left for the commit
        out = fake_pb_utils.PayloadOut()
        await run.role.handle("commit", _commit(mods).encode(), out)
        assert out.is_final
        stream.release()
        assert await asyncio.wait_for(stream.done, 30) == ("length", -1)
        assert len(run.tokens) == 2
        assert _started(run) == started
        assert run.role.arena.bytes_in_use == 0

    _run(mods, body)


def test_abort_after_a_start_on_landing_stops_the_sequence(mods: dict[str, Any]) -> None:
    async def body(run: _Run) -> None:
        stream, handle = await run.reserve({"temperature": 0.0, "max_tokens": 500,
                                            "ignore_eos": True})
        assert await run.land(handle, _commit(mods)) is True
        stream.release()
        await run.role.handle("abort", mods["c"].AbortCall(RID).to_bytes(),
                              fake_pb_utils.PayloadOut())
        assert (await asyncio.wait_for(stream.done, 30))[0] == "abort"
        assert len(run.tokens) < 499
        for _ in range(100):  # the batch worker frees the sequence at its next step
            if run.role.arena.bytes_in_use == 0:
                break
            await asyncio.sleep(0.05)
        assert run.role.arena.bytes_in_use == 0
        assert run.role.stats() == {"pending": 0, "streams": 0}

    _run(mods, body)
