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

``FieldIndex`` keeps the same order for keys of the policies' shape (number,
number, the instance's name): ``prefill_rank_key`` (in flight, -free slots,
name) and ``decode_rank_key`` (-free KV share, batch utilization, name). An
entry keeps the two numbers as floats (counts and shares: exact as floats, so
order and equality are the tuples') and, for the name, its rank among the names
the index has seen (string order); entries compare element by element, the
first unequal element deciding, as tuples do. The native build compiles that to
three float/int tests instead of a generic tuple comparison (whose ties on the
numbers, frequent among prefills, compared strings): about a quarter of the
cost of an update. Interpreted, ``bisect``'s C loop on the tuples is faster, so
``ranked_index`` gives the ``FieldIndex`` only in the native build (both are
tested against the policies' sorts, and the pinned runs both ways).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from pdserve.scheduler.instance import InstanceLoad
from pdserve.scheduler.sim.events import COMPILED

# What ``FieldIndex`` needs of a key function: (number, number, load.name). Both
# policy keys are that (prefill_rank_key's numbers are ints, promoted to float).
Key = tuple[float, float, str]


class RankedIndex:
    def __init__(self, key: Callable[[InstanceLoad], Any]) -> None:
        self._key = key
        self._keys: list[Any] = []  # sorted
        self._names: list[str] = []  # self._keys' names, same order
        self._key_of: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._names)

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


class _Entry:
    __slots__ = ("first", "listed", "name", "order", "second")

    def __init__(self, order: int, name: str) -> None:
        self.first = 0.0
        self.second = 0.0
        self.order = order  # the name's rank among the index's names, in string order
        self.name = name
        self.listed = False  # a member (in ``FieldIndex._entries``)


class FieldIndex(RankedIndex):
    """``RankedIndex`` for keys (number, number, load.name), compared field by field."""

    def __init__(self, key: Callable[[InstanceLoad], Key]) -> None:
        super().__init__(key)
        self._field_key = key
        self._entries: list[_Entry] = []  # sorted by key; ``_names`` in the same order
        self._entry_of: dict[str, _Entry] = {}  # members and past members
        self._seen: list[str] = []  # every name the index has had, sorted

    def _find(self, a: float, b: float, order: int) -> int:
        """``bisect_left`` of the key (a, b, name of rank ``order``)."""
        entries = self._entries
        lo, hi = 0, len(entries)
        while lo < hi:
            mid = (lo + hi) >> 1
            if _below(entries[mid], a, b, order):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _new_name(self, name: str) -> _Entry:
        """The entry of a name not seen before (re-ranks the names: start-up only)."""
        seen = self._seen
        at = bisect.bisect_left(seen, name)
        seen.insert(at, name)
        for order in range(at + 1, len(seen)):  # the entries' relative order is unchanged
            self._entry_of[seen[order]].order = order
        entry = _Entry(at, name)
        self._entry_of[name] = entry
        return entry

    def update(self, load: InstanceLoad, member: bool, key: Any = None) -> None:
        name = load.name
        entry = self._entry_of.get(name)
        if entry is None:
            if not member:
                return
            entry = self._new_name(name)
        entries = self._entries
        if not member:
            if entry.listed:
                i = self._find(entry.first, entry.second, entry.order)
                entries.pop(i)  # (pop: cheaper than del in the native build)
                self._names.pop(i)
                entry.listed = False
            return
        # (unpacked in two places: the native build then unboxes the tuple once)
        if key is None:
            a, b, key_name = self._field_key(load)
        else:
            given: Key = key
            a, b, key_name = given
        if key_name != name:
            raise ValueError(f"index keys must end with the instance's name: {key_name!r}")
        if entry.listed:
            if entry.first == a and entry.second == b:
                return
            i = self._find(entry.first, entry.second, entry.order)
            if (i == 0 or _below(entries[i - 1], a, b, entry.order)) and (
                i + 1 == len(entries) or not _below(entries[i + 1], a, b, entry.order)
            ):
                entry.first = a  # still between its neighbours: same place
                entry.second = b
                return
            entries.pop(i)
            self._names.pop(i)
        entry.first = a
        entry.second = b
        entry.listed = True
        i = self._find(a, b, entry.order)
        entries.insert(i, entry)
        self._names.insert(i, name)


def _below(e: _Entry, a: float, b: float, order: int) -> bool:
    """``e``'s key < (a, b, the name of rank ``order``)."""
    if e.first != a:
        return e.first < a
    if e.second != b:
        return e.second < b
    return e.order < order


def ranked_index(key: Callable[[InstanceLoad], Key]) -> RankedIndex:
    """The index of ``key`` (a policy key): a ``FieldIndex`` in the native build."""
    return FieldIndex(key) if COMPILED else RankedIndex(key)
