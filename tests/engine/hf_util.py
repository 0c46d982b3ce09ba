"""Tiny Hugging Face checkpoints written into a test's tmp dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def hf_config(arch: str, **overrides: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base: dict[str, Any] = dict(
        vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    base.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(**base)


def save_checkpoint(path: Path, arch: str, seed: int = 0, max_shard_size: str | None = None,
                    **overrides: Any) -> Any:
    """A random model saved as safetensors; returns the HF model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    with torch.no_grad():  # HF's 0.02 init gives near-identical logits; widen it
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    write_tokenizer(path)
    return model


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json built with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in ["the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world"]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
