"""Per-instance Prometheus metrics on Triton's metrics port (``pb_utils.MetricFamily``).

Every metric carries the labels ``instance`` (the Triton model name) and
``scenario``. Families are created once per stub process; each role records
what it observes: router TTFT/TPOT, tokens, offered requests, prefill
rejections and resumes, per scenario; decode/aggregated running batch and KV
arena bytes; prefill KV transfer seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import triton_python_backend_utils as pb_utils

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TRANSFER_BUCKETS = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]


# Families are process-wide in Triton (one per name); a router makes one
# InstanceMetrics per scenario, so each family is created once and reused.
_FAMILIES: dict[str, Any] = {}


def _family(name: str, desc: str, kind: Any) -> Any:
    if name not in _FAMILIES:
        _FAMILIES[name] = pb_utils.MetricFamily(name=name, description=desc, kind=kind)
    return _FAMILIES[name]


class InstanceMetrics:
    """One instance's metrics, labelled ``instance`` and ``scenario``.

    The router makes one per scenario (TTFT, TPOT, tokens, offered requests per
    scenario are what the controller's ratio loop reads); instances use their own.
    """

    def __init__(self, instance: str, scenario: str = "default") -> None:
        labels = {"instance": instance, "scenario": scenario}
        fam = pb_utils.MetricFamily

        def make(name: str, desc: str, kind: Any, buckets: list[float] | None = None) -> Any:
            family = _family(name, desc, kind)
            if buckets is None:
                return family.Metric(labels=labels)
            return family.Metric(labels=labels, buckets=buckets)

        self.ttft = make("pdserve_time_to_first_token_seconds",
                         "Time from request arrival to the first token", fam.HISTOGRAM,
                         LATENCY_BUCKETS)
        self.tpot = make("pdserve_time_per_output_token_seconds",
                         "Mean time per output token after the first, per request",
                         fam.HISTOGRAM, LATENCY_BUCKETS)
        self.prompt_tokens = make("pdserve_prompt_tokens_total", "Prompt tokens processed",
                                  fam.COUNTER)
        self.generated_tokens = make("pdserve_generated_tokens_total", "Tokens generated",
                                     fam.COUNTER)
        self.running_batch = make("pdserve_running_batch_size",
                                  "Sequences in the running batch", fam.GAUGE)
        self.kv_bytes_in_use = make("pdserve_kv_arena_bytes_in_use",
                                    "KV arena bytes held by extents", fam.GAUGE)
        self.kv_bytes_free = make("pdserve_kv_arena_bytes_free", "KV arena bytes free",
                                  fam.GAUGE)
        self.kv_transfer = make("pdserve_kv_transfer_seconds",
                                "Time to send one request's prompt KV", fam.HISTOGRAM,
                                TRANSFER_BUCKETS)
        self.prefill_rejections = make("pdserve_prefill_rejections_total",
                                       "Prompts refused for lack of a free prefill slot",
                                       fam.COUNTER)
        self.requests_in_flight = make("pdserve_router_requests_in_flight",
                                       "Client requests the router is serving now", fam.GAUGE)
        self.resumed = make("pdserve_resumed_requests_total",
                            "Requests moved to another decode after theirs failed (router)",
                            fam.COUNTER)
        self.offered = make("pdserve_requests_offered_total",
                            "Valid client requests that reached the router, served or not "
                            "(the ratio loop's demand)", fam.COUNTER)

    def set_kv(self, in_use: int, free: int) -> None:
        self.kv_bytes_in_use.set(in_use)
        self.kv_bytes_free.set(free)


class MetricsThrottle:
    """Publish step metrics at most every ``period_s``, and whenever the batch goes idle.

    Each metric update is a message over the stub's shared-memory IPC; a stub
    killed inside one can abort tritonserver (see ``token_wire``), so the step
    loop must not send several per step.
    """

    def __init__(self, publish: Callable[[int], None], period_s: float = 0.25) -> None:
        self._publish = publish  # called with the tokens generated since the last call
        self.period_s = period_s
        self._lock = threading.Lock()
        self._generated = 0
        self._last = 0.0

    def step(self, generated: int, idle: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self._generated += generated
            if not idle and now - self._last < self.period_s:
                return
            pending, self._generated, self._last = self._generated, 0, now
        self._publish(pending)
