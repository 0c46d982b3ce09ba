"""Choosing the decode instance that receives a request's KV.

The decode side must hold the prompt's KV plus room for every token the
request may generate, in one extent. Among the scenario's routable decodes
with enough free KV and a free batch slot, prefer the one with the most free KV
relative to its size, then the lightest running batch: free KV is the scarce
resource that fragments, batch slots only cost step time.
"""

from __future__ import annotations

from collections.abc import Iterable

from pdserve.errors import Unavailable
from pdserve.scheduler.instance import InstanceLoad


def rank_decodes(loads: Iterable[InstanceLoad], kv_bytes_needed: int) -> list[str]:
    """Decode instances able to take a request needing ``kv_bytes_needed``, best first."""
    fits = [load for load in loads if can_take(load, kv_bytes_needed)]
    fits.sort(key=decode_rank_key)
    return [load.name for load in fits]


def can_take(load: InstanceLoad, kv_bytes_needed: int) -> bool:
    """Routable decode (or aggregated) with a free batch slot and enough free KV."""
    return (
        load.is_routable
        and load.role in ("decode", "aggregated")
        and load.free_slots > 0
        and load.kv_free_bytes >= kv_bytes_needed
    )


def choose_decode(loads: Iterable[InstanceLoad], kv_bytes_needed: int) -> str:
    loads = list(loads)
    ranked = rank_decodes(loads, kv_bytes_needed)
    if ranked:
        return ranked[0]
    decodes = [load for load in loads if load.role in ("decode", "aggregated")]
    healthy = [load for load in decodes if load.is_routable]
    if not healthy:
        raise Unavailable("no healthy decode instance in this scenario")
    most_free = max(load.kv_free_bytes for load in healthy)
    raise Unavailable(
        f"no decode instance can take the request now: it needs {kv_bytes_needed} bytes of KV, "
        f"the most free on one instance is {most_free}, "
        f"{sum(load.free_slots for load in healthy)} batch slots free"
    )


def decode_rank_key(load: InstanceLoad) -> tuple[float, float, str]:
    """The order of ``rank_decodes`` (best first), exposed for incremental indexes."""
    kv_free_share = load.kv_free_bytes / load.kv_total_bytes if load.kv_total_bytes else 0.0
    return (-kv_free_share, load.batch_utilization, load.name)


_score = decode_rank_key  # the name older callers used
