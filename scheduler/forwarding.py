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

A router also knows its own calls: a prefill whose every slot holds one of this
router's calls would refuse, so it is not asked (``is_full``), and a request that
found every prefill full waits for one of those calls to end (``SlotSignal``)
rather than only for the back-off. Under overload that replaces a storm of
refusals (each a round trip that costs the prefill's own core and the
router's) by one wake-up per freed slot; other routers' calls are still only
learnt from refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

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


class PrefillCallBound:
    """How long the router waits for one prefill call, and what it learned of them.

    The TTFT budget bounds how long a request may look for a free prefill slot
    (early intervention); it is not a bound on the prefill itself. A call cannot
    tell "accepted" from "still asking" (a rejection is answered at once, an
    accepted prompt only when its KV has landed), so a call is given the rest
    of the start budget plus room for the prefill: ``factor`` times the running
    mean of accepted calls, at least ``min_allowance_s``. Cutting an accepted
    prefill at the start budget leaves it running on the instance for nobody
    (its slot busy, its KV target aborted): under load every slot then works for
    requests already given up, and nothing is served (E2, perf/RESULTS.md).
    The bound still ends calls a stub restarted in place never answers.
    """

    def __init__(self, min_allowance_s: float = 2.0, factor: float = 4.0,
                 weight: float = 0.2) -> None:
        if min_allowance_s <= 0 or factor < 1 or not 0 < weight <= 1:
            raise ValueError("need min_allowance_s > 0, factor >= 1 and 0 < weight <= 1")
        self.min_allowance_s = min_allowance_s
        self.factor = factor
        self.weight = weight
        self.mean_s: float | None = None  # accepted prefill calls, exponentially weighted

    def observe(self, seconds: float) -> None:
        """An accepted prefill call answered after ``seconds``."""
        if seconds < 0:
            return
        self.mean_s = seconds if self.mean_s is None else (
            (1 - self.weight) * self.mean_s + self.weight * seconds)

    def allowance_s(self) -> float:
        return max(self.min_allowance_s, self.factor * (self.mean_s or 0.0))

    def timeout_s(self, now: float, deadline: float) -> float:
        """The bound on a call sent at ``now`` by a request whose start budget ends at
        ``deadline``."""
        return max(deadline - now, 0.0) + self.allowance_s()


class SlotWaiter(Protocol):
    """What ``forward_on_demand`` waits on between sweeps: the router's
    ``SlotSignal``, or the simulator's on its own clock."""

    def wait(self, timeout_s: float) -> Awaitable[None]: ...


class SlotSignal:
    """Wakes the requests waiting for a prefill slot when one of this router's
    prefill calls ends (``notify``); each wait is also bounded (the back-off), for
    slots freed by other routers, seen only by asking. Single event loop only."""

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def num_waiting(self) -> int:
        return sum(1 for fut in self._waiters if not fut.done())

    async def wait(self, timeout_s: float) -> None:
        """Until the next ``notify`` or ``timeout_s``, whichever comes first."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(max(0.0, timeout_s), _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if not fut.done():  # cancelled while waiting (the client went away)
                fut.cancel()
            with contextlib.suppress(ValueError):  # notify took it out already
                self._waiters.remove(fut)

    def notify(self) -> None:
        """A slot freed: every waiter looks again, oldest first (the first to run
        takes the slot; the others find it full and wait again)."""
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            _wake(fut)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
    is_full: Callable[[str], bool] | None = None,
    slot_freed: SlotWaiter | None = None,
) -> ForwardResult[T]:
    """Try ranked prefills until one accepts, within ``deadline`` (a ``clock`` time).

    ``attempt(name)`` raises ``PrefillRejected`` when the instance is full; any
    other ``Unavailable`` (a dead stub, a transfer failure) counts as a failure of
    that instance and the next one is tried. ``InvalidArgument`` and other
    errors are the request's own fault and propagate at once.

    ``is_full(name)``: the caller knows ``name`` would refuse (its own calls
    hold every slot there): skipped without an attempt. With ``slot_freed``,
    the wait between two sweeps ends early when the caller frees a slot.

    A request that cannot finish prefill by the deadline, given
    ``estimated_prefill_s``, is ended with ``Unavailable`` before it is sent.
    """
    attempts = rejections = skipped = 0
    failures: list[str] = []
    backoff = policy.min_backoff_s
    while True:
        names = rank()
        for name in names:
            _check_budget(clock(), deadline, estimated_prefill_s, attempts, rejections,
                          failures, skipped)
            if is_full is not None and is_full(name):
                skipped += 1
                continue  # would be refused: nothing to learn from asking
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
        _check_budget(now, deadline, estimated_prefill_s, attempts, rejections, failures,
                      skipped)
        delay = min(backoff, max(0.0, deadline - now))
        if slot_freed is not None:
            await slot_freed.wait(delay)
        else:
            await sleep(delay)
        backoff = min(backoff * 2, policy.max_backoff_s)


def _check_budget(
    now: float,
    deadline: float,
    estimated_prefill_s: float,
    attempts: int,
    rejections: int,
    failures: list[str],
    skipped: int = 0,
) -> None:
    if now + estimated_prefill_s < deadline:
        return
    detail = f"{attempts} attempts, {rejections} rejected for lack of a free slot"
    if skipped:
        detail += f", {skipped} skipped: every slot held by this router's own calls"
    if failures:
        detail += f", failed: {'; '.join(failures[-3:])}"
    raise Unavailable(
        "request could not start prefill within its TTFT budget "
        f"(ended early rather than answered late; {detail})"
    )
