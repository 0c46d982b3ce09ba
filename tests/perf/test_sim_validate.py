"""perf.sim_validate: the router's CPU work is fitted to the runs each experiment takes
before its points (E1's busy run, E2's capacity and overload runs), not to the points.

The "measurements" here are the simulator's own runs with a known router cost,
so the calibration must find that cost again from the busy run alone.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from pdserve.scheduler.sim.config import ScenarioSpec
from pdserve.scheduler.sim.profile import load_profile
from perf import sim_validate as sv
from perf.experiments import common
from perf.experiments import e1_disagg_vs_agg as e1
from perf.experiments import e2_forwarding_vs_queue as e2

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


TRUE_ATTEMPT_S = 0.0004


def _e2_doc(cfg: e2.E2Config, with_overload: bool) -> dict[str, Any]:
    """An E2 JSON whose figures the simulator itself made with the attempt cost above
    (and no other serving overhead, so that every other calibration finds 0)."""
    profile = load_profile(PROFILE)
    spec = e2.spec(cfg, "local_queue", cfg.ttft_slo_ms / 1000)
    prof = sv._limits(profile, spec, decode_batch=e2.DECODE_BATCH)
    sc = ScenarioSpec("default", 2, 1, host=sv.host_cores(spec))
    lq = {"ttft_budget_s": cfg.ttft_slo_ms / 1000, "transfer_mode": "block_free",
          "admission": "local_queue"}
    # validate_e2 scales the prefill to the measured service time: make the scale 1.
    service = 2 * (prof.prefill.prompt_time(cfg.prompt_len)
                   + profile.transfer_time("block_free", cfg.prompt_len))
    unloaded = sv.simulate_specs(
        prof, sc, sv.one_at_a_time(e2.requests(cfg, None, cfg.unloaded_requests, seed=98)), **lq)
    cap = sv.simulate_closed_loop(prof, sc, e2.requests(cfg, None, 100_000, seed=97),
                                  2 * cfg.total_slots, cfg.capacity_s, **lq)
    budget = 0.5
    measured: dict[str, Any] = {"unloaded": unloaded, "service_s": service,
                                "capacity_req_per_s": cap["req_per_s"], "capacity_run": cap}
    if with_overload:
        rate = cfg.overload_load * cap["req_per_s"]
        specs = e2.requests(cfg, rate, round(rate * cfg.overload_s), seed=e2.OVERLOAD_SEED)
        costly = ScenarioSpec("default", 2, 1,
                              host=replace(sv.host_cores(spec), attempt_s=TRUE_ATTEMPT_S))
        over = sv.simulate_specs(prof, costly, specs, ttft_budget_s=budget,
                                 transfer_mode="block_free", admission="on_demand")
        measured["overload_run"] = {"load": cfg.overload_load, "rate": rate,
                                    "offered": len(specs), "seed": e2.OVERLOAD_SEED,
                                    "bench": over}
    return {"config": {**asdict(cfg), "loads": list(cfg.loads)}, "spec_local_queue": spec,
            "measured": measured, "ttft_budget_s": budget, "points": []}


@pytest.mark.parametrize("with_overload", [True, False])
def test_e2_attempt_work_is_fitted_to_the_overload_run(with_overload: bool) -> None:
    cfg = replace(e2.FULL, loads=(1.0,), capacity_s=6.0, overload_s=6.0)
    doc = _e2_doc(cfg, with_overload)
    calib = sv.validate_e2(doc, load_profile(PROFILE))["calibration"]
    assert calib["router_request_ms"] == 0.0  # the capacity run had no router work
    if with_overload:
        # The overload run's TPOT moves with the router's retries: the fit finds them.
        assert calib["router_attempt_ms"] == pytest.approx(1000 * TRUE_ATTEMPT_S, rel=0.35)
        assert calib["overload_replay_tpot_p50_ms"] == pytest.approx(
            calib["overload_measured_tpot_p50_ms"], rel=0.02)
    else:  # an E2 run from before the overload run: nothing to fit, no attempt work
        assert "router_attempt_ms" not in calib


def _row(prompt: int, out: int, ttft: float, tpot: float, status: str = "ok") -> list[Any]:
    times = [round(ttft + i * tpot, 6) for i in range(out)]
    return [prompt, out, 0.0, times if status == "ok" else [], status]


def test_drift_is_the_median_per_request_ratio_of_the_same_requests() -> None:
    unloaded = [_row(64, 4, 0.150, 0.025), _row(96, 8, 0.200, 0.030), _row(32, 4, 0.100, 0.020)]
    assert sv.drift(unloaded, unloaded) == {"ttft": 1.0, "tpot": 1.0}
    slower = [_row(64, 4, 0.180, 0.030), _row(96, 8, 0.300, 0.033), _row(32, 4, 0.110, 0.020)]
    k = sv.drift(slower, unloaded)
    assert k is not None
    assert k["ttft"] == pytest.approx(1.2) and k["tpot"] == pytest.approx(1.1)
    # A failed probe request is left out; a wild one is capped.
    failed = [_row(64, 4, 0, 0, status="error"), _row(96, 8, 2.0, 0.030), _row(32, 4, 9, 0.02)]
    k = sv.drift(failed, unloaded)
    assert k is not None and k["ttft"] == sv.DRIFT_CAP
    assert sv.drift(None, unloaded) is None and sv.drift(slower, None) is None
    with pytest.raises(ValueError, match="differ"):
        sv.drift([_row(65, 4, 0.15, 0.025)], unloaded)


def test_drifted_profile_scales_prefill_by_ttft_and_decode_by_tpot() -> None:
    prof = load_profile(PROFILE)
    out = sv.drifted(prof, {"ttft": 1.5, "tpot": 0.8})
    assert out.prefill.prompt_time(100) == pytest.approx(1.5 * prof.prefill.prompt_time(100))
    assert out.decode.step_time(4, 400) == pytest.approx(0.8 * prof.decode.step_time(4, 400))
    assert sv.drifted(prof, None) is prof
