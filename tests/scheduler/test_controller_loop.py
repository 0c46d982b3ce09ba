"""The controller loop with a fake clock, a fake Triton and a tmp_path repository."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest

from pdserve.scheduler.controller.controller import Controller, ControllerOptions
from pdserve.scheduler.controller.health import HealthPolicy
from pdserve.scheduler.controller.ratio_loop import RatioLoop
from pdserve.scheduler.controller.state import read_state
from pdserve.scheduler.ratio import RatioPolicy
from tests.scheduler.controller_fakes import FakeTriton, make_repo


class Traffic:
    """Cumulative router metrics, rendered as Triton's /metrics text."""

    def __init__(self) -> None:
        self.requests = 0.0
        self.ttft_sum = 0.0
        self.tpot_sum = 0.0
        self.generated = 0.0

    def add(self, requests: int, ttft_s: float, tpot_s: float, out_tokens: int) -> None:
        self.requests += requests
        self.ttft_sum += requests * ttft_s
        self.tpot_sum += requests * tpot_s
        self.generated += requests * out_tokens

    def text(self) -> str:
        lab = 'instance="pdserve"'
        lines = []
        for name, total in (("pdserve_time_to_first_token_seconds", self.ttft_sum),
                            ("pdserve_time_per_output_token_seconds", self.tpot_sum)):
            lines += [f"# TYPE {name} histogram",
                      f'{name}_bucket{{{lab},le="+Inf"}} {self.requests}',
                      f"{name}_sum{{{lab}}} {total}", f"{name}_count{{{lab}}} {self.requests}"]
        lines += ["# TYPE pdserve_generated_tokens_total counter",
                  f"pdserve_generated_tokens_total{{{lab}}} {self.generated}",
                  "# TYPE nv_inference_count counter", 'nv_inference_count{model="x"} 7']
        return "\n".join(lines) + "\n"


def make(tmp_path: Path, prefill: int = 2, decode: int = 2, traffic: Traffic | None = None,
         drain_timeout_s: float = 30.0, role_switch: Literal["reload", "live"] = "reload",
         max_step: int = 1, mix_window_s: float = 0.0,
         min_peak: float = RatioPolicy.min_peak) -> tuple[Controller, FakeTriton]:
    repo = make_repo(tmp_path, prefill, decode)
    triton = FakeTriton(repo)
    options = ControllerOptions(servers=("s0",), state_path=tmp_path / "state.json",
                                health=HealthPolicy(probe_interval_s=2.0, fail_threshold=2,
                                                    load_timeout_s=60.0),
                                ratio_interval_s=10.0, probe_workers=2,
                                role_switch=role_switch, live_settle_s=1.0)
    ratio = RatioLoop(RatioPolicy(cooldown_s=0.0, max_step=max_step,
                                  mix_window_s=mix_window_s, min_peak=min_peak),
                      drain_timeout_s=drain_timeout_s)
    scrape = (lambda: [traffic.text()]) if traffic is not None else None
    return Controller(repo, triton, options, ratio=ratio, scrape=scrape), triton


def states(c: Controller) -> dict[str, str]:
    return {name: st.state for name, st in c.state.instances.items()}


def test_a_dead_router_is_reloaded_and_stays_out_of_the_state_file(tmp_path: Path) -> None:
    """The router's stub dies like any other, and Triton 2.51 never starts it again:
    the controller heartbeats it and reloads it after ``fail_threshold`` failures."""
    c, triton = make(tmp_path)
    try:
        c.tick(0.0)
        assert triton.router_probes == ["pdserve"]
        assert "pdserve" not in states(c)  # not an instance: nobody routes to it
        triton.kill("pdserve")
        c.tick(2.0)
        assert c.repo.entry("pdserve").generation == 0  # one failure: suspect only
        c.tick(4.0)
        assert c.repo.entry("pdserve").generation == 1
        edit = c.repo.edits[-1]
        assert edit.model == "pdserve" and edit.kind == "reload"
        assert "failed router" in edit.reason and "not healthy" in edit.reason
        c.tick(6.0)  # not polled yet: no second edit meanwhile
        assert c.repo.entry("pdserve").generation == 1
        triton.poll()
        c.tick(8.0)
        assert c.router_health[("s0", "pdserve")].state == "healthy"
        assert set(states(c).values()) == {"healthy"}  # the instances were never touched
        assert [e.model for e in c.repo.edits] == ["pdserve"]
        reg = c.metrics.registry
        assert reg.get_sample_value("pdserve_controller_instance_failures_total",
                                    {"role": "router"}) == 1
        assert reg.get_sample_value("pdserve_controller_instance_recoveries_total",
                                    {"role": "router"}) == 1
    finally:
        c.close()


