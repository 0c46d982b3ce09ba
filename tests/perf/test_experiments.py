"""Experiments E1-E3: specs, accounting and the results section (fast), and each
experiment's ``--quick`` run against a real tritonserver (e2e, slow).

The e2e runs check the JSON each writes, and that no process of the run is
left behind (tritonserver and its stubs carry the run's directory in their
command lines).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pdserve.bench.metrics import Slo
from pdserve.bench.records import RequestRecord
from pdserve.scheduler.controller import cli as controller_cli
from pdserve.server.launcher import ServerOptions
from pdserve.server.repo import instances_from_spec
from perf.experiments import common, e3_owned, phases
from perf.experiments import e1_disagg_vs_agg as e1
from perf.experiments import e2_forwarding_vs_queue as e2
from perf.experiments import e3_dynamic_ratio as e3


def _record(index: int, ttft_s: float | None, kind: str | None = None) -> RequestRecord:
    ok = kind is None
    return RequestRecord(
        index=index, input_len=8, requested_output_len=2, send_s=0.0,
        response_s=(ttft_s, ttft_s + 0.01) if ok and ttft_s is not None else (),
        response_tokens=(1, 1) if ok else (), final_s=(ttft_s or 0.0) + 0.02,
        status="ok" if ok else "error", error_kind=kind, error_message=kind or "",
        scheduled_s=0.0)


def _cores(spec: dict[str, object]) -> dict[str, tuple[int, ...] | None]:
    return {c.name: c.cpu_cores for c in instances_from_spec(spec)}


def test_e1_spec_pins_each_instance_to_one_core() -> None:
    cores = _cores(e1.spec(e1.FULL))
    assert cores["prefill_0"] == (0,) and cores["decode_0"] == (1,)
    assert cores["aggregated_0"] == (0,) and cores["aggregated_1"] == (1,)
    assert cores["pdserve"] is None
    router = instances_from_spec(e1.spec(e1.FULL))[0]
    assert router.routes["agg"].aggregated == ("aggregated_0", "aggregated_1")


def test_e1_trace_is_replayed_at_the_offered_rate() -> None:
    if not common.AZURE_CONV.exists():
        pytest.skip(f"trace {common.AZURE_CONV} not present (../shared beside the checkout)")
    specs, time_scale = e1.trace_at(e1.QUICK, 4.0, common.AZURE_CONV)
    assert len(specs) == 24  # 4 req/s for 6 s
    span = specs[-1].arrival_s
    assert span is not None and (len(specs) - 1) / span == pytest.approx(4.0)
    assert time_scale > 0
    assert max(s.input_len for s in specs) <= e1.QUICK.max_input_len
    assert max(s.output_len for s in specs) <= e1.QUICK.max_output_len


def test_e1_slos_use_the_better_unloaded_value() -> None:
    slo = e1.slos({"disagg": {"ttft_p90_ms": 200.0, "tpot_p50_ms": 30.0},
                   "agg": {"ttft_p90_ms": 100.0, "tpot_p50_ms": 40.0}})
    assert slo["tpot_tight"] == Slo(ttft_ms=1000.0, tpot_ms=60.0)
    assert slo["ttft_tight"] == Slo(ttft_ms=300.0, tpot_ms=150.0)


def test_e2_attainment_all_and_admitted() -> None:
    records = [_record(0, 0.05), _record(1, 0.5), _record(2, None, "UNAVAILABLE"),
               _record(3, None, "DEADLINE")]
    got = e2.attainment(records, Slo(ttft_ms=100.0))
    assert got["finished"] == 3 and got["admitted"] == 2 and got["ended_early"] == 1
    assert got["attainment_all"] == pytest.approx(1 / 3)
    assert got["attainment_admitted"] == pytest.approx(1 / 2)


_METRICS_PAGE = """\
# HELP pdserve_request_reserve_seconds r
# TYPE pdserve_request_reserve_seconds histogram
pdserve_request_reserve_seconds_bucket{instance="pdserve",scenario="default",le="0.1"} 3
pdserve_request_reserve_seconds_bucket{instance="pdserve",scenario="default",le="+Inf"} 3
pdserve_request_reserve_seconds_count{instance="pdserve",scenario="default"} 3
pdserve_request_reserve_seconds_sum{instance="pdserve",scenario="default"} 0.03
pdserve_request_reserve_seconds_count{instance="pdserve",scenario="chat"} 1
pdserve_request_reserve_seconds_sum{instance="pdserve",scenario="chat"} 0.01
# HELP pdserve_prefill_forward_seconds f
# TYPE pdserve_prefill_forward_seconds histogram
pdserve_prefill_forward_seconds_count{instance="prefill_0",scenario="default"} 2
pdserve_prefill_forward_seconds_sum{instance="prefill_0",scenario="default"} 0.2
pdserve_prefill_forward_seconds_count{instance="prefill_1",scenario="default"} 2
pdserve_prefill_forward_seconds_sum{instance="prefill_1",scenario="default"} 0.6
# HELP pdserve_time_to_first_token_seconds t
# TYPE pdserve_time_to_first_token_seconds histogram
pdserve_time_to_first_token_seconds_count{instance="pdserve",scenario="default"} 4
pdserve_time_to_first_token_seconds_sum{instance="pdserve",scenario="default"} 1.0
"""


def test_e2_point_phases_from_two_metric_pages() -> None:
    """Each phase's mean over a point: the difference of two /metrics pages, summed
    over instances and scenarios (buckets ignored); the client's TTFT from its
    records, and what it adds to the router's."""
    before = phases.parse(
        'pdserve_request_reserve_seconds_count{instance="pdserve",scenario="default"} 1\n'
        'pdserve_request_reserve_seconds_sum{instance="pdserve",scenario="default"} 0.01\n'
        'pdserve_prefill_forward_seconds_count{instance="prefill_0",scenario="default"} 1\n'
        'pdserve_prefill_forward_seconds_sum{instance="prefill_0",scenario="default"} 0.1\n'
        'pdserve_time_to_first_token_seconds_count{instance="pdserve",scenario="default"} 1\n'
        'pdserve_time_to_first_token_seconds_sum{instance="pdserve",scenario="default"} 0.2\n')
    after = phases.parse(_METRICS_PAGE)
    assert after["reserve_count"] == 4 and after["reserve_sum"] == pytest.approx(0.04)
    records = [_record(i, 0.3) for i in range(3)] + [_record(3, None, "UNAVAILABLE")]
    got = phases.point(before, after, records)
    assert got["reserve"] == pytest.approx(10.0) and got["reserve_n"] == 3
    assert got["prefill_forward"] == pytest.approx(700.0 / 3) and got["prefill_forward_n"] == 3
    assert got["router_ttft"] == pytest.approx(800.0 / 3)
    assert got["prefill_wait"] is None and got["prefill_wait_n"] == 0  # none observed
    assert got["client_ttft"] == pytest.approx(300.0)  # the served three
    assert got["delivery"] == pytest.approx(300.0 - 800.0 / 3)
    table = "\n".join(e2.phases_table([{"admission": "on_demand", "load": 5.0,
                                         "phases_ms": got}, {"admission": "x", "load": 1.0}]))
    assert "| on_demand | 5x | 10.0 | – |" in table and "| x |" not in table


