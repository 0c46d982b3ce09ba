"""Engine behaviour on the tiny preset: caching, batching, chunking, dtypes."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.engine.engine import PrefillChunk


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256] + [rng.randrange(256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _capture_logits(engine: LLMEngine) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    real = engine.model.forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        captured.append(out.clone())
        return out

    engine.model.forward = spy
    return captured


def test_prefill_then_decode_equals_full_recomputation(tiny: LLMEngine) -> None:
    prompt = _prompts(1, seed=1)[0]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    captured = _capture_logits(tiny)
    try:
        seq = tiny.new_sequence("inc", prompt, params)
        tiny.prefill([seq])
        while not seq.is_finished:
            tiny.decode_step([seq])
        tiny.release(seq)
        incremental = [c[0] for c in captured]
        out = seq.output_ids
        for i in range(len(out)):
            captured.clear()
            full = tiny.new_sequence("full", prompt + out[:i], params)
            first = tiny.prefill([full])[0]
            tiny.release(full)
            assert first == out[i], f"token {i} differs"
            diff = (captured[0][0] - incremental[i]).abs().max().item()
            assert diff < 1e-4, f"step {i}: logits differ by {diff}"
    finally:
        del tiny.model.forward


def test_preset_output_is_varied_and_not_immediate_eos(tiny: LLMEngine) -> None:
    outs = generate(tiny, _prompts(12, seed=2), SamplingParams(max_tokens=24))
    immediate_eos = sum(1 for o in outs if o[0] in tiny.config.eos_token_ids)
    assert immediate_eos <= 2
    for o in outs:
        if len(o) >= 8:
            assert len(set(o)) >= 3, f"degenerate output {o}"
    assert len({tuple(o) for o in outs}) == len(outs), "prompts should give different outputs"


@pytest.mark.parametrize("sampled", [False, True])
def test_continuous_batching_matches_each_request_alone(tiny: LLMEngine, sampled: bool) -> None:
    prompts = _prompts(16, seed=3)
    params = [
        SamplingParams(max_tokens=4 + (i * 5) % 17, ignore_eos=True,
                       temperature=0.9 if sampled else 0.0, top_p=0.95 if sampled else 1.0,
                       top_k=50 if sampled else 0, seed=1000 + i if sampled else None)
        for i in range(16)
    ]
    alone = [
        generate(tiny, [p], sp, max_batch_size=1)[0]
        for p, sp in zip(prompts, params, strict=True)
    ]
    # Batch size 5 forces sequences to join as others finish.
    batched = generate(tiny, prompts, params, max_batch_size=5)
    assert batched == alone
    for out, sp in zip(batched, params, strict=True):
        assert len(out) == sp.max_tokens


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny: LLMEngine) -> None:
    prompt = _prompts(1, seed=4)
    a = generate(tiny, prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=7,
                                               ignore_eos=True))
    b = generate(tiny, prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=7,
                                               ignore_eos=True))
    c = generate(tiny, prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=8,
                                               ignore_eos=True))
    assert a == b
    assert a != c


@pytest.mark.parametrize("budget", [8, 19])
def test_chunked_prefill_matches_unchunked(tiny: LLMEngine, budget: int) -> None:
    prompts = _prompts(10, seed=5, lo=20, hi=90)
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    plain = generate(tiny, prompts, params, max_batch_size=4)
    chunked = generate(tiny, prompts, params, max_batch_size=4, chunked_prefill=True,
                       max_step_tokens=budget)
    assert chunked == plain


def test_prefill_chunks_by_hand_match_one_prefill(tiny: LLMEngine) -> None:
    prompt = _prompts(1, seed=6, lo=40, hi=41)[0]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    whole = tiny.new_sequence("whole", prompt, params)
    first = tiny.prefill([whole])[0]
    parts = tiny.new_sequence("parts", prompt, params)
    for n in (7, 1, 20):
        assert tiny.step([PrefillChunk(parts, n)], []) == []
    assert tiny.step([PrefillChunk(parts, len(prompt) - 28)], []) == [(parts, first)]
    # Layer 0 K/V are identical; deeper layers differ only by GEMM rounding.
    torch.testing.assert_close(tiny.kv_prompt_view(parts), tiny.kv_prompt_view(whole),
                               rtol=1e-5, atol=1e-5)
    tiny.release(whole)
    tiny.release(parts)


def test_on_layer_done_runs_after_each_layer_is_written(tiny: LLMEngine) -> None:
    seqs = [tiny.new_sequence(f"s{i}", p, SamplingParams(max_tokens=2))
            for i, p in enumerate(_prompts(3, seed=7))]
    for s in seqs:
        tiny.allocate(s)
        tiny.kv_prompt_view(s).zero_()
    layers: list[int] = []

    def done(layer: int) -> None:
        for s in seqs:  # this layer's K/V is written, later layers not yet
            kv = tiny.kv_prompt_view(s)
            assert kv[layer].abs().sum() > 0
            if layer + 1 < tiny.config.num_layers:
                assert kv[layer + 1].abs().sum() == 0
        layers.append(layer)

    tiny.prefill(seqs, on_layer_done=done)
    assert layers == list(range(tiny.config.num_layers))
    for s in seqs:
        tiny.release(s)
        tiny.release(s)  # idempotent


def test_bfloat16_runs_and_is_deterministic() -> None:
    engine = LLMEngine.load("tiny", dtype="bfloat16")
    prompts = _prompts(4, seed=8)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    a = generate(engine, prompts, params)
    b = generate(engine, prompts, params)
    assert a == b and all(len(o) == 10 for o in a)
    assert engine.layout.dtype == "bfloat16"
    assert engine.arena.bytes_in_use == 0
    assert engine.fingerprint != LLMEngine.load("tiny").fingerprint


def test_fingerprint_tracks_weights() -> None:
    assert LLMEngine.load("tiny").fingerprint == LLMEngine.load("tiny").fingerprint
    assert LLMEngine.load("tiny").fingerprint != LLMEngine.load("tiny", seed=1).fingerprint
