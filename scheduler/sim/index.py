"""A scenario's instances kept in a policy's order under updates.

The routing policies rank ``InstanceLoad`` snapshots with a key function
(``prefill_rank_key``, ``decode_rank_key``). Sorting a scenario's instances at
every request costs O(n log n); this index keeps the keys sorted and moves one
entry per load change (two bisections, or none when the entry stays between
its neighbours), so a decision reads the best instances first. Its order equals
the policy's sorted order (tested).

Keys must be unique among the members: both policy keys end with the
instance's name, so they are, and the sorted keys alone give the order (no
(key, name) pairs: a comparison one tuple level shallower). A parallel list of
names keeps ``names()`` a plain copy (no per-call comprehension): the router's
``rank()`` is called once per request.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from pdserve.scheduler.instance import InstanceLoad


class RankedIndex:
    def __init__(self, key: Callable[[InstanceLoad], Any]) -> None:
        self._key = key
        self._keys: list[Any] = []  # sorted
        self._names: list[str] = []  # self._keys' names, same order
        self._key_of: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def update(self, load: InstanceLoad, member: bool, key: Any = None) -> None:
        """Re-rank ``load`` (``member`` False: take it out of the index). ``key``: the
        key function's value for ``load`` when the caller has it already."""
        name = load.name
        old = self._key_of.get(name)
        if member:
            if key is None:
                key = self._key(load)
            if key == old:
                return
        elif old is None:
            return
        keys, names = self._keys, self._names
        if old is not None:
            i = bisect.bisect_left(keys, old)
            assert names[i] == name, f"index keys not unique at {name}"
            if member and (i == 0 or keys[i - 1] < key) and (
                i + 1 == len(keys) or key < keys[i + 1]
            ):
                keys[i] = key  # still between its neighbours: same place
                self._key_of[name] = key
                return
            del keys[i]
            del names[i]
        if not member:
            del self._key_of[name]
            return
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            raise ValueError(f"index keys must be unique: {name} has the key of {names[i]}")
        keys.insert(i, key)
        names.insert(i, name)
        self._key_of[name] = key

    def names(self) -> list[str]:
        """The names in order: a fresh list, safe to hold while the index changes."""
        return self._names.copy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)