def test_e2_budget_is_the_slo_less_the_measured_prefill() -> None:
    # SLO 1200 ms, a prompt holds a slot 400 ms under full load: a request that
    # starts prefill after 1200 - 2 * 400 ms would miss the SLO (with margin).
    assert e2.ttft_budget(e2.FULL, 0.4) == (pytest.approx(0.4), False)
    # A machine too slow for the SLO gets the minimum budget, flagged.
    assert e2.ttft_budget(e2.FULL, 0.7) == (e2.FULL.min_budget_s, True)
    with pytest.raises(ValueError, match="budget_margin"):
        replace(e2.FULL, budget_margin=0.5)
    budget = e2.spec(e2.FULL, "on_demand", 0.4)["limits"]["ttft_budget_s"]
    assert budget == 0.4
    assert e2.spec(e2.FULL, "local_queue", 1.2)["limits"]["admission"] == "queue"


def test_e3_switch_costs_from_the_controller_log() -> None:
    log = "\n".join([
        "2026-11-25 02:00:00,000 INFO pdserve controller: watching x",
        "2026-11-25 02:00:10,000 INFO ratio: draining decode_0 to make it prefill (balance)",
        "2026-11-25 02:00:11,500 INFO repository edit switch_role decode_0: balance {}",
        "2026-11-25 02:00:15,000 INFO decode_0 on 127.0.0.1:1: loading -> healthy ",
        "2026-11-25 02:00:40,000 INFO ratio: draining prefill_1 to make it decode (x)",
    ])
    got = e3.switch_costs(log)
    assert [sw["instance"] for sw in got] == ["decode_0", "prefill_1"]
    assert got[0]["drain_s"] == pytest.approx(1.5) and got[0]["reload_s"] == pytest.approx(3.5)
    assert got[0]["total_s"] == pytest.approx(5.0) and "total_s" not in got[1]
    assert (got[0]["how"], got[0]["reason"]) == ("reload", "balance")


def test_e3_switch_costs_of_a_switch_in_place() -> None:
    log = "\n".join([
        "2026-11-25 02:00:10,000 INFO ratio: draining decode_0 to make it prefill (balance)",
        "2026-11-25 02:00:10,400 INFO ratio: decode_0 serves prefill (switched in place)",
        "2026-11-25 02:00:11,000 INFO decode_1 on 127.0.0.1:1: draining -> healthy ",
        "2026-11-25 02:00:11,500 INFO ratio: decode_0 back in routing as prefill",
    ])
    (sw,) = e3.switch_costs(log)
    assert sw["how"] == "in place" and sw["instance"] == "decode_0"
    assert sw["drain_s"] == pytest.approx(0.4) and sw["reload_s"] == pytest.approx(1.1)
    assert sw["total_s"] == pytest.approx(1.5)


def test_e3_decisions_and_start_ratios() -> None:
    log = "\n".join([
        "2026-11-25 02:00:10,000 INFO ratio default: none 2P2D (decode compute saturated "
        "(96% busy on 2 units) and no prefill brings a unit with room: a switch adds slots, "
        "not compute (slot rule: balance rule: prefill 0.00 vs decode 0.78 utilised))",
        "2026-11-25 02:00:14,000 INFO ratio default: add_decode 1P3D (balance rule: x)",
        "2026-11-25 02:00:15,000 INFO decode_0 on 127.0.0.1:1: loading -> healthy ",
    ])
    got = e3.decisions(log)
    assert [(d["action"], d["ratio"]) for d in got] == [("none", "2P2D"), ("add_decode", "1P3D")]
    assert got[0]["reason"].startswith("decode compute saturated (96% busy")
    assert got[1]["at"] - got[0]["at"] == pytest.approx(4.0)
    assert e3.parse_ratio("1P3D") == (1, 3)
    for bad in ("0P4D", "1P3", "p1d3"):
        with pytest.raises(ValueError):
            e3.parse_ratio(bad)
    with pytest.raises(ValueError, match="4 instances"):
        replace(e3.FULL, starts=("2P3D",))
    assert e3.dynamic_label("live", "1P3D") == "dynamic from 1P3D"
    assert e3.dynamic_label("reload") == "dynamic-reload"


def test_e3_static_ratios_measure_each_mix_once() -> None:
    assert [e3.mix(p) for p in e3.FULL.mixes()] == ["900/4", "16/160"]
    assert len(e3.FULL.phases) == 3


def test_e3_static_ratios_spread_instances_over_both_cores() -> None:
    for n_p, n_d in e3.STATIC:
        cores = [c.cpu_cores for c in instances_from_spec(e3.spec(e3.FULL, n_p, n_d))[1:]]
        assert len(cores) == 4
        assert sorted(cores) == [(0,), (0,), (1,), (1,)]


