"""Tokenizers: a byte-level one for the presets, and HF ``tokenizer.json``.

``IncrementalDetokenizer`` turns a token stream into text without ever
emitting half a UTF-8 character: it re-decodes a short window of trailing
tokens and only emits text once it no longer ends in U+FFFD.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from pdserve.errors import InvalidArgument


@runtime_checkable
class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are bytes; 256 is BOS, 257 EOS; higher ids decode to nothing."""

    def __init__(self, vocab_size: int = 260, bos_token_id: int = 256, eos_token_id: int = 257):
        if vocab_size < 258:
            raise ValueError(f"byte tokenizer needs vocab_size >= 258, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = (eos_token_id,)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` loaded through the ``tokenizers`` library."""

    def __init__(self, path: str | Path, *, bos_token_id: int | None,
                 eos_token_ids: tuple[int, ...], vocab_size: int):
        from tokenizers import Tokenizer as _HFTok

        try:
            self._tok = _HFTok.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on bad files
            raise InvalidArgument(f"cannot load tokenizer {path}: {e}") from None
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


def load_tokenizer(model_dir: str | Path, *, bos_token_id: int | None,
                   eos_token_ids: tuple[int, ...], vocab_size: int) -> Tokenizer:
    """``tokenizer.json`` of a checkpoint; special ids fall back to config.json's."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InvalidArgument(f"{path} not found (a checkpoint directory needs tokenizer.json)")
    cfg_path = model_dir / "tokenizer_config.json"
    # add_bos_token=false (Qwen2) means prompts carry no BOS.
    if cfg_path.is_file() and json.loads(cfg_path.read_text()).get("add_bos_token") is False:
        bos_token_id = None
    return HFTokenizer(path, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids,
                       vocab_size=vocab_size)


class IncrementalDetokenizer:
    """Streams text for a growing token list; holds back incomplete UTF-8."""

    # Tokens re-decoded for context: enough for a 4-byte character split in bytes.
    _WINDOW = 6

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # tokens whose text is already out

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (may be "")."""
        self._ids.append(token_id)
        start = max(0, self._emitted - self._WINDOW)
        prefix = self._tok.decode(self._ids[start : self._emitted])
        full = self._tok.decode(self._ids[start:])
        pending = len(self._ids) - self._emitted
        # A UTF-8 character spans at most 4 tokens of a byte-level vocab; past
        # that the replacement char is real (invalid bytes), so let it out.
        if pending < 4 and (full.endswith("\ufffd") or not full.startswith(prefix)):
            return ""
        self._emitted = len(self._ids)
        return full[_common_prefix_len(prefix, full) :]

    def flush(self) -> str:
        """Whatever is held back (e.g. at finish), replacement chars included."""
        start = max(0, self._emitted - self._WINDOW)
        prefix = self._tok.decode(self._ids[start : self._emitted])
        full = self._tok.decode(self._ids[start:])
        self._emitted = len(self._ids)
        return full[_common_prefix_len(prefix, full) :]


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
