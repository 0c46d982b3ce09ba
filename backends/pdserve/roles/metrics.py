"""Per-instance Prometheus metrics on Triton's metrics port (``pb_utils.MetricFamily``).

Updates are buffered and sent by one flusher thread per stub (``metric_buffer``;
the router's per-scenario metrics share one): a role's hot path never makes a
metrics IPC call.

Every metric carries the labels ``instance`` (the Triton model name) and
``scenario``. Families are created once per stub process; each role records
what it observes: router TTFT/TPOT, tokens, offered requests, prefill
rejections and resumes, per scenario; decode/aggregated running batch and KV
arena bytes, sequences started on landing; prefill KV transfer seconds.
"""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils

from pdserve.roles.metric_buffer import (
    BufferedCounter,
    BufferedGauge,
    BufferedHistogram,
    MetricFlusher,
)

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

    def __init__(self, instance: str, scenario: str = "default",
                 flusher: MetricFlusher | None = None) -> None:
        """``flusher``: a shared one (the router's scenarios share one thread; its
        owner closes it); without one, this object owns its own."""
        labels = {"instance": instance, "scenario": scenario}
        fam = pb_utils.MetricFamily
        self._owns_flusher = flusher is None
        self.flusher = flusher if flusher is not None else MetricFlusher(instance)
        buffered = {fam.COUNTER: BufferedCounter, fam.GAUGE: BufferedGauge,
                    fam.HISTOGRAM: BufferedHistogram}

        def make(name: str, desc: str, kind: Any, buckets: list[float] | None = None) -> Any:
            family = _family(name, desc, kind)
            if buckets is None:
                sink = family.Metric(labels=labels)
            else:
                sink = family.Metric(labels=labels, buckets=buckets)
            return buffered[kind](sink, self.flusher)

        self.ttft = make("pdserve_time_to_first_token_seconds",
                         "Time from request arrival to the first token", fam.HISTOGRAM,
                         LATENCY_BUCKETS)
        self.tpot = make("pdserve_time_per_output_token_seconds",
                         "Mean time per output token after the first, per request",
                         fam.HISTOGRAM, LATENCY_BUCKETS)
        # Where a disaggregated request's first-token time goes (router; TTFT is
        # about their sum plus the first token's send): one observation each per
        # request part whose prefill answered.
        self.reserve = make("pdserve_request_reserve_seconds",
                            "Router: arrival to the decode's KV reservation answered "
                            "(decode choice, waiting for room, the reserve call)",
                            fam.HISTOGRAM, LATENCY_BUCKETS)
        self.prefill_wait = make("pdserve_request_prefill_wait_seconds",
                                 "Router: reservation to the send of the prefill call that "
                                 "was accepted (sweeps, refused tries, waits for a free slot)",
                                 fam.HISTOGRAM, LATENCY_BUCKETS)
        self.prefill_call = make("pdserve_request_prefill_call_seconds",
                                 "Router: the accepted prefill call, sent to answered (the "
                                 "prefill's forward and KV send, the hops through Triton; "
                                 "with local queues also the queue)",
                                 fam.HISTOGRAM, LATENCY_BUCKETS)
        self.prefill_forward = make("pdserve_prefill_forward_seconds",
                                    "Prefill: one forward over a batch of prompts",
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
        self.started_on_landing = make(
            "pdserve_decode_started_on_landing_total",
            "Sequences a decode started as their KV landed (no router commit; decode_start)",
            fam.COUNTER)
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
        self.requested_tokens = make(
            "pdserve_requested_output_tokens_total",
            "Output tokens the offered requests asked for (max_tokens), counted on arrival "
            "(the ratio loop's request mix)", fam.COUNTER)

    def set_kv(self, in_use: int, free: int) -> None:
        self.kv_bytes_in_use.set(in_use)
        self.kv_bytes_free.set(free)

    def close(self) -> None:
        """Send what is pending and stop the flusher thread, if this object owns it."""
        if self._owns_flusher:
            self.flusher.close()
