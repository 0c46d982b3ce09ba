"""Sampling parameters: validation, JSON parsing, stop conditions, filters."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.engine.sampling import sample
from pdserve.errors import InvalidArgument


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop_token_ids": (-2,)}, "stop_token_ids"),
    ],
)
def test_out_of_range_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**kwargs)


def test_from_dict_parses_request_json() -> None:
    p = SamplingParams.from_dict({
        "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 5, "stop": "END",
        "stop_token_ids": [3, 4], "ignore_eos": True, "max_tokens": 12,
    })
    assert p == SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, top_k=40, seed=5,
                               stop=("END",), stop_token_ids=(3, 4), ignore_eos=True)
    assert SamplingParams.from_dict({"stop": ["a", "b"]}).stop == ("a", "b")
    assert SamplingParams.from_dict({}) == SamplingParams()


@pytest.mark.parametrize(
    "d,match",
    [
        ({"temprature": 1.0}, "unknown sampling parameter"),
        ({"top_k": "5"}, "top_k"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"stop": 5}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_from_dict_rejects_bad_input(d: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        SamplingParams.from_dict(d)


def test_bad_requests_name_the_problem(tiny: LLMEngine) -> None:
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(InvalidArgument, match="empty"):
        tiny.new_sequence("r", [], ok)
    with pytest.raises(InvalidArgument, match="context"):
        tiny.new_sequence("r", [1] * tiny.max_context, ok)
    with pytest.raises(InvalidArgument, match="out of range"):
        tiny.new_sequence("r", [1, tiny.config.vocab_size], ok)


def test_stop_token_ids_and_eos_end_with_stop(tiny: LLMEngine) -> None:
    prompt = [256, 72, 105, 33]
    free = generate(tiny, [prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert len(free) == 20
    stop_at = free[5]
    seq = tiny.new_sequence("s", prompt, SamplingParams(max_tokens=20, stop_token_ids=(stop_at,)))
    tiny.prefill([seq])
    while not seq.is_finished:
        tiny.decode_step([seq])
    tiny.release(seq)
    assert seq.finish_reason == "stop"
    assert seq.output_ids == free[: free.index(stop_at) + 1]


def test_stop_string_ends_with_stop_and_marks_the_text(tiny: LLMEngine) -> None:
    prompt = [256, 72, 105, 33]
    free = generate(tiny, [prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    text = tiny.tokenizer.decode(free)
    stop = text[8:10]
    assert stop, "need printable output to pick a stop string from"
    seq = tiny.new_sequence("s", prompt, SamplingParams(max_tokens=30, stop=(stop,),
                                                         ignore_eos=True))
    tiny.prefill([seq])
    while not seq.is_finished:
        tiny.decode_step([seq])
    tiny.release(seq)
    assert seq.finish_reason == "stop"
    assert seq.stop_text_len == text.index(stop)
    assert seq.output_text.endswith(stop) or stop in seq.output_text
    assert len(seq.output_ids) < 30


def test_max_tokens_ends_with_length(tiny: LLMEngine) -> None:
    seq = tiny.new_sequence("s", [256, 1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    tiny.prefill([seq])
    while not seq.is_finished:
        tiny.decode_step([seq])
    tiny.release(seq)
    assert seq.finish_reason == "length" and len(seq.output_ids) == 3


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]])
    gen = torch.Generator().manual_seed(0)
    draws_k = {sample(logits, [SamplingParams(temperature=2.0, top_k=2)], [gen])[0]
               for _ in range(200)}
    assert draws_k == {0, 1}
    # softmax(logits) ~ [.66, .24, .09, ...]: top_p 0.8 keeps the first two.
    draws_p = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.8)], [gen])[0]
               for _ in range(300)}
    assert draws_p == {0, 1}
    assert sample(logits, [SamplingParams()], [None]) == [0]


def test_stop_string_across_a_handoff(tiny: LLMEngine) -> None:
    """A sequence whose first token came from another engine still matches stop
    strings that span the first and later tokens."""
    prompt = [256, 72, 105, 33]
    free = generate(tiny, [prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    text = tiny.tokenizer.decode(free)
    stop = tiny.tokenizer.decode(free[:3])  # spans the handed-off first token
    producer = tiny.new_sequence("p", prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    first = tiny.prefill([producer])[0]
    consumer = tiny.new_sequence("c", prompt, SamplingParams(max_tokens=30, stop=(stop,),
                                                              ignore_eos=True))
    tiny.allocate(consumer)
    tiny.kv_prompt_view(consumer).copy_(tiny.kv_prompt_view(producer))
    tiny.release(producer)
    consumer.num_cached_tokens = len(prompt)
    consumer.output_ids.append(first)
    while not consumer.is_finished:
        tiny.decode_step([consumer])
    tiny.release(consumer)
    assert stop and text.startswith(stop)
    assert consumer.finish_reason == "stop" and consumer.stop_text_len == 0
