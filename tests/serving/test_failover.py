"""Issue 5 on the real Triton path: 2 prefill + 2 decode of ``tiny``, steady load
from a background thread, the controller running in-process (probe every 0.5 s,
Triton polling the repository every second).

- SIGKILL of a prefill stub: no request fails; the instance is back in routing.
- SIGKILL of a decode stub: every request completes, greedy output identical
  to the offline engine (streams of the dead decode resume on the other one).
- A burst of many times the capacity: excess requests end UNAVAILABLE quickly,
  KV is all released afterwards and service is normal again.
- SIGKILL of the router's stub: Triton never restarts it; the controller reloads
  it and the server serves correct output again.
- tritonserver itself SIGKILLed and restarted on the same ports (what
  ``pdserve serve`` does after Triton's upstream abort): the controller finds
  every instance again and the output is correct.
- A rolling upgrade onto other weights (slow): no request fails; afterwards
  every instance serves the new weights.

Recovery times are printed (``-s``) for perf/RESULTS.md.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.scheduler.controller.controller import Controller, ControllerOptions
from pdserve.scheduler.controller.health import HealthPolicy
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.scheduler.controller.repository import Repository
from pdserve.scheduler.controller.state import ControllerState, default_state_path, read_state
from pdserve.scheduler.controller.upgrade import RollingUpgrade, UpgradeOptions
from pdserve.server.launcher import TritonServer, describe_exit
from tests.serving.checkpoint import save_tiny
from tests.serving.conftest import start_server
from tests.serving.helpers import (
    Result,
    generate_many,
    kill_stub,
    scrape,
    scrape_until,
    stub_pid,
)

pytestmark = pytest.mark.e2e

INSTANCES = ("prefill_0", "prefill_1", "decode_0", "decode_1")
PROMPTS = [list(range(5 + i, 30 + 3 * i)) for i in range(8)]


@dataclass
class Cluster:
    server: TritonServer
    repo: Path
    controller: Controller
    log: Path  # the controller's INFO log
    reference: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)

    def state(self) -> ControllerState:
        return read_state(default_state_path(self.repo))

    def diagnosis(self) -> str:
        """What a timed-out wait reports: the controller's view and its log's tail."""
        try:
            st = self.state()
            view = "\n".join(f"  {n}: {s}" for n, s in sorted(st.instances.items()))
            view += f"\n  draining: {st.draining}"
        except Exception as e:  # the state file itself may be what broke
            view = f"  state unreadable: {e!r}"
        tail = (self.log.read_text(errors="replace").splitlines()[-60:]
                if self.log.exists() else [])
        return "controller state:\n" + view + "\ncontroller log (tail):\n" + "\n".join(tail)

    def expected(self, prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in self.reference:
            engine = LLMEngine.load("tiny")
            self.reference[key] = generate(
                engine, [prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
        return self.reference[key]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("failover")
    with start_server("tiny_2p2d.yaml", tmp, poll_secs=1) as server:
        repo = Repository(tmp / "repo")
        controller = Controller(
            repo, TritonProbeClient(timeout_s=2.0),
            ControllerOptions(servers=(server.options.http_url,),
                              state_path=default_state_path(repo.root),
                              health=HealthPolicy(probe_interval_s=0.5, load_timeout_s=90)))
        # The controller's INFO log, kept for a wait that times out (a CI run once
        # found decode_0 not back in routing after 90 s, with nothing to tell why).
        log_path = tmp / "controller.log"
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        ctl_log = logging.getLogger("pdserve.scheduler.controller")
        old_level = ctl_log.level
        ctl_log.addHandler(handler)
        ctl_log.setLevel(logging.INFO)
        stop = threading.Event()
        thread = threading.Thread(target=controller.run, args=(stop, time.monotonic),
                                  daemon=True)
        thread.start()
        try:
            c = Cluster(server, repo.root, controller, log_path)
            _ACTIVE.append(c)
            _wait(lambda: _all_routable(c), 60, "every instance healthy")
            yield c
        finally:
            _ACTIVE.clear()
            stop.set()
            thread.join(timeout=30)
            controller.close()
            ctl_log.removeHandler(handler)
            ctl_log.setLevel(old_level)
            handler.close()


def _all_routable(c: Cluster) -> bool:
    st = c.state()
    return all(n in st.instances and st.is_routable(n) and st.instances[n].state == "healthy"
               for n in INSTANCES)


# Set while the module's cluster runs: what a timed-out wait adds to its message.
# The module's cluster while it runs: a wait ends at once if its server died, and a
# timed-out wait reports the controller's view and log.
_ACTIVE: list[Cluster] = []

# Triton 2.51's Python backend aborts the WHOLE server when a stub is killed while
# holding a mutex of its IPC region (a heartbeat or BLS call in flight to it):
# "terminate called after throwing an instance of 'boost::interprocess::lock_exception'".
# An open upstream bug, about one kill in five here; `pdserve serve` restarts the
# server (launcher.supervise). A kill round that ends in exactly that abort is
# repeated once on a restarted server; any other failure, or a second abort, fails.
UPSTREAM_ABORT = "boost::interprocess::lock_exception"


def _server_died() -> str | None:
    for server in (c.server for c in _ACTIVE):
        if server.process is not None and server.process.poll() is not None:
            return f"tritonserver {describe_exit(server.process.returncode)}"
    return None


def _wait(pred: Callable[[], bool], timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        died = _server_died()
        if died is not None:
            raise AssertionError(f"{died} while waiting for {what}")
        if time.monotonic() - t0 > timeout_s:
            detail = "\n".join(c.diagnosis() for c in _ACTIVE)
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{detail}")
        time.sleep(0.05)
    return time.monotonic() - t0


class Load:
    """Steady closed-loop load: rounds of ``width`` concurrent greedy requests."""

    def __init__(self, c: Cluster, max_tokens: int, width: int = 4) -> None:
        self.c, self.max_tokens, self.width = c, max_tokens, width
        self.results: list[tuple[list[int], Result]] = []
        self.broken: str | None = None  # a round that never ended (no response for 120 s)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            prompts = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(self.width)]
            i += self.width
            try:
                res = generate_many(self.c.server.options.grpc_url, [
                    {"ids": p, "sampling": {"max_tokens": self.max_tokens, "ignore_eos": True}}
                    for p in prompts], timeout_s=120)
            except Exception as exc:  # a lost request, or the server died under the round
                self.broken = f"round of {len(prompts)} from request {i - self.width}: {exc!r}"
                return
            self.results.extend(zip(prompts, res, strict=True))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=180)
        assert not self.thread.is_alive(), "the load thread hung"

    def check_all_correct(self) -> None:
        assert self.broken is None, self.broken
        assert self.results
        failed = [r.error for _, r in self.results if r.error is not None]
        assert not failed, f"{len(failed)} of {len(self.results)} failed: {failed[:3]}"
        for prompt, r in self.results:
            assert r.ids == self.c.expected(prompt, self.max_tokens), (prompt, r)


def _repeat_once_after_upstream_abort(c: Cluster, kill_round: Callable[[], None]) -> None:
    log = c.server.options.log_file
    assert log is not None
    for attempt in (1, 2):
        start = log.stat().st_size
        try:
            kill_round()
            return
        except AssertionError:
            text = log.read_bytes()[start:].decode(errors="replace")
            if attempt == 2 or _server_died() is None or UPSTREAM_ABORT not in text:
                raise
            print(f"\n{_server_died()} with the upstream {UPSTREAM_ABORT} after the stub "
                  f"kill; restarting it and repeating the round once")
            c.server.restart()


def _kv_released(c: Cluster) -> bool:
    m = scrape(c.server.options.metrics_url)
    return all(m.get(("pdserve_kv_arena_bytes_in_use", n), -1) == 0 for n in INSTANCES)


def test_prefill_killed_under_load(cluster: Cluster) -> None:
    _repeat_once_after_upstream_abort(cluster, lambda: _prefill_kill_round(cluster))


def _prefill_kill_round(cluster: Cluster) -> None:
    _wait(lambda: _all_routable(cluster), 90, "every instance healthy")
    with Load(cluster, max_tokens=12) as load:
        time.sleep(2.0)
        killed = time.monotonic()
        kill_stub(stub_pid(cluster.server, "prefill_0"))
        out_s = _wait(lambda: not cluster.state().is_routable("prefill_0"), 30,
                      "prefill_0 out of routing")
        back_s = _wait(lambda: _all_routable(cluster), 90, "prefill_0 back in routing")
        time.sleep(2.0)  # load continues on the replacement
    print(f"\nprefill kill: out of routing {out_s:.2f}s, back {time.monotonic() - killed:.2f}s "
          f"after the kill ({back_s:.2f}s after out); {len(load.results)} requests")
    load.check_all_correct()
    time.sleep(0.5)  # the stubs' pending metric updates land (every 0.25 s, metric_buffer)
    before = scrape(cluster.server.options.metrics_url)[("pdserve_prompt_tokens_total",
                                                          "prefill_0")]
    res = generate_many(cluster.server.options.grpc_url, [
        {"ids": p, "sampling": {"max_tokens": 2, "ignore_eos": True}} for p in PROMPTS])
    assert all(r.error is None for r in res), [r.error for r in res]
    after = scrape_until(cluster.server.options.metrics_url, lambda m: m.get(
        ("pdserve_prompt_tokens_total", "prefill_0"), 0) > before)[
            ("pdserve_prompt_tokens_total", "prefill_0")]
    assert after > before  # the replacement takes prompts again
    _wait(lambda: _kv_released(cluster), 20, "KV released")


def test_decode_killed_under_load_resumes(cluster: Cluster) -> None:
    _repeat_once_after_upstream_abort(cluster, lambda: _decode_kill_round(cluster))


def _decode_kill_round(cluster: Cluster) -> None:
    _wait(lambda: _all_routable(cluster), 90, "every instance healthy")
    # Rounds of 6 streams of 240 tokens (max_tokens limit 256; about 1.5 s here): a decode is idle
    # only briefly at a round's end. The pid is looked up first and decode_0 is
    # probed last, so the kill follows a fresh "it holds streams" by milliseconds
    # (the CI once killed it just after its last stream of a 120-token round ended:
    # nothing to resume then, and the test could not tell).
    with Load(cluster, max_tokens=240, width=6) as load:
        probe = TritonProbeClient(timeout_s=5.0)

        def busy(name: str) -> bool:
            load = probe.probe(cluster.server.options.http_url, name).load
            return load is not None and load.in_flight > 0

        pid = stub_pid(cluster.server, "decode_0")
        _wait(lambda: busy("decode_1") and busy("decode_0"), 30, "streams on both decodes")
        killed = time.monotonic()
        kill_stub(pid)
        out_s = _wait(lambda: not cluster.state().is_routable("decode_0"), 30,
                      "decode_0 out of routing (controller)")
        back_s = _wait(lambda: _all_routable(cluster), 90, "decode_0 back in routing")
        time.sleep(1.0)
    resumed = scrape_until(cluster.server.options.metrics_url, lambda m: m.get(
        ("pdserve_resumed_requests_total", "pdserve"), 0) >= 1)[
            ("pdserve_resumed_requests_total", "pdserve")]
    gap = max(r.max_gap_s for _, r in load.results)
    print(f"\ndecode kill: out of routing {out_s:.2f}s, back "
          f"{time.monotonic() - killed:.2f}s after the kill ({back_s:.2f}s after out); "
          f"{len(load.results)} requests, {resumed:.0f} resumed, longest token gap {gap:.2f}s")
    load.check_all_correct()
    assert resumed >= 1  # streams of the dead decode went on elsewhere
    _wait(lambda: _kv_released(cluster), 20, "KV released")


def test_burst_of_10x_capacity(cluster: Cluster) -> None:
    """2 decodes x batch 8 = 16 streams; 160 arrive at once with a 5 s TTFT budget."""
    _wait(lambda: _all_routable(cluster), 90, "every instance healthy")
    grpc, metrics = cluster.server.options.grpc_url, cluster.server.options.metrics_url
    n, max_tokens = 160, 160
    peak = {"router": 0.0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            m = scrape(metrics)
            peak["router"] = max(peak["router"],
                                 m.get(("pdserve_router_requests_in_flight", "pdserve"), 0.0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        results = generate_many(grpc, [
            {"ids": PROMPTS[i % len(PROMPTS)],
             "sampling": {"max_tokens": max_tokens, "ignore_eos": True}}
            for i in range(n)], timeout_s=120)
    finally:
        stop.set()
        watcher.join(timeout=5)
    # Stream errors carry no request id (generate_many guesses the owner), so
    # count them apart from the served requests, which are matched by id.
    failed = [r for r in results if r.error is not None]
    done = [(i, r) for i, r in enumerate(results) if r.finish_reason]
    print(f"\nburst: {len(done)} served, {len(failed)} UNAVAILABLE; last failure after "
          f"{max((r.error_at - t0 for r in failed), default=0):.2f}s; whole burst "
          f"{max(r.ended_at for r in results) - t0:.2f}s; router peak {peak['router']:.0f}")
    assert failed and done, "a 10x burst must both serve and shed"
    assert len(failed) + len(done) == n
    for r in failed:
        assert "TTFT budget" in (r.error or ""), r.error
        assert (r.error or "").startswith("[UNAVAILABLE] "), r.error  # the kind, in-stream
        assert r.error_at - t0 < 5.0 + 3.0  # ended at its budget, not left to wait
    for i, r in done:
        assert r.finish_reason == "length"
        assert r.ids == cluster.expected(PROMPTS[i % len(PROMPTS)], max_tokens)
    assert peak["router"] <= n
    _wait(lambda: _kv_released(cluster), 20, "KV released after the burst")
    _wait(lambda: scrape(metrics).get(("pdserve_router_requests_in_flight", "pdserve")) == 0,
          10, "router tasks drained")
    after = generate_many(grpc, [{"ids": p, "sampling": {"max_tokens": 8, "ignore_eos": True}}
                                 for p in PROMPTS])
    for p, r in zip(PROMPTS, after, strict=True):
        assert r.error is None and r.ids == cluster.expected(p, 8), r


def test_router_killed_comes_back(cluster: Cluster) -> None:
    """The router's stub dies (one did, in numpy, under E3's load): Triton 2.51 fails
    every client request from then on and never starts it again. The controller's
    router heartbeat fails, it reloads the router, and correct output comes back."""
    _repeat_once_after_upstream_abort(cluster, lambda: _router_kill_round(cluster))


def _router_kill_round(cluster: Cluster) -> None:
    _wait(lambda: _all_routable(cluster), 90, "every instance healthy")
    url = cluster.server.options.grpc_url
    key = (cluster.server.options.http_url, "pdserve")
    # The live router answers the heartbeat (a router that did not would be reloaded
    # over and over, and nothing else here would notice).
    _wait(lambda: cluster.controller.router_health[key].state == "healthy", 30,
          "the router healthy in the controller's view")
    assert TritonProbeClient().probe_router(*key).ok
    generation = Repository(cluster.repo).entry("pdserve").generation
    logged = cluster.log.stat().st_size
    killed = time.monotonic()
    kill_stub(stub_pid(cluster.server, "pdserve"))
    first = generate_many(url, [{"ids": PROMPTS[0], "sampling": {"max_tokens": 2}}])[0]
    assert first.error is not None and "not healthy" in first.error  # what clients see

    def serves() -> bool:
        r = generate_many(url, [{"ids": PROMPTS[0], "sampling": {"max_tokens": 2}}])[0]
        return r.error is None

    back_s = _wait(serves, 90, "the router serving again")
    res = generate_many(url, [
        {"ids": p, "sampling": {"max_tokens": 8, "ignore_eos": True}} for p in PROMPTS])
    for p, r in zip(PROMPTS, res, strict=True):
        assert r.error is None and r.ids == cluster.expected(p, 8), r
    seen = cluster.log.read_bytes()[logged:].decode(errors="replace")
    assert "repository edit reload pdserve: replace failed router" in seen, seen[-2000:]
    assert Repository(cluster.repo).entry("pdserve").generation == generation + 1
    _wait(lambda: cluster.controller.router_health[key].state == "healthy", 30,
          "the reloaded router healthy")
    _wait(lambda: _all_routable(cluster), 30, "every instance routable")
    print(f"\nrouter kill: serving again {time.monotonic() - killed:.2f}s after the kill "
          f"(polled for {back_s:.2f}s)")


def test_whole_server_killed_and_restarted_comes_back(cluster: Cluster) -> None:
    """What ``pdserve serve`` does after Triton's upstream abort: tritonserver is
    SIGKILLed with the controller running, restarted on the same ports (as
    ``launcher.supervise`` does); the controller finds every instance again and
    the server serves correct output."""
    _wait(lambda: _all_routable(cluster), 90, "every instance healthy")
    server = cluster.server
    assert server.process is not None
    old = server.process.pid
    logged = cluster.log.stat().st_size
    server.process.kill()
    server.process.wait(timeout=10)
    assert _server_died() == "tritonserver was killed by SIGKILL"
    t0 = time.monotonic()
    server.restart()
    ready_s = time.monotonic() - t0
    assert server.process is not None and server.process.pid != old
    back_s = _wait(lambda: _all_routable(cluster), 90, "every instance back after the restart")
    res = generate_many(server.options.grpc_url, [
        {"ids": p, "sampling": {"max_tokens": 8, "ignore_eos": True}} for p in PROMPTS])
    for p, r in zip(PROMPTS, res, strict=True):
        assert r.error is None and r.ids == cluster.expected(p, 8), r
    # The controller saw every instance fail and replaced it (not a lucky miss).
    seen = cluster.log.read_bytes()[logged:].decode(errors="replace")
    for name in INSTANCES:
        assert re.search(rf"{name} on \S+: \w+ -> failed", seen), (name, seen[-2000:])
        assert f"repository edit reload {name}: replace failed instance" in seen, name
    print(f"\nserver restart: ready {ready_s:.1f}s after the kill, routable in the "
          f"controller's view {back_s:.1f}s later")


@pytest.mark.slow  # four reloads, one after the other: about a minute
def test_rolling_upgrade_under_load(cluster: Cluster, tmp_path: Path) -> None:
    """Onto tiny with other weights: no request fails; afterwards all serve the new ones."""
    _wait(lambda: _all_routable(cluster), 90, "every instance healthy")
    new_dir = save_tiny(tmp_path / "tiny-v2", seed=1)
    new_engine = LLMEngine.load(str(new_dir))
    max_tokens = 12

    def new_output(prompt: list[int]) -> list[int]:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return generate(new_engine, [prompt], sp)[0]

    options = UpgradeOptions(servers=(cluster.server.options.http_url,),
                             state_path=default_state_path(cluster.repo),
                             drain_timeout_s=30, check_timeout_s=120, poll_interval_s=0.5)
    upgrade = RollingUpgrade(Repository(cluster.repo), TritonProbeClient(timeout_s=5.0), options)
    t0 = time.monotonic()
    with Load(cluster, max_tokens=max_tokens) as load:
        report = upgrade.run(str(new_dir))
    print(f"\nrolling upgrade: {report.upgraded} in {time.monotonic() - t0:.1f}s, "
          f"{len(load.results)} requests")
    assert report.ok, report.error
    assert report.upgraded == ["prefill_0", "decode_0", "prefill_1", "decode_1"]
    failed = [r.error for _, r in load.results if r.error is not None]
    assert not failed, f"{len(failed)} of {len(load.results)} failed: {failed[:3]}"
    for prompt, r in load.results:  # each from one consistent P/D pair, old or new
        assert r.ids in (cluster.expected(prompt, max_tokens), new_output(prompt)), r.ids
    _wait(lambda: _all_routable(cluster), 60, "every instance routable after the upgrade")
    time.sleep(1.5)  # the router's next heartbeats report the new weights
    after = generate_many(cluster.server.options.grpc_url, [
        {"ids": p, "sampling": {"max_tokens": max_tokens, "ignore_eos": True}} for p in PROMPTS])
    for p, r in zip(PROMPTS, after, strict=True):
        assert r.error is None and r.ids == new_output(p), r
    for name in INSTANCES:
        load_ = TritonProbeClient().probe(cluster.server.options.http_url, name).load
        assert load_ is not None and load_.model == str(new_dir)
