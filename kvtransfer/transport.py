"""The transport interface: what a decode instance and a prefill instance call.

Two sides, like vLLM's KV connector (scheduler side / worker side), here
receiver (decode instance, owns the arena) and sender (prefill instance, owns
its local KV). Every transport ("shm", "tcp", "mooncake") implements both.

KVReceiver -- called on the DECODE instance
    reserve(request_id, prompt_tokens, max_new_tokens, ttl_s) -> KVHandle
        Allocate one extent (prompt + generation region) in the arena and
        describe it. The router ships ``handle.to_bytes()`` to a prefill
        instance. If the transfer does not land within ``ttl_s`` (or the
        landed extent is not claimed within another ``ttl_s``) the extent is
        freed, so a dead router or prefill instance cannot leak KV.
    on_landed: (request_id, notice) -> bool, or None
        Set by the owner: called on the receiving thread right after a
        transfer that came with a ``notice`` landed (verified), before the
        sender hears DONE. True means the owner took the request over (it
        claimed the extent); False leaves it reserved for ``wait``/``claim``.
        The answer travels back to the sender as ``TransferResult.taken``.
    wait(request_id, timeout_s) -> TransferResult
        Block until the prompt KV has landed, length- and checksum-verified.
        Raises ``TransferError`` on failure, expiry, or if nothing lands within
        ``timeout_s`` (the reservation is then failed and its extent freed).
    claim(request_id) -> Extent
        After ``wait`` succeeded: ownership of the extent moves to the caller
        (the decode engine), which frees it with ``arena.free`` when the
        sequence ends.
    cancel(request_id) -> bool
        Give the reservation up at any stage before ``claim``; frees the extent
        (deferred until an in-flight writer has been stopped). Idempotent.
    close()
        Stop serving; fail every open reservation and free its extent.

KVSender -- called on the PREFILL instance
    begin(handle, mode) -> SendStream
        Check the handle against this model's fingerprint and layout, connect
        (pooled, authenticated) and send BEGIN without waiting for the answer.
        The receiver's refusal (expired, cancelled, other model) surfaces as
        ``TransferError`` at the first write (shm, mooncake: they wait for
        GRANT before writing) or at ``finish`` (tcp).
    send(handle, kv, mode, notice=None) -> TransferResult
        ``begin`` + ``send_all(kv)`` + ``finish(notice)``: the whole prompt at once.
    close()
        Close pooled connections and transport resources.

SendStream -- returned by ``begin``, PREFILL instance
    send_layer(layer, kv_layer)   kv_layer [2, Tp, Hkv, D]; layers in order 0..L-1,
                                  each sent as soon as it exists (overlaps prefill)
    send_all(kv)                  kv [L, 2, Tp, Hkv, D]
    finish(notice=None) -> TransferResult
                                  completion notice + checksum; returns once
                                  the receiver verified the bytes. ``notice``
                                  (a short string) goes with it to the
                                  receiver's ``on_landed`` hook; the result's
                                  ``taken`` says whether the hook took the
                                  request over (the decode started it)
    (``BackgroundStream`` wraps a stream so that ``send_layer`` returns at once
    and a worker thread writes while the engine computes the next layer.)
    abort(reason)                 tell the receiver to drop the transfer

Modes: "whole" (one region, one write: ``layout.prompt_span``), "layerwise"
(one write per layer: ``layout.layer_span``), "block_fixed" (baseline only:
pages of ``page_tokens`` tokens per layer for K and V, one message and one
confirmation each).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from pdserve.kvtransfer.arena import Arena, Extent
from pdserve.kvtransfer.handle import KVHandle

TransferMode = Literal["whole", "layerwise", "block_fixed"]
MODES: tuple[TransferMode, ...] = ("whole", "layerwise", "block_fixed")
DEFAULT_TTL_S = 30.0


@dataclass(frozen=True)
class TransferResult:
    """What both sides learn when a transfer has landed and been verified."""

    request_id: str
    nbytes: int
    mode: str
    num_messages: int  # data writes/messages the sender issued
    checksum: int | None  # None when checksums are off
    elapsed_s: float  # BEGIN received (receiver) / begin() called (sender) to verified
    taken: bool = False  # sender side: the receiver's on_landed hook took the request


class KVReceiver(abc.ABC):
    """Decode side. See the module docstring for who calls what."""

    transport: str
    arena: Arena
    on_landed: Callable[[str, str], bool] | None = None

    @abc.abstractmethod
    def reserve(self, request_id: str, prompt_tokens: int, max_new_tokens: int,
                ttl_s: float = DEFAULT_TTL_S) -> KVHandle: ...

    @abc.abstractmethod
    def wait(self, request_id: str, timeout_s: float) -> TransferResult: ...

    @abc.abstractmethod
    def claim(self, request_id: str) -> Extent: ...

    @abc.abstractmethod
    def cancel(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SendStream(abc.ABC):
    """One transfer in progress on the prefill side."""

    @abc.abstractmethod
    def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def send_all(self, kv: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def finish(self, notice: str | None = None) -> TransferResult: ...

    @abc.abstractmethod
    def abort(self, reason: str = "aborted by sender") -> None: ...

    def __enter__(self) -> SendStream:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort(f"sender failed: {exc}")


class KVSender(abc.ABC):
    """Prefill side. See the module docstring for who calls what."""

    transport: str

    @abc.abstractmethod
    def begin(self, handle: KVHandle, mode: TransferMode = "layerwise") -> SendStream: ...

    def send(self, handle: KVHandle, kv: torch.Tensor, mode: TransferMode = "whole",
             notice: str | None = None) -> TransferResult:
        with self.begin(handle, mode) as stream:
            stream.send_all(kv)
            return stream.finish(notice)

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