def test_a_dead_stub_leaves_routing_within_two_probes_and_is_replaced(tmp_path: Path) -> None:
    c, triton = make(tmp_path)
    try:
        c.tick(0.0)
        assert set(states(c).values()) == {"healthy"}
        triton.kill("prefill_1")
        c.tick(2.0)
        shared = read_state(tmp_path / "state.json")
        assert not shared.is_routable("prefill_1")  # out of routing after ONE probe
        assert shared.instances["prefill_1"].state == "suspect"
        c.tick(4.0)  # second failure: failed -> a reload edit, now replacing
        assert states(c)["prefill_1"] == "replacing"
        assert c.repo.entry("prefill_1").generation == 1
        assert c.repo.edits[-1].kind == "reload" and "not healthy" in c.repo.edits[-1].reason
        c.tick(6.0)  # Triton has not polled yet: the dead stub is still there
        assert states(c)["prefill_1"] == "replacing"
        assert c.repo.entry("prefill_1").generation == 1  # no second edit meanwhile
        triton.poll()  # poll mode reloads it with a fresh stub
        c.tick(8.0)
        assert states(c)["prefill_1"] == "healthy"
        assert read_state(tmp_path / "state.json").is_routable("prefill_1")
        reg = c.metrics.registry
        assert reg.get_sample_value("pdserve_controller_instance_failures_total",
                                    {"role": "prefill"}) == 1
        assert reg.get_sample_value("pdserve_controller_instance_recoveries_total",
                                    {"role": "prefill"}) == 1
        assert reg.get_sample_value("pdserve_controller_instances",
                                    {"role": "prefill", "state": "healthy"}) == 2
    finally:
        c.close()


def test_a_replacement_that_never_comes_up_is_retried(tmp_path: Path) -> None:
    c, triton = make(tmp_path)
    try:
        c.tick(0.0)
        triton.broken.add("decode_0")
        for t in (2.0, 4.0):
            c.tick(t)
        assert states(c)["decode_0"] == "replacing"
        c.tick(70.0)  # past load_timeout_s: failed again, and replaced again
        assert states(c)["decode_0"] == "replacing"
        assert c.repo.entry("decode_0").generation == 2
    finally:
        c.close()


def test_ratio_moves_toward_prefill_drain_first(tmp_path: Path) -> None:
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=1, decode=3, traffic=traffic)
    try:
        c.tick(0.0)  # first scrape: the baseline for the window
        # Prompt-heavy: every prefill slot busy (the heartbeats say so); each of those
        # prompts holds a decode reservation, which leaves most decode slots idle.
        triton.in_flight.update(prefill_0=32, decode_0=20, decode_1=4, decode_2=8)
        traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
        c.tick(10.0)
        # decode_1 (least in flight) is drained, not yet switched.
        assert states(c)["decode_1"] == "draining"
        shared = read_state(tmp_path / "state.json")
        assert "decode_1" in shared.draining and not shared.is_routable("decode_1")
        assert c.repo.entry("decode_1").role == "decode"
        c.tick(12.0)  # still busy: keeps draining
        assert c.repo.entry("decode_1").role == "decode"
        triton.in_flight["decode_1"] = 0
        c.tick(14.0)  # idle: switched through the repository
        assert c.repo.entry("decode_1").role == "prefill"
        assert states(c)["decode_1"] == "loading"
        assert "decode_1" not in read_state(tmp_path / "state.json").draining
        triton.poll()
        c.tick(16.0)
        assert states(c)["decode_1"] == "healthy"
        assert c.state.ratios["default"] == {"prefill": 2, "decode": 2}
        # More prompt-heavy traffic takes no more decodes: every prompt in a prefill
        # slot holds a decode slot, so a third prefill's slots could not be filled.
        triton.in_flight.update(prefill_0=32, decode_1=32, decode_0=32, decode_2=32)
        traffic.add(100, ttft_s=4.0, tpot_s=0.01, out_tokens=11)
        c.tick(30.0)
        assert c.repo.entry("decode_0").role == "decode"
        assert c.repo.entry("decode_2").role == "decode"
        assert all(e.kind == "switch_role" for e in c.repo.edits)
        assert len(c.repo.edits) == 1
        reg = c.metrics.registry
        assert reg.get_sample_value("pdserve_controller_ratio_decisions_total", {
            "scenario": "default", "action": "add_prefill", "reason": "balance_rule"}) == 1
    finally:
        c.close()


def test_ratio_moves_toward_decode_and_switches_after_drain_timeout(tmp_path: Path) -> None:
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=3, decode=1, traffic=traffic, drain_timeout_s=5.0)
    try:
        c.tick(0.0)
        # Output-heavy: the decode's batch is full, prefills nearly idle.
        triton.in_flight.update(prefill_0=1, prefill_1=2, prefill_2=2, decode_0=32)
        traffic.add(50, ttft_s=0.05, tpot_s=0.05, out_tokens=200)
        c.tick(10.0)
        assert states(c)["prefill_0"] == "draining"
        c.tick(12.0)
        assert c.repo.entry("prefill_0").role == "prefill"  # busy, within the timeout
        c.tick(16.0)  # drain timeout passed: switched anyway
        assert c.repo.entry("prefill_0").role == "decode"
    finally:
        c.close()


