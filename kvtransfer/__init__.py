"""pdserve.kvtransfer: KV regions, the arena that holds them, and the transports
that move them between prefill and decode instances."""

from __future__ import annotations

from pdserve.kvtransfer.arena import Arena, Extent
from pdserve.kvtransfer.layout import KVLayout

__all__ = ["Arena", "Extent", "KVLayout"]
