"""perf.sim_validate: the router's CPU work is fitted to the runs each experiment takes
before its points (E1's busy run, E2's capacity and overload runs), not to the points.

The "measurements" here are the simulator's own runs with a known router cost,
so the calibration must find that cost again from the busy run alone.
"""

from __future__ import annotations

import copy
import json
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


def _doc(cfg: e1.E1Config, with_busy: bool, token_s: float = 0.0) -> dict[str, Any]:
    """An E1 JSON whose figures the simulator itself made with the router cost above
    (with ``token_s``: that cost a streamed token instead of a request)."""
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
        host = sv.host_cores(spec, scenario, request_s=0.0 if token_s else TRUE_REQUEST_S,
                             token_s=token_s)
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


def test_e1_router_work_can_be_fitted_per_streamed_token() -> None:
    cfg = replace(e1.FULL, rates=(1.0,), point_s=5.0, busy_s=8.0)
    doc = _doc(cfg, with_busy=True, token_s=0.004)
    out = sv.validate_e1(doc, load_profile(PROFILE), router_unit="token")
    calib = out["calibration"]["disagg"]
    assert calib["router_request_ms"] == 0.0
    assert calib["router_token_ms"] == pytest.approx(4.0, rel=0.35)


ROUTER_CPU = {"pdserve": 0.02, "tritonserver": 0.03, "client": 0.01,
              "prefill_0": 0.4, "decode_0": 0.7, "host_speed": 0.05}


def test_router_cpu_measured_is_the_processes_cpu_per_request_not_a_fit() -> None:
    cfg = replace(e1.FULL, rates=(1.0,), point_s=5.0, busy_s=8.0)
    doc = _doc(cfg, with_busy=True)
    for label in ("disagg", "agg"):
        doc["busy"][label]["cpu_cores"] = ROUTER_CPU
    out = sv.validate_e1(doc, load_profile(PROFILE), router_cpu="measured")
    for label in ("disagg", "agg"):
        calib = out["calibration"][label]
        req_s = doc["busy"][label]["load"]["req_per_s"]
        # router stub + tritonserver + client (0.06 cores) per completed request; the
        # instances' and the gauge's CPU are not the router's
        assert calib["router_request_ms"] == pytest.approx(1000 * 0.06 / req_s)
        assert calib["busy_replay_req_per_s"] > 0
    # a busy run without its processes' CPU cannot be calibrated this way
    del doc["busy"]["agg"]["cpu_cores"]
    with pytest.raises(sv.NotGauged, match="cpu_cores"):
        sv.validate_e1(doc, load_profile(PROFILE), router_cpu="measured")
    # on a host the loop gauge read 1.5x slow, the same CPU is an unslowed host's 2/3
    slowed = {"prefill": 1.0, "decode": 1.0, "python": 1.5}
    assert sv.measured_request_s(ROUTER_CPU, 2.0, slowed) == pytest.approx(0.02)
    assert sv.measured_request_s({"pdserve": 0.1}, 2.0) is None
    assert sv.measured_request_s(ROUTER_CPU, 0.0) is None


TRUE_SWEEP_S = 0.0004


