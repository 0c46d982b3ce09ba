"""What a server takes from the machine goes with it: its process group, the
stubs' IPC regions in /dev/shm, also those of a stub killed with SIGKILL (the
Python backend unlinks a region only when its stub shuts down cleanly), and the
backend's temp dir; and a stub that crashes says where in the server's log."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pdserve.server.launcher import python_env_dirs
from tests.serving.conftest import DiagnosedServer, condense_dump, start_server
from tests.serving.helpers import generate_many, kill_stub, stub_pid

pytestmark = pytest.mark.e2e


def test_stop_leaves_no_process_and_no_shm_region(tmp_path: Path) -> None:
    with start_server("tiny_pd.yaml", tmp_path) as server:
        assert server.process is not None
        group = server.process.pid
        live = server.shm_regions()
        # One region per stub (router, prefill, decode, aggregated), under this
        # server's own prefix: the sweep cannot touch another server's.
        assert len(live) >= 4 and all(p.name.startswith(server.shm_prefix) for p in live)
        doomed = stub_pid(server, "decode_0")
        assert list(Path("/dev/shm").glob(f"pdkv-{doomed}-*"))  # its KV arena
        kill_stub(doomed)
        # Triton restarts the killed stub on the next request: a new region.
        ok = generate_many(server.options.grpc_url, [{"text": "hi", "scenario": "agg",
                                                      "sampling": {"max_tokens": 2}}])
        assert ok[0].error is None
        assert len(server.shm_regions()) >= len(live)
    assert server.shm_regions() == []
    # The killed decode's arena: swept by a restarted stub, or at the latest by stop.
    assert not list(Path("/dev/shm").glob(f"pdkv-{doomed}-*"))
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_a_stub_that_crashes_leaves_its_python_stacks_in_the_log(tmp_path: Path) -> None:
    """A segfault in a stub (the router's died once in numpy under load) is a
    kernel log line otherwise; the server's log must say where each thread was.
    (A dead router comes back by the controller: test_failover.)"""
    with start_server("tiny_pd.yaml", tmp_path) as server:
        log = server.options.log_file
        assert log is not None
        os.kill(stub_pid(server, "pdserve"), signal.SIGSEGV)
        deadline = time.monotonic() + 30
        while "Fatal Python error: Segmentation fault" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "no faulthandler dump in the server log"
            time.sleep(0.1)
        text = log.read_text(errors="replace")
        dump = text[text.index("Fatal Python error: Segmentation fault"):]
        # Every thread's stack: the asyncio loop's and the pool's, not only the main one.
        assert dump.count("(most recent call first)") >= 2, dump[:2000]


def test_each_stubs_threads_are_dumped_on_request_and_it_serves_on(tmp_path: Path) -> None:
    """SIGUSR1 makes a stub write its threads to the log and go on: what a hung
    server was waiting on, asked before it is stopped (``DiagnosedServer`` does
    it when a test fails inside it)."""
    with start_server("tiny_pd.yaml", tmp_path) as server:
        stubs = server.stubs()
        assert set(stubs) == set(server.model_names())
        dumps = server.dump_stacks()
        assert set(dumps) == set(stubs)
        for model, dump in dumps.items():
            # the stub's own thread and pdserve's (metrics, the role's) with frames
            assert dump.count("(most recent call first)") >= 2, (model, dump[:2000])
            assert "/pdserve/roles/" in dump, (model, dump[:2000])
        condensed = condense_dump(dumps["pdserve"])
        assert all(len(line) < 200 for line in condensed.splitlines()), condensed
        assert server.stubs() == stubs  # none died of the signal
        ok = generate_many(server.options.grpc_url, [{"text": "hi", "sampling": {"max_tokens": 2}}])
        assert ok[0].error is None


def test_a_test_failing_inside_the_server_prints_each_stubs_threads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server("tiny_pd.yaml", tmp_path)
    assert isinstance(server, DiagnosedServer)
    with pytest.raises(TimeoutError), server:
        raise TimeoutError("a stuck request")
    err = capsys.readouterr().err
    assert "tritonserver itself" not in err
    for model in ("pdserve", "prefill_0", "decode_0"):
        assert f"--- {model}: threads at the failure ---" in err, err[:3000]
    assert err.count("(most recent call first)") >= 6, err[:3000]
    tail = err[err.index("--- the server log's last lines ---"):]
    assert "successfully loaded" in tail, tail  # the log's own lines, not the dumps
    assert "(most recent call first)" not in tail, tail
    assert server.process is None  # stopped after the diagnosis

    # A server that died (a segfault in tritonserver, say) says so first.
    server = start_server("tiny_pd.yaml", tmp_path / "dead")
    with pytest.raises(TimeoutError), server:
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        raise TimeoutError("no response for 120 s")
    err = capsys.readouterr().err
    assert "--- tritonserver itself was killed by SIGKILL ---" in err, err[:2000]
    assert server.process is None


def test_a_stop_while_requests_are_served_crashes_nothing(tmp_path: Path) -> None:
    """Stopped in the middle of a burst, tritonserver waits for the requests in
    flight and then unloads every model at once. A router heartbeat still out
    then never returned and tritonserver died in the router's finalize (SIGSEGV,
    9 of 10 such stops). The launcher now has the routers end their heartbeats
    first (``server_stopping``)."""
    stop = threading.Event()
    with start_server("tiny_ratio.yaml", tmp_path) as server:
        generate_many(server.options.grpc_url, [{"text": "hi", "sampling": {"max_tokens": 2}}])
        burst = [{"ids": [3 + j for j in range(64)],
                  "sampling": {"max_tokens": 32, "ignore_eos": True}}] * 48
        sender = threading.Thread(target=generate_many, args=(server.options.grpc_url, burst),
                                  kwargs={"stop": stop, "timeout_s": 30}, daemon=True)
        sender.start()
        time.sleep(1.5)  # the router is taking the burst in, heartbeats going on
    stop.set()
    sender.join(timeout=30)
    log = (tmp_path / "tritonserver.log").read_text(errors="replace")
    assert "BLS threads still blocked" not in log
    assert "Signal (11)" not in log, log[log.index("Signal (11)"):][:1500]


def test_a_clean_stop_crashes_no_stub(tmp_path: Path) -> None:
    """No stub crashes at a clean stop. Two crashes did:
    - every stub that had loaded the engine, in the interpreter's last garbage
      collection ("Garbage-collecting"; ``finalize`` now collects and freezes);
    - the router's, in about half the stops on a 2-core machine: a BLS worker told to
      stop exited after the stub had unmapped its shared memory, freeing its last
      job's request or response iterator there (the router now joins its workers
      at close: DaemonExecutor.join).
    Two stops, since the second crash came at random."""
    for round_ in range(2):
        with start_server("tiny_pd.yaml", tmp_path / f"stop{round_}") as server:
            ok = generate_many(server.options.grpc_url, [{"text": "hi", "scenario": s,
                                                          "sampling": {"max_tokens": 2}}
                                                         for s in ("default", "agg")] * 2)
            assert [r.error for r in ok] == [None] * 4
            log = server.options.log_file
            assert log is not None
        text = log.read_text(errors="replace")
        assert "successfully unloaded 'decode_0'" in text  # it did shut down, cleanly
        assert "Fatal Python error" not in text, text[text.find("Fatal Python error"):][:1500]


def test_a_killed_server_leaves_no_python_env_dir(tmp_path: Path) -> None:
    """The Python backend's /tmp/python_env_XXXXXX goes only with a clean shutdown:
    after a SIGKILLed tritonserver, ``stop`` removes its server's one."""
    before = python_env_dirs()
    with start_server("tiny_pd.yaml", tmp_path) as server:
        assert server.process is not None
        mine = server.python_env_dir
        assert mine is not None and mine.is_dir() and mine not in before
        server.process.kill()
        server.process.wait(timeout=10)
        assert mine.is_dir()  # what a dead server leaves
    assert not mine.exists()
    assert python_env_dirs() - before == set()
