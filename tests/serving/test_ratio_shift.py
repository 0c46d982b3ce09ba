"""The P/D ratio follows the traffic on the real Triton path (issues 5 and 6).

2 prefill + 2 decode of ``tiny``; the controller runs in-process with its ratio
loop (3 s windows, 5 s cool-down) over the server's /metrics. Output-heavy
traffic must move an instance to decode within a bounded time; prompt-heavy
traffic must then move one back to prefill. Every request completes: the
donor is drained before its role is switched.

Two ways to switch: through the repository (Triton reloads the instance in its
new role; slow suite) and in place (``role_switch="live"``: the instance keeps
its weights and serves the new role within a second; default suite). The
in-place run also checks that the switched instances compute the same tokens
as the offline engine and that the repository was never edited.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Literal

import pytest

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.scheduler.controller.controller import Controller, ControllerOptions
from pdserve.scheduler.controller.health import HealthPolicy, ProbeResult
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.scheduler.controller.ratio_loop import RatioLoop
from pdserve.scheduler.controller.repository import Repository
from pdserve.scheduler.controller.signals import scrape_text
from pdserve.scheduler.controller.state import default_state_path, read_state
from pdserve.scheduler.ratio import RatioPolicy
from tests.serving.conftest import start_server
from tests.serving.helpers import Result, drive_until, generate_many, scrape_until

pytestmark = pytest.mark.e2e


class TimedProbe(TritonProbeClient):
    """The real probe client, timing each switch in place."""

    def __init__(self) -> None:
        super().__init__(timeout_s=2.0)
        self.switches: list[tuple[str, str, float, bool]] = []
        self.refusals: list[str] = []

    def set_role(self, server: str, model: str, role: str) -> ProbeResult:
        t0 = time.monotonic()
        result = super().set_role(server, model, role)
        self.switches.append((model, role, time.monotonic() - t0, result.ok))
        if not result.ok:
            self.refusals.append(f"{model}->{role}: {result.error}")
        return result


def _roles(state_path: Path) -> dict[str, int]:
    """Routable instances per role, as the controller publishes them."""
    out = {"prefill": 0, "decode": 0}
    for st in read_state(state_path).instances.values():
        if st.routable:
            out[st.role] = out.get(st.role, 0) + 1
    return out


@pytest.mark.parametrize("role_switch", [
    pytest.param("reload", marks=pytest.mark.slow),  # two Triton reloads: 2-4 minutes
    "live",
])
def test_ratio_moves_toward_decode_and_back(
        tmp_path: Path, role_switch: Literal["reload", "live"]) -> None:
    with start_server("tiny_ratio.yaml", tmp_path, poll_secs=1) as server:
        repo = Repository(tmp_path / "repo")
        state_path = default_state_path(repo.root)
        metrics_url = server.options.metrics_url
        probe = TimedProbe()
        controller = Controller(
            repo, probe,
            ControllerOptions(servers=(server.options.http_url,), state_path=state_path,
                              health=HealthPolicy(probe_interval_s=0.5, load_timeout_s=90),
                              ratio_interval_s=3.0, role_switch=role_switch),
            # Slots only: the four unpinned instances share both cores, so the
            # compute check would (rightly, E3) keep 2P2D under this load; this
            # test is about moving roles on the real path.
            ratio=RatioLoop(RatioPolicy(cooldown_s=5.0, compute_busy=None), drain_timeout_s=10.0),
            scrape=lambda: [scrape_text(metrics_url, 2.0)])
        stop = threading.Event()
        thread = threading.Thread(target=controller.run, args=(stop, time.monotonic),
                                  daemon=True)
        thread.start()
        results: list[Result] = []
        checked: list[Result] = []
        greedy = {"max_tokens": 24, "ignore_eos": True}
        prompts = [[7 + 3 * i + j for j in range(5 + i)] for i in range(8)]
        try:
            grpc = server.options.grpc_url
            to_decode = drive_until(grpc, 16, 160, lambda: _roles(state_path)["decode"] >= 3,
                                    150, results)
            # Three decodes serve now, one of them a former prefill: same tokens.
            checked += generate_many(grpc, [{"ids": p, "sampling": greedy} for p in prompts])
            to_prefill = drive_until(grpc, 900, 4, lambda: _roles(state_path)["prefill"] >= 2,
                                     150, results)
            checked += generate_many(grpc, [{"ids": p, "sampling": greedy} for p in prompts])
        finally:
            stop.set()
            thread.join(timeout=30)
            controller.close()
            # What the controller did, also when the traffic failed (shown with a failure).
            print(f"\ncontroller: edits {[(e.kind, e.model, e.reason) for e in repo.edits]}; "
                  f"switches {probe.switches}; refusals {probe.refusals}")
        edits = [(e.kind, e.model, e.reason) for e in repo.edits]
        print(f"\nratio shift ({role_switch}): output-heavy -> 1P3D in {to_decode:.1f}s, "
              f"prompt-heavy -> back to {_roles(state_path)} in {to_prefill:.1f}s; edits "
              f"{edits}; switches in place {probe.switches}")
        failed = [r.error for r in results + checked if r.error is not None]
        assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
        offline = generate(LLMEngine.load("tiny"), prompts, SamplingParams.from_dict(greedy))
        assert [r.ids for r in checked] == offline + offline
        if role_switch == "live":
            assert edits == []  # the repository keeps every home role
            done = [(m, r) for m, r, _, ok in probe.switches if ok]
            assert len(done) >= 2, probe.switches
            # A refusal is only the donor still finishing requests routed to
            # it before every router heard of its drain; the controller asks
            # again and the same switch then lands (no reload).
            assert all("in flight" in why for why in probe.refusals), probe.refusals
            for i, (m, r, _, ok) in enumerate(probe.switches):
                assert ok or (m, r) in [(m2, r2) for m2, r2, _, ok2
                                        in probe.switches[i + 1:] if ok2], probe.switches
            assert max(s for _, _, s, _ in probe.switches) < 5.0
            # The instance switched to decode served decode work in its new role.
            first = probe.switches[0][0]
            assert first.startswith("prefill")
            m = scrape_until(metrics_url,
                             lambda m: m.get(("pdserve_generated_tokens_total", first), 0) > 0)
            assert m[("pdserve_generated_tokens_total", first)] > 0
        # Each stub's heartbeat carries the counters of the cores it may run on,
        # and its own process's CPU ticks (it loaded a model and served: some).
        cores = len(os.sched_getaffinity(0))
        for name in ("prefill_0", "decode_0"):
            load = probe.probe(server.options.http_url, name).load
            assert load is not None and len(load.compute) == cores, load
            assert all(0 < busy <= total for busy, total in load.compute.values())
            assert 0 < load.own_ticks <= max(busy for busy, _ in load.compute.values()), load
        # Every arena is empty again, also those of the instances that switched.
        names = [f"{r}_{i}" for r in ("prefill", "decode") for i in (0, 1)]
        m = scrape_until(metrics_url, lambda m: all(
            m.get(("pdserve_kv_arena_bytes_in_use", n), -1) == 0 for n in names), 10)
        assert {n: m.get(("pdserve_kv_arena_bytes_in_use", n)) for n in names} == \
            dict.fromkeys(names, 0)