@pytest.mark.parametrize("role_switch", ["live", "reload"])
def test_a_multi_step_decision_drains_and_switches_its_donors_side_by_side(
        tmp_path: Path, role_switch: Literal["reload", "live"]) -> None:
    """3P1D, output-heavy, one decision may move 3: the slot model puts 1P3D
    best, so two prefills drain in the same tick and switch as each goes idle;
    nothing else is decided until both serve, and the ratio ends at 1P3D."""
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=3, decode=1, traffic=traffic, role_switch=role_switch,
                     max_step=3)
    try:
        c.tick(0.0)
        triton.in_flight.update(prefill_0=2, prefill_1=1, prefill_2=1, decode_0=32)
        traffic.add(50, ttft_s=0.05, tpot_s=0.05, out_tokens=200)
        c.tick(10.0)
        assert {n: s for n, s in states(c).items() if s != "healthy"} == {
            "prefill_1": "draining", "prefill_2": "draining"}
        assert set(read_state(tmp_path / "state.json").draining) == {"prefill_1", "prefill_2"}
        assert c.metrics.registry.get_sample_value(
            "pdserve_controller_ratio_decisions_total",
            {"scenario": "default", "action": "add_decode", "reason": "balance_rule"}) == 1
        triton.in_flight["prefill_1"] = 0  # one idle: it switches, the other drains on
        c.tick(12.0)
        if role_switch == "live":
            assert triton.acting == {"prefill_1": "decode"}
        else:
            assert [(e.kind, e.model) for e in c.repo.edits] == [("switch_role", "prefill_1")]
        assert states(c)["prefill_2"] == "draining"
        triton.in_flight["prefill_2"] = 0
        traffic.add(50, ttft_s=0.05, tpot_s=0.05, out_tokens=200)
        c.tick(14.0)
        if role_switch == "live":
            assert triton.acting == {"prefill_1": "decode", "prefill_2": "decode"}
            assert c.repo.edits == []
        else:
            assert [(e.kind, e.model) for e in c.repo.edits] == [
                ("switch_role", "prefill_1"), ("switch_role", "prefill_2")]
            triton.poll()
        for t in (16.0, 18.0):
            c.tick(t)
        assert c.ratio.pending == {}
        assert set(states(c).values()) == {"healthy"}
        assert c.state.ratios["default"] == {"prefill": 1, "decode": 3}
    finally:
        c.close()


def test_balanced_traffic_changes_nothing(tmp_path: Path) -> None:
    traffic = Traffic()
    c, triton = make(tmp_path, traffic=traffic)
    try:
        c.tick(0.0)
        # prefill 32/0.5 = 64 req/s, decode 32/(0.5 + 0.05*1) = 58 req/s per instance
        # (a decode slot is held through the prefill too); at 20 req/s the
        # heartbeats see 20 * 0.5 = 10 prompts in the prefills.
        triton.in_flight.update(prefill_0=5, prefill_1=5)
        traffic.add(200, ttft_s=0.5, tpot_s=0.05, out_tokens=2)
        c.tick(10.0)
        c.tick(20.0)  # no traffic in this window: no decision either
        assert c.repo.edits == []
        assert set(states(c).values()) == {"healthy"}
        reg = c.metrics.registry
        # Decode a little busier (0.17 vs 0.16), but a switch would not cut the peak.
        assert reg.get_sample_value("pdserve_controller_ratio_decisions_total", {
            "scenario": "default", "action": "none", "reason": "tolerance"}) == 1
        assert reg.get_sample_value("pdserve_controller_ratio_decisions_total", {
            "scenario": "default", "action": "none", "reason": "no_signal"}) == 1
    finally:
        c.close()


def test_external_drain_is_honoured_and_not_replaced(tmp_path: Path) -> None:
    from pdserve.scheduler.controller.state import DrainRequest, update_state, with_drain

    c, triton = make(tmp_path)
    try:
        c.tick(0.0)
        update_state(tmp_path / "state.json",
                     lambda s: with_drain(s, "decode_0", DrainRequest("upgrade", "u", 0.0)))
        c.tick(2.0)
        assert states(c)["decode_0"] == "draining"
        triton.kill("decode_0")  # an upgrade reloading it looks like this
        c.tick(4.0)
        c.tick(6.0)
        assert all(e.kind != "reload" for e in c.repo.edits)  # the owner handles it
    finally:
        c.close()


def test_state_file_is_json_with_every_instance(tmp_path: Path) -> None:
    c, _ = make(tmp_path)
    try:
        c.tick(0.0)
        raw = json.loads((tmp_path / "state.json").read_text())
        assert raw["version"] == 1
        assert set(raw["instances"]) == {"prefill_0", "prefill_1", "decode_0", "decode_1"}
        assert raw["instances"]["decode_0"]["servers"] == {"s0": "healthy"}
    finally:
        c.close()


def test_options_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one server"):
        ControllerOptions(servers=(), state_path=tmp_path / "s.json")


