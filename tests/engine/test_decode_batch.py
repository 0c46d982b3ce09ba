"""Batched decode attention (one gather + one masked attention a layer) against
the per-sequence path, in the arena's real layout."""

from __future__ import annotations

import pytest
import torch

import pdserve.engine.model as model_mod
from pdserve.engine import ContinuousBatcher, LLMEngine, SamplingParams, generate
from pdserve.engine.decode_batch import DecodeBatch
from pdserve.kvtransfer.layout import KVLayout
from tests.engine.test_attention import _naive

L, HKV, D, H = 3, 2, 16, 8  # a row (one token's K of a layer) is 32 floats = 128 bytes


@pytest.mark.parametrize("shift", [0, 64], ids=["row-aligned", "unaligned"])
def test_batch_matches_attention_per_sequence_and_writes_the_slots(shift: int) -> None:
    """Three sequences of different prompt and generated lengths; the extents
    start on a row, or 64 bytes off one (the arena's alignment allows it)."""
    torch.manual_seed(3)
    layout = KVLayout(L, HKV, D)
    buffer = torch.zeros(1 << 20, dtype=torch.uint8)
    seqs = [(5, 7, 2), (11, 4, 0), (1, 9, 8)]  # (prompt tokens, generation slots, slot)
    offset, views = shift, []
    for tp, g, slot in seqs:
        prompt = layout.view(buffer, offset, tp)
        gen = layout.view(buffer, layout.generation_offset(offset, tp), g)
        prompt.copy_(torch.randn(prompt.shape))
        gen[:, :, :slot].copy_(torch.randn(gen[:, :, :slot].shape))
        views.append((prompt, gen, slot))
        offset += layout.extent_bytes(tp, g) + shift
    batch = DecodeBatch(
        views[0][0], prompt_offsets=[p.storage_offset() for p, _, _ in views],
        prompt_tokens=[p.shape[2] for p, _, _ in views],
        gen_offsets=[g.storage_offset() for _, g, _ in views],
        gen_slots=[g.shape[2] for _, g, _ in views], slots=[s for _, _, s in views],
        num_kv_heads=HKV, head_dim=D)
    assert batch.aligned == (shift == 0)
    assert batch.tmax == max(tp + slot + 1 for tp, _, slot in seqs)
    for layer in range(L):
        q, k, v = torch.randn(3, H, D), torch.randn(3, HKV, D), torch.randn(3, HKV, D)
        out = torch.full((3, H * D), float("nan"))
        batch.attend(layer, q, k, v, 0.25, out)
        for i, (prompt, gen, slot) in enumerate(views):
            # The new token's K/V landed in its generation slot of this layer ...
            torch.testing.assert_close(gen[layer, 0, slot], k[i], rtol=0, atol=0)
            torch.testing.assert_close(gen[layer, 1, slot], v[i], rtol=0, atol=0)
            # ... and it attended over its prompt and generated tokens, nothing else.
            keys = torch.cat([prompt[layer, 0], gen[layer, 0, : slot + 1]])
            values = torch.cat([prompt[layer, 1], gen[layer, 1, : slot + 1]])
            want = _naive(q[i][None], keys, values, torch.tensor([len(keys) - 1]), 0.25)[0]
            torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)


def _engines() -> tuple[LLMEngine, LLMEngine]:
    per_sequence, batched = LLMEngine.load("tiny"), LLMEngine.load("tiny")
    per_sequence.model.decode_batching = "never"
    batched.model.decode_batching = "always"
    return per_sequence, batched


def _serve(engine: LLMEngine) -> tuple[list[list[int]], list[int]]:
    """Continuous batching with chunked prefill: steps mix prompt chunks and
    decode tokens, sequences join and finish at different steps. Returns each
    request's tokens and the number of decode tokens of every step."""
    b = ContinuousBatcher(engine, max_batch_size=6, max_step_tokens=40, chunked_prefill=True)
    seqs = [engine.new_sequence(f"r{i}", [256] + [(7 * i + j) % 250 + 1 for j in range(3 + 9 * i)],
                                SamplingParams(max_tokens=6 + 5 * i, ignore_eos=True))
            for i in range(8)]
    for s in seqs:
        b.add(s)
    decodes_per_step = []
    while b.has_unfinished():
        decodes_per_step.append(sum(1 for s in seqs if s.is_prefilled and not s.is_finished))
        b.step()
    assert engine.arena.bytes_in_use == 0
    return [s.output_ids for s in seqs], decodes_per_step


