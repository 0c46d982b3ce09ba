"""Mooncake transport: KV written by the Mooncake Transfer Engine (RDMA or TCP).

The decode instance registers its whole arena buffer with a TransferEngine
(P2P handshake, no metadata server) and publishes the engine's session id
(``host:rpc_port``) and the buffer's address in each handle. The prefill
instance writes its KV one-sided with ``transfer_sync_write`` into
``remote_base + offset``. Completion (NOTE per span, END with the checksum)
goes over the same authenticated control connection as the other transports,
so the decode side never attends over bytes that were not verified.

Needs ``mooncake-transfer-engine-non-cuda`` and Debian's ``libibverbs1`` even
for the TCP protocol (``scripts/install_system_deps.sh``). ``register_buffer``
pins a long-lived source buffer (the prefill engine's KV cache) once; other
source tensors are registered for the duration of one write when the
protocol is RDMA (the TCP protocol reads unregistered memory).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from pdserve.errors import TransferError, Unavailable
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.arena import Arena
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.receiver import ControlReceiver
from pdserve.kvtransfer.sender import ControlSender, ControlStream


def new_engine(host: str, protocol: str) -> Any:
    """An initialised TransferEngine in P2P-handshake mode, bound to ``host``."""
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise Unavailable(
            f"Mooncake Transfer Engine unavailable ({exc}); install "
            "mooncake-transfer-engine-non-cuda and libibverbs1 (scripts/install_system_deps.sh)"
        ) from None
    engine = TransferEngine()
    if engine.initialize(host, "P2PHANDSHAKE", protocol, "") != 0:
        raise TransferError(f"Mooncake TransferEngine.initialize({host!r}, {protocol!r}) failed")
    return engine


class MooncakeReceiver(ControlReceiver):
    """Decode side: the arena buffer is registered with a TransferEngine."""

    transport = "mooncake"
    data_frame = wire.NOTE

    def __init__(self, arena: Arena, layout: KVLayout, model_fingerprint: str,
                 config: TransferConfig, instance: str = "decode") -> None:
        self._engine = new_engine(config.public_host, config.mooncake_protocol)
        self._base = arena.buffer.data_ptr()
        if self._engine.register_memory(self._base, arena.buffer.numel()) != 0:
            raise TransferError("Mooncake could not register the KV arena buffer")
        self._session = f"{config.public_host}:{self._engine.get_rpc_port()}"
        try:
            super().__init__(arena, layout, model_fingerprint, config, instance)
        except BaseException:
            self._release_transport()
            raise

    @property
    def data_endpoint(self) -> str:
        return self._session

    @property
    def remote_base(self) -> int:
        return self._base

    def _release_transport(self) -> None:
        if self._engine is not None:
            self._engine.unregister_memory(self._base)
            self._engine = None


class MooncakeSender(ControlSender):
    """Prefill side: ``transfer_sync_write`` per span, then NOTE on the control channel."""

    transport = "mooncake"
    one_sided = True

    def __init__(self, layout: KVLayout, model_fingerprint: str, config: TransferConfig,
                 host: str = "127.0.0.1") -> None:
        super().__init__(layout, model_fingerprint, config)
        self._host = host
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        self._registered: list[tuple[int, int]] = []  # (address, nbytes) pinned for good

    def register_buffer(self, tensor: torch.Tensor) -> None:
        """Pin a long-lived source buffer (e.g. the engine's KV cache) once."""
        engine = self._get_engine()
        addr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        if engine.register_memory(addr, nbytes) != 0:
            raise TransferError("Mooncake could not register the source buffer")
        self._registered.append((addr, nbytes))

    def _get_engine(self) -> Any:
        with self._engine_lock:
            if self._engine is None:
                self._engine = new_engine(self._host, self.config.mooncake_protocol)
            return self._engine

    def _put(self, stream: ControlStream, offset: int, flat: torch.Tensor, ack: bool) -> None:
        engine, handle = self._get_engine(), stream.handle
        addr, nbytes = flat.data_ptr(), flat.numel()
        rdma = self.config.mooncake_protocol == "rdma"
        temporary = rdma and not self._is_registered(addr, nbytes)
        if temporary and engine.register_memory(addr, nbytes) != 0:
            raise TransferError("Mooncake could not register the source KV")
        try:
            rc = engine.transfer_sync_write(handle.data_endpoint, addr,
                                            handle.remote_base + offset, nbytes)
        finally:
            if temporary:
                engine.unregister_memory(addr)
        if rc != 0:
            raise TransferError(f"Mooncake write of {nbytes} bytes to {handle.data_endpoint} "
                                f"failed (rc={rc})")
        stream.hasher.update(wire.as_memoryview(flat))  # the engine moved it: one more pass
        stream.conn.send_frame(wire.NOTE, offset=offset, meta={"nbytes": nbytes},
                               flags=wire.FLAG_ACK if ack else 0)
        if ack:
            stream.conn.expect(wire.ACK)

    def _is_registered(self, addr: int, nbytes: int) -> bool:
        return any(a <= addr and addr + nbytes <= a + n for a, n in self._registered)

    def _release_transport(self) -> None:
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            for addr, _ in self._registered:
                engine.unregister_memory(addr)
        self._registered.clear()
