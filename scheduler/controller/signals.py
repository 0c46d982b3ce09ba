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
    T_d       = T_p + tpot * max(out - 1, 1) (seconds a request holds a decode slot:
                                             reserved before its prefill, see below)
    b_p, b_d  = the instances' configured max_batch_size (slots per instance)
    e2e       = T_p + tpot * (out - 1)       ttft_share = T_p / e2e

So prompt-heavy traffic (long T_p) lowers per-prefill capacity b_p/T_p and
output-heavy traffic (long T_d) lowers per-decode capacity: the balance rule
moves instances toward the stage that needs them.

The balance rule needs utilisation u = arrival_rate * T / (n * b), which by
Little's law is the mean share of the stage's slots that are busy. Where the
controller measured that share for the prefills directly (``prefill_occupancy``:
the in-flight counts the prefills report to its heartbeats, averaged over the
window) it replaces the TTFT: a router waits for decode room BEFORE the
prefill (it reserves decode KV and a batch slot first), so when decode is
short the TTFT grows with that wait and T_p = TTFT would blame the prefills;
under a closed loop both stages then look equally busy and nothing moves (E3).
T_p is then derived from the measured share, T_p = u_p * n_p * b_p / rate.

A decode slot is held longer than the tokens take: the router reserves it
(KV and a batch slot) right before the prefill, so a request holds it through
its prefill too, T_d = T_p + tpot * (out - 1). Counting only the tokens made
prompt-heavy traffic look decode-idle and moved a third instance to prefill,
where its slots could not be used: 3P1D has 12 prefill slots but only 4 decode
slots to reserve, so 4 requests at most are in flight (E3 of 2026-12-03, phase 2:
87% of the best static ratio after that switch). T_d is not taken from the
decode's own in-flight count: that includes reservations waiting for a prefill
slot, so it would blame decode for a prefill shortage.

``requested`` (``pdserve_requested_output_tokens_total``, router) adds each
arriving request's ``max_tokens``: the output length the request mix asks for,
known as it arrives, where the generated count trails a shift by a request's
life (``ratio.py``, ``RatioController._asked_leads``).

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

from pdserve.scheduler.ratio import ComputeView, RoleCapacity, ScenarioSignal

TTFT = "pdserve_time_to_first_token_seconds"
TPOT = "pdserve_time_per_output_token_seconds"
GENERATED = "pdserve_generated_tokens_total"
PROMPT = "pdserve_prompt_tokens_total"
RUNNING = "pdserve_running_batch_size"
OFFERED = "pdserve_requests_offered_total"
REQUESTED = "pdserve_requested_output_tokens_total"
_KEYS = ("ttft_sum", "ttft_count", "tpot_sum", "tpot_count", "generated", "prompt", "offered",
         "requested")
_ROUTER_ONLY = ("generated", "prompt", "requested")


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
        GENERATED: "generated", PROMPT: "prompt", OFFERED: "offered", REQUESTED: "requested",
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
    prompt_tokens: float | None = None  # mean prompt length of the arrived requests
    # Mean output length the arrived requests asked for (max_tokens); None: not counted
    requested_tokens: float | None = None

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
        # The router counts a prompt's tokens when the request arrives, as it
        # counts it offered.
        prompt_tokens=d["prompt"] / (d["offered"] or d["ttft_count"]) if d["prompt"] else None,
        requested_tokens=(d["requested"] / (d["offered"] or d["ttft_count"])
                          if d["requested"] else None),
    )


MIN_OCCUPANCY = 1e-3  # an idle stage still has a (tiny) positive T


def scenario_signal(
    w: Window, now: float, n_prefill: int, n_decode: int, prefill_batch: int, decode_batch: int,
    prefill_occupancy: float | None = None, compute: ComputeView | None = None,
) -> ScenarioSignal | None:
    """``prefill_occupancy``: the measured busy share of the prefill slots, if any;
    ``compute``: the instances' compute units and how busy they were, if measured."""
    if w.ttft_s <= 0 or w.tpot_s <= 0:
        return None
    e2e = w.e2e_s
    t_p = w.ttft_s
    rate = w.arrival_rate
    if prefill_occupancy is not None and rate > 0 and n_prefill > 0:
        t_p = max(prefill_occupancy, MIN_OCCUPANCY) * n_prefill * prefill_batch / rate
    return ScenarioSignal(
        now=now,
        n_prefill=n_prefill,
        n_decode=n_decode,
        arrival_rate=rate,
        prefill=RoleCapacity(batch_size=prefill_batch, batch_time_s=t_p),
        decode=RoleCapacity(batch_size=decode_batch, batch_time_s=t_p + w.decode_time_s),
        e2e_s=e2e,
        ttft_share=w.ttft_s / e2e,
        prompt_tokens=w.prompt_tokens,
        output_tokens=w.output_tokens,
        requested_tokens=w.requested_tokens,
        compute=compute,
    )
