"""LLMEngine: the model, its tokenizer, and the KV arena its sequences live in.

KV ownership: ``allocate`` takes one extent per sequence from ``arena``;
``release`` gives it back (idempotent). The engine never frees implicitly
except where noted: ``prefill`` allocates a missing extent (the caller still
owns it and releases it), and ``ContinuousBatcher`` releases every sequence it
finishes or aborts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.config import PRESETS, ModelConfig
from pdserve.engine.device import resolve_device
from pdserve.engine.model import AttnItem, LlamaModel
from pdserve.engine.sampling import SamplingParams, make_generator, sample
from pdserve.engine.sequence import Sequence
from pdserve.engine.stopping import StopChecker
from pdserve.engine.tokenizer import Tokenizer
from pdserve.engine.tokenizer_loader import load_tokenizer_and_config
from pdserve.engine.weights import fingerprint, load_state_dict, random_state_dict
from pdserve.errors import InvalidArgument
from pdserve.kvtransfer.arena import Arena, Extent
from pdserve.kvtransfer.layout import KVLayout, torch_dtype

DEFAULT_KV_BYTES_CAP = 512 << 20


@dataclass
class PrefillChunk:
    """``num_tokens`` more prompt tokens of ``seq``, starting at its num_cached_tokens."""

    seq: Sequence
    num_tokens: int


class LLMEngine:
    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer,
                 *, dtype: str, device: torch.device, arena: Arena) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.device = device
        self.model = LlamaModel(config, state, device, torch_dtype(dtype))
        self.fingerprint = fingerprint(state, config, dtype)
        self.layout: KVLayout = config.kv_layout(dtype)
        self.arena = arena
        self.max_context = config.max_context
        self._stop = StopChecker(tokenizer, config.eos_token_ids)

    @classmethod
    def load(cls, model: str = "tiny", *, dtype: str = "float32", device: str = "cpu",
             kv_arena: Arena | None = None, kv_capacity_bytes: int | None = None,
             seed: int = 0) -> LLMEngine:
        """``model``: a preset name (``tiny``, ``small``) or a HF checkpoint directory."""
        try:
            torch_dtype(dtype)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        dev = resolve_device(device)
        tokenizer, config = load_tokenizer_and_config(model)
        if model in PRESETS:
            state = random_state_dict(config, seed)
        else:
            state = load_state_dict(model, config)
        if kv_arena is None:
            kv_arena = _local_arena(config, dtype, dev, kv_capacity_bytes)
        elif kv_arena.buffer.device != dev:
            raise InvalidArgument(f"kv_arena lives on {kv_arena.buffer.device}, engine on {dev}")
        return cls(config, state, tokenizer, dtype=dtype, device=dev, arena=kv_arena)

    def with_arena(self, kv_arena: Arena | None = None,
                   kv_capacity_bytes: int | None = None) -> LLMEngine:
        """The same weights and tokenizer (shared, not copied) over another KV arena:
        what an instance switching roles in place keeps. The caller must have
        released every sequence of this engine's arena first."""
        if kv_arena is None:
            kv_arena = _local_arena(self.config, self.dtype, self.device, kv_capacity_bytes)
        elif kv_arena.buffer.device != self.device:
            raise InvalidArgument(f"kv_arena lives on {kv_arena.buffer.device}, "
                                  f"engine on {self.device}")
        twin = copy.copy(self)
        twin.arena = kv_arena
        return twin

    # -- sequences and their KV -----------------------------------------------------
    def new_sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     extent: Extent | None = None) -> Sequence:
        if not prompt_ids:
            raise InvalidArgument("prompt is empty: at least one token is required")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt_ids):
            raise InvalidArgument("prompt token ids must be integers")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidArgument(
                f"prompt token id {bad[0]} out of range [0, {self.config.vocab_size})"
            )
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context of {self.max_context} tokens"
            )
        if extent is not None and extent.nbytes < self.extent_bytes(len(prompt_ids), params):
            raise InvalidArgument(
                f"extent of {extent.nbytes} bytes is smaller than the "
                f"{self.extent_bytes(len(prompt_ids), params)} this request needs"
            )
        return Sequence(request_id, prompt_ids, params, extent,
                        make_generator(params, self.device))

    def extent_bytes(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        return self.layout.extent_bytes(num_prompt_tokens, params.max_tokens)

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` its extent (raises OutOfKVSpace); the caller must ``release``."""
        if seq.extent is None:
            seq.extent = self.arena.allocate(self.extent_bytes(seq.num_prompt_tokens, seq.params))

    def release(self, seq: Sequence) -> None:
        """Free ``seq``'s extent; safe to call twice."""
        extent, seq.extent = seq.extent, None
        if extent is not None:
            self.arena.free(extent)

    def kv_prompt_view(self, seq: Sequence) -> torch.Tensor:
        """[L, 2, Tp, Hkv, D] view of ``seq``'s prompt region in the arena."""
        if seq.extent is None:
            raise InvalidArgument(f"sequence {seq.request_id!r} has no KV extent")
        return self.layout.view(self.arena.buffer, seq.extent.offset, seq.num_prompt_tokens)

    def kv_generation_view(self, seq: Sequence) -> torch.Tensor:
        """[L, 2, G, Hkv, D] view of ``seq``'s generation region (G = max_tokens)."""
        if seq.extent is None:
            raise InvalidArgument(f"sequence {seq.request_id!r} has no KV extent")
        offset = self.layout.generation_offset(seq.extent.offset, seq.num_prompt_tokens)
        return self.layout.view(self.arena.buffer, offset, seq.num_generation_slots)

    # -- forward passes -------------------------------------------------------------
    def prefill(self, seqs: list[Sequence],
                on_layer_done: Callable[[int], None] | None = None) -> list[int]:
        """Run the rest of each prompt in one packed batch; returns each first token."""
        chunks = [PrefillChunk(s, s.num_prompt_tokens - s.num_cached_tokens) for s in seqs]
        for c in chunks:
            if c.num_tokens <= 0 or c.seq.output_ids:
                raise InvalidArgument(f"sequence {c.seq.request_id!r} is already prefilled")
        tokens = {id(s): t for s, t in self.step(chunks, [], on_layer_done)}
        return [tokens[id(s)] for s in seqs]

    def decode_step(self, seqs: list[Sequence]) -> list[int]:
        """One token for each running sequence."""
        return [t for _, t in self.step([], seqs)]

    def step(self, chunks: list[PrefillChunk], decodes: list[Sequence],
             on_layer_done: Callable[[int], None] | None = None) -> list[tuple[Sequence, int]]:
        """One forward mixing prompt chunks and decode tokens.

        Returns (seq, new token) for sequences whose prompt this step completes
        (in chunk order), then for the decode sequences (in order); appends those
        tokens to output_ids and sets finish_reason when a stop condition hits.
        """
        ids: list[int] = []
        positions: list[int] = []
        items: list[AttnItem] = []
        sampled: list[tuple[Sequence, int]] = []  # (seq, packed row whose logits it samples)
        for c in chunks:
            seq, start = c.seq, c.seq.num_cached_tokens
            if not 0 < c.num_tokens <= seq.num_prompt_tokens - start:
                raise InvalidArgument(
                    f"chunk of {c.num_tokens} tokens does not fit the {seq.request_id!r} prompt"
                )
            self.allocate(seq)
            row = len(ids)
            ids.extend(seq.prompt_ids[start : start + c.num_tokens])
            positions.extend(range(start, start + c.num_tokens))
            items.append(AttnItem(slice(row, len(ids)), start, self.kv_prompt_view(seq), None,
                                  False))
            if start + c.num_tokens == seq.num_prompt_tokens:
                sampled.append((seq, len(ids) - 1))
        for seq in decodes:
            if not seq.is_prefilled or seq.is_finished or seq.extent is None:
                raise InvalidArgument(f"sequence {seq.request_id!r} is not ready to decode")
            pos = seq.num_tokens - 1  # the newest token, whose KV is not cached yet
            row = len(ids)
            ids.append(seq.output_ids[-1])
            positions.append(pos)
            items.append(AttnItem(slice(row, row + 1), pos, self.kv_prompt_view(seq),
                                  self.kv_generation_view(seq), True))
            sampled.append((seq, row))
        if not items:
            return []
        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        logits = self.model.forward(
            as_tensor(ids), as_tensor(positions), items,
            as_tensor([row for _, row in sampled]), on_layer_done,
        )  # [B, V]
        for c in chunks:
            c.seq.num_cached_tokens += c.num_tokens
        for seq in decodes:
            seq.num_cached_tokens += 1
        new_tokens = sample(logits, [s.params for s, _ in sampled],
                            [s.generator for s, _ in sampled])
        for (seq, _), tok in zip(sampled, new_tokens, strict=True):
            self._stop.append(seq, tok)
        return [(seq, tok) for (seq, _), tok in zip(sampled, new_tokens, strict=True)]


def _local_arena(config: ModelConfig, dtype: str, device: torch.device,
                 kv_capacity_bytes: int | None) -> Arena:
    layout = config.kv_layout(dtype)
    capacity = kv_capacity_bytes or min(
        DEFAULT_KV_BYTES_CAP, 32 * config.max_context * layout.token_bytes
    )
    if capacity <= 0:
        raise InvalidArgument(f"kv_capacity_bytes must be positive, got {capacity}")
    # Uninitialized is fine: attention only reads slots it has written.
    return Arena(buffer=torch.empty(capacity, dtype=torch.uint8, device=device))