def _e2_doc(cfg: e2.E2Config, with_overload: bool) -> dict[str, Any]:
    """An E2 JSON whose figures the simulator itself made with the sweep cost above
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
                              host=replace(sv.host_cores(spec), sweep_s=TRUE_SWEEP_S))
        over = sv.simulate_specs(prof, costly, specs, ttft_budget_s=budget,
                                 transfer_mode="block_free", admission="on_demand")
        measured["overload_run"] = {"load": cfg.overload_load, "rate": rate,
                                    "offered": len(specs), "seed": e2.OVERLOAD_SEED,
                                    "bench": over}
    return {"config": {**asdict(cfg), "loads": list(cfg.loads)}, "spec_local_queue": spec,
            "measured": measured, "ttft_budget_s": budget, "points": []}


@pytest.mark.parametrize("with_overload", [True, False])
def test_e2_sweep_work_is_fitted_to_the_overload_run(with_overload: bool) -> None:
    cfg = replace(e2.FULL, loads=(1.0,), capacity_s=6.0, overload_s=6.0)
    doc = _e2_doc(cfg, with_overload)
    calib = sv.validate_e2(doc, load_profile(PROFILE))["calibration"]
    assert calib["router_request_ms"] == 0.0  # the capacity run had no router work
    if with_overload:
        # The overload run's TPOT moves with the router's retries: the fit finds them.
        assert calib["router_sweep_ms"] == pytest.approx(1000 * TRUE_SWEEP_S, rel=0.35)
        assert calib["overload_replay_tpot_p50_ms"] == pytest.approx(
            calib["overload_measured_tpot_p50_ms"], rel=0.02)
    else:  # an E2 run from before the overload run: nothing to fit, no sweep work
        assert "router_sweep_ms" not in calib


def test_e2_router_cpu_measured_comes_from_the_capacity_runs_processes() -> None:
    cfg = replace(e2.FULL, loads=(1.0,), capacity_s=6.0, overload_s=6.0)
    doc = _e2_doc(cfg, with_overload=False)
    doc["measured"]["capacity_cpu_cores"] = ROUTER_CPU
    calib = sv.validate_e2(doc, load_profile(PROFILE), router_cpu="measured")["calibration"]
    cap_req_s = doc["measured"]["capacity_run"]["req_per_s"]
    assert calib["router_request_ms"] == pytest.approx(1000 * 0.06 / cap_req_s)
    # the replay at that work is slower than the run that had none
    assert calib["capacity_replay_tpot_p50_ms"] > doc["measured"]["capacity_run"]["tpot_p50_ms"]
    del doc["measured"]["capacity_cpu_cores"]
    with pytest.raises(sv.NotGauged, match="capacity_cpu_cores"):
        sv.validate_e2(doc, load_profile(PROFILE), router_cpu="measured")


def test_e2_prefill_spread_is_the_unloaded_runs_and_can_be_switched_off() -> None:
    assert sv.prefill_cv({"ttft_p50_ms": 100.0, "ttft_p90_ms": 112.816}) == pytest.approx(0.1)
    for row in ({"ttft_p50_ms": 100.0, "ttft_p90_ms": 100.0}, {"ttft_p50_ms": None}):
        assert sv.prefill_cv(row) == 0.0  # no spread measured: none drawn
    cfg = replace(e2.FULL, loads=(1.0,), capacity_s=6.0, overload_s=6.0)
    doc = _e2_doc(cfg, with_overload=False)
    doc["measured"]["unloaded"] = {**doc["measured"]["unloaded"],
                                   "ttft_p90_ms": 1.2 * doc["measured"]["unloaded"]["ttft_p50_ms"]}
    calib = sv.validate_e2(doc, load_profile(PROFILE))["calibration"]
    assert calib["prefill_cv"] == pytest.approx(0.2 / sv.Z90)
    assert sv.validate_e2(doc, load_profile(PROFILE), spread=False)["calibration"][
        "prefill_cv"] == 0.0


def test_e2_prefill_call_time_comes_from_the_unloaded_runs_phases() -> None:
    """``--prefill-call``: the call's time beyond the forward and the KV send, as the
    router and the prefills timed them one request at a time; 0 without those
    timings, and by default."""
    assert sv.unloaded_call_s({"prefill_call": 125.0, "prefill_forward": 113.0}, 0.002) \
        == pytest.approx(0.010)
    assert sv.unloaded_call_s({"prefill_call": 100.0, "prefill_forward": 113.0}, 0.0) == 0.0
    assert sv.unloaded_call_s(None, 0.0) == 0.0
    assert sv.unloaded_call_s({"prefill_call": None, "prefill_forward": 1.0}, 0.0) == 0.0
    cfg = replace(e2.FULL, loads=(1.0,), capacity_s=6.0, overload_s=6.0)
    doc = _e2_doc(cfg, with_overload=False)
    profile = load_profile(PROFILE)
    xfer = profile.transfer_time("block_free", cfg.prompt_len)
    doc["measured"]["unloaded_phases_ms"] = {"prefill_call": 50.0 + 1000 * xfer,
                                             "prefill_forward": 30.0}
    assert sv.validate_e2(doc, profile, call_hops=True)["calibration"][
        "prefill_call_ms"] == pytest.approx(20.0)
    assert sv.validate_e2(doc, profile)["calibration"]["prefill_call_ms"] == 0  # the default


def test_phases_compare_the_simulated_and_the_live_first_token_time() -> None:
    sim = {"phases_ms": {"to_accept": 90.0, "call": 250.0, "forward": 200.0, "rest": 10.0,
                         "ttft": 350.0}}
    live = {"reserve": 10.0, "prefill_wait": 100.0, "prefill_call": 260.0,
            "prefill_forward": 210.0, "client_ttft": 400.0, "prefill_call_n": 30.0,
            "prefill_forward_n": 20.0}
    got = sv.phase_comparison(sim, live)
    assert got is not None
    assert got["measured"] == {"to_accept": 110.0, "call": 260.0, "forward": 210.0,
                               "rest": 30.0, "ttft": 400.0, "per_forward": 1.5}
    # a run recorded before the forward counts were: no prompts per forward
    old = sv.phase_comparison(sim, {k: v for k, v in live.items() if not k.endswith("_n")})
    assert old is not None and old["measured"]["per_forward"] is None
    assert got["simulated"] == sim["phases_ms"]
    # an aggregated point (no reservation, no prefill call) or a run without phases
    assert sv.phase_comparison(sim, {**live, "reserve": None}) is None
    assert sv.phase_comparison(sim, None) is None
    table = sv.phases_markdown([{"points": [{"experiment": "E2", "point": "on_demand 1x",
                                             "phases_ms": got}]}])
    assert ("| E2 | on_demand 1x | 90.0 / 110.0 | 250.0 / 260.0 | 200.0 / 210.0 | 10.0 / 30.0 |"
            in table)


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


def _summary(ttft: float, tpot: float, req_s: float = 1.0) -> dict[str, Any]:
    return {"ttft_p50_ms": ttft, "ttft_p90_ms": 2 * ttft, "tpot_p50_ms": tpot,
            "tpot_p90_ms": None, "req_per_s": req_s, "out_tok_per_s": 10 * req_s}


def test_live_spread_compares_reruns_and_the_simulator_against_their_mean() -> None:
    # The validated run: two E1 points; the repeat has one of them (and one it lacks).
    results = [{"points": [
        {"experiment": "E1", "point": "disagg 1 req/s", "simulated": _summary(115, 30),
         "measured": _summary(100, 30)},
        {"experiment": "E1", "point": "agg 1 req/s", "simulated": _summary(100, 30),
         "measured": _summary(100, 30)}]}]
    repeat = {"points": [
        {"deployment": "disagg", "rate": 1.0, "load": _summary(130, 30, req_s=1.05)},
        {"deployment": "disagg", "rate": 3.0, "load": _summary(500, 50)}]}
    out = sv.live_spread(results, {"E1": [repeat]})
    assert [p["point"] for p in out["points"]] == ["disagg 1 req/s"]  # only points both have
    p = out["points"][0]
    assert p["runs"] == 2
    err = p["rerun_error"][0]
    assert err["ttft_p50_ms"] == pytest.approx(0.30) and err["ttft_p90_ms"] == pytest.approx(0.30)
    assert err["tpot_p50_ms"] == 0.0 and err["tpot_p90_ms"] is None  # no figure: not counted
    assert err["req_per_s"] == pytest.approx(0.05)
    # live: 5 figures compared, the two TTFTs move 30 % from run to run
    assert out["live_within_10pct"] == [3, 5]
    # the mean TTFT p50 is 115 ms: the simulated 115 hits it (-> within), which
    # against the validated run alone (100 ms) it would not (+15 %)
    assert p["mean"]["ttft_p50_ms"] == pytest.approx(115)
    assert p["sim_vs_mean_error"]["ttft_p50_ms"] == pytest.approx(0.0)
    assert p["sim_vs_mean_error"]["ttft_p90_ms"] == pytest.approx(0.0)
    assert p["sim_vs_mean_error"]["req_per_s"] == pytest.approx(1 / 1.025 - 1)
    assert out["vs_mean_within_10pct"] == [5, 5]
    table = sv.spread_markdown(out)
    assert "| E1 | disagg 1 req/s | 2 | +30% / +0% |" in table


def test_median_of_runs_compares_each_runs_own_simulation_as_medians() -> None:
    def point(name: str, sim_ttft: float, live_ttft: float) -> dict[str, Any]:
        return {"experiment": "E2", "point": name, "simulated": _summary(sim_ttft, 30),
                "measured": {**_summary(live_ttft, 30), "errors": {"REJECTED": 2}}}
    # three runs; the third met a transient: its own simulation and its live figure
    # are both far off, and the median leaves it out where a mean would not
    runs = [[{"points": [point("on_demand 1x", 100, 104), point("on_demand 5x", 400, 400)]}],
            [{"points": [point("on_demand 1x", 102, 98)]}],  # lacks the 5x point
            [{"points": [point("on_demand 1x", 160, 250), point("on_demand 5x", 1, 1)]}]]
    out = sv.median_of_runs(runs)
    assert len(out) == 1
    assert [p["point"] for p in out[0]["points"]] == ["on_demand 1x"]  # only points all have
    p = out[0]["points"][0]
    assert p["runs"] == 3
    assert p["simulated"]["ttft_p50_ms"] == 102 and p["measured"]["ttft_p50_ms"] == 104
    assert p["relative_error"]["ttft_p50_ms"] == pytest.approx(102 / 104 - 1)
    assert p["relative_error"]["tpot_p90_ms"] is None  # no figure in any run: not counted
    assert p["live_spread"]["ttft_p50_ms"] == pytest.approx((250 - 98) / 104)
    assert p["measured"]["errors"] == {"all": 2} and p["simulated"]["errors"] == {"all": 0}
    assert sv.within(out) == (5, 5)
    # a mean of the same runs misses: (104 + 98 + 250) / 3 against (100 + 102 + 160) / 3
    assert abs((100 + 102 + 160) / (104 + 98 + 250) - 1) > 0.10
    table = sv.median_markdown(out)
    assert "| E2 | on_demand 1x | 3 | 102.0 / 104.0 (-2%) [146%] |" in table


def test_the_host_gauges_cpu_is_background_work_in_every_simulation_of_its_run() -> None:
    e1_doc = {"points": [{"cpu_cores": {"host_speed": 0.05, "prefill_0": 0.4}},
                         {"cpu_cores": {"host_speed": 0.04}}, {"cpu_cores": None}],
              "busy": {"disagg": {"cpu_cores": {"host_speed": 0.045}}}}
    assert sv.gauge_background_s(e1_doc) == pytest.approx(0.045 * sv.GAUGE_PERIOD_S)
    e2_doc = {"points": [{"cpu_cores": {"host_speed": 0.049}}],
              "measured": {"capacity_cpu_cores": {"host_speed": 0.047}}}
    assert sv.gauge_background_s(e2_doc) == pytest.approx(0.048)
    assert sv.gauge_background_s({"points": [{"cpu_cores": {"decode_0": 0.5}}]}) == 0.0
    spec = e1.spec(e1.FULL)
    host = sv.host_cores(spec, "default", background_s=0.05)
    assert (host.background_s, host.background_period_s, host.background_cores) == \
        (0.05, sv.GAUGE_PERIOD_S, ())  # unpinned, as the gauge's process is
    # a run validated with and without it: the calibration says which
    doc = _doc(replace(e1.FULL, rates=(1.0,), point_s=5.0), with_busy=False)
    doc["points"] = [{"deployment": "disagg", "rate": 1.0, "load": _summary(150, 30),
                      "cpu_cores": {"host_speed": 0.05}}]
    on = sv.validate_e1(doc, load_profile(PROFILE))
    off = sv.validate_e1(doc, load_profile(PROFILE), background=False)
    assert on["calibration"]["disagg"]["background_ms"] == pytest.approx(50.0)
    assert off["calibration"]["disagg"]["background_ms"] == 0.0


def test_e2_points_are_named_alike_in_every_run() -> None:
    doc = {"points": [{"admission": "on_demand", "load": 5.0, "bench": _summary(1, 1)},
                      {"admission": "local_queue", "load": 1.0, "bench": _summary(2, 2)}]}
    assert list(sv.measured_points("E2", doc)) == ["on_demand 5x", "local_queue 1x"]
    assert sv.point_label("E1", {"deployment": "agg", "rate": 0.5}) == "agg 0.5 req/s"


def test_repeat_without_the_run_it_repeats_is_a_usage_error(tmp_path: Path) -> None:
    f = tmp_path / "e1.json"
    f.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        sv.main(["--profile", str(PROFILE), "--e2", str(f), "--repeat-e1", str(f)])
    assert exc.value.code == 2


def test_router_work_per_token_with_the_measured_cpu_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "e1.json"
    f.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        sv.main(["--profile", str(PROFILE), "--e1", str(f), "--router-unit", "token",
                 "--router-cpu", "measured"])
    assert exc.value.code == 2
    assert "give one" in capsys.readouterr().err


def test_a_repeat_of_another_experiment_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e1_doc = _doc(replace(e1.FULL, rates=(1.0,), point_s=5.0), with_busy=False)
    e1_doc["experiment"] = e1.NAME
    a, b = tmp_path / "e1.json", tmp_path / "e2.json"
    a.write_text(json.dumps(e1_doc))
    b.write_text(json.dumps({"experiment": e2.NAME}))
    with pytest.raises(SystemExit) as exc:
        sv.main(["--profile", str(PROFILE), "--e1", str(a), "--repeat-e1", str(b),
                 "--json", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"is a run of '{e2.NAME}', not of '{e1.NAME}'" in capsys.readouterr().err


def test_repeats_are_each_simulated_on_their_own_calibration_and_compared_as_medians(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _doc(replace(e1.FULL, rates=(1.0,), point_s=5.0), with_busy=False)
    base["experiment"] = e1.NAME
    files = []
    for i, ttft in enumerate((100.0, 130.0, 400.0)):
        doc = copy.deepcopy(base)
        doc["points"] = [{"deployment": "disagg", "rate": 1.0, "load": _summary(ttft, 30)}]
        if i == 2:  # this run's unloaded requests met a slow host: its calibration moves
            doc["unloaded"]["disagg"]["ttft_p50_ms"] += 200
        files.append(tmp_path / f"e1_{i}.json")
        files[-1].write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert sv.main(["--profile", str(PROFILE), "--e1", str(files[0]),
                    "--repeat-e1", str(files[1]), str(files[2]), "--json", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())["repeat"]
    (point,) = doc["median_of_runs"][0]["points"]
    assert point["runs"] == 3 and point["measured"]["ttft_p50_ms"] == 130.0
    # the third run's simulation starts from its own (slower) calibration
    sims = sorted(p["simulated"]["ttft_p50_ms"] for p in (
        sv.validate_e1(json.loads(f.read_text()), load_profile(PROFILE))["points"][0]
        for f in files))
    assert sims[2] > sims[0] + 150
    assert point["simulated"]["ttft_p50_ms"] == pytest.approx(sims[1])
    assert doc["median_of_runs_within_10pct"] == list(sv.within(doc["median_of_runs"]))
    assert "median of the runs, each simulated on its own calibration:" in capsys.readouterr().out


def test_mean_run_averages_every_measured_figure_the_validation_reads() -> None:
    def e1_doc(k: float, rates: tuple[float, ...]) -> dict[str, Any]:
        return {"config": {"rates": list(rates)},
                "unloaded": {"disagg": {**_summary(100 * k, 20 * k), "errors": {"X": 1}}},
                "busy": {"disagg": {"concurrency": 2, "load": _summary(150 * k, 30 * k)}},
                "points": [{"deployment": "disagg", "rate": r, "load": _summary(200 * k, 40)}
                           for r in rates]}
    runs = [e1_doc(1.0, (1.0, 2.0)), e1_doc(2.0, (1.0,)), e1_doc(3.0, (1.0, 2.0))]
    out = sv.mean_run("E1", runs)
    assert out["unloaded"]["disagg"]["ttft_p50_ms"] == pytest.approx(200)
    assert out["unloaded"]["disagg"]["errors"] == {"X": 1}  # not a figure: the first run's
    assert out["busy"]["disagg"]["load"]["tpot_p50_ms"] == pytest.approx(60)
    assert out["busy"]["disagg"]["concurrency"] == 2
    assert [p["rate"] for p in out["points"]] == [1.0]  # 2 req/s: not in every run
    assert out["points"][0]["load"]["ttft_p50_ms"] == pytest.approx(400)
    assert out["points"][0]["load"]["tpot_p90_ms"] is None
    assert out["mean_of_runs"] == 3
    assert runs[0]["unloaded"]["disagg"]["ttft_p50_ms"] == 100  # the inputs are untouched

    def e2_doc(k: float) -> dict[str, Any]:
        return {"measured": {"unloaded": _summary(150 * k, 20), "service_s": 0.3 * k,
                             "capacity_run": _summary(500, 25 * k, req_s=7 * k),
                             "overload_run": {"rate": 28.0, "offered": 280, "seed": 5,
                                              "bench": _summary(400, 40 * k)}},
                "points": [{"admission": "on_demand", "load": 1.0, "rate": 7.0 * k,
                            "bench": _summary(300 * k, 30)}]}
    out2 = sv.mean_run("E2", [e2_doc(1.0), e2_doc(3.0)])
    m = out2["measured"]
    assert m["service_s"] == pytest.approx(0.6)
    assert m["capacity_run"]["req_per_s"] == pytest.approx(14)
    assert m["overload_run"]["bench"]["tpot_p50_ms"] == pytest.approx(80)
    assert m["overload_run"]["offered"] == 280 and m["overload_run"]["rate"] == 28.0
    assert out2["points"][0]["bench"]["ttft_p50_ms"] == pytest.approx(600)
    assert out2["points"][0]["rate"] == 7.0  # a setting: the first run's


def test_figures_are_also_counted_apart_for_points_on_a_slowed_host() -> None:
    def point(err: float, host: float | None) -> dict[str, object]:
        return {"experiment": "E2", "point": "p", "simulated": _summary(100, 30),
                "measured": _summary(100, 30), "host_slowdown": host,
                "relative_error": {"ttft_p50_ms": err, "req_per_s": 0.0}}

    results = [{"points": [point(0.05, 1.0), point(0.30, 1.4), point(0.30, None)]}]
    assert sv.by_host(results) == {"unslowed": [2, 2], "slowed": [1, 2]}
    assert sv.within(results) == (4, 6)  # every point, gauged or not
    assert sv.by_host([{"points": [point(0.0, None)]}]) is None  # runs without the gauge
    assert "| E2 | p (host 1.40x) |" in sv.markdown(results)


def test_host_scale_scales_a_gauged_points_engine_by_part_of_its_slowdown() -> None:
    assert sv.host_scaled({"host_slowdown": 1.4}, 0.5) == pytest.approx(
        {"ttft": 1.2, "tpot": 1.2})
    assert sv.host_scaled({"host_slowdown": 1.4}, 0.0) is None  # off
    assert sv.host_scaled({}, 0.5) is None  # a point without the gauge
    # The scale reaches the engine the point is simulated on.
    profile = load_profile(PROFILE)
    scaled = sv.drifted(profile, sv.host_scaled({"host_slowdown": 1.4}, 0.5))
    assert scaled.decode.fixed_s == pytest.approx(1.2 * profile.decode.fixed_s)
    assert scaled.prefill.per_token_s == pytest.approx(1.2 * profile.prefill.per_token_s)


@pytest.mark.parametrize("flags", [["--drift", "--host-scale", "0.5"], ["--host-scale", "2"]])
def test_host_scale_with_drift_or_out_of_range_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    f = tmp_path / "e1.json"
    f.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        sv.main(["--profile", str(PROFILE), "--e1", str(f), *flags])
    assert exc.value.code == 2
    assert "--host-scale" in capsys.readouterr().err


SLOW_CALIBRATION = {"host_slowdown": 1.5, "gemv_slowdown": 1.1, "gemm_slowdown": 1.2}
SLOW_POINT = {"host_slowdown": 1.3, "gemv_slowdown": 1.25, "gemm_slowdown": 1.05}


def _as_gauged(f: dict[str, float]) -> dict[str, float]:
    return {part: f[field] for part, field in sv.GAUGE_FIELDS.items()}


def test_host_model_gauges_replays_each_run_on_the_host_its_gauges_read() -> None:
    """E1 "measured" by the simulator with a known router cost, its calibration runs
    on one slowed host and its point on another: with the gauges the calibration
    finds the unslowed router cost and the point is reproduced; without them the
    router cost comes out inflated by the calibration's slow Python."""
    cfg = replace(e1.FULL, rates=(1.0,), point_s=5.0, busy_s=8.0)
    doc = _doc(cfg, with_busy=False)  # the figures are remade below on the slowed hosts
    spec = doc["spec"]
    prof = sv._limits(load_profile(PROFILE), spec)
    trace = common.AZURE_CONV
    base, _ = e1.trace_at(cfg, 1.0, trace)
    kw: dict[str, Any] = {"ttft_budget_s": float(spec["limits"]["ttft_budget_s"]),
                          "transfer_mode": "layerwise"}
    doc["unloaded_window"] = {}
    specs, _ = e1.trace_at(cfg, 1.0, trace)
    for label, scenario in (("disagg", "default"), ("agg", "agg")):
        host = sv.host_cores(spec, scenario, request_s=TRUE_REQUEST_S)
        sc = (ScenarioSpec("default", 1, 1, host=host) if label == "disagg"
              else ScenarioSpec("default", n_aggregated=2, host=host))
        slow = sv.on_host(prof, sc, _as_gauged(SLOW_CALIBRATION))
        doc["unloaded"][label] = sv.simulate_specs(
            *slow, sv.one_at_a_time(base[2: cfg.unloaded_requests + 2]), **kw)
        doc["unloaded_window"][label] = dict(SLOW_CALIBRATION)
        busy = sv.simulate_closed_loop(*slow, e1.busy_specs(cfg, trace), cfg.busy_concurrency,
                                       cfg.busy_s, **kw)
        doc["busy"][label] = {"concurrency": cfg.busy_concurrency, "duration_s": cfg.busy_s,
                              "load": busy, **SLOW_CALIBRATION}
        point = sv.simulate_specs(*sv.on_host(prof, sc, _as_gauged(SLOW_POINT)), specs, **kw)
        doc["points"].append({"deployment": label, "rate": 1.0, "load": point, **SLOW_POINT})
    gauged = sv.validate_e1(doc, load_profile(PROFILE), gauges=True)
    plain = sv.validate_e1(doc, load_profile(PROFILE))
    for label in ("disagg", "agg"):
        assert gauged["calibration"][label]["router_request_ms"] == pytest.approx(
            1000 * TRUE_REQUEST_S, rel=0.35)
        assert gauged["calibration"][label]["serving_overhead_ms"] == pytest.approx(0, abs=1.0)
        # without the gauges the slow calibration host is taken for router work
        assert plain["calibration"][label]["serving_overhead_ms"] > 5
    for p in gauged["points"]:
        assert p["host"] == _as_gauged(SLOW_POINT) and p["drift"] is None
        for key in ("ttft_p50_ms", "tpot_p50_ms", "req_per_s"):
            assert p["relative_error"][key] == pytest.approx(0, abs=0.1), (p["point"], key)


