"""On-demand forwarding of prompts to prefill instances (P/D-Serve §4.2).

Prefill instances keep no local queue: an instance accepts a prompt only when
it has a free batch slot and rejects it at once otherwise. The router ranks the
scenario's prefills (fewest in flight first), tries them in turn, waits a short
back-off and tries again while the request's TTFT budget allows, and ends a
request that can no longer start in time with UNAVAILABLE (early intervention)
instead of letting it wait for a first token that would arrive too late.

The local-queue baseline (``shortest_queue``) exists only to be measured
against.

    time --->
    |try P0: reject|try P1: reject|backoff|try P0: accept ... first token
    |<------------------------ TTFT budget ---------------------------->|
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pdserve.errors import InvalidArgument, PdserveError, Unavailable
from pdserve.scheduler.instance import InstanceLoad

T = TypeVar("T")


class PrefillRejected(Unavailable):
    """A prefill instance had no free slot and refused the prompt at once."""


@dataclass(frozen=True)
class ForwardingPolicy:
    """How long a request may look for a prefill slot, and how it waits."""

    ttft_budget_s: float = 10.0
    min_backoff_s: float = 0.002
    max_backoff_s: float = 0.05

    def __post_init__(self) -> None:
        if self.ttft_budget_s <= 0:
            raise ValueError(f"ttft_budget_s must be positive, got {self.ttft_budget_s}")
        if not 0 < self.min_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < min_backoff_s <= max_backoff_s, got "
                f"{self.min_backoff_s} and {self.max_backoff_s}"
            )


@dataclass
class ForwardResult(Generic[T]):
    value: T
    instance: str
    attempts: int
    rejections: int
    failures: list[str] = field(default_factory=list)


def rank_prefills(loads: Iterable[InstanceLoad]) -> list[str]:
    """Routable prefill (or aggregated) instances, fewest in flight first.

    Ties go to the larger free batch, then the name, so ranking is deterministic.
    """
    candidates = [load for load in loads if is_prefill_candidate(load)]
    candidates.sort(key=prefill_rank_key)
    return [load.name for load in candidates]


def is_prefill_candidate(load: InstanceLoad) -> bool:
    """May receive prompts at all (full or not): routable and able to prefill."""
    return load.is_routable and load.role in ("prefill", "aggregated")


def prefill_rank_key(load: InstanceLoad) -> tuple[int, int, str]:
    """The order of ``rank_prefills``, exposed so that an incremental index
    (the simulator's, a router's with many instances) keeps exactly this order."""
    return (load.in_flight, -load.free_slots, load.name)


def shortest_queue(loads: Iterable[InstanceLoad]) -> str:
    """Baseline only: the prefill with the fewest queued plus in-flight prompts."""
    ranked = sorted(
        (load for load in loads if load.is_routable and load.role in ("prefill", "aggregated")),
        key=lambda load: (load.queued + load.in_flight, load.name),
    )
    if not ranked:
        raise Unavailable("no healthy prefill instance in this scenario")
    return ranked[0].name


async def forward_on_demand(
    rank: Callable[[], list[str]],
    attempt: Callable[[str], Awaitable[T]],
    policy: ForwardingPolicy,
    *,
    deadline: float,
    estimated_prefill_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> ForwardResult[T]:
    """Try ranked prefills until one accepts, within ``deadline`` (a ``clock`` time).

    ``attempt(name)`` raises ``PrefillRejected`` when the instance is full; any
    other ``Unavailable`` (a dead stub, a transfer failure) counts as a failure of
    that instance and the next one is tried. ``InvalidArgument`` and other
    errors are the request's own fault and propagate at once.

    A request that cannot finish prefill by the deadline, given
    ``estimated_prefill_s``, is ended with ``Unavailable`` before it is sent.
    """
    attempts = rejections = 0
    failures: list[str] = []
    backoff = policy.min_backoff_s
    while True:
        names = rank()
        for name in names:
            _check_budget(clock(), deadline, estimated_prefill_s, attempts, rejections, failures)
            attempts += 1
            try:
                value = await attempt(name)
            except PrefillRejected:
                rejections += 1
                continue
            except InvalidArgument:
                raise
            except Unavailable as exc:
                failures.append(f"{name}: {exc}")
                continue
            except PdserveError:
                raise
            return ForwardResult(value, name, attempts, rejections, failures)
        # Every instance refused (or none is routable right now, say while a failed
        # one is replaced): back off and try again while the budget allows.
        now = clock()
        _check_budget(now, deadline, estimated_prefill_s, attempts, rejections, failures)
        await sleep(min(backoff, max(0.0, deadline - now)))
        backoff = min(backoff * 2, policy.max_backoff_s)


def _check_budget(
    now: float,
    deadline: float,
    estimated_prefill_s: float,
    attempts: int,
    rejections: int,
    failures: list[str],
) -> None:
    if now + estimated_prefill_s < deadline:
        return
    detail = f"{attempts} attempts, {rejections} rejected for lack of a free slot"
    if failures:
        detail += f", failed: {'; '.join(failures[-3:])}"
    raise Unavailable(
        "request could not start prefill within its TTFT budget "
        f"(ended early rather than answered late; {detail})"
    )
