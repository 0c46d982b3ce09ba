"""pdserve.kvtransfer: KV regions, the arena that holds them, and the transports
that move them between prefill and decode instances.

Public API (see ``transport.py`` for which side calls what):

    KVLayout, Arena, Extent          the extent layout and the decode arena
    ShmArena                         an Arena in POSIX shared memory (shm transport)
    TransferConfig                   secret, bind address, timeouts, checksum
    KVHandle                         where a request's KV must land (to_bytes/from_bytes)
    make_receiver / make_sender      "shm" | "tcp" | "mooncake"
    KVReceiver, KVSender, SendStream, TransferResult, TransferMode
    BackgroundStream                 layer-wise sends on a worker thread (overlap prefill)
    model_fingerprint                id that mismatched models refuse on
"""

from __future__ import annotations

from pdserve.kvtransfer.arena import Arena, Extent
from pdserve.kvtransfer.background import BackgroundStream
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.factory import KINDS, make_receiver, make_sender, model_fingerprint
from pdserve.kvtransfer.handle import KVHandle
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.shm import ShmArena
from pdserve.kvtransfer.transport import (
    MODES,
    KVReceiver,
    KVSender,
    SendStream,
    TransferMode,
    TransferResult,
)

__all__ = [
    "KINDS",
    "MODES",
    "Arena",
    "BackgroundStream",
    "Extent",
    "KVHandle",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "SendStream",
    "ShmArena",
    "TransferConfig",
    "TransferMode",
    "TransferResult",
    "make_receiver",
    "make_sender",
    "model_fingerprint",
]
