"""The P/D ratio follows the traffic on the real Triton path (issue 5).

2 prefill + 2 decode of ``tiny``; the controller runs in-process with its ratio
loop (3 s windows, 5 s cool-down) over the server's /metrics. Output-heavy
traffic must move an instance to decode within a bounded time; prompt-heavy
traffic must then move one back to prefill. Every request completes: the
donor is drained before its role is switched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pdserve.scheduler.controller.controller import Controller, ControllerOptions
from pdserve.scheduler.controller.health import HealthPolicy
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.scheduler.controller.ratio_loop import RatioLoop
from pdserve.scheduler.controller.repository import Repository
from pdserve.scheduler.controller.signals import scrape_text
from pdserve.scheduler.controller.state import default_state_path
from pdserve.scheduler.ratio import RatioPolicy
from tests.serving.conftest import start_server
from tests.serving.helpers import Result, generate_many

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # two traffic phases: 2-4 minutes


def _roles(repo: Repository) -> dict[str, int]:
    out = {"prefill": 0, "decode": 0}
    for entry in repo.instances().values():
        out[entry.role] = out.get(entry.role, 0) + 1
    return out


def _drive(url: str, prompt_len: int, out_len: int, until: Callable[[], bool],
           timeout_s: float, results: list[Result]) -> float:
    """Closed loop, 8 concurrent, until ``until()``; the seconds it took."""
    t0 = time.monotonic()
    i = 0
    while not until():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"the ratio did not move within {timeout_s}s")
        reqs = [{"ids": [3 + (i + k + j) % 250 for j in range(prompt_len)],
                 "sampling": {"max_tokens": out_len, "ignore_eos": True}} for k in range(8)]
        i += 8
        results.extend(generate_many(url, reqs, timeout_s=120))
    return time.monotonic() - t0


def test_ratio_moves_toward_decode_and_back(tmp_path: Path) -> None:
    with start_server("tiny_ratio.yaml", tmp_path, poll_secs=1) as server:
        repo = Repository(tmp_path / "repo")
        metrics_url = server.options.metrics_url
        controller = Controller(
            repo, TritonProbeClient(timeout_s=2.0),
            ControllerOptions(servers=(server.options.http_url,),
                              state_path=default_state_path(repo.root),
                              health=HealthPolicy(probe_interval_s=0.5, load_timeout_s=90),
                              ratio_interval_s=3.0),
            ratio=RatioLoop(RatioPolicy(cooldown_s=5.0), drain_timeout_s=10.0),
            scrape=lambda: [scrape_text(metrics_url, 2.0)])
        stop = threading.Event()
        thread = threading.Thread(target=controller.run, args=(stop, time.monotonic),
                                  daemon=True)
        thread.start()
        results: list[Result] = []
        try:
            grpc = server.options.grpc_url
            to_decode = _drive(grpc, 16, 160, lambda: _roles(repo)["decode"] >= 3, 150, results)
            to_prefill = _drive(grpc, 900, 4, lambda: _roles(repo)["prefill"] >= 2, 150,
                                results)
        finally:
            stop.set()
            thread.join(timeout=30)
            controller.close()
        edits = [(e.kind, e.model, e.reason) for e in repo.edits]
        print(f"\nratio shift: output-heavy -> 1P3D in {to_decode:.1f}s, prompt-heavy -> "
              f"back to {_roles(repo)} in {to_prefill:.1f}s; edits {edits}")
        failed = [r.error for r in results if r.error is not None]
        assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
