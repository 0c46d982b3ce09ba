"""Continuous batching: sequences join and leave between steps.

Each ``step`` is one forward under a token budget: every running sequence
decodes one token first, then waiting prompts fill what is left of the budget
(whole prompts, or chunks of them with ``chunked_prefill``). That mix is the
aggregated mode; a decode instance uses the same class with sequences whose
prompt KV arrived from a prefill instance (they skip the prefill queue).

KV ownership: the batcher allocates extents for the prompts it prefills and
releases the extent of every sequence it finishes or aborts, including
sequences added with an extent someone else allocated.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from pdserve.engine.engine import LLMEngine, PrefillChunk
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.errors import InvalidArgument, OutOfKVSpace


@dataclass
class StepOutput:
    seq: Sequence
    new_token_ids: list[int]
    finished: bool


class ContinuousBatcher:
    def __init__(self, engine: LLMEngine, *, max_batch_size: int, max_step_tokens: int,
                 chunked_prefill: bool) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        if max_step_tokens < max_batch_size:
            raise ValueError(
                f"max_step_tokens ({max_step_tokens}) must be >= max_batch_size "
                f"({max_batch_size}) so every running sequence decodes each step"
            )
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.chunked_prefill = chunked_prefill
        self._waiting: deque[Sequence] = deque()  # not yet running (maybe part-prefilled)
        self._running: list[Sequence] = []  # prefilled, decoding
        # add/abort may come from request threads while step runs on the worker.
        self._lock = threading.RLock()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._running or self._waiting)

    def add(self, seq: Sequence) -> None:
        if seq.is_finished:
            raise InvalidArgument(f"sequence {seq.request_id!r} is already finished")
        if seq.is_prefilled and seq.extent is None:
            raise InvalidArgument(f"prefilled sequence {seq.request_id!r} has no KV extent")
        with self._lock:
            self._waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Finish ``request_id`` with reason "abort" and free its KV; False if unknown."""
        with self._lock:
            for queue in (self._waiting, self._running):
                for seq in queue:
                    if seq.request_id == request_id:
                        queue.remove(seq)
                        seq.finish_reason = "abort"
                        self.engine.release(seq)
                        return True
        return False

    def step(self) -> list[StepOutput]:
        with self._lock:
            decodes = list(self._running)
            budget = self.max_step_tokens - len(decodes)
            chunks: list[PrefillChunk] = []
            failed: list[StepOutput] = []
            slots = self.max_batch_size - len(decodes)
            while self._waiting and slots > 0 and budget > 0:
                seq = self._waiting[0]
                if seq.is_prefilled:  # KV came from elsewhere: join the decode batch
                    self._waiting.popleft()
                    self._running.append(seq)
                    decodes.append(seq)
                    slots -= 1
                    budget -= 1
                    continue
                remaining = seq.num_prompt_tokens - seq.num_cached_tokens
                take = min(remaining, budget) if self.chunked_prefill else remaining
                if take > budget and (chunks or decodes):
                    break  # an unchunked prompt over budget waits for a lighter step
                try:
                    self.engine.allocate(seq)
                except OutOfKVSpace as e:
                    if decodes or chunks:
                        break  # space frees up as running sequences finish
                    self._waiting.popleft()  # nothing will ever free space for it
                    seq.finish_reason = "abort"
                    seq.error = e
                    failed.append(StepOutput(seq, [], True))
                    continue
                chunks.append(PrefillChunk(seq, take))
                budget -= take
                if take == remaining:
                    self._waiting.popleft()
                    slots -= 1
                else:
                    break  # the rest of this prompt goes in the next step
            try:
                results = self.engine.step(chunks, decodes)
            except BaseException:
                self._fail_all(chunks, decodes)
                raise
            outputs = failed
            for seq, token in results:
                if seq not in self._running:
                    self._running.append(seq)  # its prompt completed this step
                outputs.append(StepOutput(seq, [token], seq.is_finished))
                if seq.is_finished:
                    self._running.remove(seq)
                    self.engine.release(seq)
            return outputs

    def _fail_all(self, chunks: list[PrefillChunk], decodes: list[Sequence]) -> None:
        """A forward raised: its sequences' KV is unusable; free it and drop them."""
        for seq in [c.seq for c in chunks] + decodes:
            seq.finish_reason = "abort"
            self.engine.release(seq)
            if seq in self._running:
                self._running.remove(seq)
            if seq in self._waiting:
                self._waiting.remove(seq)


def generate(engine: LLMEngine, prompts: list[list[int]],
             params: list[SamplingParams] | SamplingParams, *, max_batch_size: int = 32,
             chunked_prefill: bool = False, max_step_tokens: int | None = None) -> list[list[int]]:
    """Offline helper: every prompt's output token ids, batched continuously."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise InvalidArgument(f"{len(prompts)} prompts but {len(plist)} sampling params")
    seqs = [
        engine.new_sequence(f"gen-{i}", p, sp)
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True))
    ]
    batcher = ContinuousBatcher(
        engine, max_batch_size=max_batch_size, chunked_prefill=chunked_prefill,
        max_step_tokens=max_step_tokens or max(max_batch_size, 2048),
    )
    for seq in seqs:
        batcher.add(seq)
    try:
        while batcher.has_unfinished():
            batcher.step()
    finally:
        for seq in seqs:
            engine.release(seq)
    for seq in seqs:
        if seq.error is not None:
            raise seq.error
    return [seq.output_ids for seq in seqs]
