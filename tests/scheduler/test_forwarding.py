from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time

import pytest

from pdserve.errors import InvalidArgument, Unavailable
from pdserve.scheduler.forwarding import (
    ForwardingPolicy,
    PrefillCallBound,
    PrefillRejected,
    SlotSignal,
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


def test_a_prefill_known_full_is_not_asked() -> None:
    clock = FakeClock()
    tried: list[str] = []
    full = {"p0"}

    async def attempt(name: str) -> str:
        tried.append(name)
        raise PrefillRejected(f"{name} full")

    with pytest.raises(Unavailable, match="skipped: every slot held") as info:
        asyncio.run(forward_on_demand(
            lambda: ["p0", "p1"], attempt, ForwardingPolicy(ttft_budget_s=0.05),
            deadline=0.05, clock=clock, sleep=clock.sleep, is_full=full.__contains__))
    assert tried and set(tried) == {"p1"}  # p0 never asked
    assert f"{len(tried)} attempts, {len(tried)} rejected" in str(info.value)


def test_a_waiter_wakes_when_a_slot_frees_not_at_its_back_off() -> None:
    async def scenario() -> tuple[float, list[str]]:
        signal = SlotSignal()
        held = {"p0"}
        tried: list[str] = []

        async def attempt(name: str) -> str:
            tried.append(name)
            return name

        async def free_later() -> None:
            await asyncio.sleep(0.05)
            held.clear()
            signal.notify()

        # A 10 s back-off: only the signal can end the wait within the test.
        policy = ForwardingPolicy(ttft_budget_s=30, min_backoff_s=10, max_backoff_s=10)
        t0 = time.monotonic()
        freer = asyncio.create_task(free_later())
        result = await forward_on_demand(lambda: ["p0"], attempt, policy,
                                         deadline=time.monotonic() + 30,
                                         is_full=held.__contains__, slot_freed=signal)
        await freer
        assert result.instance == "p0" and result.attempts == 1
        assert signal.num_waiting == 0
        return time.monotonic() - t0, tried

    waited, tried = asyncio.run(scenario())
    assert tried == ["p0"]
    assert 0.04 <= waited < 2.0


def test_slot_signal_wait_ends_at_its_timeout_and_cancelled_waiters_leave() -> None:
    async def scenario() -> None:
        signal = SlotSignal()
        t0 = time.monotonic()
        await signal.wait(0.02)
        assert time.monotonic() - t0 >= 0.015 and signal.num_waiting == 0
        waiters = [asyncio.create_task(signal.wait(10)) for _ in range(3)]
        await asyncio.sleep(0)
        assert signal.num_waiting == 3
        waiters[0].cancel()
        await asyncio.sleep(0)
        assert signal.num_waiting == 2 and len(signal._waiters) == 2
        signal.notify()  # every remaining waiter looks again
        await asyncio.wait_for(asyncio.gather(*waiters[1:]), 1.0)
        assert signal.num_waiting == 0 and not signal._waiters

    asyncio.run(scenario())


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


def test_instance_load_init_matches_its_fields_and_stays_frozen() -> None:
    """``InstanceLoad.__init__`` is written by hand (speed): its parameters must be
    the dataclass's fields, in order, with the same defaults, and the snapshot must
    stay immutable and compare, copy and serialise as the generated one did."""
    params = list(inspect.signature(InstanceLoad.__init__).parameters.values())[1:]
    fields = dataclasses.fields(InstanceLoad)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert p.default is None and f.default_factory() == {}, f.name
        else:
            assert p.default is inspect.Parameter.empty, f.name
    load = InstanceLoad("d0", "decode", "s", 8, in_flight=3, kv_free_bytes=5, kv_total_bytes=9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        load.in_flight = 4  # type: ignore[misc]
    assert load.compute == {} and load.compute is not InstanceLoad("d1", "decode", "s", 8).compute
    moved = dataclasses.replace(load, in_flight=4)
    assert moved.in_flight == 4 and moved.kv_free_bytes == 5 and load.in_flight == 3
    assert moved != load and dataclasses.replace(moved, in_flight=3) == load
    assert dataclasses.asdict(load)["kv_total_bytes"] == 9
    assert InstanceLoad.from_bytes(load.to_bytes()) == load
    with pytest.raises(InvalidArgument, match="in_flight"):
        dataclasses.replace(load, in_flight=-1)
    with pytest.raises(InvalidArgument, match="compute"):
        InstanceLoad("d0", "decode", "s", 8, compute={"cpu0": [1]})


def test_an_accepted_prefill_is_not_cut_at_the_start_budget() -> None:
    """E2 regression: the router bounded a prefill call by what was left of the
    TTFT *start* budget, so a prompt accepted near its end was given up while
    the prefill ran on for nobody, holding the slot; at full load every slot
    then served abandoned requests and none was answered."""
    bound = PrefillCallBound(min_allowance_s=0.5)

    async def main() -> bytes:
        deadline = time.monotonic() + 0.05  # little of the start budget is left

        async def prefill() -> bytes:  # accepted at once, longer than that
            await asyncio.sleep(0.15)
            return b"first token"

        async def attempt(name: str) -> bytes:
            sent = time.monotonic()
            value = await asyncio.wait_for(prefill(), bound.timeout_s(sent, deadline))
            bound.observe(time.monotonic() - sent)
            return value

        result = await forward_on_demand(lambda: ["p0"], attempt,
                                         ForwardingPolicy(ttft_budget_s=1.0), deadline=deadline)
        return result.value

    assert asyncio.run(main()) == b"first token"
    assert bound.mean_s is not None and bound.mean_s >= 0.15


def test_prefill_call_bound_grows_with_observed_prefills_and_still_ends() -> None:
    bound = PrefillCallBound(min_allowance_s=2.0, factor=4.0, weight=0.5)
    assert bound.timeout_s(now=10.0, deadline=10.3) == pytest.approx(2.3)
    bound.observe(1.0)
    bound.observe(2.0)  # mean 1.5
    assert bound.allowance_s() == pytest.approx(6.0)
    # Past the start budget a call (say to a stub restarted under it) still ends.
    assert bound.timeout_s(now=20.0, deadline=10.0) == pytest.approx(6.0)
    with pytest.raises(ValueError):
        PrefillCallBound(factor=0.5)
