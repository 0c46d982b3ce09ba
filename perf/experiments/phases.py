"""Where the served requests' first-token time went, from the server's metrics.

The router observes three phases per disaggregated request (``roles.metrics``):
the decode's KV reservation, the wait for a prefill to accept the prompt, and
the accepted prefill call; each prefill observes its forwards. ``totals`` reads
their sums and counts (every instance and scenario of one server summed) with
the router's own TTFT; ``means_ms`` turns two such readings, before and after a
load point, into the point's mean per phase. What the client saw beyond the
router's TTFT (``delivery_ms``: the first token's way from the router through
Triton to the client) needs the client's records and is added by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client.parser import text_string_to_metric_families

from pdserve.bench.records import RequestRecord
from pdserve.scheduler.controller.signals import scrape_text

# key -> metric family; the router's phases and TTFT, and the prefills' forwards
METRICS = {
    "reserve": "pdserve_request_reserve_seconds",
    "prefill_wait": "pdserve_request_prefill_wait_seconds",
    "prefill_call": "pdserve_request_prefill_call_seconds",
    "prefill_forward": "pdserve_prefill_forward_seconds",
    "router_ttft": "pdserve_time_to_first_token_seconds",
}
_SAMPLES = {f"{family}_{part}": f"{key}_{part}"
            for key, family in METRICS.items() for part in ("sum", "count")}


def parse(text: str) -> dict[str, float]:
    """{"<key>_sum" | "<key>_count": value} summed over instances and scenarios."""
    out = dict.fromkeys(_SAMPLES.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = _SAMPLES.get(sample.name)
            if key is not None:
                out[key] += float(sample.value)
    return out


def totals(metrics_url: str, settle_s: float = 5.0, timeout_s: float = 5.0) -> dict[str, float]:
    """``parse`` of the server's /metrics once two readings 0.5 s apart agree (the
    stubs send their observations every 0.25 s), or after ``settle_s``."""
    deadline = time.monotonic() + settle_s
    last = _read(metrics_url, timeout_s)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _read(metrics_url, timeout_s)
        if now == last:
            break
        last = now
    return last


def _read(metrics_url: str, timeout_s: float) -> dict[str, float]:
    return parse(scrape_text(metrics_url, timeout_s))


def means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean of each phase between two readings, in ms (None where nothing was
    observed), and how many were observed (``<key>_n``)."""
    out: dict[str, float | None] = {}
    for key in METRICS:
        n = after[f"{key}_count"] - before[f"{key}_count"]
        total = after[f"{key}_sum"] - before[f"{key}_sum"]
        out[key] = 1000.0 * total / n if n > 0 else None
        out[f"{key}_n"] = n
    return out


def point(before: dict[str, float], after: dict[str, float],
          records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """A run's served requests' mean first-token time split as the router saw it
    (``means_ms``), with the client's mean TTFT and what it adds to the router's
    (``delivery``: the first token's way from the router to the client)."""
    out = means_ms(before, after)
    served = [r.first_token_s - r.send_s for r in records
              if r.is_ok and r.first_token_s is not None]
    client = 1000.0 * sum(served) / len(served) if served else None
    router = out["router_ttft"]
    out["client_ttft"] = client
    out["delivery"] = client - router if client is not None and router is not None else None
    return out