def test_balance_uses_measured_slot_occupancy_not_ttft(tmp_path: Path) -> None:
    """E3: routers wait for decode room BEFORE the prefill, so with decode short the
    TTFT swells with that wait; T_p = TTFT then shows prefill as busy as decode and
    nothing moved. The slots the heartbeats report busy tell the stages apart."""
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=3, decode=1, traffic=traffic)
    try:
        c.tick(0.0)
        # Output-heavy under a closed loop: the decode batch is full, the prefills
        # idle; 12 of 16 requests wait for decode room, so TTFT = 3x a decode and
        # TTFT-based utilisation reads 3P1D as balanced.
        triton.in_flight.update(decode_0=32)
        traffic.add(60, ttft_s=4.5, tpot_s=0.01, out_tokens=151)
        c.tick(10.0)
        assert c.repo.entry("prefill_0").role == "decode"  # idle donor: switched at once
        assert c.occupancy("default") is None  # samples start again after a decision
    finally:
        c.close()


def test_no_second_switch_while_the_first_reloads(tmp_path: Path) -> None:
    """E3: a reload took 15-20 s, longer than the cool-down, and the controller,
    counting the reloading instance in neither role, switched a second decode
    the same way 9 s after the first. The switch lasts until the instance serves
    in its new role, and the cool-down runs from then."""
    traffic = Traffic()
    # 1P5D: room for two more prefills (prefill slots never above decode slots:
    # each prompt in a prefill slot holds a decode reservation).
    c, triton = make(tmp_path, prefill=1, decode=5, traffic=traffic)
    c.ratio = RatioLoop(RatioPolicy(cooldown_s=5.0), drain_timeout_s=30.0)
    try:
        c.tick(0.0)
        triton.in_flight.update(prefill_0=32)  # prompt-heavy: the prefill is full
        traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
        c.tick(10.0)  # an idle decode is switched at once, then reloads
        assert [e.kind for e in c.repo.edits] == ["switch_role"]
        switched = c.repo.edits[0].model
        for now in (20.0, 30.0, 40.0):  # past the cool-down, still loading
            traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
            c.tick(now)
            assert states(c)[switched] == "loading"
            assert len(c.repo.edits) == 1
        triton.poll()
        c.tick(42.0)  # serving in its new role: the switch is over, cool-down from now
        assert states(c)[switched] == "healthy" and c.ratio.pending == {}
        traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
        c.tick(44.0)
        assert len(c.repo.edits) == 1  # 2 s after it took effect: cooling down
        traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
        c.tick(54.0)
        assert len(c.repo.edits) == 2  # the prefills are still full: the next one
    finally:
        c.close()


@contextlib.contextmanager
def switched_in_place(tmp_path: Path, refuse: bool = False, landing: int = 0,
                      drain_timeout_s: float = 30.0,
                      busy: int = 0) -> Iterator[tuple[Controller, FakeTriton]]:
    """1P3D under prompt-heavy traffic: decode_1 (the least busy) is drained and,
    idle, switched to prefill in the decision's tick (-> 2P2D); ``refuse``: it
    refuses in place; ``landing``: that many requests reach it just as set_role
    comes; ``busy``: it holds that many at the decision."""
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=1, decode=3, traffic=traffic, role_switch="live",
                     drain_timeout_s=drain_timeout_s)
    if refuse:
        triton.refuse_switch.add("decode_1")
    if landing:
        triton.land_at_switch["decode_1"] = landing
    try:
        c.tick(0.0)
        triton.in_flight.update(prefill_0=32, decode_0=20, decode_1=busy, decode_2=12)
        traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
        c.tick(10.0)
        yield c, triton
    finally:
        c.close()


def test_live_switch_keeps_the_repository_and_serves_at_once(tmp_path: Path) -> None:
    with switched_in_place(tmp_path) as (c, triton):
        assert triton.acting == {"decode_1": "prefill"}
        # No repository edit, no reload: the home role stays decode.
        assert c.repo.edits == [] and c.repo.entry("decode_1").role == "decode"
        shared = read_state(tmp_path / "state.json")
        assert shared.instances["decode_1"].acting_role == "prefill"
        assert shared.instances["decode_1"].role == "prefill"
        assert "decode_1" in shared.draining  # until routers heard the new role
        c.tick(11.0)  # live_settle_s later: the drain is lifted
        assert "decode_1" not in read_state(tmp_path / "state.json").draining
        c.tick(12.0)
        assert states(c)["decode_1"] == "healthy"
        assert c.state.ratios["default"] == {"prefill": 2, "decode": 2}
        assert c.metrics.registry.get_sample_value(
            "pdserve_controller_repository_edits_total", {"kind": "switch_role_in_place"}) == 1


