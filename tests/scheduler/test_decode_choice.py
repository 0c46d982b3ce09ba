from __future__ import annotations

import pytest

from pdserve.errors import Unavailable
from pdserve.scheduler.decode_choice import choose_decode, rank_decodes
from pdserve.scheduler.instance import InstanceLoad


def decode(name: str, free: int, total: int = 1000, in_flight: int = 0, **kw) -> InstanceLoad:
    return InstanceLoad(
        name=name,
        role="decode",
        scenario="default",
        max_batch_size=4,
        in_flight=in_flight,
        kv_free_bytes=free,
        kv_total_bytes=total,
        **kw,
    )


def test_prefers_most_free_kv_then_lightest_batch() -> None:
    loads = [decode("d0", 300), decode("d1", 800, in_flight=3), decode("d2", 800, in_flight=1)]
    assert rank_decodes(loads, 100) == ["d2", "d1", "d0"]


def test_excludes_full_batch_unhealthy_and_too_small() -> None:
    loads = [
        decode("d0", 900, in_flight=4),  # no batch slot
        decode("d1", 900, healthy=False),
        decode("d2", 900, draining=True),
        decode("d3", 50),  # not enough KV
        decode("d4", 200),
    ]
    assert choose_decode(loads, 100) == "d4"


def test_nothing_fits_says_why() -> None:
    with pytest.raises(Unavailable, match=r"needs 500 bytes.*most free on one instance is 300"):
        choose_decode([decode("d0", 300), decode("d1", 200)], 500)
    with pytest.raises(Unavailable, match="no healthy decode"):
        choose_decode([decode("d0", 300, healthy=False)], 10)
