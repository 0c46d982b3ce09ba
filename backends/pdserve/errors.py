"""Typed errors shared by every pdserve component.

Each error carries one ``code``; the Triton adapters (``model.py`` and
``roles/``) map that code to a Triton error code in one place. Everything else
raises these and never imports Triton.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorCode = Literal["INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL", "NOT_FOUND"]


class PdserveError(Exception):
    """Base class: a failure that is reported to the client, never a crash."""

    code: ClassVar[ErrorCode] = "INTERNAL"


class InvalidArgument(PdserveError, ValueError):
    """The request (or a config value) is malformed or out of range."""

    code: ClassVar[ErrorCode] = "INVALID_ARG"


class Unavailable(PdserveError):
    """Overload or a missing resource: the client may retry later."""

    code: ClassVar[ErrorCode] = "UNAVAILABLE"


class OutOfKVSpace(Unavailable):
    """An arena cannot hold an extent of the requested size right now."""

    def __init__(self, needed: int, free_total: int, largest_free: int) -> None:
        self.needed = needed
        self.free_total = free_total
        self.largest_free = largest_free
        reason = "fragmented" if free_total >= needed else "full"
        super().__init__(
            f"no space in KV arena ({reason}): need {needed} bytes, "
            f"{free_total} free in total, largest free extent {largest_free}"
        )


class Cancelled(PdserveError):
    """The client cancelled the request or went away."""

    code: ClassVar[ErrorCode] = "CANCELLED"


class TransferError(PdserveError):
    """A KV transfer failed: peer gone, timeout, truncation, bad checksum, auth."""

    code: ClassVar[ErrorCode] = "UNAVAILABLE"


class InternalError(PdserveError):
    """A bug or an invariant broken inside pdserve."""

    code: ClassVar[ErrorCode] = "INTERNAL"
