"""Metric updates buffered in the stub and sent to Triton by one thread (no Triton import).

Every ``pb_utils`` metric update (increment, set, observe) is a round trip over
the stub's shared-memory IPC to tritonserver, and in Triton 2.51 each one also
runs a race in the server: ``ProcessMessage`` releases the stub before it drops
its own view of the message's shared memory, so a burst of updates racing the
stub's frees aborts tritonserver (``boost::interprocess::lock_exception`` in
``Metric::~Metric``, seen on cancels, when every role updates its metrics at
once). So the roles never talk to Triton's metrics directly:

    role threads --increment/set/observe--> Buffered* (a lock, no IPC)
    MetricFlusher thread, every period_s --> one update per changed metric
                                             (gauges: the last value; counters:
                                             the summed delta; histograms: each
                                             observation), serially

The hot paths (the router's event loop, the batcher's step loop) then cost a
lock, and Triton sees at most one burst per ``period_s`` per stub, from one
thread. Values reach /metrics up to ``period_s`` late.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Protocol

log = logging.getLogger(__name__)

FLUSH_PERIOD_S = 0.25
MAX_PENDING_OBSERVATIONS = 4096  # per histogram between two flushes; older ones are dropped


class MetricSink(Protocol):
    """What a Triton metric (``pb_utils.MetricFamily.Metric``) offers; one kind each."""

    def increment(self, value: float) -> None: ...
    def set(self, value: float) -> None: ...
    def observe(self, value: float) -> None: ...


class _Buffered:
    def __init__(self, sink: MetricSink, flusher: MetricFlusher) -> None:
        self._sink = sink
        self._lock = flusher.lock
        flusher.register(self)

    def flush(self) -> None:
        """Send what is pending (called by the flusher thread only)."""
        raise NotImplementedError


class BufferedCounter(_Buffered):
    def __init__(self, sink: MetricSink, flusher: MetricFlusher) -> None:
        super().__init__(sink, flusher)
        self._delta = 0.0

    def increment(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"a counter only goes up, got an increment of {value}")
        with self._lock:
            self._delta += value

    def flush(self) -> None:
        with self._lock:
            delta, self._delta = self._delta, 0.0
        if delta:
            self._sink.increment(delta)


class BufferedGauge(_Buffered):
    def __init__(self, sink: MetricSink, flusher: MetricFlusher) -> None:
        super().__init__(sink, flusher)
        self._value: float | None = None  # set since the last flush
        self._sent: float | None = None

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def flush(self) -> None:
        with self._lock:
            value, self._value = self._value, None
        if value is not None and value != self._sent:
            self._sink.set(value)
            self._sent = value


class BufferedHistogram(_Buffered):
    def __init__(self, sink: MetricSink, flusher: MetricFlusher) -> None:
        super().__init__(sink, flusher)
        self._pending: deque[float] = deque(maxlen=MAX_PENDING_OBSERVATIONS)
        self.num_dropped = 0

    def observe(self, value: float) -> None:
        with self._lock:
            if len(self._pending) == MAX_PENDING_OBSERVATIONS:
                self.num_dropped += 1  # the deque drops the oldest
            self._pending.append(value)

    def flush(self) -> None:
        with self._lock:
            pending = self._pending
            self._pending = deque(maxlen=MAX_PENDING_OBSERVATIONS)
        for value in pending:
            self._sink.observe(value)


class MetricFlusher:
    """The one thread of a stub that sends metric updates to Triton.

    Owner: whoever builds it (``InstanceMetrics``) calls ``close()``, which
    sends what is pending and joins the thread.
    """

    def __init__(self, name: str, period_s: float = FLUSH_PERIOD_S) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.period_s = period_s
        self.lock = threading.Lock()  # guards every buffered metric's pending state
        self._metrics: list[_Buffered] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-metrics", daemon=True)
        self._thread.start()

    def register(self, metric: _Buffered) -> None:
        with self.lock:
            self._metrics.append(metric)

    def flush(self) -> None:
        with self.lock:
            metrics = list(self._metrics)
        for metric in metrics:
            try:
                metric.flush()
            except Exception as exc:  # a failed update must not stop the others
                log.warning("metric update failed: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.flush()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()
