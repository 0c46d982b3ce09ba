"""Reservations: the decode side's record of every extent promised to a transfer.

Ownership (who frees the extent):

    reserve ──> RESERVED ──begin_write──> RECEIVING ──end_write(ok)──> LANDED ──claim──> caller
                   │                          │                           │
                   └── cancel / TTL / close / failure ────────────────────┴──> FAILED: freed here

An extent is freed by this table, never by a connection thread, and only once
no writer is inside it (``writers == 0``): a cancel that arrives mid-transfer
marks the reservation FAILED, the writer notices at its next step and leaves,
and the free happens then. After ``claim`` the caller (decode engine) owns it.
Failed reservations leave a bounded tombstone so ``wait`` reports the reason.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from pdserve.errors import InvalidArgument, TransferError
from pdserve.kvtransfer.arena import Arena, Extent
from pdserve.kvtransfer.handle import check_request_id
from pdserve.kvtransfer.transport import TransferResult

State = Literal["reserved", "receiving", "landed", "failed"]
MAX_TOMBSTONES = 4096


@dataclass
class Reservation:
    request_id: str
    extent: Extent
    prompt_tokens: int
    max_new_tokens: int
    ttl_s: float
    deadline: float
    state: State = "reserved"
    writers: int = 0
    error: str | None = None
    result: TransferResult | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def is_failed(self) -> bool:
        return self.state == "failed"


class ReservationTable:
    """Thread-safe table of reservations over one arena, with a TTL reaper thread."""

    def __init__(self, arena: Arena, name: str = "kv") -> None:
        self.arena = arena
        self._lock = threading.Condition()
        self._live: dict[str, Reservation] = {}
        self._tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._closed = False
        self._reaper = threading.Thread(target=self._reap, name=f"{name}-ttl-reaper", daemon=True)
        self._reaper.start()

    # -- decode side -------------------------------------------------------------
    def reserve(self, request_id: str, prompt_tokens: int, max_new_tokens: int,
                nbytes: int, ttl_s: float) -> Reservation:
        check_request_id(request_id)
        if not ttl_s > 0:
            raise InvalidArgument(f"ttl_s must be positive, got {ttl_s}")
        with self._lock:
            if self._closed:
                raise TransferError("KV receiver is closed")
            if request_id in self._live:
                raise InvalidArgument(f"request {request_id!r} already has a KV reservation")
            extent = self.arena.allocate(nbytes)  # raises OutOfKVSpace
            res = Reservation(request_id, extent, prompt_tokens, max_new_tokens, ttl_s,
                              time.monotonic() + ttl_s)
            self._live[request_id] = res
            self._tombstones.pop(request_id, None)
            self._lock.notify_all()
            return res

    def wait(self, request_id: str, timeout_s: float) -> TransferResult:
        res = self._get(request_id)
        if not res.done.wait(timeout_s):
            self.fail(request_id, f"no KV transfer completed within {timeout_s}s")
        with self._lock:
            if res.state == "landed":
                assert res.result is not None
                return res.result
            raise TransferError(f"KV transfer for {request_id!r} failed: {res.error}")

    def claim(self, request_id: str) -> Extent:
        with self._lock:
            res = self._get_locked(request_id)
            if res.state != "landed":
                raise TransferError(
                    f"cannot claim KV of {request_id!r}: transfer {res.state}"
                    + (f" ({res.error})" if res.error else "")
                )
            del self._live[request_id]
            return res.extent

    def cancel(self, request_id: str) -> bool:
        return self.fail(request_id, "cancelled")

    # -- writer side (connection threads) ---------------------------------------
    def begin_write(self, request_id: str, extent_offset: int | None = None) -> Reservation:
        """The writer enters. ``extent_offset``: where its handle says the extent
        is; a handle of an earlier reservation under the same id (freed, the
        space reused) names another place and is refused, the reservation kept."""
        with self._lock:
            res = self._get_locked(request_id)
            if extent_offset is not None and extent_offset != res.extent.offset:
                raise TransferError(
                    f"handle for {request_id!r} names extent offset {extent_offset}; its "
                    f"reservation is at {res.extent.offset} (a handle of an earlier one)")
            if res.state != "reserved":
                raise TransferError(f"reservation {request_id!r} is {res.state}, not writable")
            res.state, res.writers = "receiving", 1
            return res

    def end_write(self, res: Reservation, result: TransferResult | None, error: str | None) -> None:
        """The writer leaves: success lands the KV, anything else fails it."""
        with self._lock:
            res.writers = 0
            if res.state == "receiving" and result is not None:
                res.state, res.result = "landed", result
                res.deadline = time.monotonic() + res.ttl_s  # time to claim
                res.done.set()
                self._lock.notify_all()
                return
            self._fail_locked(res, error or "transfer ended without completing")

    def fail(self, request_id: str, reason: str) -> bool:
        with self._lock:
            res = self._live.get(request_id)
            if res is None:
                return False
            self._fail_locked(res, reason)
            return True

    # -- accounting --------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for res in list(self._live.values()):
                self._fail_locked(res, "KV receiver closed")
            self._lock.notify_all()
        self._reaper.join()

    # -- internals ---------------------------------------------------------------
    def _get(self, request_id: str) -> Reservation:
        with self._lock:
            return self._get_locked(request_id)

    def _get_locked(self, request_id: str) -> Reservation:
        res = self._live.get(request_id)
        if res is not None:
            return res
        reason = self._tombstones.get(request_id)
        if reason is not None:
            raise TransferError(f"KV transfer for {request_id!r} failed: {reason}")
        raise TransferError(f"no KV reservation for request {request_id!r}")

    def _fail_locked(self, res: Reservation, reason: str) -> None:
        if res.state != "failed":
            res.state, res.error = "failed", reason
            res.done.set()
        if res.writers == 0 and self._live.get(res.request_id) is res:
            del self._live[res.request_id]
            self.arena.free(res.extent)
            self._tombstones[res.request_id] = reason
            while len(self._tombstones) > MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)
        self._lock.notify_all()

    def _reap(self) -> None:
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                for res in list(self._live.values()):
                    if res.deadline <= now and res.state != "failed":
                        what = "claimed" if res.state == "landed" else "transferred"
                        self._fail_locked(res, f"reservation expired: not {what} within "
                                               f"its TTL of {res.ttl_s}s")
                pending = [r.deadline for r in self._live.values() if r.state != "failed"]
                self._lock.wait(max(0.0, min(pending) - now) if pending else None)
