"""The load-time warm-up (``warmup_tokens``): it runs at load, frees its KV and
leaves nothing behind that changes what requests get."""

from __future__ import annotations

import pytest

from pdserve.engine import SamplingParams, generate
from pdserve.errors import InvalidArgument
from pdserve.roles.instance import close_arena, load_engine, make_arena
from pdserve.server.config import InstanceConfig, Transport

PROMPTS = [[5, 9, 200, 31, 7], [3] * 40]
PARAMS = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
          SamplingParams(temperature=0.8, top_k=20, seed=11, max_tokens=6, ignore_eos=True)]


def _cfg(warmup_tokens: int, transport: Transport = "tcp") -> InstanceConfig:
    return InstanceConfig(name="decode_0", role="decode", model="tiny",
                          kv_capacity_bytes=4 << 20, kv_transport=transport,
                          warmup_tokens=warmup_tokens)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_warm_engine_frees_its_kv_and_answers_as_a_cold_one(transport: Transport) -> None:
    arena = make_arena(_cfg(16, transport))
    try:
        warm = load_engine(_cfg(16, transport), arena)
        assert arena.bytes_in_use == 0 and arena.bytes_free == arena.capacity
        cold = load_engine(_cfg(0))
        assert generate(warm, PROMPTS, PARAMS) == generate(cold, PROMPTS, PARAMS)
        assert arena.bytes_in_use == 0
    finally:
        close_arena(arena)


def test_warm_up_runs_at_load_and_a_bad_size_fails_the_load_clearly() -> None:
    # a warm-up prompt the model's context cannot hold: the load fails, with the reason
    with pytest.raises(InvalidArgument, match="exceeds the context"):
        load_engine(_cfg(1 << 20))
    load_engine(_cfg(0))  # no warm-up: loads (the size is never checked)