def test_e3_owned_gives_every_instance_its_quota_and_keeps_the_pinning() -> None:
    assert e3.FULL.cpu_quota is None  # the shared-core E3 stays as it was
    for n_p, n_d in e3.STATIC:
        plain = instances_from_spec(e3.spec(e3.FULL, n_p, n_d))
        owned = instances_from_spec(e3.spec(e3_owned.FULL, n_p, n_d))
        assert [c.cpu_quota for c in plain] == [None] * 5
        assert [c.cpu_quota for c in owned] == [None] + [e3_owned.CPU_QUOTA] * 4  # router: none
        assert [c.cpu_cores for c in owned] == [c.cpu_cores for c in plain]
        assert 4 * e3_owned.CPU_QUOTA < 2  # room left on the 2 cores for router and client
    assert e3_owned.FULL.phases == e3.FULL.phases and e3_owned.FULL.slots == e3.FULL.slots


def test_e3_owned_lets_one_decision_move_both_instances_of_a_shift() -> None:
    """The controller E3-owned starts is asked for multi-instance decisions; the
    shared-core E3 keeps one switch a decision, and a bad value is refused."""
    args = e3.controller_args(e3_owned.FULL)
    assert args[args.index("--ratio-max-step") + 1] == "3"
    assert "--ratio-max-step" not in e3.controller_args(e3.FULL)
    parser = argparse.ArgumentParser()
    controller_cli.add_arguments(parser)
    parsed = parser.parse_args(["--repository", "r", *args])
    assert parsed.ratio_max_step == 3
    with pytest.raises(ValueError, match="ratio_max_step"):
        replace(e3_owned.FULL, ratio_max_step=0)


def test_e3_owned_judges_a_shift_on_a_short_window_of_one_mix() -> None:
    args = e3.controller_args(e3_owned.FULL)
    assert args[args.index("--ratio-mix-window-s") + 1] == "2"
    assert "--ratio-mix-window-s" not in e3.controller_args(e3.FULL)
    quick = e3.controller_args(e3_owned.QUICK)
    assert float(quick[quick.index("--ratio-mix-window-s") + 1]) <= e3_owned.QUICK.ratio_interval_s
    parser = argparse.ArgumentParser()
    controller_cli.add_arguments(parser)
    assert parser.parse_args(["--repository", "r", *args]).ratio_mix_window_s == 2.0
    for bad in (-1.0, e3_owned.FULL.ratio_interval_s + 1):
        with pytest.raises(ValueError, match="ratio_mix_window_s"):
            replace(e3_owned.FULL, ratio_mix_window_s=bad)


def test_e3_blockers_are_reasons_not_crashes() -> None:
    blockers = e3.dynamic_blockers()
    assert all(isinstance(b, str) and b for b in blockers)


def test_request_rows_keep_what_an_slo_miss_needs() -> None:
    rec = RequestRecord(index=0, input_len=40, requested_output_len=3, send_s=10.0,
                        response_s=(10.2, 10.25, 10.3), response_tokens=(1, 1, 1),
                        final_s=10.3, status="ok")
    assert common.request_rows([rec]) == [[40, 3, 10.0, [0.2, 0.25, 0.3], "ok"]]


def test_replace_section_appends_then_replaces(tmp_path: Path) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text("# title\n\n## other\ntext\n")
    common.replace_section("e9", "## E9\nfirst", md)
    common.replace_section("e9", "## E9\nsecond", md)
    text = md.read_text()
    assert text.count("## E9") == 1 and "second" in text and "first" not in text
    assert text.startswith("# title\n\n## other\ntext\n")


def _leftover_processes(marker: str) -> list[str]:
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd:
            left.append(f"{pid}: {cmd[:120]}")
    return left


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_e1_quick(tmp_path: Path) -> None:
    assert e1.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "e1.json").read_text())
    # The host gauge ran beside the run and its samples reached the rows.
    assert doc["host_speed"]["samples"] > 0
    assert any("host_slowdown" in p for p in doc["points"])
    assert {p["deployment"] for p in doc["points"]} == {"disagg", "agg"}
    assert all(p["cpu_cores"]["tritonserver"] > 0 for p in doc["points"])
    assert all(b["cpu_cores"]["pdserve"] > 0 for b in doc["busy"].values())
    assert len(doc["points"]) == 2 * len(e1.QUICK.rates)
    for p in doc["points"]:
        assert p["load"]["ok"] == p["offered_requests"], p["load"]["errors"]
        assert 0.0 <= p["tpot_tight"]["slo_attainment"] <= 1.0
        assert len(p["requests"]) == p["offered_requests"]
        # One response per token at most, then the final one (finish reason and the
        # detokenizer's tail, no token).
        assert all(0 < len(times) <= out + 1 for _, out, _, times, _ in p["requests"])
    assert (tmp_path / "e1.png").stat().st_size > 0
    assert _leftover_processes(str(tmp_path)) == []


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_e2_quick(tmp_path: Path) -> None:
    assert e2.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "e2.json").read_text())
    # The host gauge ran beside the run and its samples reached the rows.
    assert doc["host_speed"]["samples"] > 0
    assert any("host_slowdown" in p for p in doc["points"])
    assert doc["measured"]["capacity_req_per_s"] > 0
    assert 0 < doc["ttft_budget_s"] < e2.QUICK.ttft_slo_ms / 1000
    # The overload run the simulator's validation fits the router's retries to.
    over = doc["measured"]["overload_run"]
    assert over["load"] == e2.QUICK.overload_load and over["seed"] == e2.OVERLOAD_SEED
    assert over["offered"] >= 4 and over["bench"]["ok"] > 0 and over["bench"]["tpot_p50_ms"] > 0
    # The router's CPU in the calibration runs and at each point (process_cpu).
    assert over["cpu_cores"]["pdserve"] > 0
    assert doc["measured"]["capacity_cpu_cores"]["pdserve"] > 0
    assert all(p["cpu_cores"]["pdserve"] > 0 for p in doc["points"])
    on_demand = [p for p in doc["points"] if p["admission"] == "on_demand"]
    assert [p["load"] for p in on_demand] == list(e2.QUICK.loads)
    for p in on_demand:
        assert p["finished"] == p["offered"]
        assert p["admitted"] + p["ended_early"] == p["finished"]
        # An admitted request is served: none abandoned mid-prefill (the E2 bug).
        assert p["failed_admitted"] == 0, p["error_samples"]
        assert p["bench"]["ok"] > 0
    assert (tmp_path / "e2.png").stat().st_size > 0
    assert _leftover_processes(str(tmp_path)) == []


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_e3_quick(tmp_path: Path) -> None:
    assert e3.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "e3.json").read_text())
    # The host gauge ran beside the run and its samples reached the rows.
    assert doc["host_speed"]["samples"] > 0
    assert any("host_slowdown" in p for p in doc["rows"])
    static = {r["deployment"] for r in doc["rows"] if not e3.is_dynamic(r["deployment"])}
    assert static == {"1P3D", "2P2D", "3P1D"}
    assert all(r["ok"] > 0 for r in doc["rows"])
    # Each row says where the CPU went: the instances, the router, tritonserver, the
    # load generator, and on the dynamic rows the controller.
    for r in doc["rows"]:
        assert {"client", "tritonserver", "pdserve", "prefill_0", "decode_0"} <= \
            set(r["cpu_cores"]), r["cpu_cores"]
        assert r["cpu_cores"]["pdserve"] > 0 and r["cpu_cores"]["prefill_0"] > 0
    assert all("controller" in r["cpu_cores"] for r in doc["rows"]
               if e3.is_dynamic(r["deployment"]))
    assert len([r for r in doc["rows"] if r["deployment"] == "dynamic"]) == len(e3.QUICK.phases)
    assert ("dynamic" in {r["deployment"] for r in doc["rows"]}) == (not doc["dynamic_blockers"])
    assert (tmp_path / "e3.png").stat().st_size > 0
    assert _leftover_processes(str(tmp_path)) == []


