"""Stop conditions, checked as each token is appended.

Order: stop token ids, then EOS (unless ignore_eos), then stop strings, then
max_tokens. The token that triggers a stop stays in ``output_ids``; for a stop
string, ``seq.stop_text_len`` is the length of ``output_text`` before the
match, so a server can return the text without it.
"""

from __future__ import annotations

from pdserve.engine.sequence import Sequence
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class StopChecker:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self._eos = frozenset(eos_token_ids)

    def append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        p = seq.params
        if (
            token in p.stop_token_ids
            or (not p.ignore_eos and token in self._eos)
            or (p.stop and self._matches_stop_string(seq, token))
        ):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            seq.finish_reason = "length"

    def _matches_stop_string(self, seq: Sequence, token: int) -> bool:
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self._tokenizer)
            # A sequence prefilled elsewhere (decode role) arrives with tokens
            # this engine never checked: replay them so text stays contiguous.
            seq.output_text = "".join(seq.detokenizer.push(t) for t in seq.output_ids[:-1])
        new_text = seq.detokenizer.push(token)
        if not new_text:
            return False
        # Only the tail can hold a new match: the new text plus the longest
        # stop string's worth of older text.
        tail_start = max(0, len(seq.output_text) - max(len(s) for s in seq.params.stop) + 1)
        seq.output_text += new_text
        tail = seq.output_text[tail_start:]
        hits = [tail.find(s) for s in seq.params.stop]
        found = [h for h in hits if h >= 0]
        if not found:
            return False
        seq.stop_text_len = tail_start + min(found)
        return True
