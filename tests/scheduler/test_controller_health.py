from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdserve.scheduler.controller.health import HealthPolicy, InstanceHealth, ProbeResult
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.scheduler.instance import InstanceLoad

OK = ProbeResult(ok=True, load=InstanceLoad("prefill_0", "prefill", "default", 4), generation=0)
FAIL = ProbeResult(ok=False, generation=0, error="Stub process 'prefill_0' is not healthy")
SLOW = ProbeResult(ok=False, generation=0, error="heartbeat: timed out", timed_out=True)


def test_two_failed_probes_make_failed_and_the_first_leaves_routing() -> None:
    h = InstanceHealth(HealthPolicy(fail_threshold=2), now=0.0)
    assert h.observe(OK, 0.0) == "healthy" and h.is_routable
    assert h.observe(FAIL, 2.0) == "suspect" and not h.is_routable
    assert h.observe(FAIL, 4.0) == "failed"
    assert h.observe(FAIL, 6.0) == "failed"


def test_probes_that_only_time_out_fail_an_instance_after_the_hang_timeout() -> None:
    """A busy instance answers late: out of routing at once, replaced only once it
    has answered nothing for ``hang_timeout_s``."""
    h = InstanceHealth(HealthPolicy(fail_threshold=2, hang_timeout_s=30), now=0.0,
                       state="healthy")
    assert h.observe(SLOW, 1.0) == "suspect" and not h.is_routable
    assert h.observe(SLOW, 3.0) == "suspect"  # the threshold, but no answer said "dead"
    assert h.observe(SLOW, 30.9) == "suspect"
    assert h.observe(SLOW, 31.0) == "failed"


def test_an_answered_failure_in_a_slow_streak_fails_by_the_threshold() -> None:
    h = InstanceHealth(HealthPolicy(fail_threshold=2, hang_timeout_s=30), now=0.0,
                       state="healthy")
    assert h.observe(SLOW, 1.0) == "suspect"
    assert h.observe(FAIL, 2.0) == "failed"
    h = InstanceHealth(HealthPolicy(fail_threshold=2, hang_timeout_s=30), now=0.0,
                       state="healthy")
    assert h.observe(FAIL, 1.0) == "suspect"
    assert h.observe(SLOW, 2.0) == "failed"


def test_a_good_probe_ends_a_slow_streak() -> None:
    h = InstanceHealth(HealthPolicy(fail_threshold=2, hang_timeout_s=30), now=0.0,
                       state="healthy")
    h.observe(SLOW, 1.0)
    h.observe(SLOW, 20.0)
    assert h.observe(OK, 25.0) == "healthy"
    assert h.observe(SLOW, 40.0) == "suspect"
    assert h.observe(SLOW, 69.0) == "suspect"  # 29 s into the new streak
    assert h.observe(SLOW, 70.0) == "failed"


def test_suspect_recovers_on_one_good_probe() -> None:
    h = InstanceHealth(HealthPolicy(), now=0.0, state="healthy")
    h.observe(FAIL, 1.0)
    assert h.observe(OK, 2.0) == "healthy" and h.failures == 0


def test_replacing_waits_for_the_new_generation() -> None:
    h = InstanceHealth(HealthPolicy(load_timeout_s=10), now=0.0, state="failed")
    h.begin_replacing(generation=1, now=1.0)
    # The old stub (generation 0) is still loaded: not healthy yet.
    assert h.observe(OK, 2.0) == "replacing"
    assert h.observe(FAIL, 3.0) == "replacing"
    new = ProbeResult(ok=True, load=OK.load, generation=1)
    assert h.observe(new, 4.0) == "healthy"


def test_a_replacement_that_never_loads_fails_after_the_timeout() -> None:
    h = InstanceHealth(HealthPolicy(load_timeout_s=10), now=0.0, state="failed")
    h.begin_replacing(generation=1, now=0.0)
    assert h.observe(FAIL, 5.0) == "replacing"
    assert h.observe(FAIL, 11.0) == "failed"


def test_draining_keeps_probing_and_knows_when_idle() -> None:
    h = InstanceHealth(HealthPolicy(), now=0.0, state="healthy")
    h.begin_draining(1.0)
    busy = ProbeResult(ok=True, load=InstanceLoad("d", "decode", "default", 4, in_flight=3))
    assert h.observe(busy, 2.0) == "draining" and not h.is_idle and not h.is_routable
    assert h.observe(OK, 3.0) == "draining" and h.is_idle
    h.end_draining(4.0)
    assert h.state == "healthy"


def test_a_draining_instance_that_dies_is_failed() -> None:
    h = InstanceHealth(HealthPolicy(fail_threshold=2), now=0.0, state="draining")
    h.observe(FAIL, 1.0)
    assert h.observe(FAIL, 2.0) == "failed"


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="fail_threshold"):
        HealthPolicy(fail_threshold=0)
    with pytest.raises(ValueError, match="probe_interval_s"):
        HealthPolicy(probe_interval_s=0)
    with pytest.raises(ValueError, match="hang_timeout_s"):
        HealthPolicy(hang_timeout_s=0)


@contextmanager
def _triton_like(heartbeat: str) -> Iterator[str]:
    """An HTTP server that answers readiness and the config like Triton, and the
    heartbeat as told: ``"hang"`` (answers nothing for 5 s) or ``"error"`` (HTTP 400)."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # ready, config
            body = b"{}" if self.path.endswith("/config") else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # the heartbeat
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if heartbeat == "hang":
                release.wait(5.0)
                return
            self.send_error(400, "Stub process 'prefill_0' is not healthy")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_probe_tells_no_answer_from_an_answered_failure() -> None:
    probe = TritonProbeClient(timeout_s=0.3)
    # No answer: a listening socket nobody accepts on (readiness times out) ...
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.monotonic()
        result = probe.probe(f"127.0.0.1:{silent.getsockname()[1]}", "prefill_0")
    assert not result.ok and result.timed_out, result
    assert time.monotonic() - t0 < 5
    # ... or a heartbeat that never comes back.
    with _triton_like("hang") as server:
        result = probe.probe(server, "prefill_0")
    assert not result.ok and result.timed_out and "heartbeat" in result.error, result
    # Answered failures: the heartbeat's error, a refused connection.
    with _triton_like("error") as server:
        result = probe.probe(server, "prefill_0")
    assert not result.ok and not result.timed_out and "400" in result.error, result
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = probe.probe(f"127.0.0.1:{port}", "prefill_0")
    assert not result.ok and not result.timed_out, result