def test_e2_early_intervention_is_told_by_its_text() -> None:
    early = _record(0, None, "SERVER_ERROR")
    early = RequestRecord(**{**early.__dict__, "error_message":
                             "request could not start prefill within its TTFT budget (...)"})
    assert e2.ended_early(early)
    assert not e2.ended_early(_record(1, None, "SERVER_ERROR"))
    got = e2.attainment([early, _record(1, None, "SERVER_ERROR"), _record(2, 0.01)],
                        Slo(ttft_ms=100.0))
    assert got["ended_early"] == 1 and got["failed_admitted"] == 1
    assert got["attainment_served"] == 1.0 and got["attainment_admitted"] == 0.5


def test_e3_verdict_and_markdown_from_a_json_doc() -> None:
    doc: dict[str, Any] = _minimal_doc()
    rows = doc["rows"]
    assert "dynamic 3.80 req/s = 3.80x worst (goal >= 1.6x: met)" in doc["verdict"][0]
    assert "95% of best (goal >= 90%: met)" in doc["verdict"][0]
    assert "Role switches during the dynamic runs: 0 — none" in e3.markdown(doc, None)
    assert "owning" not in e3.markdown(doc, None)
    owned = dict(doc, config=dict(doc["config"], cpu_quota=0.4))
    text = e3.markdown(owned, None)
    assert "4 tiny instances, each owning 0.4 cores (cgroup CPU quota)" in text
    assert "perf.experiments.e3_owned" in text and "the 0.4 cores left" in text
    # Where best/worst < 1.6x, 1.6x worst cannot be reached: said so, not hidden.
    close = [dict(r, req_per_s=v) for r, v in zip(rows, (3.0, 4.0, 3.5, 3.9), strict=True)]
    doc["rows"] = close
    assert "impossible here: best/worst is only 1.33x" in e3.verdict(doc)[0]


def test_e3_static_passes_are_compared_as_their_mean(tmp_path: Path) -> None:
    from dataclasses import asdict

    def row(d: str, r: float, k: int | None = None) -> dict[str, object]:
        out = {"deployment": d, "phase": "p", "index": 0, "mix": "900/4", "req_per_s": r,
               "out_tok_per_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0,
               "tpot_p50_ms": 1.0, "slo_attainment": 0.5}
        return out if k is None else dict(out, **{"pass": k})

    # 2P2D measured 5.0 before the dynamic run and 3.0 after: the machine drifted.
    rows = [row("1P3D", 2.0, 0), row("2P2D", 5.0, 0), row("dynamic", 3.8),
            row("1P3D", 2.0, 1), row("2P2D", 3.0, 1)]
    machine = {"cpu": "x", "usable_cores": 2, "load_average": [1, 1, 1], "date_utc": "now"}
    doc = json.loads(json.dumps({
        "config": asdict(replace(e3.QUICK, static_passes=2)),
        "slo": {"ttft_ms": 1.0, "tpot_ms": 1.0}, "rows": rows, "machine": machine,
        "machine_after": machine, "dynamic_blockers": [], "controller_edits": []}))
    doc["config"]["phases"] = doc["config"]["phases"][:1]
    assert e3.static_means(doc, 0)["2P2D"]["req_per_s"] == pytest.approx(4.0)
    doc["verdict"] = e3.verdict(doc)
    assert "best static 2P2D 4.00 req/s (mean of 5.00 and 3.00)" in doc["verdict"][0]
    assert "95% of best" in doc["verdict"][0]  # 3.8 / mean 4.0, not 3.8 / 5.0
    text = e3.markdown(doc, None)
    assert "| 2P2D (pass 2) | 0: p | 3.00 |" in text and "measured 2 times" in text
    assert e3.plot(doc, tmp_path / "e3.png").stat().st_size > 0
    with pytest.raises(ValueError, match="static_passes"):
        replace(e3.FULL, static_passes=0)


