"""Router request validation and the router<->instance contracts (no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdserve.engine.tokenizer import ByteTokenizer
from pdserve.errors import InvalidArgument
from pdserve.roles.contracts import CommitCall, GenerateCall, PrefillResult, TokenChunk
from pdserve.roles.requests import Limits, parse_request

LIMITS = Limits(max_context=64, max_tokens_limit=32, vocab_size=260, scenarios=("default", "b"))
TOK = ByteTokenizer()


def _text(s: str) -> np.ndarray:
    return np.array([s.encode()], dtype=object)


def test_fields_from_inputs_and_parameters() -> None:
    req = parse_request({"text_input": _text("hi"), "stream": np.array([True])},
                        {"max_tokens": 5, "scenario": "b",
                         "sampling_parameters": '{"temperature": 0.5, "seed": 3}'}, TOK, LIMITS)
    assert req.prompt_ids == tuple(TOK.encode("hi"))
    assert req.max_tokens == 5 and req.sampling == {"temperature": 0.5, "seed": 3,
                                                    "max_tokens": 5}
    assert req.stream and req.scenario == "b" and not req.exclude_input_in_output
    ids = parse_request({"input_ids": np.array([1, 2, 3], dtype=np.int32)}, {}, TOK, LIMITS)
    assert ids.prompt_ids == (1, 2, 3)


def test_flat_sampling_parameters_as_the_generate_extension_sends_them() -> None:
    req = parse_request({"text_input": _text("hi")},
                        {"temperature": 0.7, "seed": 9, "top_k": 5,
                         "sampling_parameters": '{"seed": 3}'}, TOK, LIMITS)
    assert req.sampling == {"seed": 3, "temperature": 0.7, "top_k": 5, "max_tokens": 16}
    with pytest.raises(InvalidArgument, match="temperature"):
        parse_request({"text_input": _text("hi")}, {"temperature": -1.0}, TOK, LIMITS)


@pytest.mark.parametrize(("inputs", "params", "message"), [
    ({}, {}, "text_input is required"),
    ({"text_input": _text("")}, {}, "must not be empty"),
    ({"text_input": _text("x" * 60)}, {"max_tokens": 8}, "exceeds the model context"),
    ({"text_input": _text("x")}, {"max_tokens": 0}, r"max_tokens must be in \[1, 32\]"),
    ({"text_input": _text("x")}, {"max_tokens": 33}, r"max_tokens must be in \[1, 32\]"),
    ({"text_input": _text("x")}, {"max_tokens": "3"}, "max_tokens must be an integer"),
    ({"text_input": _text("x")}, {"sampling_parameters": "{"}, "not valid JSON"),
    ({"text_input": _text("x")}, {"sampling_parameters": "[1]"}, "must be a JSON object"),
    ({"text_input": _text("x")}, {"sampling_parameters": '{"tempo": 1}'}, "unknown sampling"),
    ({"text_input": _text("x")}, {"scenario": "zz"}, "unknown scenario 'zz'"),
    ({"text_input": _text("x")}, {"stream": "maybe"}, "stream must be true or false"),
    ({"input_ids": np.array([999], dtype=np.int32)}, {}, "input_ids must be integers"),
    ({"input_ids": np.array([1.5], dtype=np.float32)}, {}, "input_ids must be INT32"),
])
def test_bad_requests(inputs: dict[str, np.ndarray], params: dict[str, object],
                      message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_request(inputs, params, TOK, LIMITS)


def test_contracts_round_trip_and_reject_garbage() -> None:
    msgs = [GenerateCall("r1", (1, 2), {"max_tokens": 3}), CommitCall("r1", 7, "00ff"),
            PrefillResult("r1", 5, 0.1, 0.01, "stop", 3), TokenChunk((1, 2), "length")]
    for m in msgs:
        assert type(m).from_bytes(m.to_bytes()) == m
    for bad, message in [(b"{", "not valid JSON"), (b"[]", "JSON object"),
                         (b'{"request_id": "r", "prompt_ids": [], "sampling": {}}', "empty"),
                         (b'{"x": 1}', "unknown fields")]:
        with pytest.raises(InvalidArgument, match=message):
            GenerateCall.from_bytes(bad)
    with pytest.raises(InvalidArgument, match="finish_reason"):
        TokenChunk.from_bytes(b'{"finish_reason": "bored"}')


def test_prefill_result_leaves_started_out_unless_set() -> None:
    """A router of before ``started`` refuses unknown fields: only an answer whose
    decode started on landing carries it."""
    plain = PrefillResult("r", 5, 0.1, 0.01)
    assert "started" not in json.loads(plain.to_bytes())
    assert PrefillResult.from_bytes(plain.to_bytes()) == plain
    started = PrefillResult("r", 5, 0.1, 0.01, started=True)
    assert json.loads(started.to_bytes())["started"] is True
    assert PrefillResult.from_bytes(started.to_bytes()).started is True