def test_a_drained_donor_is_switched_between_the_probe_ticks_once_idle(tmp_path: Path) -> None:
    """E3 with owned compute: a decode drained for a prefill waited for the next probe
    tick (~1.1 s), idle or not. ``tick_switches`` moves a switch under way on
    between the ticks: a heartbeat of its instance alone, the switch once idle, the
    drain lifted ``live_settle_s`` after. A probe there that fails marks nothing."""
    with switched_in_place(tmp_path, busy=2) as (c, triton):
        assert "decode_1" in c.ratio.pending and triton.acting == {}  # 2 still in flight
        c.tick_switches(10.25)
        assert triton.acting == {}
        triton.in_flight["decode_1"] = 0
        c.tick_switches(10.5)
        assert triton.acting == {"decode_1": "prefill"}
        assert "decode_1" in read_state(tmp_path / "state.json").draining
        c.tick_switches(11.25)
        assert "decode_1" in read_state(tmp_path / "state.json").draining
        state = c.tick_switches(11.5)  # live_settle_s after the switch
        assert state is not None and "decode_1" not in state.draining
        assert "decode_1" not in read_state(tmp_path / "state.json").draining
        assert c.tick_switches(11.75) is None
        c.tick(12.0)  # the probe tick: healthy, routable as a prefill
        assert states(c)["decode_1"] == "healthy"
        assert c.state.ratios["default"] == {"prefill": 2, "decode": 2}


def test_probes_between_the_ticks_do_not_count_for_health(tmp_path: Path) -> None:
    with switched_in_place(tmp_path, busy=2) as (c, triton):
        triton.kill("decode_1")
        for k in range(1, 8):  # fail_threshold is 2 probes
            c.tick_switches(10.0 + 0.25 * k)
        assert states(c)["decode_1"] == "draining" and triton.acting == {}
        for t in (12.0, 14.0):  # the probe ticks count: failed after two
            c.tick(t)
        assert states(c)["decode_1"] in ("failed", "replacing")


def test_run_ticks_for_the_switches_between_the_probe_ticks(tmp_path: Path) -> None:
    """``run``: a tick every ``probe_interval_s``; while a switch is under way, a
    ``tick_switches`` every ``switch_tick_s`` between them."""
    c, _ = make(tmp_path)
    c.options = replace(c.options, health=replace(c.options.health, probe_interval_s=0.4),
                        switch_tick_s=0.05)
    calls: list[str] = []
    stop = threading.Event()
    c.tick = lambda now: calls.append("tick")
    c.tick_switches = lambda now: calls.append("switch")
    try:
        runner = threading.Thread(target=c.run, args=(stop, time.monotonic))
        runner.start()
        time.sleep(1.0)  # no switch under way: ticks only
        idle = list(calls)
        c.ratio.pending["decode_0"] = None
        time.sleep(1.0)
        stop.set()
        runner.join(timeout=5)
        assert not runner.is_alive()
    finally:
        c.ratio.pending.clear()
        c.close()
    assert set(idle) == {"tick"} and 2 <= len(idle) <= 4, idle
    busy = calls[len(idle):]
    assert busy.count("switch") >= 2 * busy.count("tick") >= 2, busy


def test_live_switch_refused_falls_back_to_a_reload(tmp_path: Path) -> None:
    with switched_in_place(tmp_path, refuse=True) as (c, triton):
        assert triton.acting == {}
        assert c.repo.entry("decode_1").role == "prefill"  # through the repository
        assert [e.kind for e in c.repo.edits] == ["switch_role"]
        assert states(c)["decode_1"] == "loading"
        assert read_state(tmp_path / "state.json").instances["decode_1"].acting_role == ""


def test_live_switch_waits_for_requests_that_landed_during_the_drain(tmp_path: Path) -> None:
    """CI: the heartbeat said idle, but two requests routed before the routers heard
    of the drain were in flight when set_role came; the instance refused and the
    controller reloaded it through the repository. It waits for them instead."""
    with switched_in_place(tmp_path, landing=2) as (c, triton):
        # idle by its heartbeat at the decision: set_role, refused while 2 are in flight
        assert triton.acting == {} and c.repo.edits == []
        assert states(c)["decode_1"] == "draining"
        c.tick(12.0)  # still busy: still waiting, nothing edited
        assert triton.acting == {} and c.repo.edits == []
        triton.in_flight["decode_1"] = 0  # they finished
        c.tick(14.0)
        assert triton.acting == {"decode_1": "prefill"}
        assert c.repo.edits == [] and c.repo.entry("decode_1").role == "decode"


def test_live_switch_refused_by_requests_gone_by_the_heartbeat_is_asked_again(
        tmp_path: Path) -> None:
    """CI (tests/serving/test_ratio_shift.py): set_role was refused with "has 2 requests
    in flight", the heartbeat right after said 0, and the controller reloaded the
    instance through the repository. It asks once more, in place."""
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=1, decode=3, traffic=traffic, role_switch="live")
    triton.brief_at_switch["decode_1"] = 2
    try:
        c.tick(0.0)
        triton.in_flight.update(prefill_0=32, decode_0=20, decode_1=0, decode_2=12)
        traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
        c.tick(10.0)
        assert triton.acting == {"decode_1": "prefill"}
        assert c.repo.edits == [] and c.repo.entry("decode_1").role == "decode"
    finally:
        c.close()


