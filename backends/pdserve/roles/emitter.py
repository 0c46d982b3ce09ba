"""Router side: token ids from instances -> client responses (no Triton import).

Detokenizes incrementally, applies ``stream`` / ``exclude_input_in_output``,
and measures TTFT and time per output token for the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pdserve.engine import IncrementalDetokenizer, Tokenizer
from pdserve.roles.requests import ClientRequest

Send = Callable[[dict[str, np.ndarray], bool], None]


@dataclass
class Emitter:
    request: ClientRequest
    tokenizer: Tokenizer
    send: Send  # (outputs, final)
    start: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    num_tokens: int = 0
    finish_reason: str = ""
    _text: list[str] = field(default_factory=list)
    _ids: list[int] = field(default_factory=list)
    _part_start: int = 0  # characters of text before the part being generated now

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer)

    def tokens(self, token_ids: tuple[int, ...] | list[int]) -> None:
        if not token_ids:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.num_tokens += len(token_ids)
        text = "".join(self._detok.push(t) for t in token_ids)
        self._ids.extend(token_ids)
        if self.request.stream:
            self.send(_outputs(text, list(token_ids), ""), False)
        else:
            self._text.append(text)

    def begin_part(self) -> None:
        """A resumed request's next part starts: the text length a decode reports
        at a stop string counts from here (it sees the earlier tokens as prompt)."""
        self._part_start = sum(len(t) for t in self._text)

    def finish(self, reason: str, text_len: int = -1) -> None:
        """Last response, with FINAL; ``text_len`` >= 0 cuts the text at a stop string
        (counted from the start of the current part)."""
        self.finish_reason = reason
        tail = self._detok.flush()
        if self.request.stream:
            self.send(_outputs(tail, [], reason), True)
            return
        text = "".join(self._text) + tail
        if text_len >= 0:
            text = text[:self._part_start + text_len]
        if not self.request.exclude_input_in_output:
            text = self.request.prompt_text + text
        self.send(_outputs(text, self._ids, reason), True)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every token sent (or to be sent) so far: what a resumed request continues after."""
        return tuple(self._ids)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.start

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_at is None or self.num_tokens < 2:
            return None
        return (time.perf_counter() - self.first_token_at) / (self.num_tokens - 1)


def _outputs(text: str, ids: list[int], reason: str) -> dict[str, np.ndarray]:
    return {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "output_ids": np.array(ids, dtype=np.int32),
        "finish_reason": np.array([reason.encode()], dtype=np.object_),
    }
