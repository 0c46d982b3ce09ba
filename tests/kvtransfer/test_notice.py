"""The completion notice: END carries a string to the receiver's ``on_landed`` hook.

The decode role uses it to start a sequence the moment its KV landed; these
tests hold the transport's side of that contract on every transport and mode.
"""

from __future__ import annotations

import threading

import pytest
import torch

from pdserve.errors import InvalidArgument, TransferError
from pdserve.kvtransfer import MODES, KVHandle, wire
from tests.kvtransfer import helpers
from tests.kvtransfer.conftest import Pair


def _send(pair: Pair, request_id: str, mode: str, notice: str | None,
          tokens: int = 9) -> tuple[bool, torch.Tensor]:
    kv = helpers.random_kv(pair.layout, tokens, seed=tokens)
    handle = KVHandle.from_bytes(pair.receiver.reserve(request_id, tokens, 4).to_bytes())
    if mode == "layerwise":
        with pair.sender.begin(handle, "layerwise") as stream:
            stream.send_all(kv)
            return stream.finish(notice).taken, kv
    return pair.sender.send(handle, kv, mode, notice=notice).taken, kv  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
def test_hook_sees_landed_kv_and_its_answer_reaches_the_sender(pair: Pair, mode: str) -> None:
    seen: list[tuple[str, str, bool]] = []
    kv_by_id = {"a": helpers.random_kv(pair.layout, 9, seed=9)}  # what _send sends

    def on_landed(request_id: str, notice: str) -> bool:
        # Called after the KV landed and was verified: it can be claimed here.
        extent = pair.receiver.claim(request_id)
        got = pair.layout.view(pair.arena.buffer, extent.offset, 9)
        seen.append((request_id, notice, torch.equal(got, kv_by_id[request_id])))
        pair.arena.free(extent)
        return True

    pair.receiver.on_landed = on_landed
    taken, _ = _send(pair, "a", mode, '{"first_token":7}')
    assert taken is True
    assert seen == [("a", '{"first_token":7}', True)]


@pytest.mark.parametrize("mode", MODES)
def test_hook_that_declines_leaves_the_reservation_for_wait_and_claim(pair: Pair,
                                                                      mode: str) -> None:
    calls: list[str] = []
    pair.receiver.on_landed = lambda rid, notice: calls.append(rid) is not None  # False
    taken, kv = _send(pair, "b", mode, "x")
    assert taken is False and calls == ["b"]
    pair.receiver.wait("b", timeout_s=5)
    extent = pair.receiver.claim("b")
    assert torch.equal(pair.layout.view(pair.arena.buffer, extent.offset, 9), kv)
    pair.arena.free(extent)


def test_no_notice_or_no_hook_means_not_taken(pair: Pair) -> None:
    called = threading.Event()
    pair.receiver.on_landed = lambda rid, notice: called.set() or True
    assert _send(pair, "c", "whole", None)[0] is False  # no notice: the hook is not asked
    assert not called.is_set()
    pair.arena.free(pair.receiver.claim("c"))
    pair.receiver.on_landed = None
    assert _send(pair, "d", "whole", "n")[0] is False  # no hook
    pair.arena.free(pair.receiver.claim("d"))


def test_a_failing_hook_is_not_taken_and_the_connection_stays_usable(pair: Pair) -> None:
    def broken(rid: str, notice: str) -> bool:
        raise RuntimeError("owner bug")

    pair.receiver.on_landed = broken
    assert _send(pair, "e", "whole", "n")[0] is False
    pair.arena.free(pair.receiver.claim("e"))
    pair.receiver.on_landed = lambda rid, notice: pair.arena.free(pair.receiver.claim(rid)) or True
    assert _send(pair, "f", "layerwise", "n")[0] is True  # same pooled connection


@pytest.mark.parametrize("notice", ["é", "x" * (wire.MAX_NOTICE_CHARS + 1)])
def test_a_notice_that_cannot_travel_is_refused_before_end(pair: Pair, notice: str) -> None:
    kv = helpers.random_kv(pair.layout, 9)
    handle = pair.receiver.reserve("g", 9, 4)
    with pytest.raises(InvalidArgument, match="notice must be an ASCII string"):
        pair.sender.send(handle, kv, "whole", notice=notice)
    # The sender aborted: the reservation failed and its extent is freed.
    with pytest.raises(TransferError):
        pair.receiver.wait("g", timeout_s=5)
