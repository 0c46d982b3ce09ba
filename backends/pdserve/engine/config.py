"""Model geometry: one frozen dataclass, built from a preset or a HF config.json.

Letters used across the engine: B batch, N packed tokens, T tokens of one
sequence, L layers, H query heads, Hkv KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.errors import InvalidArgument
from pdserve.kvtransfer.layout import KVLayout

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (the only non-default type supported)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= 0:
            raise ValueError(f"rope scaling factors must be positive: {self}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor must exceed low_freq_factor: {self}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError(f"original_max_position_embeddings must be positive: {self}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_context: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    rope_scaling: RopeScaling | None = None
    architecture: str = "llama"
    # Mistral: attention is limited to this many previous tokens. We refuse
    # contexts beyond it (max_context is clamped), so full attention is exact.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_context"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"rope_theta and rms_norm_eps must be positive: {self}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {SUPPORTED_ARCHITECTURES}")
        ids = [*self.eos_token_ids, *([self.bos_token_id] if self.bos_token_id is not None else [])]
        for tok in ids:
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"special token id {tok} outside vocab [0, {self.vocab_size})")
        if self.sliding_window is not None and self.max_context > self.sliding_window:
            raise ValueError(
                f"max_context {self.max_context} exceeds sliding_window {self.sliding_window}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameters, counting a tied embedding once."""
        per_layer = (
            self.hidden_size * (self.q_size + 2 * self.kv_size)
            + self.q_size * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size
            + 2 * self.hidden_size
            + (self.q_size + 2 * self.kv_size if self.attention_bias else 0)
        )
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + embed + head + self.hidden_size

    @property
    def num_matmul_params(self) -> int:
        """Parameters multiplied per token (excludes the embedding lookup and norms)."""
        return self.num_params - self.vocab_size * self.hidden_size * (
            0 if self.tie_word_embeddings else 1
        ) - (2 * self.num_layers + 1) * self.hidden_size

    def kv_layout(self, dtype: str) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, dtype)

    def with_max_context(self, max_context: int) -> ModelConfig:
        return replace(self, max_context=max_context)


PRESETS: dict[str, ModelConfig] = {
    # A few layers and a small width: tests build it in milliseconds.
    "tiny": ModelConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, max_context=1024,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=256, eos_token_ids=(257,),
    ),
    # About 97M parameters (fp32: 390 MB of weights), for benchmarks.
    "small": ModelConfig(
        vocab_size=260, hidden_size=1024, intermediate_size=3072, num_layers=8, num_heads=16,
        num_kv_heads=4, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5, max_context=4096,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=256, eos_token_ids=(257,),
    ),
}


def _rope_scaling(raw: Mapping[str, Any] | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise InvalidArgument(
            f"rope_scaling type {kind!r} is not supported (supported: 'default', 'llama3')"
        )
    try:
        return RopeScaling(
            factor=float(raw["factor"]),
            low_freq_factor=float(raw["low_freq_factor"]),
            high_freq_factor=float(raw["high_freq_factor"]),
            original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise InvalidArgument(f"llama3 rope_scaling lacks {e.args[0]!r}") from None


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Map a Hugging Face config.json (Llama, Qwen2, Mistral) to ModelConfig."""
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InvalidArgument(
            f"model_type {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise InvalidArgument(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise InvalidArgument("mlp_bias=true is not supported")
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older
    # checkpoints write rope_theta and rope_scaling at the top level.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        layers = int(hf["num_hidden_layers"])
        vocab = int(hf["vocab_size"])
        intermediate = int(hf["intermediate_size"])
    except KeyError as e:
        raise InvalidArgument(f"config.json lacks {e.args[0]!r}") from None
    head_dim = int(hf.get("head_dim") or hidden // heads)
    max_context = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if arch == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is not None:
        max_context = min(max_context, int(window))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    bos = hf.get("bos_token_id")
    try:
        return ModelConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
            num_layers=layers, num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
            rope_theta=theta, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_context=max_context,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
            bos_token_id=int(bos) if bos is not None else None, eos_token_ids=eos_ids,
            rope_scaling=_rope_scaling(rope), architecture=arch,
            sliding_window=int(window) if window is not None else None,
        )
    except ValueError as e:
        raise InvalidArgument(f"config.json: {e}") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InvalidArgument(f"{path} not found (a checkpoint directory needs config.json)")
    try:
        return config_from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{path} is not valid JSON: {e}") from None
