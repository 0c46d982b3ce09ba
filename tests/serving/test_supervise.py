"""``pdserve serve`` restarts a tritonserver that exits on its own.

The loop is tested with a fake server and a fake clock (every branch: restart,
back-off, a failed restart, the restart budget, stopping while waiting); the
real thing is tested on a real server whose tritonserver is SIGKILLed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pdserve.errors import Unavailable
from pdserve.server.launcher import (
    RestartPolicy,
    ServerOptions,
    describe_exit,
    free_port,
    supervise,
)
from pdserve.server.repo import build
from tests.serving.conftest import SPECS
from tests.serving.helpers import Result, generate_many


class _Proc:
    def __init__(self, exit_after_polls: int | None, code: int) -> None:
        self.left, self.code = exit_after_polls, code
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.left is not None:
            if self.left <= 0:
                self.returncode = self.code
            self.left -= 1
        return self.returncode


@dataclass
class _Server:
    """Each (re)start's process exits after the given polls (None: runs on)."""

    lives: list[tuple[int | None, int]]
    fail_restarts: int = 0
    restarts: int = 0
    options: ServerOptions = field(default_factory=lambda: ServerOptions(repository=Path(".")))
    process: _Proc | None = None
    # What each router check answers, in turn (then: every router alive).
    routers: list[str | None] = field(default_factory=list)
    checks: int = 0
    stops: int = 0

    def __post_init__(self) -> None:
        self.process = _Proc(*self.lives.pop(0))

    def dead_router(self) -> str | None:
        self.checks += 1
        return self.routers.pop(0) if self.routers else None

    def stop(self, timeout_s: float = 20.0) -> None:
        self.stops += 1
        self.process = None

    def restart(self, should_stop: object = None) -> None:
        self.restarts += 1
        if self.fail_restarts:
            self.fail_restarts -= 1
            self.process = None
            raise Unavailable("tritonserver exited with code 1")
        self.process = _Proc(*self.lives.pop(0)) if self.lives else _Proc(None, 0)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt
        self.slept.append(dt)


def _run(server: _Server, policy: RestartPolicy, stop_at: float = 1e9) -> tuple[int, list[str]]:
    clock = _Clock()
    said: list[str] = []
    rc = supervise(server, lambda: clock.t >= stop_at, policy,
                   clock=clock, sleep=clock.sleep, say=said.append)
    return rc, said


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(-signal.SIGABRT) == "was killed by SIGABRT"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(None) == "is not running"


def test_a_crashed_server_is_restarted_with_doubling_back_off() -> None:
    server = _Server([(2, -6), (2, -6), (None, 0)])
    rc, said = _run(server, RestartPolicy(max_restarts=5, backoff_s=1.0), stop_at=100.0)
    assert rc == 0 and server.restarts == 2
    assert said[0] == ("tritonserver was killed by SIGABRT; restarting in 1.0 s "
                       "(restart 1 of at most 5 in 600 s)")
    assert said[1].startswith("ready again")
    assert "restarting in 2.0 s (restart 2 of at most 5" in said[2]


def test_gives_up_after_max_restarts_within_the_window() -> None:
    server = _Server([(0, 1)] * 10)
    rc, said = _run(server, RestartPolicy(max_restarts=3, window_s=600.0))
    assert rc == 1 and server.restarts == 3
    assert said[-1] == ("tritonserver exited with code 1; 3 restarts in the last 600 s "
                        "already: giving up")


def test_restarts_older_than_the_window_do_not_count() -> None:
    # exits every ~40 s of fake time (80 polls of 0.5 s): with a 30 s window
    # only the latest restart counts, so a budget of 1 is never used up
    server = _Server([(80, -9)] * 6)
    rc, said = _run(server, RestartPolicy(max_restarts=1, window_s=30.0, backoff_s=1.0),
                    stop_at=230.0)
    assert rc == 0 and server.restarts == 5
    assert all("restarting in 1.0 s" in m for m in said if "restarting" in m)


def test_never_restarts_with_a_budget_of_zero() -> None:
    server = _Server([(0, -11)])
    rc, said = _run(server, RestartPolicy(max_restarts=0))
    assert rc == 1 and server.restarts == 0
    assert "was killed by SIGSEGV" in said[0] and "giving up" in said[0]


