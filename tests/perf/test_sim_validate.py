"""perf.sim_validate on E1: the router's CPU work is fitted to E1's busy run, not its points.

The "measurements" here are the simulator's own runs with a known router cost,
so the calibration must find that cost again from the busy run alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pdserve.scheduler.sim.config import ScenarioSpec
from pdserve.scheduler.sim.profile import load_profile
from perf import sim_validate as sv
from perf.experiments import common
from perf.experiments import e1_disagg_vs_agg as e1

PROFILE = Path(__file__).resolve().parents[2] / "perf/sim_profiles/cpu_small_fitted_2026-12-02.yaml"
TRUE_REQUEST_S = 0.030


def _doc(cfg: e1.E1Config, with_busy: bool) -> dict[str, Any]:
    """An E1 JSON whose figures the simulator itself made with the router cost above."""
    spec = e1.spec(cfg)
    prof = sv._limits(load_profile(PROFILE), spec)
    trace = common.AZURE_CONV
    base, _ = e1.trace_at(cfg, 1.0, trace)
    unloaded_specs = base[2: cfg.unloaded_requests + 2]
    budget = float(spec["limits"]["ttft_budget_s"])
    doc: dict[str, Any] = {"config": {**cfg.__dict__, "rates": list(cfg.rates)},
                           "spec": spec, "trace": str(trace), "unloaded": {}, "busy": {},
                           "points": []}
    for label, scenario in (("disagg", "default"), ("agg", "agg")):
        host = sv.host_cores(spec, scenario, request_s=TRUE_REQUEST_S)
        sc = (ScenarioSpec("default", 1, 1, host=host) if label == "disagg"
              else ScenarioSpec("default", n_aggregated=2, host=host))
        kw: dict[str, Any] = {"ttft_budget_s": budget, "transfer_mode": "layerwise"}
        doc["unloaded"][label] = sv.simulate_specs(prof, sc, sv.one_at_a_time(unloaded_specs),
                                                   **kw)
        if with_busy:
            busy = sv.simulate_closed_loop(prof, sc, e1.busy_specs(cfg, trace),
                                           cfg.busy_concurrency, cfg.busy_s, **kw)
            doc["busy"][label] = {"concurrency": cfg.busy_concurrency,
                                  "duration_s": cfg.busy_s, "load": busy}
    return doc


@pytest.mark.parametrize("with_busy", [True, False])
def test_e1_router_work_is_fitted_to_the_busy_run(with_busy: bool) -> None:
    cfg = replace(e1.FULL, rates=(1.0,), point_s=5.0, busy_s=8.0)
    doc = _doc(cfg, with_busy)
    out = sv.validate_e1(doc, load_profile(PROFILE))
    for label in ("disagg", "agg"):
        calib = out["calibration"][label]
        if with_busy:
            # The busy run's TTFT moves with the router's work: the fit finds it again.
            assert calib["router_request_ms"] == pytest.approx(1000 * TRUE_REQUEST_S, rel=0.35)
            # (the replay at the fitted value: just under the measured figure, which
            # steps up as requests start queueing behind the router's work)
            assert calib["busy_replay_ttft_p50_ms"] <= doc["busy"][label]["load"]["ttft_p50_ms"]
        else:  # an E1 run without a busy run: nothing to fit, no router work
            assert "router_request_ms" not in calib
    assert not with_busy or e1.busy_specs(cfg, common.AZURE_CONV)[0].arrival_s is None
