"""A KV arena: one flat byte buffer carved into contiguous extents.

First-fit allocation with coalescing on free. One extent per request (see
``layout.py``), so a request's KV is always one contiguous run of bytes that a
transport can move with a single write.

Ownership: whoever calls ``allocate`` owns the extent and must ``free`` it on
finish, cancel and failure. ``check_integrity`` verifies the free list and the
allocations tile the buffer exactly; tests end with ``bytes_in_use == 0``.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import torch

from pdserve.errors import OutOfKVSpace
from pdserve.kvtransfer.layout import ALIGNMENT, align_up


@dataclass(frozen=True)
class Extent:
    """A contiguous byte range [offset, offset + nbytes) of an arena."""

    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class Arena:
    """Thread-safe first-fit allocator over ``buffer`` (1-D uint8 tensor)."""

    def __init__(self, capacity_bytes: int | None = None, *, buffer: torch.Tensor | None = None):
        if buffer is None:
            if capacity_bytes is None or capacity_bytes <= 0:
                raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
            buffer = torch.zeros(capacity_bytes, dtype=torch.uint8)
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("arena buffer must be a 1-D uint8 tensor")
        self.buffer = buffer
        self.capacity = buffer.numel() // ALIGNMENT * ALIGNMENT
        self._lock = threading.Lock()
        self._free_starts: list[int] = [0] if self.capacity else []  # sorted
        self._free_sizes: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self._allocated: dict[int, int] = {}  # offset -> size

    # -- allocation -------------------------------------------------------------
    def allocate(self, nbytes: int) -> Extent:
        """First-fit extent of at least ``nbytes``; raises ``OutOfKVSpace``."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        size = align_up(nbytes)
        with self._lock:
            for start in self._free_starts:
                free = self._free_sizes[start]
                if free >= size:
                    self._take(start, free, size)
                    return Extent(start, size)
            raise OutOfKVSpace(size, self._bytes_free_locked(), self._largest_free_locked())

    def free(self, extent: Extent) -> None:
        """Return ``extent``; freeing an unknown or already freed extent is a bug."""
        with self._lock:
            size = self._allocated.pop(extent.offset, None)
            if size != extent.nbytes:
                if size is not None:
                    self._allocated[extent.offset] = size
                raise RuntimeError(f"free of an extent this arena did not hand out: {extent}")
            self._insert_free(extent.offset, size)

    def owns(self, extent: Extent) -> bool:
        with self._lock:
            return self._allocated.get(extent.offset) == extent.nbytes

    # -- accounting -------------------------------------------------------------
    @property
    def bytes_in_use(self) -> int:
        with self._lock:
            return sum(self._allocated.values())

    @property
    def bytes_free(self) -> int:
        with self._lock:
            return self._bytes_free_locked()

    @property
    def largest_free(self) -> int:
        with self._lock:
            return self._largest_free_locked()

    @property
    def num_extents(self) -> int:
        with self._lock:
            return len(self._allocated)

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless free and allocated extents tile the buffer."""
        with self._lock:
            spans = sorted([*self._free_sizes.items(), *self._allocated.items()])
            assert self._free_starts == sorted(self._free_sizes), "free index out of order"
            pos = 0
            for start, size in spans:
                assert start == pos, f"gap or overlap at {pos} (next extent at {start})"
                assert size > 0 and size % ALIGNMENT == 0, f"bad extent size {size} at {start}"
                pos += size
            assert pos == self.capacity, f"extents cover {pos} of {self.capacity} bytes"
            for a, b in zip(self._free_starts, self._free_starts[1:], strict=False):
                assert a + self._free_sizes[a] < b, f"free extents at {a} and {b} not coalesced"

    # -- internals (lock held) --------------------------------------------------
    def _take(self, start: int, free: int, size: int) -> None:
        del self._free_sizes[start]
        self._free_starts.pop(bisect.bisect_left(self._free_starts, start))
        if free > size:
            self._free_sizes[start + size] = free - size
            bisect.insort(self._free_starts, start + size)
        self._allocated[start] = size

    def _insert_free(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self._free_starts, start)
        if i < len(self._free_starts) and start + size == self._free_starts[i]:
            nxt = self._free_starts.pop(i)
            size += self._free_sizes.pop(nxt)
        if i > 0:
            prev = self._free_starts[i - 1]
            if prev + self._free_sizes[prev] == start:
                self._free_sizes[prev] += size
                return
        self._free_starts.insert(i, start)
        self._free_sizes[start] = size

    def _bytes_free_locked(self) -> int:
        return sum(self._free_sizes.values())

    def _largest_free_locked(self) -> int:
        return max(self._free_sizes.values(), default=0)