def test_live_switch_busy_past_the_drain_timeout_reloads(tmp_path: Path) -> None:
    with switched_in_place(tmp_path, landing=2, drain_timeout_s=5.0) as (c, triton):
        assert c.repo.edits == []
        c.tick(16.0)  # drained for 6 s > 5 s, still busy: through the repository
        assert triton.acting == {}
        assert [e.kind for e in c.repo.edits] == ["switch_role"]
        assert c.repo.entry("decode_1").role == "prefill"


def test_restart_in_place_ends_the_acting_role(tmp_path: Path) -> None:
    """A stub Triton restarts comes back in its home role: the controller follows."""
    with switched_in_place(tmp_path) as (c, triton):
        c.tick(11.0)
        assert c.acting_role("decode_1") == "prefill"
        triton.restart_in_place("decode_1")
        c.tick(12.0)
        assert c.acting_role("decode_1") == ""
        c.tick(13.0)
        status = read_state(tmp_path / "state.json").instances["decode_1"]
        assert (status.role, status.acting_role) == ("decode", "")


def test_a_restarted_controller_takes_over_roles_switched_in_place(tmp_path: Path) -> None:
    """The controller that switched decode_1 in place is gone; the next one reads
    decode_1's home role (decode) from the repository but its heartbeat says
    prefill: it takes that role over, so decode_1 stays routable as a prefill
    (without it, routers would see a decode answering as prefill: unroutable)."""
    with switched_in_place(tmp_path) as (c, triton):
        c.tick(11.0)
        c.tick(12.0)
        options = c.options
    successor = Controller(c.repo, triton, options, ratio=RatioLoop(RatioPolicy()))
    try:
        successor.tick(100.0)
        assert successor.acting_role("decode_1") == "prefill"
        status = read_state(tmp_path / "state.json").instances["decode_1"]
        assert (status.role, status.acting_role, status.routable) == ("prefill", "prefill", True)
        assert successor.state.ratios["default"] == {"prefill": 2, "decode": 2}
        assert c.repo.edits == []  # nothing was reloaded to get there
        # A later restart of the stub brings its home role back, as for the first controller.
        triton.restart_in_place("decode_1")
        successor.tick(102.0)
        successor.tick(104.0)
        status = read_state(tmp_path / "state.json").instances["decode_1"]
        assert (status.role, status.acting_role) == ("decode", "")
    finally:
        successor.close()


def test_a_reload_ends_the_acting_role(tmp_path: Path) -> None:
    with switched_in_place(tmp_path) as (c, triton):
        c.tick(11.0)
        c.repo.reload("decode_1", reason="operator")  # new generation: home role
        triton.poll()
        c.tick(12.0)
        assert c.acting_role("decode_1") == ""
        assert c.entries["decode_1"].role == "decode"


def test_a_failed_instance_is_replaced_in_the_role_it_served(tmp_path: Path) -> None:
    with switched_in_place(tmp_path) as (c, triton):
        c.tick(11.0)
        triton.kill("decode_1")
        c.tick(12.0)
        c.tick(14.0)  # failed: replaced through the repository, as a prefill
        assert [(e.kind, e.model) for e in c.repo.edits] == [("reload", "decode_1")]
        assert c.repo.entry("decode_1").role == "prefill"
        triton.poll()
        c.tick(16.0)
        assert states(c)["decode_1"] == "healthy" and c.acting_role("decode_1") == ""
        assert c.state.ratios["default"] == {"prefill": 2, "decode": 2}