def test_engine_tokens_are_the_same_batched_or_per_sequence() -> None:
    per_sequence, batched = _engines()
    want, steps = _serve(per_sequence)
    got, _ = _serve(batched)
    assert max(steps) >= 4  # several decode tokens met in one step
    assert got == want


def test_a_batch_over_the_gather_cap_is_split_and_gives_the_same_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    per_sequence, batched = _engines()
    want, _ = _serve(per_sequence)
    sizes: list[int] = []
    real = batched.model._decode_batches

    def spy(items: list[model_mod.AttnItem]) -> tuple[list[tuple[DecodeBatch, object]],
                                                      list[model_mod.AttnItem]]:
        batches, rest = real(items)
        sizes.extend(b.batch for b, _ in batches)
        return batches, rest  # type: ignore[return-value]

    # ~2 sequences of ~40 tokens: tiny's K+V of a token and layer is 256 bytes
    monkeypatch.setattr(model_mod, "GATHER_BYTES", 2 * 40 * 256)
    monkeypatch.setattr(batched.model, "_decode_batches", spy)
    got, _ = _serve(batched)
    assert got == want
    assert sizes and max(sizes) <= 3 and 1 in sizes


def test_auto_batches_on_a_cpu_only_short_contexts_of_several_sequences() -> None:
    engine = LLMEngine.load("tiny")  # K+V of a token's layer: 256 bytes
    m = engine.model

    def items(*lengths: int) -> list[model_mod.AttnItem]:
        return [model_mod.AttnItem(slice(i, i + 1), n - 1, torch.empty(L, 2, 1, HKV, D),
                                   torch.empty(L, 2, n, HKV, D), True)
                for i, n in enumerate(lengths)]

    def lengths(chosen: list[model_mod.AttnItem]) -> list[int]:
        return [it.start + 1 for it in chosen]

    cap = model_mod.CPU_GATHER_MAX_BYTES // 256  # tokens
    assert lengths(m._batchable(items(100, 200))) == [100, 200]
    assert m._batchable(items(100)) == []  # one sequence: nothing to batch
    assert m._batchable(items(cap + 50, cap + 50)) == []  # the copy costs more
    # The long one attends on its own; the short ones still batch.
    assert lengths(m._batchable(items(100, cap + 50, 200))) == [100, 200]
    m.decode_batching = "always"
    assert lengths(m._batchable(items(cap + 50))) == [cap + 50]
    m.decode_batching = "never"
    assert m._batchable(items(100, 200)) == []
    m.decode_batching = "auto"
    m.device = torch.device("meta")  # any accelerator: launches cost more than the copy
    assert lengths(m._batchable(items(cap + 50, 7))) == [cap + 50, 7]


def test_mixed_lengths_batch_the_short_in_length_order_and_keep_the_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequences of very different contexts in one step: on a CPU the long
    ones attend per sequence and the short ones batch, in order of length
    (their rows are then not consecutive); tokens as with no batching."""
    per_sequence, auto = LLMEngine.load("tiny"), LLMEngine.load("tiny")
    per_sequence.model.decode_batching = "never"
    monkeypatch.setattr(model_mod, "CPU_GATHER_MAX_BYTES", 100 * 256)  # 100 tokens
    lengths = [40, 200, 9, 70, 150, 25]
    prompts = [[256] + [(5 * i + j) % 250 + 1 for j in range(n - 1)]
               for i, n in enumerate(lengths)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    seen: list[tuple[list[int], object]] = []
    real = auto.model._decode_batches

    def spy(items: list[model_mod.AttnItem]) -> tuple[list[tuple[DecodeBatch, object]],
                                                      list[model_mod.AttnItem]]:
        batches, rest = real(items)
        seen.extend(([it.start for it in rest if it.is_decode], rows) for _, rows in batches)
        return batches, rest  # type: ignore[return-value]

    monkeypatch.setattr(auto.model, "_decode_batches", spy)
    want = generate(per_sequence, prompts, params)
    assert generate(auto, prompts, params) == want
    full = [(rest, rows) for rest, rows in seen
            if isinstance(rows, torch.Tensor) and rows.numel() == 4]
    assert full, seen
    rest, rows = full[0]
    assert isinstance(rows, torch.Tensor)
    assert rows.tolist() == [2, 5, 0, 3]  # 9, 25, 40 and 70 tokens: length order
    assert sorted(rest) == [150, 200]  # the two long ones, per sequence (first step)
