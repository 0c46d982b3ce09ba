"""A scenario's instances kept in a policy's order under updates.

The routing policies rank ``InstanceLoad`` snapshots with a key function
(``prefill_rank_key``, ``decode_rank_key``). Sorting a scenario's instances at
every request costs O(n log n); this index keeps (key, name) sorted and moves
one entry per load change (two bisections), so a decision reads the best
instances first. Its order equals the policy's sorted order (tested).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from pdserve.scheduler.instance import InstanceLoad


class RankedIndex:
    def __init__(self, key: Callable[[InstanceLoad], Any]) -> None:
        self._key = key
        self._entries: list[tuple[Any, str]] = []
        self._by_name: dict[str, tuple[Any, str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, load: InstanceLoad, member: bool) -> None:
        """Re-rank ``load`` (``member`` False: take it out of the index)."""
        old = self._by_name.pop(load.name, None)
        if old is not None:
            del self._entries[bisect.bisect_left(self._entries, old)]
        if member:
            entry = (self._key(load), load.name)
            bisect.insort(self._entries, entry)
            self._by_name[load.name] = entry

    def names(self) -> list[str]:
        return [name for _, name in self._entries]

    def __iter__(self) -> Iterator[str]:
        return (name for _, name in self._entries)
