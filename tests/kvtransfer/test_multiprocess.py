"""Sender and receiver in different processes (spawn), as Triton stub processes are."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from pdserve.errors import TransferError
from tests.kvtransfer import helpers
from tests.kvtransfer.conftest import close_pair, open_pair

CTX = mp.get_context("spawn")


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_cross_process_round_trip(kind: str) -> None:
    pair = open_pair(kind)
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=helpers.child_sender, args=(kind, child))
    proc.start()
    try:
        for i, (tp, mode) in enumerate([(1, "whole"), (17, "layerwise"), (100, "block_fixed"),
                                        (513, "whole")]):
            handle = pair.receiver.reserve(f"mp-{i}", tp, 4)
            parent.send((handle.to_bytes(), mode, i))
            assert parent.poll(30), "child sender did not answer"
            assert parent.recv() == ("ok", pair.layout.region_bytes(tp))
            pair.receiver.wait(f"mp-{i}", 5)
            extent = pair.receiver.claim(f"mp-{i}")
            got = pair.layout.view(pair.arena.buffer, extent.offset, tp)
            assert torch.equal(got, helpers.random_kv(pair.layout, tp, i))
            pair.arena.free(extent)
        parent.send(None)
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        close_pair(pair)


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_sender_killed_mid_transfer(kind: str) -> None:
    pair = open_pair(kind)
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=helpers.child_sender, args=(kind, child, 1))
    proc.start()
    try:
        handle = pair.receiver.reserve("doomed", 100, 4, ttl_s=60)
        parent.send((handle.to_bytes(), "layerwise", 0))
        assert parent.poll(30) and parent.recv() == "half-sent"
        assert pair.arena.bytes_in_use > 0
        proc.kill()
        start = time.monotonic()
        with pytest.raises(TransferError, match=r"closed the connection|connection failed"):
            pair.receiver.wait("doomed", timeout_s=5)
        assert time.monotonic() - start < 5  # noticed at once, not by the TTL or the wait
        helpers.assert_released(pair.arena)
    finally:
        proc.kill()
        proc.join()
        close_pair(pair)


def _create_segment_and_die(conn: object) -> None:
    from pdserve.kvtransfer import ShmArena

    arena = ShmArena(1 << 16)
    conn.send(arena.name)  # type: ignore[attr-defined]
    time.sleep(60)


def test_sweep_removes_segments_of_killed_owners() -> None:
    from pdserve.kvtransfer.shm import sweep_stale_segments

    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_create_segment_and_die, args=(child,))
    proc.start()
    assert parent.poll(30)
    name = parent.recv()
    assert name not in sweep_stale_segments()  # owner alive: kept
    proc.kill()
    proc.join()
    assert name in sweep_stale_segments()
    assert not os.path.exists(f"/dev/shm/{name}")
