"""Load modes against a fake sender: concurrency bound, open-loop timing, deadlines."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from pdserve.bench.progress import Progress
from pdserve.bench.records import RequestRecord, RequestSpec
from pdserve.bench.runner import CLIENT_ERROR, LoadConfig, run_load
from pdserve.bench.workload import LengthDistribution, gamma_arrivals, synthetic_requests


class FakeSender:
    """Sleeps ``step_s`` per output token and tracks how many requests overlap."""

    def __init__(self, step_s: float = 0.002, fail_index: int | None = None) -> None:
        self.step_s = step_s
        self.fail_index = fail_index
        self.in_flight = 0
        self.max_in_flight = 0
        self.sent: list[tuple[int, float]] = []  # (index, send time rel. to t0)

    async def __call__(self, spec: RequestSpec, t0: float, deadline: float | None) -> RequestRecord:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        send = time.perf_counter() - t0
        self.sent.append((spec.index, send))
        times: list[float] = []
        try:
            if spec.index == self.fail_index:
                raise RuntimeError("sender bug")
            for _ in range(spec.output_len):
                if deadline is not None and time.perf_counter() + self.step_s > deadline:
                    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
                    now = time.perf_counter() - t0
                    return RequestRecord(
                        spec.index, spec.input_len, spec.output_len, send, tuple(times),
                        (1,) * len(times), now, "cancelled", "DEADLINE", scheduled_s=spec.arrival_s,
                    )  # fmt: skip
                await asyncio.sleep(self.step_s)
                times.append(time.perf_counter() - t0)
        finally:
            self.in_flight -= 1
        return RequestRecord(
            spec.index, spec.input_len, spec.output_len, send, tuple(times),
            (1,) * len(times), times[-1], "ok", scheduled_s=spec.arrival_s,
        )  # fmt: skip


def specs(n: int, out_len: int = 3, arrivals: list[float] | None = None) -> list[RequestSpec]:
    return synthetic_requests(n, LengthDistribution(8), LengthDistribution(out_len), arrivals)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_closed_loop_never_exceeds_concurrency(n: int) -> None:
    sender = FakeSender()
    result = asyncio.run(run_load(specs(40), LoadConfig("concurrency", concurrency=n), sender))
    assert sender.max_in_flight == n  # reached, never exceeded
    assert [r.index for r in result.records] == list(range(40))
    assert all(r.is_ok and r.output_tokens == 3 for r in result.records)
    assert not result.deadline_hit


def test_open_loop_follows_the_schedule_regardless_of_completions() -> None:
    arrivals = gamma_arrivals(30, rate=200.0, seed=2)
    sender = FakeSender(step_s=0.02)  # each request outlives several arrivals
    result = asyncio.run(run_load(specs(30, 3, arrivals), LoadConfig("request_rate"), sender))
    assert len(result.records) == 30
    assert sender.max_in_flight > 1
    for r in result.records:
        assert r.scheduled_s is not None
        assert r.send_s >= r.scheduled_s - 1e-6
        assert r.send_s - r.scheduled_s < 0.05  # loose: the 2 shared cores are noisy


def test_deadline_stops_sending_and_cancels_in_flight() -> None:
    sender = FakeSender(step_s=0.01)
    endless = synthetic_requests(10_000, LengthDistribution(8), LengthDistribution(50))
    cfg = LoadConfig("concurrency", concurrency=4, max_duration_s=0.3)
    started = time.perf_counter()
    result = asyncio.run(run_load(endless, cfg, sender))
    assert time.perf_counter() - started < 2.0
    assert result.deadline_hit
    cancelled = [r for r in result.records if r.status == "cancelled"]
    assert len(cancelled) == 4 and all(r.error_kind == "DEADLINE" for r in cancelled)
    assert all(send < 0.3 for _, send in sender.sent)
    assert sender.in_flight == 0


def test_open_loop_deadline_drops_later_arrivals() -> None:
    sender = FakeSender()
    arrivals = [0.0, 0.05, 0.1, 5.0, 6.0]
    result = asyncio.run(
        run_load(specs(5, 1, arrivals), LoadConfig("trace", max_duration_s=0.5), sender)
    )
    assert [r.index for r in result.records] == [0, 1, 2]


def test_warmup_is_kept_apart() -> None:
    sender = FakeSender()
    warm = synthetic_requests(5, LengthDistribution(4), LengthDistribution(2))
    warm = [RequestSpec(1000 + s.index, s.input_len, s.output_len) for s in warm]
    cfg = LoadConfig("concurrency", concurrency=2, warmup_requests=5, warmup_concurrency=2)
    result = asyncio.run(run_load(specs(6), cfg, sender, warmup_specs=warm))
    assert [r.index for r in result.warmup_records] == list(range(1000, 1005))
    assert [r.index for r in result.records] == list(range(6))
    assert min(r.send_s for r in result.records) < 0.05  # t0 restarts after warmup


def test_sender_failure_becomes_a_client_error_record() -> None:
    sender = FakeSender(fail_index=2)
    result = asyncio.run(run_load(specs(5), LoadConfig("concurrency", concurrency=2), sender))
    bad = result.records[2]
    assert bad.status == "error" and bad.error_kind == CLIENT_ERROR
    assert "sender bug" in (bad.error_message or "")
    assert sum(r.is_ok for r in result.records) == 4


def test_progress_counts_and_draws() -> None:
    out = io.StringIO()
    progress = Progress(total=6, max_duration_s=None, enabled=True, stream=out)
    cfg = LoadConfig("concurrency", concurrency=2)
    asyncio.run(run_load(specs(6), cfg, FakeSender(), (), progress))
    progress.close()
    assert (progress.num_done, progress.num_in_flight, progress.num_failed) == (6, 0, 0)
    assert "6/6 done" in out.getvalue().splitlines()[-1]


def test_bad_load_config() -> None:
    with pytest.raises(ValueError):
        LoadConfig("concurrency", concurrency=0)
    with pytest.raises(ValueError):
        LoadConfig("closed")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LoadConfig("trace", max_duration_s=0)
