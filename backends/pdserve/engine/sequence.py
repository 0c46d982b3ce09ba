"""One request's state inside the engine.

Token positions:   0 .. Tp-1 prompt | Tp .. Tp+len(output_ids)-1 generated
KV placement:      prompt token t  -> prompt region slot t
                   output token i  -> generation region slot i (written when it
                                      is fed back by the decode step after it)
So ``num_cached_tokens`` runs up to Tp during prefill and to
Tp + len(output_ids) - 1 during decode (the newest token has no KV yet).
"""

from __future__ import annotations

from typing import Literal

import torch

from pdserve.engine.sampling import SamplingParams
from pdserve.engine.tokenizer import IncrementalDetokenizer
from pdserve.kvtransfer.arena import Extent

FinishReason = Literal["stop", "length", "abort"]


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 extent: Extent | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.extent = extent
        self.num_cached_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.generator = generator  # per-sequence RNG: batch-independent sampling
        self.output_text = ""  # decoded text so far, kept only when stop strings are set
        self.stop_text_len: int | None = None  # text length up to a matched stop string
        self.detokenizer: IncrementalDetokenizer | None = None  # for stop strings
        self.error: Exception | None = None  # why it was aborted, when the engine did it

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilled(self) -> bool:
        return self.num_cached_tokens >= len(self.prompt_ids) and bool(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_generation_slots(self) -> int:
        """Generation-region slots the extent holds (one per possible output token)."""
        return self.params.max_tokens

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, prompt={len(self.prompt_ids)}, "
            f"out={len(self.output_ids)}, cached={self.num_cached_tokens}, "
            f"finish={self.finish_reason})"
        )
