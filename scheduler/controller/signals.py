"""Capacity signals per scenario from Triton's /metrics text (P/D-Serve §4.1 inputs).

The instances export (``roles/metrics.py``, label ``instance``, optionally
``scenario``): TTFT and TPOT histograms, prompt/generated token counters and
the running batch gauge. Between two scrapes the controller derives, per
scenario:

    requests  = Δ ttft_count                 arrival_rate = Δ offered / Δt
                                             (requests / Δt without the offered counter)
    T_p       = Δ ttft_sum / Δ ttft_count    (seconds a prompt occupies a prefill slot)
    tpot      = Δ tpot_sum / Δ tpot_count
    out       = Δ generated_tokens / requests
    T_d       = tpot * max(out - 1, 1)       (seconds a request occupies a decode slot)
    b_p, b_d  = the instances' configured max_batch_size (slots per instance)
    e2e       = T_p + tpot * (out - 1)       ttft_share = T_p / e2e

So prompt-heavy traffic (long T_p) lowers per-prefill capacity b_p/T_p and
output-heavy traffic (long T_d) lowers per-decode capacity: the balance rule
moves instances toward the stage that needs them.

``offered`` (``pdserve_requests_offered_total``, router) counts every valid
request, also those ended early with UNAVAILABLE: demand the first-token
count misses exactly when capacity is short. Token counters are taken from the
router only (series whose ``instance`` is not a P/D instance), which counts each
request once; prefill/decode instances count the same tokens again.

Series without a ``scenario`` label count for the scenario of their
``instance`` if it is a P/D instance, and for the only scenario when there is
one; with several scenarios they are dropped.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from pdserve.scheduler.ratio import RoleCapacity, ScenarioSignal

TTFT = "pdserve_time_to_first_token_seconds"
TPOT = "pdserve_time_per_output_token_seconds"
GENERATED = "pdserve_generated_tokens_total"
PROMPT = "pdserve_prompt_tokens_total"
RUNNING = "pdserve_running_batch_size"
OFFERED = "pdserve_requests_offered_total"
_KEYS = ("ttft_sum", "ttft_count", "tpot_sum", "tpot_count", "generated", "prompt", "offered")
_ROUTER_ONLY = ("generated", "prompt")


@dataclass
class Totals:
    """Cumulative counters per scenario at one scrape (summed over servers)."""

    at: float
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # scenario -> key -> v

    def get(self, scenario: str, key: str) -> float:
        return self.values.get(scenario, {}).get(key, 0.0)


def scrape_text(url: str, timeout_s: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return str(resp.read().decode())


def totals_from_text(
    texts: list[str], at: float, instance_scenario: Mapping[str, str], scenarios: list[str]
) -> Totals:
    """Sum the pdserve series of several /metrics pages into per-scenario totals."""
    values: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(_KEYS, 0.0))
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = _key(sample.name)
                if key is None:
                    continue
                if key in _ROUTER_ONLY and sample.labels.get("instance") in instance_scenario:
                    continue
                scenario = _scenario(sample.labels, instance_scenario, scenarios)
                if scenario is not None:
                    values[scenario][key] += float(sample.value)
    return Totals(at, dict(values))


def _key(sample_name: str) -> str | None:
    return {
        f"{TTFT}_sum": "ttft_sum", f"{TTFT}_count": "ttft_count",
        f"{TPOT}_sum": "tpot_sum", f"{TPOT}_count": "tpot_count",
        GENERATED: "generated", PROMPT: "prompt", OFFERED: "offered",
    }.get(sample_name)


def _scenario(
    labels: Mapping[str, str], instance_scenario: Mapping[str, str], scenarios: list[str]
) -> str | None:
    if labels.get("scenario"):
        return labels["scenario"]
    if labels.get("instance") in instance_scenario:
        return instance_scenario[labels["instance"]]
    return scenarios[0] if len(scenarios) == 1 else None


@dataclass(frozen=True)
class Window:
    """What one scenario did between two scrapes."""

    seconds: float
    requests: float
    ttft_s: float
    tpot_s: float
    output_tokens: float
    offered: float | None = None  # requests that arrived, served or not (router counter)

    @property
    def arrival_rate(self) -> float:
        arrived = self.offered if self.offered else self.requests
        return max(arrived, self.requests) / self.seconds

    @property
    def decode_time_s(self) -> float:
        return self.tpot_s * max(self.output_tokens - 1, 1.0)

    @property
    def e2e_s(self) -> float:
        return self.ttft_s + self.tpot_s * max(self.output_tokens - 1, 0.0)


def window(prev: Totals, cur: Totals, scenario: str) -> Window | None:
    """None when the window saw no finished first token or TPOT (nothing to measure)."""
    seconds = cur.at - prev.at
    d = {k: cur.get(scenario, k) - prev.get(scenario, k) for k in _KEYS}
    if seconds <= 0 or d["ttft_count"] <= 0 or d["tpot_count"] <= 0 or min(d.values()) < 0:
        return None  # a counter going down is a restarted server: skip this window
    return Window(
        seconds=seconds,
        requests=d["ttft_count"],
        ttft_s=d["ttft_sum"] / d["ttft_count"],
        tpot_s=d["tpot_sum"] / d["tpot_count"],
        output_tokens=d["generated"] / d["ttft_count"],
        offered=d["offered"] or None,
    )


def scenario_signal(
    w: Window, now: float, n_prefill: int, n_decode: int, prefill_batch: int, decode_batch: int
) -> ScenarioSignal | None:
    if w.ttft_s <= 0 or w.tpot_s <= 0:
        return None
    e2e = w.e2e_s
    return ScenarioSignal(
        now=now,
        n_prefill=n_prefill,
        n_decode=n_decode,
        arrival_rate=w.arrival_rate,
        prefill=RoleCapacity(batch_size=prefill_batch, batch_time_s=w.ttft_s),
        decode=RoleCapacity(batch_size=decode_batch, batch_time_s=w.decode_time_s),
        e2e_s=e2e,
        ttft_share=w.ttft_s / e2e,
    )
