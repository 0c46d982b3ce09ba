from __future__ import annotations

from pdserve.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer


def test_byte_tokenizer_round_trip_with_bos() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "héllo ✓"
    assert tok.encode("a", add_bos=False) == [97]


def test_incremental_detokenizer_holds_partial_utf8() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in tok.encode("a✓b€", add_bos=False)]
    # ✓ and € are three bytes each: nothing comes out until the last byte.
    assert pieces == ["a", "", "", "✓", "b", "", "", "€"]
    assert detok.flush() == ""


def test_incremental_detokenizer_lets_invalid_bytes_through() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    out = "".join(detok.push(t) for t in [0xFF, 0xFF, 0xFF, 0xFF, 0x41]) + detok.flush()
    assert out.endswith("A") and "\ufffd" in out