def test_a_failed_restart_is_retried_within_the_budget() -> None:
    server = _Server([(0, -6), (None, 0)], fail_restarts=1)
    rc, said = _run(server, RestartPolicy(max_restarts=3), stop_at=60.0)
    assert rc == 0 and server.restarts == 2
    assert said[1] == "restart failed: tritonserver exited with code 1"
    assert "tritonserver is not running; restarting in 2.0 s" in said[2]


def test_stopping_during_the_back_off_returns_without_restarting() -> None:
    server = _Server([(0, -6)])
    rc, said = _run(server, RestartPolicy(backoff_s=10.0), stop_at=3.0)
    assert rc == 0 and server.restarts == 0
    assert "restarting in 10.0 s" in said[0]


DEAD = "pdserve: heartbeat: HTTP 400: Stub process 'pdserve_0_0' is not healthy."


def test_a_dead_router_takes_the_server_down_and_up_again() -> None:
    """Two checks in a row find the router's stub dead: the server is stopped at
    once (its client streams would hang for ever) and restarted like a crash."""
    server = _Server([(None, 0), (None, 0)], routers=[None, DEAD, None, DEAD, DEAD])
    rc, said = _run(server, RestartPolicy(router_check_s=1.0, backoff_s=1.0), stop_at=30.0)
    assert rc == 0 and server.stops == 1 and server.restarts == 1
    assert said[0] == f"router {DEAD}: stopping tritonserver (the streams it was serving " \
                      "would never end)"
    assert said[1] == (f"router {DEAD}; restarting in 1.0 s (restart 1 of at most 5 in 600 s)")
    assert said[2].startswith("ready again")
    assert len(said) == 3  # the restarted server's routers all answer


def test_one_failed_router_check_is_not_enough_and_zero_turns_checks_off() -> None:
    server = _Server([(None, 0)], routers=[DEAD, None, DEAD, None, DEAD])
    rc, said = _run(server, RestartPolicy(router_check_s=1.0), stop_at=20.0)
    assert rc == 0 and server.stops == 0 and server.restarts == 0 and said == []
    assert server.checks >= 10  # about one a second
    server = _Server([(None, 0)], routers=[DEAD] * 100)
    rc, said = _run(server, RestartPolicy(router_check_s=0.0), stop_at=20.0)
    assert rc == 0 and server.checks == 0 and server.stops == 0


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError):
        RestartPolicy(window_s=0)
    with pytest.raises(ValueError):
        RestartPolicy(backoff_s=5, max_backoff_s=1)
    with pytest.raises(ValueError):
        RestartPolicy(router_check_s=-1)
    with pytest.raises(ValueError):
        RestartPolicy(router_strikes=0)
    assert RestartPolicy(backoff_s=1, max_backoff_s=8).delay_s(10) == 8


# -- the real thing ------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(x) for x in out.split()]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str], dict[str, int]]]:
    """``pdserve serve`` on a tiny P/D repository; always stopped (its own
    ``finally`` stops tritonserver's whole group)."""
    repo = tmp_path / "repo"
    build(SPECS / "tiny_pd.yaml", repo, force=True)
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "serve", "--repository", str(repo),
         "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
         "--metrics-port", str(ports["metrics"]), "--ready-timeout", "180",
         "--max-restarts", "2", "--poll-secs", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield proc, lines, ports
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        reader.join(timeout=10)


def _wait_line(lines: list[str], pattern: str, timeout_s: float, after: int = 0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for i in range(after, len(lines)):
            if re.search(pattern, lines[i]):
                return i
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in {timeout_s}s:\n"
                         + "\n".join(lines[-40:]))


