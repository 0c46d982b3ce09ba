"""Buffered metric updates: role threads only touch a lock; one flusher thread sends
to Triton, one update per changed metric per period (fake sinks stand in for Triton)."""

from __future__ import annotations

import threading
import time

import pytest

from pdserve.roles.metric_buffer import (
    MAX_PENDING_OBSERVATIONS,
    BufferedCounter,
    BufferedGauge,
    BufferedHistogram,
    MetricFlusher,
)


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, str]] = []

    def _record(self, op: str, value: float) -> None:
        self.calls.append((op, value, threading.current_thread().name))

    def increment(self, value: float) -> None:
        self._record("increment", value)

    def set(self, value: float) -> None:
        self._record("set", value)

    def observe(self, value: float) -> None:
        self._record("observe", value)


def test_updates_are_coalesced_and_sent_by_the_flusher_thread_only() -> None:
    flusher = MetricFlusher("t", period_s=3600)  # flushed by hand below
    try:
        sinks = [Sink(), Sink(), Sink()]
        counter = BufferedCounter(sinks[0], flusher)
        gauge = BufferedGauge(sinks[1], flusher)
        hist = BufferedHistogram(sinks[2], flusher)
        for i in range(100):
            counter.increment(2)
            gauge.set(i)
            hist.observe(i / 100)
        assert all(not s.calls for s in sinks)  # nothing reached "Triton" yet
        flusher.flush()
        assert sinks[0].calls == [("increment", 200, threading.current_thread().name)]
        assert [c[:2] for c in sinks[1].calls] == [("set", 99)]
        assert [c[1] for c in sinks[2].calls] == [i / 100 for i in range(100)]
        flusher.flush()  # nothing changed: no update at all
        gauge.set(99)
        flusher.flush()  # the same value again: not re-sent
        assert len(sinks[0].calls) == 1 and len(sinks[1].calls) == 1
        assert len(sinks[2].calls) == 100
        counter.increment(0)
        flusher.flush()
        assert len(sinks[0].calls) == 1
    finally:
        flusher.close()


def test_the_thread_flushes_periodically_and_close_sends_the_rest() -> None:
    flusher = MetricFlusher("t", period_s=0.02)
    sink = Sink()
    counter = BufferedCounter(sink, flusher)
    counter.increment(1)
    deadline = time.monotonic() + 5
    while not sink.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [c[:2] for c in sink.calls] == [("increment", 1)]
    assert sink.calls[0][2] == "t-metrics"
    counter.increment(5)
    flusher.close()  # stops the thread, then flushes what is left
    assert not flusher.is_running
    assert sum(c[1] for c in sink.calls) == 6
    flusher.close()  # idempotent


def test_concurrent_writers_lose_nothing() -> None:
    flusher = MetricFlusher("t", period_s=0.001)
    sink = Sink()
    counter = BufferedCounter(sink, flusher)

    def work() -> None:
        for _ in range(2000):
            counter.increment(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flusher.close()
    assert sum(c[1] for c in sink.calls) == 8000
    assert {c[2] for c in sink.calls} <= {"t-metrics", threading.current_thread().name}


def test_bounded_histogram_buffer_and_bad_updates() -> None:
    flusher = MetricFlusher("t", period_s=3600)
    try:
        sink = Sink()
        hist = BufferedHistogram(sink, flusher)
        for i in range(MAX_PENDING_OBSERVATIONS + 10):
            hist.observe(float(i))
        assert hist.num_dropped == 10
        flusher.flush()
        assert len(sink.calls) == MAX_PENDING_OBSERVATIONS
        assert sink.calls[0][1] == 10.0  # the oldest were dropped
        with pytest.raises(ValueError, match="only goes up"):
            BufferedCounter(Sink(), flusher).increment(-1)
    finally:
        flusher.close()
    with pytest.raises(ValueError, match="period_s"):
        MetricFlusher("t", period_s=0)


def test_a_failing_sink_does_not_stop_the_others() -> None:
    class Broken(Sink):
        def increment(self, value: float) -> None:
            raise RuntimeError("stub IPC failed")

    flusher = MetricFlusher("t", period_s=3600)
    try:
        good = Sink()
        BufferedCounter(Broken(), flusher).increment(1)
        gauge = BufferedGauge(good, flusher)
        gauge.set(3)
        flusher.flush()
        assert [c[:2] for c in good.calls] == [("set", 3)]
    finally:
        flusher.close()
