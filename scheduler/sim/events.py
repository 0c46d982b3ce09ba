"""The event heap: (time, sequence, callback, argument).

The sequence number breaks ties in insertion order, so a run is a pure
function of its inputs and seed (no comparison of callbacks, no set order).
Stale events (a batch of an instance that failed meanwhile) are not removed
from the heap; their callbacks check an epoch and return.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any], None]


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.num_events = 0
        self._heap: list[tuple[float, int, Callback, Any]] = []
        self._seq = 0

    def at(self, t: float, fn: Callback, arg: Any = None) -> None:
        if t < self.now:
            t = self.now  # float round-off only: events never go back in time
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    def after(self, delay: float, fn: Callback, arg: Any = None) -> None:
        t = self.now + delay if delay > 0.0 else self.now  # as at(): never back in time
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    def clock(self) -> float:
        return self.now

    def run(self, until: float = float("inf")) -> None:
        heap, pop = self._heap, heapq.heappop
        n = 0
        while heap and heap[0][0] <= until:
            t, _, fn, arg = pop(heap)
            self.now = t
            n += 1
            fn(arg)
        self.num_events += n

    @property
    def pending(self) -> int:
        return len(self._heap)
