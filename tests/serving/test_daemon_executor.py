"""DaemonExecutor: results, errors, abandoned calls counted, threads never block exit."""

from __future__ import annotations

import threading
import time

import pytest

from pdserve.roles.daemon_executor import DaemonExecutor


def test_results_errors_and_reuse() -> None:
    pool = DaemonExecutor(4, name="t")
    assert [pool.submit(pow, 2, i).result(timeout=5) for i in range(20)] == [
        2**i for i in range(20)]
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 // 0).result(timeout=5)
    assert len(pool._threads) <= 2  # sequential calls reuse an idle thread
    pool.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        pool.submit(pow, 2, 2)


def test_stuck_call_is_abandoned_and_a_daemon() -> None:
    pool = DaemonExecutor(2, name="t")
    release = threading.Event()
    stuck = pool.submit(release.wait)
    assert pool.submit(pow, 3, 2).result(timeout=5) == 9  # others still run
    pool.abandon(stuck)  # maybe before a worker took it: counted once it runs
    deadline = time.monotonic() + 5
    while not stuck.running() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pool.num_abandoned == 1
    assert all(t.daemon for t in pool._threads)
    release.set()  # the call returns after all: no longer counted
    assert stuck.result(timeout=5) is True
    assert pool.num_abandoned == 0
    pool.shutdown(wait=True)
    assert not any(t.is_alive() for t in pool._threads)