def test_heartbeat_cpu_counters_stop_a_switch_that_adds_no_compute(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Output-heavy traffic on 2P2D with every instance pinned as E3 pins them:
    decode runs on both cores already. While the heartbeats' counters show both
    cores saturated the controller keeps 2P2D; with room on them it switches."""
    traffic = Traffic()
    c, triton = make(tmp_path, traffic=traffic)
    cores = {"prefill_0": 0, "prefill_1": 1, "decode_0": 1, "decode_1": 0}
    ticks = {0: [0, 0], 1: [0, 0]}

    def run_cores(busy0: float, busy1: float, seconds: float = 10.0) -> None:
        for core, busy in ((0, busy0), (1, busy1)):
            ticks[core][0] += int(busy * seconds * 100)
            ticks[core][1] += int(seconds * 100)
        triton.compute = {n: {f"h/cpu{core}": list(ticks[core])} for n, core in cores.items()}

    caplog.set_level("INFO", logger="pdserve.scheduler.controller.controller")
    try:
        run_cores(0.5, 0.5)
        c.tick(0.0)
        triton.in_flight.update(decode_0=32, decode_1=32)
        run_cores(0.98, 0.95)
        traffic.add(50, ttft_s=0.05, tpot_s=0.05, out_tokens=200)
        c.tick(10.0)
        assert c.repo.edits == [] and set(states(c).values()) == {"healthy"}
        reg = c.metrics.registry
        assert reg.get_sample_value("pdserve_controller_ratio_decisions_total", {
            "scenario": "default", "action": "none", "reason": "compute_saturated"}) == 1
        assert "ratio default: none 2P2D (decode compute saturated (96% busy on 2 units)" \
            in caplog.text
        run_cores(0.6, 0.55)  # the same traffic with room on the cores
        traffic.add(50, ttft_s=0.05, tpot_s=0.05, out_tokens=200)
        c.tick(20.0)  # prefill_0 is idle: drained at once and switched
        assert [(e.kind, e.model) for e in c.repo.edits] == [("switch_role", "prefill_0")]
        assert c.repo.entry("prefill_0").role == "decode"
    finally:
        c.close()


@pytest.mark.parametrize("own_reported", [True, False])
def test_a_donors_own_cpu_is_not_counted_against_the_core_it_brings(
        tmp_path: Path, own_reported: bool) -> None:
    """3P1D, output-heavy, decode_0 saturating core 1. Core 0 is 95% busy, 90
    points of it prefill_0's own work: moving prefill_0 to decode brings core 0
    with room. Without its own ticks in the heartbeat the core looks saturated
    and the switch is refused."""
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=3, decode=1, traffic=traffic)
    cores = {"prefill_0": 0, "prefill_1": 1, "prefill_2": 1, "decode_0": 1}
    ticks = {0: [0, 0], 1: [0, 0]}
    own = {"prefill_0": 0}

    def run_cores(busy0: float, busy1: float, own0: float, seconds: float = 10.0) -> None:
        for core, busy in ((0, busy0), (1, busy1)):
            ticks[core][0] += int(busy * seconds * 100)
            ticks[core][1] += int(seconds * 100)
        own["prefill_0"] += int(own0 * seconds * 100)
        triton.compute = {n: {f"h/cpu{core}": list(ticks[core])} for n, core in cores.items()}
        triton.own = dict(own) if own_reported else {}

    try:
        run_cores(0.5, 0.5, 0.4)
        c.tick(0.0)
        triton.in_flight.update(decode_0=32)
        run_cores(0.95, 0.99, 0.9)
        traffic.add(50, ttft_s=0.05, tpot_s=0.05, out_tokens=200)
        c.tick(10.0)
        if own_reported:
            assert [(e.kind, e.model) for e in c.repo.edits] == [("switch_role", "prefill_0")]
        else:
            assert c.repo.edits == []
            assert c.metrics.registry.get_sample_value(
                "pdserve_controller_ratio_decisions_total",
                {"scenario": "default", "action": "none", "reason": "compute_saturated"}) == 1
    finally:
        c.close()


def test_a_switch_back_home_that_is_refused_in_place_reloads_it(tmp_path: Path) -> None:
    """decode_1 serves prefill in place; the traffic turns output-heavy and it is
    the one to go back to decode, but it refuses in place. The fallback reload
    cannot write role decode (the repository has it already): it reloads the
    model, whose stub then serves its home role. It wedged every tick before
    ("decode_1 already has role 'decode'")."""
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=1, decode=3, traffic=traffic, role_switch="live")
    try:
        c.tick(0.0)
        triton.in_flight.update(prefill_0=32, decode_0=20, decode_1=0, decode_2=12)
        traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
        c.tick(10.0)
        c.tick(11.0)
        c.tick(12.0)
        assert triton.acting == {"decode_1": "prefill"}
        triton.in_flight.update(prefill_0=3, decode_1=0, decode_0=32, decode_2=32)
        triton.refuse_switch.add("decode_1")
        for t in (22.0, 32.0):
            traffic.add(50, ttft_s=0.05, tpot_s=0.05, out_tokens=200)
            c.tick(t)
        assert [(e.kind, e.model) for e in c.repo.edits] == [("reload", "decode_1")]
        assert c.repo.entry("decode_1").role == "decode"
        triton.poll()
        for t in (34.0, 36.0):
            c.tick(t)
        assert states(c)["decode_1"] == "healthy" and c.acting_role("decode_1") == ""
        assert c.state.ratios["default"] == {"prefill": 1, "decode": 3}
        assert read_state(tmp_path / "state.json").updated_at == 36.0  # published every tick
    finally:
        c.close()


def test_a_switch_whose_role_lost_its_other_instance_during_the_drain_is_abandoned(
        tmp_path: Path) -> None:
    """2P2D, output-heavy: prefill_0 drains to become a decode; prefill_1 dies
    meanwhile. Switching prefill_0 would leave no prefill: the switch is
    abandoned and prefill_0 serves as a prefill again."""
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=2, decode=2, traffic=traffic)
    try:
        c.tick(0.0)
        triton.in_flight.update(prefill_0=1, prefill_1=2, decode_0=32, decode_1=32)
        traffic.add(50, ttft_s=0.05, tpot_s=0.05, out_tokens=200)
        c.tick(10.0)
        assert {k: v.scenario for k, v in c.ratio.pending.items()} == {"prefill_0": "default"}
        triton.kill("prefill_1")
        c.tick(12.0)
        c.tick(14.0)
        triton.in_flight["prefill_0"] = 0  # idle: the switch would happen now
        c.tick(16.0)
        assert ("switch_role", "prefill_0") not in [(e.kind, e.model) for e in c.repo.edits]
        assert c.repo.entry("prefill_0").role == "prefill" and not c.ratio.pending
        assert "prefill_0" not in read_state(tmp_path / "state.json").draining
        c.tick(18.0)
        assert states(c)["prefill_0"] == "healthy"
        assert c.state.ratios["default"]["prefill"] >= 1
    finally:
        c.close()


def test_a_drain_left_by_a_stopped_controller_is_lifted_by_the_next(tmp_path: Path) -> None:
    traffic = Traffic()
    c, triton = make(tmp_path, prefill=1, decode=3, traffic=traffic)
    c.tick(0.0)
    triton.in_flight.update(prefill_0=32, decode_0=20, decode_1=4, decode_2=8)
    traffic.add(100, ttft_s=2.0, tpot_s=0.01, out_tokens=11)
    c.tick(10.0)
    assert "decode_1" in read_state(tmp_path / "state.json").draining
    c.close()  # stopped during the drain (SIGTERM, a crash)
    successor = Controller(c.repo, triton, c.options, ratio=RatioLoop(RatioPolicy(), 30.0))
    try:
        successor.tick(100.0)
        st = read_state(tmp_path / "state.json")
        assert st.draining == {} and st.is_routable("decode_1")
        successor.tick(102.0)
        assert states(successor)["decode_1"] == "healthy"
    finally:
        successor.close()


def test_mid_upgrade_the_ratio_loop_strands_no_weights(tmp_path: Path) -> None:
    """prefill_0 and decode_0 rolled onto new weights, prefill_1 and decode_1 still
    on the old: output-heavy traffic asks for a decode, but each prefill is the last
    of its weights, so no prefill is drained and every pair keeps serving. With a
    third prefill on the old weights, an old one goes."""
    for extra in (0, 1):
        traffic = Traffic()
        c, triton = make(tmp_path / str(extra), prefill=2 + extra, decode=2, traffic=traffic)
        try:
            for name in ("prefill_0", "decode_0"):
                c.repo.set_model(name, "tiny-v2", reason="upgrade")
            triton.poll()
            c.tick(0.0)
            triton.in_flight.update(decode_0=32, decode_1=32)
            traffic.add(60, ttft_s=0.5, tpot_s=0.01, out_tokens=151)
            c.tick(10.0)
            draining = read_state(tmp_path / str(extra) / "state.json").draining
            if extra:
                # prefill_0, the least busy by name, is the new weights' last prefill
                assert c.repo.entry("prefill_0").role == "prefill"
                assert c.repo.entry("prefill_1").role == "decode"  # idle: switched at once
                continue
            assert set(states(c).values()) == {"healthy"} and not draining
            assert c.repo.entry("prefill_0").role == c.repo.entry("prefill_1").role == "prefill"
            assert c.metrics.registry.get_sample_value(
                "pdserve_controller_ratio_decisions_total",
                {"scenario": "default", "action": "none", "reason": "mixed_weights"}) == 1
        finally:
            c.close()


def _decisions(c: Controller) -> float:
    reg = c.metrics.registry
    return sum(s.value for m in reg.collect() for s in m.samples
               if s.name == "pdserve_controller_ratio_decisions_total")


@pytest.mark.parametrize("mix_window_s", [0.0, 4.0])
def test_the_window_after_a_changing_mix_is_short(tmp_path: Path, mix_window_s: float) -> None:
    """Windows every 10 s; after one whose output length moved (a day/night shift)
    the next decision comes ``mix_window_s`` later, and then every 10 s again."""
    traffic = Traffic()
    # no stage near saturation: every decision is "none", only the windows move
    c, _ = make(tmp_path, traffic=traffic, mix_window_s=mix_window_s, min_peak=100.0)
    try:
        c.tick(0.0)  # the first scrape: the baseline
        traffic.add(50, ttft_s=0.1, tpot_s=0.01, out_tokens=10)
        c.tick(10.0)
        assert _decisions(c) == 1
        traffic.add(50, ttft_s=0.1, tpot_s=0.01, out_tokens=100)  # output-heavy now
        c.tick(20.0)
        assert _decisions(c) == 2 and c.metrics.registry.get_sample_value(
            "pdserve_controller_ratio_decisions_total",
            {"scenario": "default", "action": "none", "reason": "mix_change"}) == 1
        for t in (22.0, 24.0, 26.0, 28.0, 30.0):
            traffic.add(10, ttft_s=0.1, tpot_s=0.01, out_tokens=100)
            c.tick(t)
            due = 24.0 if mix_window_s else 30.0
            assert _decisions(c) == (3 if t >= due else 2), t
        c.tick(32.0)  # back to the interval: the next one 10 s after the short one
        assert _decisions(c) == 3
        c.tick(24.0 + 10.0 if mix_window_s else 40.0)
        assert _decisions(c) == 4
    finally:
        c.close()
