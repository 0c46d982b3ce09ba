from __future__ import annotations

import asyncio

import pytest

from pdserve.errors import InvalidArgument, Unavailable
from pdserve.scheduler.forwarding import (
    ForwardingPolicy,
    PrefillRejected,
    forward_on_demand,
    rank_prefills,
    shortest_queue,
)
from pdserve.scheduler.instance import InstanceLoad


def prefill(name: str, in_flight: int = 0, **kw) -> InstanceLoad:
    return InstanceLoad(
        name=name, role="prefill", scenario="default", max_batch_size=4, in_flight=in_flight, **kw
    )


class FakeClock:
    """Virtual time: sleeping advances it, so tests are exact and instant."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rank_prefers_fewest_in_flight_and_skips_unroutable() -> None:
    loads = [
        prefill("p0", 3),
        prefill("p1", 1),
        prefill("p2", 1, healthy=False),
        prefill("p3", 0, draining=True),
        prefill("p4", 2),
        InstanceLoad(name="d0", role="decode", scenario="default", max_batch_size=8),
    ]
    assert rank_prefills(loads) == ["p1", "p4", "p0"]


def test_forwarding_tries_in_rank_order_until_one_accepts() -> None:
    clock = FakeClock()
    tried: list[str] = []

    async def attempt(name: str) -> str:
        tried.append(name)
        if name != "p2":
            raise PrefillRejected(f"{name} full")
        return f"token-from-{name}"

    result = asyncio.run(
        forward_on_demand(
            lambda: ["p0", "p1", "p2"],
            attempt,
            ForwardingPolicy(ttft_budget_s=1.0),
            deadline=1.0,
            clock=clock,
            sleep=clock.sleep,
        )
    )
    assert tried == ["p0", "p1", "p2"]
    assert (result.value, result.instance, result.attempts, result.rejections) == (
        "token-from-p2",
        "p2",
        3,
        2,
    )
    assert clock.sleeps == []  # no waiting when a slot exists


def test_all_full_backs_off_then_succeeds_when_a_slot_frees() -> None:
    clock = FakeClock()

    async def attempt(name: str) -> str:
        if clock.now < 0.01:
            raise PrefillRejected("full")
        return name

    policy = ForwardingPolicy(ttft_budget_s=1.0, min_backoff_s=0.002, max_backoff_s=0.004)
    result = asyncio.run(
        forward_on_demand(
            lambda: ["p0", "p1"], attempt, policy, deadline=1.0, clock=clock, sleep=clock.sleep
        )
    )
    assert result.instance == "p0"
    assert clock.sleeps[:3] == [0.002, 0.004, 0.004]  # exponential back-off, capped
    assert result.rejections == 2 * len(clock.sleeps)


def test_request_that_cannot_start_in_budget_is_ended_with_unavailable() -> None:
    clock = FakeClock()

    async def attempt(name: str) -> str:
        raise PrefillRejected("full")

    with pytest.raises(Unavailable, match="TTFT budget") as info:
        asyncio.run(
            forward_on_demand(
                lambda: ["p0"],
                attempt,
                ForwardingPolicy(ttft_budget_s=0.1),
                deadline=0.1,
                clock=clock,
                sleep=clock.sleep,
            )
        )
    assert "rejected" in str(info.value)
    assert clock.now <= 0.1 + 1e-9  # never waits past the deadline


def test_early_intervention_uses_the_prefill_estimate() -> None:
    clock = FakeClock()
    calls: list[str] = []

    async def attempt(name: str) -> str:
        calls.append(name)
        return name

    # 0.5 s of prefill cannot fit in a 0.3 s budget: ended before being sent.
    with pytest.raises(Unavailable, match="ended early"):
        asyncio.run(
            forward_on_demand(
                lambda: ["p0"],
                attempt,
                ForwardingPolicy(ttft_budget_s=0.3),
                deadline=0.3,
                estimated_prefill_s=0.5,
                clock=clock,
                sleep=clock.sleep,
            )
        )
    assert calls == []


def test_failed_instance_is_skipped_and_reported_but_bad_request_propagates() -> None:
    clock = FakeClock()

    async def attempt(name: str) -> str:
        if name == "p0":
            raise Unavailable("Stub process 'prefill_0' is not healthy")
        return name

    result = asyncio.run(
        forward_on_demand(
            lambda: ["p0", "p1"],
            attempt,
            ForwardingPolicy(),
            deadline=1.0,
            clock=clock,
            sleep=clock.sleep,
        )
    )
    assert result.instance == "p1" and "not healthy" in result.failures[0]

    async def bad(name: str) -> str:
        raise InvalidArgument("prompt too long")

    with pytest.raises(InvalidArgument):
        asyncio.run(
            forward_on_demand(
                lambda: ["p0", "p1"],
                bad,
                ForwardingPolicy(),
                deadline=1.0,
                clock=clock,
                sleep=clock.sleep,
            )
        )


def test_no_instance_waits_for_replacement_within_budget() -> None:
    clock = FakeClock()

    def rank() -> list[str]:
        return ["p0"] if clock.now >= 0.05 else []  # p0 comes back after 50 ms

    async def attempt(name: str) -> str:
        return name

    result = asyncio.run(
        forward_on_demand(
            rank,
            attempt,
            ForwardingPolicy(ttft_budget_s=1.0),
            deadline=1.0,
            clock=clock,
            sleep=clock.sleep,
        )
    )
    assert result.instance == "p0" and clock.now >= 0.05


def test_shortest_queue_baseline() -> None:
    loads = [prefill("p0", 1, queued=5), prefill("p1", 2, queued=1), prefill("p2", 0, queued=9)]
    assert shortest_queue(loads) == "p1"
    with pytest.raises(Unavailable):
        shortest_queue([prefill("p0", healthy=False)])


def test_policy_and_load_validation() -> None:
    with pytest.raises(ValueError, match="ttft_budget_s"):
        ForwardingPolicy(ttft_budget_s=0)
    with pytest.raises(InvalidArgument, match="max_batch_size"):
        InstanceLoad(name="p", role="prefill", scenario="s", max_batch_size=0)
    with pytest.raises(InvalidArgument, match="role"):
        InstanceLoad(name="p", role="router", scenario="s", max_batch_size=1)  # type: ignore[arg-type]
    load = prefill("p9", 2, kv_free_bytes=10)
    assert InstanceLoad.from_bytes(load.to_bytes()) == load
    with pytest.raises(InvalidArgument, match="malformed"):
        InstanceLoad.from_bytes(b"{not json")