def test_e3_interleaved_runs_are_also_judged_against_their_adjacent_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import asdict

    cfg = replace(e3.QUICK, starts=("1P3D", "2P2D"), static_passes=3, interleave=True)
    # The order of a run: static, from 1P3D, static, from 2P2D, static.
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(e3, "run_static", lambda c, d, o, s, k=0: calls.append(("static", k)))
    monkeypatch.setattr(e3, "run_dynamic", lambda c, d, o, s, runs=None, bracket=None:
                        calls.append(("dynamic", tuple(runs or ()), bracket)))
    monkeypatch.setattr(e3, "plot", lambda doc, path: path)
    monkeypatch.setattr(e3, "dynamic_blockers", lambda: [])
    e3.run(cfg, quick=True, out=tmp_path)
    assert calls == [("static", 0), ("dynamic", (("live", "1P3D"),), (0, 1)), ("static", 1),
                     ("dynamic", (("live", "2P2D"),), (1, 2)), ("static", 2)]
    # With the dynamic runs blocked, all the static passes the config names still run.
    calls.clear()
    monkeypatch.setattr(e3, "dynamic_blockers", lambda: ["no cgroup"])
    e3.run(cfg, quick=True, out=tmp_path)
    assert calls == [("static", 0), ("static", 1), ("static", 2)]

    def row(d: str, r: float, k: int | None = None, bracket: list[int] | None = None
            ) -> dict[str, object]:
        out: dict[str, object] = {
            "deployment": d, "phase": "p", "index": 0, "mix": "900/4", "req_per_s": r,
            "out_tok_per_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0,
            "tpot_p50_ms": 1.0, "slo_attainment": 0.5}
        if k is not None:
            out["pass"] = k
        if bracket is not None:
            out["bracket"] = bracket
        return out

    # The machine slows through the run: 2P2D 6.0, 5.0, then 3.0 req/s.
    rows = [row("1P3D", 2.0, 0), row("2P2D", 6.0, 0),
            row("dynamic from 1P3D", 5.4, bracket=[0, 1]),
            row("1P3D", 2.0, 1), row("2P2D", 5.0, 1),
            row("dynamic", 3.6, bracket=[1, 2]),
            row("1P3D", 1.0, 2), row("2P2D", 3.0, 2)]
    machine = {"cpu": "x", "usable_cores": 2, "load_average": [1, 1, 1], "date_utc": "now"}
    doc = json.loads(json.dumps({
        "config": asdict(cfg), "slo": {"ttft_ms": 1.0, "tpot_ms": 1.0}, "rows": rows,
        "machine": machine, "machine_after": machine, "dynamic_blockers": [],
        "controller_edits": []}))
    doc["config"]["phases"] = doc["config"]["phases"][:1]
    assert e3.static_means(doc, 0, (1, 2))["2P2D"]["req_per_s"] == pytest.approx(4.0)
    doc["verdict"] = e3.verdict(doc)
    (line,) = doc["verdict"]
    # Against the mean of all 3 passes (2P2D 4.67): the later run misses ...
    assert "dynamic 3.60 req/s = 2.16x worst (goal >= 1.6x: met), 77% of best" in line
    # ... against the passes around it (2P2D 4.0, 1P3D 1.5) it is judged on its own minutes.
    assert ("[against the static passes right before and after this run (2 and 3): best 2P2D "
            "4.00, worst 1P3D 1.50 req/s; 2.40x worst (goal >= 1.6x: met), 90% of best "
            "(goal >= 90%: met)]") in line
    assert "(1 and 2): best 2P2D 5.50, worst 1P3D 2.00 req/s; 2.70x worst" in line
    assert "before, between and after the dynamic runs" in e3.markdown(doc, None)
    with pytest.raises(ValueError, match="interleave needs static_passes = dynamic runs"):
        replace(cfg, static_passes=2)
    with pytest.raises(ValueError, match="interleave"):
        replace(cfg, dynamic_first=True)


def test_e3_reaction_times_from_the_switches_and_a_near_miss_shown_unrounded() -> None:
    """How long each dynamic run took to reach each phase's best static ratio (or
    one within 5 % of it) for good; a switch counts when its instance serves."""
    from dataclasses import asdict

    def row(d: str, i: int, r: float, started: float | None = None) -> dict[str, object]:
        out: dict[str, object] = {
            "deployment": d, "phase": "p", "index": i, "mix": ["900/4", "16/160"][i],
            "req_per_s": r, "out_tok_per_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0,
            "tpot_p50_ms": 1.0, "slo_attainment": 1.0}
        return out if started is None else dict(out, started_at=started)

    rows = [row("1P3D", 0, 2.0), row("2P2D", 0, 4.0), row("3P1D", 0, 6.0),
            row("1P3D", 1, 5.0), row("2P2D", 1, 4.9), row("3P1D", 1, 1.0),
            row("dynamic from 1P3D", 0, 5.37, 1000.0), row("dynamic from 1P3D", 1, 4.0, 1060.0),
            row("dynamic", 0, 3.0, 2000.0), row("dynamic", 1, 4.0, 2060.0)]
    switches = [  # from 1P3D: 3P1D at 1012 (the second switch serving); then 2P2D at 1065
        {"run": "dynamic from 1P3D", "to_role": "prefill", "switched_at": 1005.0,
         "healthy_at": 1006.0},
        {"run": "dynamic from 1P3D", "to_role": "prefill", "healthy_at": 1012.0},
        {"run": "dynamic from 1P3D", "to_role": "decode", "healthy_at": 1065.0},
        # from 2P2D: 3P1D, left again, back; never served as a decode in phase 1
        {"run": "dynamic", "to_role": "prefill", "healthy_at": 2010.0},
        {"run": "dynamic", "to_role": "decode", "healthy_at": 2020.0},
        {"run": "dynamic", "to_role": "prefill", "healthy_at": 2030.0},
        {"run": "dynamic", "to_role": "decode", "drain_at": 2070.0}]
    for sw in switches:  # as switch_costs gives them
        sw.setdefault("drain_at", sw.get("switched_at", sw.get("healthy_at", 0.0)) - 1.0)
        sw.update(instance="decode_0", reason="r")
    machine = {"cpu": "x", "usable_cores": 2, "load_average": [1, 1, 1], "date_utc": "now"}
    doc = json.loads(json.dumps({
        "config": dict(asdict(e3.QUICK), phase_s=60.0), "slo": {"ttft_ms": 1.0, "tpot_ms": 1.0},
        "rows": rows, "machine": machine, "machine_after": machine, "dynamic_blockers": [],
        "controller_edits": [], "switches": switches}))
    assert e3.reaction(doc) == [
        "- dynamic from 1P3D: phase 0 (3P1D): 12.0 s; phase 1 (1P3D or 2P2D): 5.0 s",
        "- dynamic: phase 0 (3P1D): 30.0 s; phase 1 (1P3D or 2P2D): not reached"]
    doc["verdict"] = e3.verdict(doc)
    assert "89.5% of best (goal >= 90%: NOT met)" in doc["verdict"][0]  # 5.37 / 6
    assert "- dynamic: phase 0 (3P1D): 30.0 s" in e3.markdown(doc, None)