def test_on_host_scales_the_engine_by_the_products_and_the_python_by_the_loop() -> None:
    profile = replace(load_profile(PROFILE), serving_overhead_s=0.01)
    host = replace(sv.host_cores(e1.spec(e1.FULL)), request_s=0.02, sweep_s=0.001)
    sc = ScenarioSpec("default", 1, 1, host=host)
    prof, scen = sv.on_host(profile, sc, {"prefill": 1.2, "decode": 1.1, "python": 1.5})
    assert prof.prefill.per_token_s == pytest.approx(1.2 * profile.prefill.per_token_s)
    assert prof.decode.per_seq_s == pytest.approx(1.1 * profile.decode.per_seq_s)
    assert prof.decode.stream_overhead_s == pytest.approx(1.5 * profile.decode.stream_overhead_s)
    assert prof.serving_overhead_s == pytest.approx(0.015)
    assert scen.host is not None
    assert (scen.host.request_s, scen.host.sweep_s) == pytest.approx((0.03, 0.0015))
    assert sv.on_host(profile, sc, None) == (profile, sc)


def test_host_model_gauges_on_a_run_without_the_torch_gauge_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = replace(e1.FULL, rates=(1.0,), point_s=5.0, busy_s=8.0)
    doc = _doc(cfg, with_busy=True)
    doc["unloaded_window"] = {"disagg": {"host_slowdown": 1.2}}  # a gauge without torch
    f = tmp_path / "e1.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(SystemExit) as exc:
        sv.main(["--profile", str(PROFILE), "--e1", str(f), "--host-model", "gauges"])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # argparse wraps its lines
    assert "unloaded disagg has no gemm_slowdown, gemv_slowdown" in err
    with pytest.raises(SystemExit):
        sv.main(["--profile", str(PROFILE), "--e1", str(f), "--host-model", "gauges",
                 "--host-scale", "0.5"])
    assert "give one" in capsys.readouterr().err


