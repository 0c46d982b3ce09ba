"""ContinuousBatcher: joins, aborts, the decode-role path, and KV ownership."""

from __future__ import annotations

import pytest

from pdserve.engine import ContinuousBatcher, LLMEngine, SamplingParams, generate
from pdserve.errors import OutOfKVSpace
from pdserve.kvtransfer.arena import Arena


def test_abort_releases_kv_and_reports(tiny: LLMEngine) -> None:
    b = ContinuousBatcher(tiny, max_batch_size=4, max_step_tokens=256, chunked_prefill=True)
    seqs = [tiny.new_sequence(f"r{i}", [256, 1 + i, 2, 3], SamplingParams(max_tokens=50,
                              ignore_eos=True)) for i in range(6)]
    for s in seqs:
        b.add(s)
    b.step()
    assert b.num_running == 4 and b.num_waiting == 2
    assert b.abort("r1") and b.abort("r5")
    assert not b.abort("r1") and not b.abort("nope")
    assert seqs[1].finish_reason == "abort" and seqs[1].extent is None
    while b.has_unfinished():
        b.step()
    assert all(s.extent is None for s in seqs)


def test_prefilled_sequence_joins_decode_directly(tiny: LLMEngine) -> None:
    """The decode role: prompt KV computed elsewhere lands in the extent."""
    prompt = [256, 10, 20, 30, 40, 50]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = generate(tiny, [prompt], params)[0]
    producer = tiny.new_sequence("p", prompt, params)
    first = tiny.prefill([producer])[0]
    consumer = tiny.new_sequence("c", prompt, params)
    tiny.allocate(consumer)
    tiny.kv_prompt_view(consumer).copy_(tiny.kv_prompt_view(producer))  # "the transfer"
    tiny.release(producer)
    consumer.num_cached_tokens = len(prompt)
    consumer.output_ids.append(first)
    b = ContinuousBatcher(tiny, max_batch_size=2, max_step_tokens=64, chunked_prefill=False)
    b.add(consumer)
    steps = 0
    while b.has_unfinished():
        outs = b.step()
        steps += 1
        assert all(len(o.new_token_ids) == 1 for o in outs)
    assert consumer.output_ids == expected
    assert steps == len(expected) - 1  # no prefill step
    assert consumer.extent is None  # released by the batcher


def test_requests_wait_for_kv_space_and_oversized_ones_abort() -> None:
    engine = LLMEngine.load("tiny", kv_capacity_bytes=64 << 10)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    need = engine.extent_bytes(40, params)
    fits = (64 << 10) // need
    prompts = [[256] + [7] * 39 for _ in range(fits + 3)]
    outs = generate(engine, prompts, params, max_batch_size=fits + 3)
    assert all(len(o) == 20 for o in outs)  # later ones waited for space
    big = engine.new_sequence("big", [256] * 100, SamplingParams(max_tokens=200))
    b = ContinuousBatcher(engine, max_batch_size=2, max_step_tokens=512, chunked_prefill=False)
    b.add(big)
    (out,) = b.step()
    assert out.finished and big.finish_reason == "abort"
    assert isinstance(big.error, OutOfKVSpace) and "full" in str(big.error)
    assert not b.has_unfinished()
    assert engine.arena.bytes_in_use == 0
    engine.arena.check_integrity()


def test_batcher_rejects_bad_limits(tiny: LLMEngine) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        ContinuousBatcher(tiny, max_batch_size=0, max_step_tokens=8, chunked_prefill=False)
    with pytest.raises(ValueError, match="max_step_tokens"):
        ContinuousBatcher(tiny, max_batch_size=8, max_step_tokens=4, chunked_prefill=False)


def test_engine_over_shared_arena() -> None:
    arena = Arena(1 << 20)
    engine = LLMEngine.load("tiny", kv_arena=arena)
    assert engine.arena is arena
    generate(engine, [[256, 1, 2]], SamplingParams(max_tokens=3))
    assert arena.bytes_in_use == 0