def _e1_row(good: int | None, requests: int, goodput: float, attainment: float,
            deadline: int = 0) -> dict[str, object]:
    row: dict[str, object] = {"requests": requests, "goodput": goodput,
                              "slo_attainment": attainment,
                              "errors": {"DEADLINE": deadline} if deadline else {}}
    if good is not None:
        row["good"] = good
    return row


def test_e1_verdict_counts_requests_meeting_the_slo_not_goodput_jitter() -> None:
    # 0.5 req/s: all 40 met on both, goodput differs only by the runs' wall times (a tie);
    # 2 req/s: 80 vs 58 met; an older doc without "good" (3 req/s): counted from the
    # attainment over the requests that finished (2 were cut at the time limit)
    points = []
    for rate, d, a in ((0.5, _e1_row(40, 40, 0.5094, 1.0), _e1_row(40, 40, 0.5087, 1.0)),
                       (2.0, _e1_row(80, 80, 1.94, 1.0), _e1_row(58, 80, 1.41, 0.725)),
                       (3.0, _e1_row(None, 120, 1.2, 0.5, deadline=2),
                        _e1_row(None, 120, 1.3, 0.5))):
        for dep, row in (("disagg", d), ("agg", a)):
            points.append({"rate": rate, "deployment": dep, "tpot_tight": row,
                           "ttft_tight": row})
    lines = e1.verdict({"config": {"rates": [0.5, 2.0, 3.0]}, "points": points})
    assert lines[0] == ("- TPOT-tight: disaggregation ahead on goodput (more requests meeting "
                        "the SLO) at rates ['2'], behind at ['3'] (as many elsewhere).")


class _Proc:
    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


class _DeadServer:
    """What ``common.check_alive`` reads of a ``TritonServer``."""

    def __init__(self, returncode: int | None, log: Path) -> None:
        self.process = _Proc(returncode)
        self.options = ServerOptions(repository=log.parent, log_file=log)


def test_a_dead_tritonserver_is_an_error_with_its_abort_line_not_a_measurement(
        tmp_path: Path) -> None:
    log = tmp_path / "tritonserver.log"
    log.write_text("I1206 22:09:49 model loaded\n"
                   "E1206 22:10:15.418903427   29198 sync.cc:105]   ASSERTION FAILED: prior > 0\n"
                   "Signal (6) received.\n 0# 0x000055BF5019652D in tritonserver\n")
    common.check_alive(_DeadServer(None, log), "p")  # running: nothing to say
    dead = _DeadServer(-6, log)
    with pytest.raises(common.ServerDied,
                       match=r"was killed by SIGABRT during 3P1D: .*ASSERTION FAILED: prior > 0"
                             r" / Signal \(6\) received"):
        common.check_alive(dead, "3P1D")
    # drive() checks before it connects: a dead server sends nothing.
    with pytest.raises(common.ServerDied, match="exited with code 1 during x"):
        common.drive(_DeadServer(1, tmp_path / "none.log"), [], label="x",
                     concurrency=1)


