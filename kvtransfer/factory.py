"""Factories the serving roles use: one call per side, the transport by name.

    decode instance:   receiver = make_receiver("shm", arena, layout, fingerprint, config)
    prefill instance:  sender = make_sender("shm", layout, fingerprint, config)

``kind`` is "shm" (same host; the arena must be a ``ShmArena``), "tcp" (any
host) or "mooncake" (Mooncake Transfer Engine). ``model_fingerprint`` names the
exact model (``model_fingerprint()`` below builds one); handles and transfers
between instances with different fingerprints or layouts are refused.
"""

from __future__ import annotations

import hashlib

from pdserve.errors import InvalidArgument
from pdserve.kvtransfer.arena import Arena
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.mooncake import MooncakeReceiver, MooncakeSender
from pdserve.kvtransfer.receiver import ControlReceiver
from pdserve.kvtransfer.sender import ControlSender
from pdserve.kvtransfer.shm import ShmReceiver, ShmSender
from pdserve.kvtransfer.tcp import TcpReceiver, TcpSender

KINDS = ("shm", "tcp", "mooncake")
_RECEIVERS: dict[str, type[ControlReceiver]] = {
    "shm": ShmReceiver, "tcp": TcpReceiver, "mooncake": MooncakeReceiver,
}
_SENDERS: dict[str, type[ControlSender]] = {
    "shm": ShmSender, "tcp": TcpSender, "mooncake": MooncakeSender,
}


def make_receiver(kind: str, arena: Arena, layout: KVLayout, model_fingerprint: str,
                  config: TransferConfig, instance: str = "decode") -> ControlReceiver:
    """The decode side of transport ``kind`` over ``arena`` (not owned: close it yourself)."""
    if kind not in _RECEIVERS:
        raise InvalidArgument(f"KV transport must be one of {KINDS}, got {kind!r}")
    return _RECEIVERS[kind](arena, layout, model_fingerprint, config, instance)


def make_sender(kind: str, layout: KVLayout, model_fingerprint: str,
                config: TransferConfig) -> ControlSender:
    """The prefill side of transport ``kind``."""
    if kind not in _SENDERS:
        raise InvalidArgument(f"KV transport must be one of {KINDS}, got {kind!r}")
    return _SENDERS[kind](layout, model_fingerprint, config)


def model_fingerprint(model_id: str, layout: KVLayout, weights_digest: str = "") -> str:
    """A short stable id of (model, KV geometry, weights): equal only for the same model."""
    text = f"{model_id}|{layout.num_layers}|{layout.num_kv_heads}|{layout.head_dim}|" \
           f"{layout.dtype}|{weights_digest}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]
