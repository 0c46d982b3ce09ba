"""The simulator's incremental index keeps exactly the policies' order."""

from __future__ import annotations

import random

import pytest

from pdserve.scheduler.decode_choice import can_take, decode_rank_key, rank_decodes
from pdserve.scheduler.forwarding import is_prefill_candidate, prefill_rank_key, rank_prefills
from pdserve.scheduler.instance import InstanceLoad
from pdserve.scheduler.sim.index import FieldIndex, RankedIndex

KINDS = [RankedIndex, FieldIndex]  # interpreted runs use RankedIndex, the native build FieldIndex


def _random_load(rng: random.Random, name: str) -> InstanceLoad:
    role = rng.choice(["prefill", "decode", "aggregated"])
    total = 1000
    return InstanceLoad(name=name, role=role, scenario="s", max_batch_size=4,
                        in_flight=rng.randrange(6), kv_free_bytes=rng.randrange(total + 1),
                        kv_total_bytes=total, healthy=rng.random() > 0.1,
                        draining=rng.random() < 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_index_order_equals_rank_prefills_and_rank_decodes_under_updates(
        kind: type[RankedIndex]) -> None:
    rng = random.Random(7)
    loads = {f"i{k}": _random_load(rng, f"i{k}") for k in range(40)}
    pre, dec = kind(prefill_rank_key), kind(decode_rank_key)
    for step in range(500):
        name = rng.choice(list(loads))
        loads[name] = _random_load(rng, name)
        pre.update(loads[name], is_prefill_candidate(loads[name]))
        dec.update(loads[name], loads[name].is_routable and loads[name].role != "prefill")
        if step % 25 == 0:
            for load in loads.values():  # everything indexed at least once
                pre.update(load, is_prefill_candidate(load))
                dec.update(load, load.is_routable and load.role != "prefill")
            assert pre.names() == rank_prefills(loads.values())
            need = rng.randrange(800)
            fits = [n for n in dec if can_take(loads[n], need)]
            assert fits == rank_decodes(loads.values(), need)


@pytest.mark.parametrize("kind", KINDS)
def test_removal_takes_an_instance_out(kind: type[RankedIndex]) -> None:
    idx = kind(prefill_rank_key)
    a = InstanceLoad("a", "prefill", "s", 4)
    idx.update(a, True)
    assert idx.names() == ["a"]
    idx.update(a, False)
    assert idx.names() == [] and len(idx) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_names_is_a_copy_that_survives_updates(kind: type[RankedIndex]) -> None:
    idx = kind(prefill_rank_key)
    a, b = InstanceLoad("a", "prefill", "s", 4), InstanceLoad("b", "prefill", "s", 4, in_flight=1)
    idx.update(a, True)
    idx.update(b, True)
    held = idx.names()
    assert held == ["a", "b"]
    idx.update(InstanceLoad("a", "prefill", "s", 4, in_flight=2), True)
    assert held == ["a", "b"] and idx.names() == ["b", "a"] and list(idx) == ["b", "a"]
    idx.update(b, True)  # unchanged key: nothing moves
    assert idx.names() == ["b", "a"]
