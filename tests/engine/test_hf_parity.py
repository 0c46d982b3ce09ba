"""Logits match transformers on the same weights: prompt, then ten decode steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.engine import LLMEngine, SamplingParams
from tests.engine.hf_util import save_checkpoint

PROMPT = [1, 17, 45, 299, 3, 8, 120, 64, 33, 250, 7, 90]


def _engine_logits(engine: LLMEngine, prompt: list[int], feed: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt, then after each token of ``feed`` (teacher forcing)."""
    params = SamplingParams(max_tokens=len(feed) + 1, ignore_eos=True)
    seq = engine.new_sequence("r", prompt, params)
    captured: list[torch.Tensor] = []
    real_forward = engine.model.forward

    def spy(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        captured.append(out[0].clone())
        return out

    engine.model.forward = spy
    try:
        engine.prefill([seq])
        for tok in feed:
            seq.output_ids[-1] = tok  # force the token HF also sees
            engine.decode_step([seq])
    finally:
        engine.release(seq)
    return captured


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "rope_theta": 5000.0}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}}),
        ("qwen2", {}),
        ("mistral", {"sliding_window": 128}),
    ],
)
def test_logits_match_transformers(tmp_path: Path, arch: str, overrides: dict) -> None:
    hf = save_checkpoint(tmp_path, arch, **overrides)
    engine = LLMEngine.load(str(tmp_path), dtype="float32")
    feed = [5, 77, 200, 13, 2, 44, 160, 9, 299, 31]
    ours = _engine_logits(engine, PROMPT, feed)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT + feed])).logits[0]  # [T, V]
    n = len(PROMPT)
    for step, got in enumerate(ours):
        want = ref[n - 1 + step]
        diff = (got - want).abs().max().item()
        assert diff < 1e-4, f"{arch} step {step}: max abs diff {diff}"
    assert engine.arena.bytes_in_use == 0
    engine.arena.check_integrity()


def test_qwen2_bias_is_used(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "qwen2")
    engine = LLMEngine.load(str(tmp_path))
    assert engine.config.attention_bias and engine.model.layers[0].qkv.bias is not None


def test_mistral_context_is_clamped_to_sliding_window(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "mistral", sliding_window=64)
    engine = LLMEngine.load(str(tmp_path))
    assert engine.max_context == 64
    from pdserve.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="context"):
        engine.new_sequence("r", [1] * 60, SamplingParams(max_tokens=8))
