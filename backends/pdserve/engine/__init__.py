"""pdserve.engine: a Llama-family LLM engine in pure PyTorch (no Triton).

Public API (see the modules): ``ModelConfig``/``PRESETS`` (config),
``Tokenizer``/``IncrementalDetokenizer`` (tokenizer), ``SamplingParams``
(sampling), ``Sequence`` (sequence), ``LLMEngine`` (engine),
``ContinuousBatcher``/``StepOutput``/``generate`` (batcher).

Additions beyond the agreed contract (nothing was renamed or removed):
- ``LLMEngine.step(chunks, decodes)``: one forward mixing ``PrefillChunk``s and
  decode sequences (what ``prefill``/``decode_step``/the batcher call);
  ``LLMEngine.kv_generation_view(seq)``, ``LLMEngine.extent_bytes(Tp, params)``.
- ``LLMEngine.prefill`` allocates a sequence's extent when it has none (the
  caller still owns it and must ``release`` it).
- ``Sequence.output_text``/``stop_text_len`` (text up to a stop string) and
  ``Sequence.error`` (why the batcher aborted it, e.g. OutOfKVSpace).
- ``generate(..., max_step_tokens=None)``.
- ``load_tokenizer_and_config(model)`` (tokenizer_loader.py, added by serving): the
  router's tokenizer and limits without loading weights.
"""

from __future__ import annotations

from pdserve.engine.batcher import ContinuousBatcher, StepOutput, generate
from pdserve.engine.config import PRESETS, ModelConfig
from pdserve.engine.engine import LLMEngine, PrefillChunk
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from pdserve.engine.tokenizer_loader import load_tokenizer_and_config

__all__ = [
    "PRESETS",
    "ContinuousBatcher",
    "IncrementalDetokenizer",
    "LLMEngine",
    "ModelConfig",
    "PrefillChunk",
    "SamplingParams",
    "Sequence",
    "StepOutput",
    "Tokenizer",
    "generate",
    "load_tokenizer_and_config",
]
