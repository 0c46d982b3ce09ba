"""A simulation described in YAML/JSON (``pdserve sim run --config``).

    duration_s: 600
    admission: on_demand          # or local_queue
    transfer_mode: block_free     # block_fixed, layerwise
    ratio: static                 # or dynamic
    failures_per_hour_per_1000: 1
    seed: 0
    slo: {ttft_ms: 1000, tpot_ms: 50}
    forwarding: {ttft_budget_s: 5}
    scenarios:
      - name: chat
        n_prefill: 2
        n_decode: 4
        replicas: 1               # k copies named chat-0 .. chat-(k-1)
        load:
          rate: 20                # requests/s (peak, per replica)
          burstiness: 1.0         # gamma shape: 1 Poisson, < 1 bursty
          input: {mean: 1024, stddev: 300, min_len: 16, max_len: 4096}
          output: {mean: 256, stddev: 100}
          day_night: {period_s: 600, night_rate_scale: 0.3,
                      night_input: {mean: 4096}, night_output: {mean: 64}}
    trace: {path: AzureLLMInferenceTrace_conv.csv, time_scale: 1.0, max_rows: 10000}
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from pdserve.bench.metrics import Slo
from pdserve.bench.records import RequestSpec
from pdserve.bench.traces import TraceScaling, read_trace, trace_requests
from pdserve.bench.workload import LengthDistribution
from pdserve.errors import InvalidArgument
from pdserve.scheduler.controller.health import HealthPolicy
from pdserve.scheduler.forwarding import ForwardingPolicy
from pdserve.scheduler.ratio import RatioPolicy
from pdserve.scheduler.sim.config import ScenarioSpec, SimConfig
from pdserve.scheduler.sim.workload import DayNight, ScenarioLoad


def _lengths(doc: dict[str, Any] | None) -> LengthDistribution | None:
    return None if doc is None else LengthDistribution(**doc)


def _load(doc: dict[str, Any] | None) -> ScenarioLoad | None:
    if doc is None:
        return None
    body = dict(doc)
    dn = body.pop("day_night", None)
    day_night = None
    if dn is not None:
        dn = dict(dn)
        dn["night_input"] = _lengths(dn.get("night_input"))
        dn["night_output"] = _lengths(dn.get("night_output"))
        day_night = DayNight(**dn)
    return ScenarioLoad(rate=float(body.pop("rate")), input=LengthDistribution(**body.pop("input")),
                        output=LengthDistribution(**body.pop("output")), day_night=day_night,
                        **body)


def _scenarios(docs: list[dict[str, Any]]) -> tuple[ScenarioSpec, ...]:
    out = []
    for doc in docs:
        body = dict(doc)
        replicas = int(body.pop("replicas", 1))
        load = _load(body.pop("load", None))
        name = str(body.pop("name"))
        names = [name] if replicas == 1 else [f"{name}-{k}" for k in range(replicas)]
        out += [ScenarioSpec(name=n, load=load, **body) for n in names]
    return tuple(out)


def config_from_dict(doc: dict[str, Any]) -> tuple[SimConfig, list[RequestSpec] | None]:
    try:
        body = dict(doc)
        trace_doc = body.pop("trace", None)
        known = {f.name for f in fields(SimConfig)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise InvalidArgument(f"unknown simulation settings: {unknown}")
        body["scenarios"] = _scenarios(body["scenarios"])
        for key, cls in (("slo", Slo), ("forwarding", ForwardingPolicy),
                         ("ratio_policy", RatioPolicy), ("health", HealthPolicy)):
            if key in body:
                body[key] = cls(**body[key])
        config = SimConfig(**body)
        trace = None
        if trace_doc is not None:
            t = dict(trace_doc)
            rows = read_trace(t.pop("path"), t.pop("max_rows", None))
            trace = trace_requests(rows, TraceScaling(**t))
        return config, trace
    except InvalidArgument:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"bad simulation config: {exc!r}") from exc


def load_config(path: str | Path) -> tuple[SimConfig, list[RequestSpec] | None]:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"simulation config not found: {p}")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{p}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{p}: a simulation config is a mapping")
    return config_from_dict(doc)
