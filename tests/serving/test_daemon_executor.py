"""DaemonExecutor: results, errors, abandoned calls counted, threads never block exit."""

from __future__ import annotations

import threading
import time
import weakref

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


class _Held:
    """Stands for a BLS request or response: freed in the stub only while it runs."""


def test_join_frees_each_workers_last_job_before_it_returns() -> None:
    """An idle worker keeps its last job's call and arguments until it exits; join
    waits for that, so a stub that joins at close frees them while its shared
    memory, which their destructors write, is still there (segfault at exit)."""
    pool = DaemonExecutor(1, name="t")
    held = _Held()
    gone = threading.Event()
    weakref.finalize(held, gone.set)
    assert pool.submit(lambda x: type(x).__name__, held).result(timeout=5) == "_Held"
    del held
    pool.shutdown(wait=False)
    assert pool.join(5.0) == 0
    assert gone.is_set(), "a worker still holds its last job's argument after join"


def test_join_waits_for_the_workers_that_can_exit() -> None:
    pool = DaemonExecutor(2, name="t")
    release = threading.Event()
    pool.submit(release.wait)  # blocked as in a call to a dead stub
    assert pool.submit(pow, 2, 3).result(timeout=5) == 8
    pool.shutdown(wait=False)
    started = time.monotonic()
    assert pool.join(0.3) == 1  # the blocked one is still alive after the timeout
    assert time.monotonic() - started < 2.0
    release.set()
    assert pool.join(5.0) == 0
