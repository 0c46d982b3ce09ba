"""Arena: randomized allocate/free stress, and fragmentation errors."""

from __future__ import annotations

import contextlib
import itertools
import random
import threading

import pytest

from pdserve.errors import OutOfKVSpace
from pdserve.kvtransfer.arena import Arena, Extent
from pdserve.kvtransfer.layout import ALIGNMENT


def test_randomized_allocate_free_keeps_integrity() -> None:
    rng = random.Random(0)
    arena = Arena(1 << 20)
    live: list[Extent] = []
    for i in range(3000):
        if live and (rng.random() < 0.45 or arena.bytes_free < 8192):
            arena.free(live.pop(rng.randrange(len(live))))
        else:
            try:
                live.append(arena.allocate(rng.randrange(1, 20000)))
            except OutOfKVSpace:
                assert arena.largest_free < 20000
        if i % 50 == 0:
            arena.check_integrity()
            assert arena.bytes_in_use == sum(e.nbytes for e in live)
    spans = sorted((e.offset, e.end) for e in live)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "extents overlap"
    for e in live:
        arena.free(e)
    assert arena.bytes_in_use == 0 and arena.largest_free == arena.capacity
    arena.check_integrity()


def test_fragmented_request_gets_out_of_kv_space() -> None:
    arena = Arena(16 * ALIGNMENT * 4)
    blocks = [arena.allocate(4 * ALIGNMENT) for _ in range(16)]
    for e in blocks[::2]:
        arena.free(e)
    assert arena.bytes_free == 8 * 4 * ALIGNMENT
    with pytest.raises(OutOfKVSpace, match="fragmented") as info:
        arena.allocate(5 * ALIGNMENT)
    assert info.value.largest_free == 4 * ALIGNMENT
    arena.check_integrity()
    for e in blocks[1::2]:
        arena.free(e)
    assert arena.allocate(16 * 4 * ALIGNMENT).nbytes == arena.capacity  # coalesced whole
    with pytest.raises(OutOfKVSpace, match="full"):
        arena.allocate(1)


def test_double_free_is_refused() -> None:
    arena = Arena(4096)
    e = arena.allocate(100)
    arena.free(e)
    with pytest.raises(RuntimeError):
        arena.free(e)
    arena.check_integrity()


def test_concurrent_allocate_free() -> None:
    arena = Arena(1 << 20)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[Extent] = []
        for _ in range(500):
            if mine and rng.random() < 0.5:
                arena.free(mine.pop())
            else:
                with contextlib.suppress(OutOfKVSpace):
                    mine.append(arena.allocate(rng.randrange(64, 4096)))
        for e in mine:
            arena.free(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert arena.bytes_in_use == 0
    arena.check_integrity()
