"""A send stream whose writes run on a worker thread, so prefill keeps computing.

The engine calls ``on_layer_done(layer)`` between layers of its forward pass.
Sending the layer inline (copy + hash + control frame) stalls the next layer
for as long as the write takes; ``BackgroundStream.send_layer`` only queues
the layer and returns, and one worker thread feeds the queued layers, in
order, to the wrapped stream while the next layers compute:

    engine thread:   [layer 0][layer 1][layer 2] ... [layer L-1] finish() waits
    worker thread:            [send 0] [send 1]  ...            [send L-1] END/DONE

Contract (the caller's side of it): a queued ``kv_layer`` is read later, so
its memory (the engine's KV extent) must stay allocated and unchanged until
``finish()`` or ``abort()`` returns. A write that fails is reported by the
next ``send_layer``/``finish`` call; later layers are then dropped.

Overlap needs a free core. The worker's heavy steps (torch ``copy_``, the
kernel's socket copy, xxhash over large buffers) release the GIL, so the
engine's Python keeps running; on a saturated 2-core box the worker can still
fall behind and leave a tail of a few layers for ``finish`` (perf/RESULTS.md).
"""

from __future__ import annotations

import queue
import threading

import torch

from pdserve.errors import TransferError
from pdserve.kvtransfer.transport import SendStream, TransferResult

_Item = tuple[int, torch.Tensor] | None


class BackgroundStream(SendStream):
    """Wraps a layer-wise ``SendStream``; not thread-safe itself (one caller thread)."""

    def __init__(self, inner: SendStream, name: str = "stream") -> None:
        self.inner = inner
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{name}", daemon=True)
        self._thread.start()

    def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        """Queue ``kv_layer`` [2, Tp, Hkv, D]; returns at once (see the contract above)."""
        self._check_usable()
        self._queue.put((layer, kv_layer))

    def send_all(self, kv: torch.Tensor) -> None:
        """kv [L, 2, Tp, Hkv, D], queued layer by layer."""
        for layer in range(kv.shape[0]):
            self.send_layer(layer, kv[layer])

    def finish(self, notice: str | None = None) -> TransferResult:
        """Wait for every queued layer, then complete the transfer (END -> DONE)."""
        self._check_usable()
        self._stop_worker()
        if self._error is not None:
            self.inner.abort(f"sender failed: {self._error}")
            raise self._error
        return self.inner.finish(notice)

    def abort(self, reason: str = "aborted by sender") -> None:
        if self._closed:
            return
        self._stopping = True  # the worker drops what is still queued
        self._stop_worker()
        self.inner.abort(reason)

    # -- internals ---------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise TransferError("background stream is closed")
        if self._error is not None:
            error = self._error
            self.abort(f"sender failed: {error}")
            raise error

    def _stop_worker(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None or self._stopping:
                continue  # failed or aborted: drop the rest
            try:
                self.inner.send_layer(*item)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
