"""The event heap: events ordered by (time, sequence), each a callback and its argument.

The sequence number breaks ties in insertion order, so a run is a pure
function of its inputs and seed (no comparison of callbacks, no set order).
Stale events (a batch of an instance that failed meanwhile) are not removed
from the heap; their callbacks check an epoch and return.

Interpreted, the heap is ``heapq`` on (time, sequence, callback, argument)
tuples. The native build (``COMPILED``) runs ``heapq``'s algorithm written out
here on ``Timed`` objects compared by their typed (time, sequence) fields,
which it compiles to two float/int tests instead of a generic tuple comparison
(interpreted, that Python loop would be slower than ``heapq``'s C). (time,
sequence) pairs are unique, so the events come out in the same order either way
(the pinned runs are checked both ways).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any], None]

# True in the native build (a compiled module's file is the extension's). The
# simulator's modules are compiled together (native.MODULES): ``index`` and
# ``instance`` pick their typed loops by it too. Read when an object is built.
COMPILED = not __file__.endswith(".py")


class Timed:
    """An entry of a typed heap (``heap_push``, ``heap_pop``), ordered by (t, seq):
    an event (``fn(arg)`` at ``t``), or any item ``arg`` kept by a time (``fn`` None:
    the decode batch's ends, ``instance.SimInstance``)."""

    __slots__ = ("arg", "fn", "seq", "t")

    def __init__(self, t: float, seq: int, fn: Callback | None, arg: Any) -> None:
        self.t = t
        self.seq = seq
        self.fn = fn
        self.arg = arg


def _before(a: Timed, b: Timed) -> bool:
    return a.t < b.t or (a.t == b.t and a.seq < b.seq)


def _sift_up(heap: list[Timed], pos: int, item: Timed) -> None:
    """Put ``item`` at ``pos`` or above it, moving later parents down (heapq's ``_siftdown``)."""
    while pos > 0:
        up = (pos - 1) >> 1
        parent = heap[up]
        if not _before(item, parent):
            break
        heap[pos] = parent
        pos = up
    heap[pos] = item


def heap_push(heap: list[Timed], item: Timed) -> None:
    """``heapq.heappush`` on (t, seq)."""
    heap.append(item)
    _sift_up(heap, len(heap) - 1, item)


def heap_pop(heap: list[Timed]) -> Timed:
    """``heapq.heappop`` on (t, seq), of a non-empty heap: the last leaf replaces the
    root, which moves down to a leaf along the earlier children, then back up."""
    last = heap.pop()
    if not heap:
        return last
    first = heap[0]
    end = len(heap)
    pos = 0
    child = 1
    while child < end:
        right = child + 1
        if right < end and not _before(heap[child], heap[right]):
            child = right
        heap[pos] = heap[child]
        pos = child
        child = 2 * pos + 1
    _sift_up(heap, pos, last)
    return first


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.num_events = 0
        self._typed = COMPILED
        self._heap: list[Timed] = []  # COMPILED
        self._tuples: list[tuple[float, int, Callback, Any]] = []  # else
        self._seq = 0

    def at(self, t: float, fn: Callback, arg: Any = None) -> None:
        if t < self.now:
            t = self.now  # float round-off only: events never go back in time
        self._seq += 1
        if self._typed:
            heap_push(self._heap, Timed(t, self._seq, fn, arg))
        else:
            heapq.heappush(self._tuples, (t, self._seq, fn, arg))

    def after(self, delay: float, fn: Callback, arg: Any = None) -> None:
        t = self.now + delay if delay > 0.0 else self.now  # as at(): never back in time
        self._seq += 1
        if self._typed:
            heap_push(self._heap, Timed(t, self._seq, fn, arg))
        else:
            heapq.heappush(self._tuples, (t, self._seq, fn, arg))

    def clock(self) -> float:
        return self.now

    def run(self, until: float = float("inf")) -> None:
        n = 0
        if self._typed:
            heap = self._heap
            while heap and heap[0].t <= until:
                event = heap_pop(heap)
                self.now = event.t
                n += 1
                fn = event.fn
                if fn is not None:  # (always set for the loop's own events)
                    fn(event.arg)
        else:
            tuples, pop = self._tuples, heapq.heappop
            while tuples and tuples[0][0] <= until:
                t, _, fn, arg = pop(tuples)
                self.now = t
                n += 1
                fn(arg)
        self.num_events += n

    @property
    def pending(self) -> int:
        return len(self._heap) + len(self._tuples)