def test_e3_measures_a_deployment_again_when_its_server_died(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployed: list[str] = []

    @contextlib.contextmanager
    def fake_deployed(spec: object, workdir: Path, **kw: object) -> Iterator[object]:
        deployed.append(workdir.name)
        yield object()

    died = {"2P2D_pass0"}  # the first server of 2P2D dies under its phases

    def fake_phases(server: object, cfg: e3.E3Config, label: str, slo: Slo,
                    phases: list[tuple[int, e3.Phase]], seconds: float) -> list[dict[str, object]]:
        if deployed[-1] in died:
            raise common.ServerDied(f"tritonserver was killed by SIGABRT during {label}")
        return [{"deployment": label, "index": i, "req_per_s": 1.0} for i, _ in phases]

    monkeypatch.setattr(common, "deployed", fake_deployed)
    monkeypatch.setattr(e3, "warmup", lambda server, cfg: None)
    monkeypatch.setattr(e3, "run_phases", fake_phases)
    doc: dict[str, object] = {"rows": []}
    e3.run_static(e3.QUICK, doc, tmp_path, Slo(), 0)
    assert deployed == ["1P3D_pass0", "2P2D_pass0", "2P2D_pass0_retry1", "3P1D_pass0"]
    rows = doc["rows"]
    assert isinstance(rows, list)
    # Only the live server's rows count: one set per ratio, none from the dead one.
    assert [r["deployment"] for r in rows].count("2P2D") == len(e3.QUICK.mixes())
    deaths = doc["server_deaths"]
    assert isinstance(deaths, list) and len(deaths) == 1
    assert deaths[0]["what"] == "2P2D (pass 1)" and "SIGABRT" in deaths[0]["error"]
    # It is said in the results section.
    said = e3.markdown(dict(_minimal_doc(), server_deaths=deaths), None)
    assert "tritonserver died 1 time(s)" in said and "- 2P2D (pass 1): tritonserver was" in said
    # A second death in a row ends the experiment, with the error.
    died.add("2P2D_pass0_retry1")
    with pytest.raises(common.ServerDied):
        e3.run_static(e3.QUICK, {"rows": []}, tmp_path, Slo(), 0)


def _minimal_doc() -> dict[str, object]:
    from dataclasses import asdict

    machine = {"cpu": "x", "usable_cores": 2, "load_average": [1, 1, 1], "date_utc": "now"}
    rows = [{"deployment": d, "phase": "p", "index": 0, "mix": "900/4", "req_per_s": r,
             "out_tok_per_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "tpot_p50_ms": 1.0,
             "slo_attainment": 1.0}
            for d, r in (("1P3D", 2.0), ("2P2D", 4.0), ("3P1D", 1.0), ("dynamic", 3.8))]
    doc = json.loads(json.dumps({
        "config": asdict(e3.QUICK), "slo": {"ttft_ms": 1.0, "tpot_ms": 1.0}, "rows": rows,
        "machine": machine, "machine_after": machine, "dynamic_blockers": [],
        "controller_edits": []}))
    doc["config"]["phases"] = doc["config"]["phases"][:1]
    doc["verdict"] = e3.verdict(doc)
    return dict(doc)


def test_an_experiment_whose_server_died_twice_exits_1_and_records_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    def run(args: object) -> dict[str, object]:
        raise common.ServerDied("tritonserver was killed by SIGABRT during 3P1D")

    code = common.main([], key="k", name="e9", description="d", quick_help="q", run=run,
                       plot=lambda doc, path: path, markdown=lambda doc, fig: "never")
    assert code == 1
    err = capsys.readouterr().err
    assert "e9: tritonserver was killed by SIGABRT during 3P1D; nothing recorded" in err


def test_host_speed_gauge_samples_in_its_own_process_and_stops(tmp_path: Path) -> None:
    from perf.experiments import host_speed

    path = tmp_path / "gauge.jsonl"
    with host_speed.HostSpeed(path, interval_s=0.1) as gauge:
        proc = gauge._proc
        assert proc is not None
        deadline = time.monotonic() + 20
        while len(gauge.samples()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        samples = gauge.samples()
    assert proc.poll() is not None  # stopped with the block
    assert len(samples) >= 3 and all(0 < ms < 1000 for _, ms in samples)
    t0, t1 = samples[0][0], samples[-1][0]
    assert gauge.cost_ms(t0, t1) == pytest.approx(
        sorted(ms for _, ms in samples)[(len(samples) - 1) // 2], rel=0.5)
    assert gauge.cost_ms(t1 + 10, t1 + 20) is None
    with pytest.raises(ValueError, match="interval_s"):
        host_speed.HostSpeed(path, interval_s=0)


def test_host_slowdown_per_row_is_its_window_median_over_the_unslowed_cost() -> None:
    from perf.experiments import host_speed

    # 100 s of samples: 1.0 ms, except 40-60 s when the host ran the work at 1.5 ms.
    samples = [(float(t), 1.5 if 40 <= t < 60 else 1.0) for t in range(100)]
    assert host_speed.reference_ms(samples) == 1.0
    assert host_speed.reference_ms([]) is None
    doc = _minimal_doc()
    rows = doc["rows"]
    assert isinstance(rows, list)
    rows[0].update(started_at=10.0, seconds=20.0)  # quiet host
    rows[1].update(started_at=40.0, seconds=19.0)  # slowed
    doc["host_speed"] = host_speed.annotate(rows, samples)
    assert rows[0]["host_slowdown"] == 1.0 and rows[1]["host_slowdown"] == 1.5
    assert "host_slowdown" not in rows[2]  # no window: nothing claimed
    text = e3.markdown(doc, None)
    assert "| host slowdown |" in text and " 1.50x |" in text and " – |" in text
    assert "unslowed 1.00 ms, 100 samples" in text
    # Without the gauge (older runs) the table is as it was.
    assert "host slowdown" not in e3.markdown(_minimal_doc(), None)


def test_host_slowdown_note_names_each_point_and_is_absent_without_the_gauge() -> None:
    from perf.experiments import host_speed

    points = [{"deployment": "disagg", "rate": 0.5, "started_at": 0.0, "wall_s": 10.0},
              {"deployment": "agg", "rate": 0.5, "started_at": 20.0, "wall_s": 10.0}]
    samples = [(float(t), 2.0 if t >= 20 else 1.0) for t in range(40)]
    doc: dict[str, object] = {"host_speed": host_speed.annotate(points, samples)}
    lines = host_speed.note(doc, points, lambda p: f"{p['deployment']} {p['rate']:g}")
    assert "disagg 0.5 1.00x, agg 0.5 2.00x." in lines[-1] and "1.00 ms" in lines[-1]
    assert host_speed.note({}, points, str) == []


def test_dynamic_phases_are_also_compared_with_passes_at_a_matching_host_speed() -> None:
    doc: dict[str, Any] = _minimal_doc()
    rows = doc["rows"]
    # Best 2P2D: 5.0 on a quiet host (1.0x), 3.0 while it ran slow (1.5x): mean 4.0.
    rows[1].update({"req_per_s": 5.0, "pass": 0, "host_slowdown": 1.0})
    rows.append(dict(rows[1], **{"req_per_s": 3.0, "pass": 1, "host_slowdown": 1.5}))
    rows[2].update({"pass": 0, "host_slowdown": 1.6})  # worst 3P1D: only a slow pass
    rows[3].update({"req_per_s": 4.6, "host_slowdown": 1.05})  # dynamic, quiet host
    doc["verdict"] = e3.verdict(doc)
    assert "115% of best (goal >= 90%: met)" in doc["verdict"][0]  # 4.6 / mean 4.0
    lines = e3.host_matched(doc)
    assert lines == ["- phase 0 (prompt-heavy), dynamic 4.60 req/s at host 1.05x: 92% of best "
                     "2P2D (pass 1 5.00 at 1.00x); no pass of the worst ratio 3P1D at a "
                     "matching host speed"]
    rows.append(dict(rows[2], **{"pass": 1, "host_slowdown": 1.1, "req_per_s": 1.2}))
    assert e3.host_matched(doc)[0].endswith("; 3.83x worst 3P1D (pass 2 1.20 at 1.10x)")
    assert "at a host speed within 15% of the dynamic phase's" in e3.markdown(doc, None)
    # Runs without the gauge: nothing to say, and the results say nothing.
    assert e3.host_matched(_minimal_doc()) == []
    assert "matching host speed" not in e3.markdown(_minimal_doc(), None)


def test_e3_says_where_the_cpu_went_per_deployment_and_mix() -> None:
    doc = _minimal_doc()
    rows = doc["rows"]
    assert isinstance(rows, list)
    used = {"client": 0.16, "tritonserver": 0.19, "pdserve": 0.33, "prefill_0": 0.3,
            "prefill_1": 0.26, "prefill_2": 0.19, "decode_0": 0.3}
    rows[2]["cpu_cores"] = used  # 3P1D
    rows[3]["cpu_cores"] = dict(used, controller=0.02, host_speed=0.01, prefill_2=0.21)
    text = e3.markdown(doc, None)
    assert "| deployment | mix | instances | router | tritonserver | client | other | total |" \
        in text
    assert "| 3P1D | 900/4 | 1.05 | 0.33 | 0.19 | 0.16 | 0.00 | 1.73 |" in text
    assert "| dynamic | 900/4 | 1.07 | 0.33 | 0.19 | 0.16 | 0.03 | 1.78 |" in text
    assert "| 1P3D | 900/4 |" not in text.split("Where the CPU went")[1]  # not measured
    assert "Where the CPU went" not in e3.markdown(_minimal_doc(), None)


def test_pass_spread_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from perf import e3_pass_spread

    for argv in (["--ratio", "4P0D"], ["--passes", "0"], ["--mix-index", "7"]):
        with pytest.raises(SystemExit) as exc:
            e3_pass_spread.main([*argv, "--out", "/nonexistent"])
        assert exc.value.code == 2
    assert "a ratio is written like 1P3D" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pass_spread_repeats_a_static_pass_with_each_process_cpu(tmp_path: Path) -> None:
    from dataclasses import replace

    from perf import e3_pass_spread
    from perf.experiments import e3_owned

    cfg = replace(e3_owned.QUICK, static_phase_s=3.0, warmup_requests=4)
    doc = e3_pass_spread.measure("2P2D", 0, 2, 1, tmp_path, cfg=cfg)
    assert [(r["server"], r["pass"]) for r in doc["rows"]] == [(0, 0), (0, 1)]
    for r in doc["rows"]:
        assert r["ok"] > 0 and r["cpu_cores"]["prefill_1"] > 0 and r["cpu_cores"]["pdserve"] > 0
    assert doc["host_speed"]["samples"] > 0
    assert doc["req_per_s"]["min"] <= doc["req_per_s"]["mean"] <= doc["req_per_s"]["max"]
    assert json.loads((tmp_path / "spread.json").read_text())["ratio"] == "2P2D"
    assert set(doc["gauge_correlation"]) == {"host_slowdown", "gemv_slowdown", "gemm_slowdown"}
    assert _leftover_processes(str(tmp_path)) == []


def test_pass_spread_correlates_each_gauge_with_the_passes_throughput() -> None:
    from perf import e3_pass_spread

    rows = [{"req_per_s": 50.0 - 10 * k, "host_slowdown": 1.0 + 0.1 * k,
             "gemv_slowdown": 1.0 + 0.1 * (k % 2), "gemm_slowdown": 1.0} for k in range(4)]
    corr = e3_pass_spread.gauge_correlation(rows)
    assert corr["host_slowdown"] == pytest.approx(-1.0)  # slower host, fewer req/s
    assert corr["gemv_slowdown"] is not None and abs(corr["gemv_slowdown"]) < 0.5
    assert corr["gemm_slowdown"] is None  # never moved: nothing to say
    assert e3_pass_spread.gauge_correlation(rows[:2])["host_slowdown"] is None  # too few


def test_each_row_gets_a_slowdown_per_gauge_the_samples_have(tmp_path: Path) -> None:
    from perf.experiments import host_speed

    gauge = host_speed.HostSpeed(tmp_path / "g.jsonl")  # read only: never started
    lines = [{"at": float(t), "ms": 1.0, "gemv_ms": 3.0 if t < 20 else 4.5, "gemm_ms": 2.0}
             for t in range(0, 40, 5)]
    lines += [{"at": float(t), "ms": 1.2 if t > 20 else 1.0} for t in range(1, 40, 5)]
    gauge.path.write_text("".join(json.dumps(rec) + "\n" for rec in lines) + '{"at": 9')
    rows: list[dict[str, Any]] = [{"started_at": 0.0, "wall_s": 18.0},
                                  {"started_at": 21.0, "wall_s": 18.0}]
    doc = host_speed.annotate_all(rows, gauge)
    assert rows[0] == {"started_at": 0.0, "wall_s": 18.0, "host_slowdown": 1.0,
                       "gemv_slowdown": 1.0, "gemm_slowdown": 1.0}
    assert (rows[1]["host_slowdown"], rows[1]["gemv_slowdown"]) == (1.2, 1.5)
    assert doc["samples"] == 16 and doc["gemv"]["samples"] == 8
    # a gauge without torch: the loop only, as before
    gauge.path.write_text("".join(json.dumps({"at": float(t), "ms": 1.0}) + "\n"
                                  for t in range(10)))
    plain: list[dict[str, Any]] = [{"started_at": 0.0, "wall_s": 9.0}]
    assert "gemv" not in host_speed.annotate_all(plain, gauge)
    assert set(plain[0]) == {"started_at", "wall_s", "host_slowdown"}
    with pytest.raises(ValueError, match="engine_every"):
        host_speed.HostSpeed(tmp_path / "x", engine_every=0)


@pytest.mark.parametrize("quota", ["0", "0.6"])
def test_e3_owned_refuses_a_quota_that_leaves_no_room(tmp_path: Path, quota: str) -> None:
    from perf.experiments import e3_owned

    with pytest.raises(SystemExit, match="--cpu-quota must be in"):
        e3_owned.main(["--no-results", "--cpu-quota", quota, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before any server started
