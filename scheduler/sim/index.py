"""A scenario's instances kept in a policy's order under updates.

The routing policies rank ``InstanceLoad`` snapshots with a key function
(``prefill_rank_key``, ``decode_rank_key``). Sorting a scenario's instances at
every request costs O(n log n); this index keeps (key, name) sorted and moves
one entry per load change (two bisections), so a decision reads the best
instances first. Its order equals the policy's sorted order (tested).
A parallel list of names keeps ``names()`` a plain copy (no per-call
comprehension): the router's ``rank()`` is called once per request.
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
        self._names: list[str] = []  # self._entries' names, same order
        self._by_name: dict[str, tuple[Any, str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, load: InstanceLoad, member: bool) -> None:
        """Re-rank ``load`` (``member`` False: take it out of the index)."""
        name = load.name
        old = self._by_name.get(name)
        if member:
            entry = (self._key(load), name)
            if entry == old:
                return
        elif old is None:
            return
        entries, names = self._entries, self._names
        if old is not None:
            i = bisect.bisect_left(entries, old)
            del entries[i]
            del names[i]
        if member:
            i = bisect.bisect_right(entries, entry)
            entries.insert(i, entry)
            names.insert(i, name)
            self._by_name[name] = entry
        else:
            del self._by_name[name]

    def names(self) -> list[str]:
        """The names in order: a fresh list, safe to hold while the index changes."""
        return self._names.copy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)