def test_prefill_fit_takes_slope_and_intercept_from_the_unloaded_requests() -> None:
    prefill = load_profile(PROFILE).prefill
    rows = [_row(n, 4, 0.045 + 0.75 * prefill.prompt_time(n), 0.03) for n in (11, 48, 110, 164)]
    k, a = sv.prefill_fit(prefill, [*rows, _row(30, 2, 0, 0, status="error")])
    assert (k, a) == pytest.approx((0.75, 0.045), rel=1e-4)
    # two prompt lengths do not make a slope; a broken run is clamped, not believed
    assert sv.prefill_fit(prefill, rows[:1] * 3 + rows[1:2]) is None
    assert sv.prefill_fit(prefill, None) is None
    steep = [_row(n, 4, 9 * prefill.prompt_time(n), 0.03) for n in (11, 48, 110)]
    assert sv.prefill_fit(prefill, steep)[0] == sv.PREFILL_FIT_RANGE[1]  # type: ignore[index]


@pytest.mark.parametrize("fit", [True, False])
def test_e1_scales_the_prefill_by_the_unloaded_runs_slope(fit: bool) -> None:
    cfg = replace(e1.FULL, rates=(1.0,), point_s=5.0, busy_s=8.0)
    doc = _doc(cfg, with_busy=False)
    prefill = load_profile(PROFILE).prefill
    doc["unloaded_requests"] = {
        label: [_row(n, 4, 0.04 + 0.8 * prefill.prompt_time(n), 0.03) for n in (11, 48, 164)]
        for label in ("disagg", "agg")}
    calib = sv.validate_e1(doc, load_profile(PROFILE), fit_prefill=fit)["calibration"]
    for label in ("disagg", "agg"):
        if fit:
            assert calib[label]["prefill_scale_vs_engine"] == pytest.approx(0.8, rel=1e-4)
            assert calib[label]["prefill_fit_intercept_ms"] == pytest.approx(40.0, rel=1e-3)
            # the engine-only unloaded TTFT is the faster prefill's
            assert calib[label]["engine_only_unloaded_ttft_p50_ms"] < 0.9 * doc["unloaded"][
                label]["ttft_p50_ms"]
        else:
            assert "prefill_scale_vs_engine" not in calib[label]
