"""An Executor of daemon threads, for blocking calls that may never return.

The router iterates BLS response iterators on threads (they are synchronous).
When the called stub dies mid-call, ``next(iterator)`` never returns and
Triton 2.51 offers no way to cancel it. ``ThreadPoolExecutor`` threads are
joined at interpreter exit, so one such thread kept the router's stub from
exiting. Here threads are daemons, and a call the caller gave up on is
counted in ``num_abandoned`` (``abandon``) so the leak is visible, not silent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


class DaemonExecutor(Executor):
    def __init__(self, max_workers: int, name: str = "daemon") -> None:
        if max_workers <= 0:
            raise ValueError(f"max_workers must be positive, got {max_workers}")
        self.max_workers = max_workers
        self.name = name
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._busy: set[Future[Any]] = set()
        self._abandoned: set[Future[Any]] = set()
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"{self.name} executor is shut down")
            self._work.put((future, fn, args, kwargs))
            if self._idle == 0 and len(self._threads) < self.max_workers:
                t = threading.Thread(target=self._worker, daemon=True,
                                     name=f"{self.name}-{len(self._threads)}")
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1 if self._idle else 0
        return future

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            with self._lock:  # running <=> busy, as num_abandoned sees them
                running = future.set_running_or_notify_cancel()
                if running:
                    self._busy.add(future)
                else:
                    self._abandoned.discard(future)
            if not running:
                self._mark_idle()
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._busy.discard(future)
                    self._abandoned.discard(future)
            self._mark_idle()

    def _mark_idle(self) -> None:
        with self._lock:
            self._idle += 1

    def abandon(self, future: Future[Any]) -> None:
        """The caller stopped waiting for ``future`` (its thread may be stuck for good)."""
        # Also when a worker took it from the queue but has not marked it busy yet:
        # it counts once it runs (num_abandoned), and is forgotten when it ends.
        with self._lock:
            if not future.done():
                self._abandoned.add(future)

    @property
    def num_abandoned(self) -> int:
        """Threads still blocked in a call nobody waits for."""
        with self._lock:
            return len(self._abandoned & self._busy)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[0].cancel()
        for _ in threads:
            self._work.put(_STOP)
        if wait:
            for t in threads:
                t.join()

    def join(self, timeout_s: float) -> int:
        """After ``shutdown(wait=False)``: wait up to ``timeout_s`` in all for the
        workers to exit (one blocked in a call that never returns does not);
        returns how many are still alive.

        A worker keeps its last job's call and arguments (a BLS request, its
        response iterator) until it takes the next job or exits. One that exits
        after its stub unmapped the shared memory frees them there and segfaults
        (their destructors lock a mutex in it), so a stub joins its workers
        before it finishes. (Dropping them at the end of each job instead moves
        those destructors to whichever thread lets go last, the router's event
        loop included, where an unfinished iterator's waits for its call's end.)"""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in threads)
