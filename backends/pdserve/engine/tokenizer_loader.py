"""The tokenizer and config of a model, without its weights or a KV arena.

The router only tokenizes and checks limits; loading a whole ``LLMEngine``
there would read every weight (seconds and GBs for a real checkpoint).
Same rules as ``LLMEngine.load``: a preset name or a checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path

from pdserve.engine.config import PRESETS, ModelConfig, load_config
from pdserve.engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from pdserve.errors import InvalidArgument


def load_tokenizer_and_config(model: str) -> tuple[Tokenizer, ModelConfig]:
    if model in PRESETS:
        config = PRESETS[model]
        return ByteTokenizer(config.vocab_size, config.bos_token_id or 0,
                             config.eos_token_ids[0]), config
    if Path(model).is_dir():
        config = load_config(model)
        return load_tokenizer(model, bos_token_id=config.bos_token_id,
                              eos_token_ids=config.eos_token_ids,
                              vocab_size=config.vocab_size), config
    raise InvalidArgument(
        f"model must be a preset ({', '.join(PRESETS)}) or a checkpoint directory, got {model!r}"
    )
