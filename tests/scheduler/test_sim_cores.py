"""Shared cores (``ScenarioSpec.host``): processor sharing of instances, router and client."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve.bench.records import RequestSpec
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.config import Admission, HostCores, ScenarioSpec, SimConfig
from pdserve.scheduler.sim.cores import Core, Host
from pdserve.scheduler.sim.events import EventLoop
from pdserve.scheduler.sim.profile import Profile
from tests.scheduler.sim_helpers import assert_clean, profile


def _core() -> tuple[EventLoop, Core, dict[str, float]]:
    loop = EventLoop()
    done: dict[str, float] = {}
    return loop, Core(loop, 0, lambda _: None), done


def _job(loop: EventLoop, core: Core, done: dict[str, float], name: str, work: float) -> None:
    core.add_job(work, lambda _: done.__setitem__(name, loop.now))


def test_one_job_alone_takes_its_work() -> None:
    loop, core, done = _core()
    _job(loop, core, done, "a", 1.0)
    loop.run()
    assert done["a"] == pytest.approx(1.0)


def test_two_jobs_on_one_core_take_twice_as_long() -> None:
    loop, core, done = _core()
    _job(loop, core, done, "a", 1.0)
    _job(loop, core, done, "b", 1.0)
    loop.run()
    assert done == pytest.approx({"a": 2.0, "b": 2.0})


def test_share_is_re_evaluated_when_a_job_starts_and_ends() -> None:
    # a: 1 s of work from t=0; b: 0.25 s from t=0.5. Sharing from 0.5 until b ends
    # at 1.0 (0.25 s of work at half speed); a then has 0.25 s left alone.
    loop, core, done = _core()
    _job(loop, core, done, "a", 1.0)
    loop.at(0.5, lambda _: _job(loop, core, done, "b", 0.25))
    loop.run()
    assert done == pytest.approx({"b": 1.0, "a": 1.25})
    assert core.busy_s == pytest.approx(1.25)


class _Fluid:
    def __init__(self) -> None:
        self.speed = 1.0
        self.changes: list[tuple[float, float]] = []

    def speed_change(self, now: float, speed: float) -> None:
        self.speed = speed
        self.changes.append((now, speed))


def test_a_fluid_item_runs_at_half_speed_while_a_job_shares_its_core() -> None:
    loop, core, done = _core()
    item = _Fluid()
    core.set_fluid(item, True)
    assert item.speed == 1.0
    loop.at(1.0, lambda _: _job(loop, core, done, "router", 0.5))
    loop.run()
    assert done["router"] == pytest.approx(2.0)  # 0.5 s of work at half speed
    assert item.changes == [(1.0, 0.5), (pytest.approx(2.0), 1.0)]


def test_router_work_goes_to_the_least_busy_allowed_core() -> None:
    loop = EventLoop()
    host = Host(loop, 2, (), lambda _: None)
    host.cores[0].add_job(5.0, lambda _: None)
    host.router_job(1.0)
    assert host.cores[1].num_runnable == 1
    pinned = Host(loop, 2, (0,), lambda _: None)
    pinned.router_job(1.0)
    assert pinned.cores[0].num_runnable == 1 and pinned.cores[1].num_runnable == 0


def test_host_cores_are_validated() -> None:
    with pytest.raises(ValueError):
        HostCores(prefill=(-1,))
    with pytest.raises(ValueError):
        HostCores(prefill=(0,), decode=(1,), request_s=-1.0)
    with pytest.raises(ValueError):  # a role with instances but no cores
        ScenarioSpec("a", 1, 1, host=HostCores(prefill=(0,)))
    assert HostCores(prefill=(0,), decode=(1,), router=(3,)).num_cores == 4
    with pytest.raises(ValueError):
        HostCores(prefill=(0,), decode=(1,), background_s=-0.1)
    with pytest.raises(ValueError):
        HostCores(prefill=(0,), decode=(1,), background_s=0.1, background_period_s=0.0)
    assert HostCores(prefill=(0,), decode=(1,), background_cores=(2,)).num_cores == 3


def test_background_work_goes_to_the_least_busy_of_its_cores() -> None:
    loop = EventLoop()
    host = Host(loop, 2, (1,), lambda _: None)
    host.cores[0].add_job(5.0, lambda _: None)
    host.background_job(1.0)  # any core: the idle one
    assert [c.num_runnable for c in host.cores] == [1, 1]
    host.background_job(1.0, (0,))  # only core 0, busy or not
    assert [c.num_runnable for c in host.cores] == [2, 1]
    assert host.cores[1].router_jobs == 0  # not the router's: hop_factor counts it in full
    host.background_job(0.0)
    assert [c.num_runnable for c in host.cores] == [2, 1]


# -- in the cluster ----------------------------------------------------------------
E2_LIKE = HostCores(prefill=(0,), decode=(1,), router=(1,))  # router on the decode's core


def _run(prof: Profile, specs: list[RequestSpec], scenario: ScenarioSpec,
         admission: Admission = "local_queue") -> Cluster:
    cfg = SimConfig(scenarios=(scenario,), duration_s=100.0, admission=admission)
    c = Cluster(cfg, prof, trace=specs)
    c.run()
    assert c.outcomes.counts() == {"ok": len(specs)}
    assert_clean(c)
    return c


def _tpots(c: Cluster) -> list[float]:
    o = c.outcomes
    return [(o.last[i] - o.first[i]) / (o.tokens[i] - 1) for i in range(len(o))]


def _prof() -> Profile:
    base = profile()
    return replace(base, prefill=replace(base.prefill, max_batch_size=1))


def test_separate_cores_and_no_router_work_change_nothing() -> None:
    prof = _prof()
    specs = [RequestSpec(i, 500 + 100 * (i % 3), 20, 0.05 * i) for i in range(30)]
    plain = _run(prof, specs, ScenarioSpec("a", 2, 1)).outcomes
    own = HostCores(prefill=(0, 1), decode=(2,))
    hosted = _run(prof, specs, ScenarioSpec("a", 2, 1, host=own)).outcomes
    assert hosted.first == pytest.approx(plain.first)
    assert hosted.last == pytest.approx(plain.last)


def test_router_work_on_the_decode_core_raises_tpot_under_load_only() -> None:
    prof = _prof()
    step = prof.decode.step_time(1, 0.0)
    prompt = prof.prefill.prompt_time(500)
    work = 0.5 * prompt  # done on core 1 while its own prompt is in prefill on core 0
    alone = [RequestSpec(0, 500, 20, 0.0)]
    free = _run(prof, alone, ScenarioSpec("a", 2, 1, host=E2_LIKE))
    costly = _run(prof, alone, ScenarioSpec("a", 2, 1, host=replace(E2_LIKE, request_s=work)))
    assert _tpots(costly) == pytest.approx(_tpots(free))  # unloaded: nothing shared
    # under load: prompts every half prefill, so other requests' router work lands
    # on core 1 while each one decodes
    specs = [RequestSpec(i, 500, 20, 0.5 * prompt * i) for i in range(40)]
    free = _run(prof, specs, ScenarioSpec("a", 2, 1, host=E2_LIKE))
    costly = _run(prof, specs, ScenarioSpec("a", 2, 1, host=replace(E2_LIKE, request_s=work)))
    f, c = sorted(_tpots(free)), sorted(_tpots(costly))
    assert f[len(f) // 2] < 1.2 * step  # the decode's core alone: about one step a token
    assert c[len(c) // 2] > 1.2 * f[len(f) // 2]


def test_router_on_other_cores_leaves_decode_alone() -> None:
    prof = _prof()
    prompt = prof.prefill.prompt_time(500)
    specs = [RequestSpec(i, 500, 20, 0.5 * prompt * i) for i in range(40)]
    apart = HostCores(prefill=(0,), decode=(1,), router=(2,), request_s=0.5 * prompt)
    free = _run(prof, specs, ScenarioSpec("a", 2, 1, host=replace(apart, request_s=0.0)))
    costly = _run(prof, specs, ScenarioSpec("a", 2, 1, host=apart))
    assert _tpots(costly) == pytest.approx(_tpots(free))


def test_per_token_router_work_slows_the_decode_on_its_core() -> None:
    prof = _prof()
    specs = [RequestSpec(i, 500, 40, 0.1 * i) for i in range(10)]
    step = prof.decode.step_time(1, 0.0)
    free = _run(prof, specs, ScenarioSpec("a", 1, 1, host=E2_LIKE))
    costly = _run(prof, specs, ScenarioSpec("a", 1, 1, host=replace(E2_LIKE, token_s=step)))
    assert sum(_tpots(costly)) > 1.2 * sum(_tpots(free))


def test_background_work_slows_what_shares_its_core_and_stops_with_the_run() -> None:
    prof = _prof()
    prompt = prof.prefill.prompt_time(500)
    # one prompt at a time, 2 s apart; a piece of background work every second,
    # each as long as half a prompt, on the prefill's core, from 0.5 s on: each
    # prompt starts with a piece beside it
    specs = [RequestSpec(i, 500, 4, 0.5 + 2.0 * i) for i in range(10)]
    host = HostCores(prefill=(0,), decode=(1,), router=(1,))
    plain = _run(prof, specs, ScenarioSpec("a", 1, 1, host=host), admission="on_demand")
    gauged = replace(host, background_s=0.5 * prompt, background_cores=(0,))
    cfg = SimConfig(scenarios=(ScenarioSpec("a", 1, 1, host=gauged),), duration_s=100.0,
                    admission="on_demand")
    c = Cluster(cfg, prof, trace=specs)
    c.run()
    assert c.outcomes.counts() == {"ok": len(specs)}
    assert_clean(c)
    ttft = [f - a for f, a in zip(c.outcomes.first, c.outcomes.send, strict=True)]
    plain_ttft = [f - a for f, a in
                  zip(plain.outcomes.first, plain.outcomes.send, strict=True)]
    # sharing the core with a piece: the prompt takes 1.5 x its time
    assert ttft == pytest.approx([t + 0.5 * prompt for t in plain_ttft])
    # the pieces stop once the run has nothing left: the loop ends (no event left),
    # about a period after the last request, not at duration + max_drain_s
    assert c.loop.pending == 0
    assert c.loop.now < max(c.outcomes.last) + 2 * gauged.background_period_s
    busy = c.scenarios["a"].host.cores[0].busy_s  # type: ignore[union-attr]
    plain_busy = plain.scenarios["a"].host.cores[0].busy_s  # type: ignore[union-attr]
    assert busy > plain_busy + 10 * 0.5 * prompt - prompt  # ~ one piece a second


def test_requests_waiting_for_decode_room_load_the_routers_core() -> None:
    """``sweep_s`` is also the router's work each time a request waiting for decode
    room looks over the decodes again (``Router._choose``): local queues, where no
    prefill sweep happens, and a decode of 2 slots that the burst overfills."""
    prof = _prof()
    prof = replace(prof, decode=replace(prof.decode, max_batch_size=2))
    specs = [RequestSpec(i, 300, 40, 0.001 * i) for i in range(12)]
    busy = []
    for sweep in (0.0, 0.002):
        sc = ScenarioSpec("a", 2, 1, host=replace(E2_LIKE, sweep_s=sweep))
        c = _run(prof, specs, sc)
        assert c.scenarios["a"].host is not None
        busy.append(c.scenarios["a"].host.cores[1].busy_s)
    # the waiting requests' looks (dozens, each 2 ms) kept the router's core busier
    assert busy[1] > busy[0] + 0.02


def test_prefills_on_one_core_are_re_timed_when_the_other_ends() -> None:
    # two prompts, the second half a prefill later: processor sharing ends the first at
    # 1.5 t and the second at 2 t (counting busy prefills only at a batch's start, the
    # first would end at t and the second at 2.5 t)
    prof = _prof()
    t = prof.prefill.prompt_time(2000)
    specs = [RequestSpec(0, 2000, 2, 0.0), RequestSpec(1, 2000, 2, 0.5 * t)]
    host = HostCores(prefill=(0,), decode=(1,))
    c = _run(prof, specs, ScenarioSpec("a", 2, 1, host=host), admission="on_demand")
    xfer = prof.transfer_time("block_free", 2000)
    first = [f - xfer - prof.attempt_rtt_s - prof.serving_overhead_s for f in c.outcomes.first]
    assert first == pytest.approx([1.5 * t, 2.0 * t], rel=1e-6)


def test_shared_cores_run_is_deterministic() -> None:
    prof = _prof()
    specs = [RequestSpec(i, 300 + 50 * (i % 5), 10 + i % 7, 0.03 * i) for i in range(60)]
    sc = ScenarioSpec("a", 2, 1, host=replace(E2_LIKE, request_s=0.01, token_s=0.001))
    a, b = _run(prof, specs, sc).outcomes, _run(prof, specs, sc).outcomes
    assert a.first == b.first and a.last == b.last


def _ratio_run(n_p: int, n_d: int, compute_busy: float | None) -> Cluster:
    """E3's layout on a 2-core host (prefill_i on core i%2, decode_i on (i+1)%2),
    output-heavy Poisson traffic beyond the decodes' capacity, the controller's
    ratio loop every 4 s."""
    from pdserve.bench.workload import LengthDistribution
    from pdserve.scheduler.ratio import RatioPolicy
    from pdserve.scheduler.sim.profile import load_profile
    from pdserve.scheduler.sim.workload import ScenarioLoad
    from tests.scheduler.sim_helpers import ROOT

    prof = load_profile(ROOT / "perf" / "sim_profiles" / "cpu_small_fitted_2026-12-02.yaml")
    out_heavy = ScenarioLoad(rate=2.0, input=LengthDistribution(64, 0, 64, 64),
                             output=LengthDistribution(512, 0, 512, 512))
    host = HostCores(prefill=(0, 1), decode=(1, 0))
    cfg = SimConfig(scenarios=(ScenarioSpec("a", n_p, n_d, load=out_heavy, host=host),),
                    duration_s=40.0, ratio="dynamic", ratio_interval_s=4.0,
                    ratio_policy=RatioPolicy(cooldown_s=8.0, compute_busy=compute_busy))
    c = Cluster(cfg, prof)
    c.run()
    assert_clean(c)
    return c


def test_ratio_compute_check_on_shared_cores() -> None:
    """The live controller's compute check, from the simulated cores' busy time: on
    2P2D decode runs on both cores already, so a third decode is refused while the
    cores are saturated (slots alone would switch); on 3P1D the lone decode's core
    is saturated and a prefill on the other core brings it one, so it switches."""
    def actions(c: Cluster) -> list[tuple[str, str]]:
        return [(str(d["action"]), str(d["reason"])) for d in c.control.decisions
                if d["action"] != "none" or "compute" in str(d["reason"])]

    kept = actions(_ratio_run(2, 2, 0.85))
    assert kept and all(a == "none" for a, _ in kept)
    assert "decode compute saturated (100% busy on 2 units)" in kept[0][1]
    slots_only = actions(_ratio_run(2, 2, None))
    assert slots_only[0][0] == "add_decode"
    spread = _ratio_run(3, 1, 0.85)
    assert actions(spread)[0][0] == "add_decode"
    moved = [i for i in spread.instances if i.name in ("a/p0", "a/p2") and i.role == "decode"]
    assert len(moved) == 1 and moved[0].core is not None and moved[0].core.number == 0


def test_a_prefill_call_holds_its_slot_until_the_answer_is_back() -> None:
    """``Profile.prefill_call_s``: on-demand, the router sees a prefill's slot free,
    and sends the first token, only once the prefill's answer is back; a prefill
    with a local queue goes on with its next prompt at once (the answer still
    delays that prompt's first token)."""
    prof = replace(_prof(), prefill_call_s=0.05)
    t, xfer = prof.prefill.prompt_time(500), prof.transfer_time("block_free", 500)
    rtt, call = prof.attempt_rtt_s + prof.serving_overhead_s, prof.prefill_call_s
    specs = [RequestSpec(0, 500, 2, 0.0), RequestSpec(1, 500, 2, 0.0)]
    sc = ScenarioSpec("a", 1, 1)
    c = _run(prof, specs, sc, admission="on_demand")
    assert c.outcomes.first == pytest.approx([t + xfer + call + rtt,
                                              2 * (t + xfer + call) + rtt], rel=1e-6)
    # the router's phases: arrival to the accepted call, and that call
    assert c.phase_n == 2 and c.phase_wait_s == pytest.approx(t + xfer + call, rel=1e-6)
    assert c.phase_call_s == pytest.approx(2 * (t + xfer + call), rel=1e-6)
    assert c.forward_n == 2 and c.forward_s == pytest.approx(2 * t, rel=1e-6)
    local = _run(prof, specs, sc, admission="local_queue").outcomes
    assert local.first == pytest.approx([t + xfer + call + rtt,
                                         2 * (t + xfer) + call + rtt], rel=1e-6)


def test_a_prefill_calls_answer_waits_its_turn_on_a_busy_router_core() -> None:
    """On shared cores the answer's way back is router work: with the decode running
    on the router's core it takes twice as long (``Host.hop_factor``)."""
    prof = replace(_prof(), prefill_call_s=0.05)
    t, xfer = prof.prefill.prompt_time(500), prof.transfer_time("block_free", 500)
    rtt, call = prof.attempt_rtt_s + prof.serving_overhead_s, prof.prefill_call_s
    # the second prompt comes once the first's slot is free, while it decodes on core 1
    second = t + xfer + call + 0.01
    specs = [RequestSpec(0, 500, 400, 0.0), RequestSpec(1, 500, 2, second)]
    c = _run(prof, specs, ScenarioSpec("a", 1, 1, host=E2_LIKE), admission="on_demand")
    assert c.outcomes.first[0] == pytest.approx(t + xfer + call + rtt, rel=1e-6)
    assert c.outcomes.first[1] == pytest.approx(second + t + xfer + 2 * call + rtt, rel=1e-6)
    host = Host(EventLoop(), 2, (1,), lambda _: None)
    host.router_job(1.0)
    host.router_job(1.0)
    assert host.hop_factor() == 2.0  # the router's own pending work counts once
    host.cores[1].set_fluid(_Fluid(), True)
    assert host.hop_factor() == 3.0
