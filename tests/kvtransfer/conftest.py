from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pdserve.kvtransfer import Arena, KVLayout, ShmArena, make_receiver, make_sender
from pdserve.kvtransfer.receiver import ControlReceiver
from pdserve.kvtransfer.sender import ControlSender
from tests.kvtransfer import helpers

TRANSPORTS = [
    "shm",
    "tcp",
    pytest.param("mooncake", marks=pytest.mark.skipif(
        not helpers.mooncake_available(),
        reason="mooncake needs libibverbs1: run scripts/install_system_deps.sh")),
]


@dataclass
class Pair:
    kind: str
    arena: Arena
    receiver: ControlReceiver
    sender: ControlSender
    layout: KVLayout


def open_pair(kind: str, layout: KVLayout = helpers.LAYOUT, capacity: int = 8 << 20,
              **cfg: object) -> Pair:
    arena = helpers.make_arena(kind, capacity)
    fp = helpers.fingerprint(layout)
    receiver = make_receiver(kind, arena, layout, fp, helpers.config(**cfg))
    sender = make_sender(kind, layout, fp, helpers.config(**cfg))
    return Pair(kind, arena, receiver, sender, layout)


def close_pair(pair: Pair) -> None:
    pair.sender.close()
    pair.receiver.close()
    helpers.assert_released(pair.arena)
    if isinstance(pair.arena, ShmArena):
        pair.arena.close()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test ends with no transfer threads and no shm segments of ours."""
    yield
    assert helpers.wait_until(lambda: not helpers.kv_threads()), helpers.kv_threads()
    assert not helpers.own_shm_segments(), helpers.own_shm_segments()


@pytest.fixture(params=TRANSPORTS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = open_pair(request.param)
    yield p
    close_pair(p)