@pytest.mark.e2e
def test_serve_restarts_a_killed_tritonserver_and_serves_again(
        serve: tuple[subprocess.Popen[str], list[str], dict[str, int]]) -> None:
    proc, lines, ports = serve
    ready = _wait_line(lines, r"^pdserve ready: ", 180)
    grpc = f"127.0.0.1:{ports['grpc']}"
    req = [{"text": "hello", "sampling": {"max_tokens": 4, "ignore_eos": True}}]
    first = generate_many(grpc, req)
    assert first[0].error is None, first[0].error
    (triton,) = [p for p in _children(proc.pid)]
    stubs = _children(triton)
    assert stubs and any(Path("/dev/shm").glob(f"pdkv-{pid}-*") for pid in stubs)  # KV arenas
    os.kill(triton, signal.SIGKILL)  # what the upstream abort looks like from outside
    _wait_line(lines, r"tritonserver was killed by SIGKILL; restarting in 1\.0 s", 30, ready)
    _wait_line(lines, r"ready again: HTTP", 180, ready)
    (again,) = _children(proc.pid)
    assert again != triton
    stubs += _children(again)
    second = generate_many(grpc, req)
    assert second[0].error is None, second[0].error
    assert second[0].ids == first[0].ids  # same weights, greedy
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(again, 0)  # the restarted server's group went with it
    # Nothing of either server left in /dev/shm: no stub IPC region (prefix named
    # after the serve process) and no KV arena of any stub, killed or stopped.
    assert not list(Path("/dev/shm").glob(f"pdserve_{proc.pid}_*"))
    assert not [pid for pid in stubs if list(Path("/dev/shm").glob(f"pdkv-{pid}-*"))]


@pytest.mark.e2e
def test_serve_ends_the_streams_of_a_dead_router_and_serves_again(
        serve: tuple[subprocess.Popen[str], list[str], dict[str, int]]) -> None:
    """The router's stub dies with streams in flight. Triton 2.51 would leave them
    waiting for ever (and never start the stub again); ``pdserve serve`` sees the
    dead router, restarts the server, and every stream ends with an error.

    A stub's SIGKILL can also make tritonserver abort by itself (the upstream
    ``lock_exception``; a CI run saw the server restarted without the router line):
    then the restart was not ours, and the round is repeated once."""
    proc, lines, ports = serve
    after = _wait_line(lines, r"^pdserve ready: ", 180)
    for attempt in (1, 2):
        why = lines[_router_kill_round(proc, lines, ports, after)]
        after = _wait_line(lines, r"ready again: HTTP", 180, after)
        if "stopping tritonserver" in why:
            break
        assert attempt == 1, f"tritonserver died by itself twice: {why}"
        print(f"\nround {attempt}: {why}; repeating it once")
    again = generate_many(f"127.0.0.1:{ports['grpc']}",
                          [{"text": "hello", "sampling": {"max_tokens": 4}}])
    assert again[0].error is None, again[0].error


def _router_kill_round(proc: subprocess.Popen[str], lines: list[str], ports: dict[str, int],
                       after: int) -> int:
    """Kill the router under 4 long streams; the line that says why the server went
    down (our router check, or tritonserver dying by itself)."""
    grpc = f"127.0.0.1:{ports['grpc']}"
    (triton,) = _children(proc.pid)
    router = next(pid for pid in _children(triton)
                  if b"pdserve_0_0" in Path(f"/proc/{pid}/cmdline").read_bytes())
    results: list[Result] = []
    began = time.monotonic()

    def long_stream() -> None:  # one stream each, as separate clients
        results.extend(generate_many(grpc, [
            {"ids": list(range(5, 30)), "sampling": {"max_tokens": 990, "ignore_eos": True}}
        ], timeout_s=60))

    threads = [threading.Thread(target=long_stream, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the streams are under way (990 tokens: several seconds)
    os.kill(router, signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "streams hung:\n" + "\n".join(lines[-30:])
    ended_s = time.monotonic() - killed
    assert len(results) == 4
    assert all(r.error is not None for r in results), [r.error for r in results]
    assert not any(r.finish_reason for r in results)  # cut short, not finished
    assert all(r.ids for r in results)  # ... after they had begun (tokens came)
    assert killed - began < 5  # the kill came while they ran
    assert ended_s < 30  # ended by the restart, not by the client giving up (60 s)
    why = _wait_line(lines, r"router pdserve: .*is not healthy.*: stopping tritonserver"
                     r"|tritonserver (was killed by|exited with)", 30, after)
    print(f"\ndead router: its streams ended {ended_s:.1f}s after the kill")
    return why
