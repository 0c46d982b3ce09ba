"""Router side: a client request (tensors + parameters) -> a validated ``ClientRequest``.

Inputs follow Triton's LLM conventions (DESIGN.md §4). A field may arrive as an
input tensor or, through the HTTP generate extension, as a request parameter;
the tensor wins. Every problem raises ``InvalidArgument`` naming the field.
No Triton import: the router's ``model.py`` glue hands plain numpy arrays in.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidArgument

ROUTER_INPUTS = (
    "text_input", "input_ids", "max_tokens", "stream", "sampling_parameters", "scenario",
    "exclude_input_in_output",
)
# Sampling fields a client may also send flat, as request parameters (the HTTP
# generate extension turns extra JSON fields into parameters); a field given in
# both places keeps the ``sampling_parameters`` value.
SAMPLING_PARAMETERS = (
    "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
)
DEFAULT_MAX_TOKENS = 16


class Encoder(Protocol):
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class Limits:
    max_context: int  # prompt + generated tokens the model can attend over
    max_tokens_limit: int  # largest max_tokens a client may ask for
    vocab_size: int
    scenarios: tuple[str, ...]


@dataclass(frozen=True)
class ClientRequest:
    request_id: str  # unique per router, also used as the KV reservation key
    prompt_ids: tuple[int, ...]
    prompt_text: str
    sampling: dict[str, Any]  # validated by SamplingParams.from_dict, max_tokens set
    max_tokens: int
    stream: bool
    scenario: str
    exclude_input_in_output: bool


def parse_request(
    inputs: Mapping[str, np.ndarray],
    params: Mapping[str, Any],
    tokenizer: Encoder,
    limits: Limits,
) -> ClientRequest:
    fields = _merge(inputs, params)
    prompt_text = _text(fields.get("text_input"))
    ids = fields.get("input_ids")
    if ids is not None:
        prompt_ids = _input_ids(ids, limits.vocab_size)
    elif prompt_text is None:
        raise InvalidArgument("text_input is required (a non-empty string)")
    elif not prompt_text:
        raise InvalidArgument("text_input must not be empty")
    else:
        prompt_ids = tuple(tokenizer.encode(prompt_text))
    sampling = _sampling(fields.get("sampling_parameters"))
    for key in SAMPLING_PARAMETERS:
        if key in params and key not in sampling:
            sampling[key] = params[key]
    max_tokens = sampling.get("max_tokens", DEFAULT_MAX_TOKENS)
    if fields.get("max_tokens") is not None:
        max_tokens = _int("max_tokens", fields["max_tokens"])
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidArgument(f"max_tokens must be an integer, got {max_tokens!r}")
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidArgument(
            f"max_tokens must be in [1, {limits.max_tokens_limit}], got {max_tokens}"
        )
    if len(prompt_ids) + max_tokens > limits.max_context:
        raise InvalidArgument(
            f"prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceeds the "
            f"model context of {limits.max_context} tokens"
        )
    sampling["max_tokens"] = max_tokens
    SamplingParams.from_dict(sampling)  # raises InvalidArgument naming the bad field
    scenario = _str("scenario", fields.get("scenario")) or "default"
    if scenario not in limits.scenarios:
        raise InvalidArgument(f"unknown scenario {scenario!r}; known: {list(limits.scenarios)}")
    return ClientRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        prompt_text=prompt_text or "",
        sampling=sampling,
        max_tokens=max_tokens,
        stream=_bool("stream", fields.get("stream", False)),
        scenario=scenario,
        exclude_input_in_output=_bool(
            "exclude_input_in_output", fields.get("exclude_input_in_output", False)
        ),
    )


def _merge(inputs: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in params.items():
        if key in ROUTER_INPUTS:
            merged[key] = value
    for key, arr in inputs.items():
        if key == "input_ids":
            merged[key] = arr
        elif arr.size != 1:
            raise InvalidArgument(f"{key} must hold exactly one element, got shape {arr.shape}")
        else:
            merged[key] = arr.reshape(-1)[0]
    return merged


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("text_input is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise InvalidArgument(f"text_input must be a string, got {type(value).__name__}")


def _str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, got {type(value).__name__}")
    return value


def _int(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    raise InvalidArgument(f"{name} must be an integer, got {value!r}")


def _bool(name: str, value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (bytes, str)):
        text = value.decode() if isinstance(value, bytes) else value
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
    raise InvalidArgument(f"{name} must be true or false, got {value!r}")


def _sampling(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = _str("sampling_parameters", value) or ""
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"sampling_parameters is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(
            f"sampling_parameters must be a JSON object, got {type(parsed).__name__}"
        )
    return parsed


def _input_ids(value: object, vocab_size: int) -> tuple[int, ...]:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise InvalidArgument(f"input_ids must be INT32, got {value.dtype}")
        ids: Sequence[Any] = value.reshape(-1).tolist()
    elif isinstance(value, list):
        ids = value
    else:
        raise InvalidArgument(f"input_ids must be a list of integers, got {type(value).__name__}")
    if not ids:
        raise InvalidArgument("input_ids must not be empty")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidArgument(f"input_ids must be integers in [0, {vocab_size}), got {t!r}")
    return tuple(int(t) for t in ids)
