"""What the router hands instances and what they hand back (one module).

Each message is a small frozen dataclass with ``to_bytes``/``from_bytes``
(compact JSON); it travels as the single BYTES tensor ``payload`` of a BLS
request or response, next to a STRING ``op`` saying what to do:

    router -> decode      op=reserve  GenerateCall   one Accepted (KV handle, channel incarnation)
    router -> prefill     op=prefill  PrefillCall    one PrefillResult
    router -> decode      op=commit   CommitCall     one empty TokenChunk (ack)
    router -> decode/agg  op=abort    AbortCall      one empty TokenChunk (ack)
    router -> aggregated  op=generate GenerateCall   one Accepted (channel incarnation)
    router -> any         op=ping     (empty)        one empty TokenChunk (liveness probe)

Every call completes at once: the tokens of reserve/generate requests travel on
the token channel (``token_wire``), never as Triton responses, so no request
stays in flight in Triton while an instance streams.

Bad bytes raise ``InvalidArgument`` saying what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

from pdserve.errors import InvalidArgument

Op = Literal["reserve", "prefill", "commit", "abort", "generate", "ping"]
OPS: tuple[Op, ...] = ("reserve", "prefill", "commit", "abort", "generate", "ping")
MAX_PAYLOAD_BYTES = 16 << 20

T = TypeVar("T", bound="_Message")


class _Message:
    """JSON round trip with field checking, shared by every contract."""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()  # type: ignore[call-overload]

    @classmethod
    def from_bytes(cls: type[T], data: bytes) -> T:
        if len(data) > MAX_PAYLOAD_BYTES:
            raise InvalidArgument(f"{cls.__name__} of {len(data)} bytes is too large")
        try:
            raw = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"{cls.__name__} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{cls.__name__} must be a JSON object")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if set(raw) - names:
            raise InvalidArgument(f"{cls.__name__} has unknown fields {sorted(set(raw) - names)}")
        for key in ("prompt_ids", "token_ids"):
            if key in raw and isinstance(raw[key], list):
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{cls.__name__} is invalid: {exc}") from None


def _check_ids(name: str, ids: tuple[int, ...], allow_empty: bool = False) -> None:
    if not isinstance(ids, tuple) or not all(type(t) is int and t >= 0 for t in ids):
        raise ValueError(f"{name} must be non-negative integers")
    if not ids and not allow_empty:
        raise ValueError(f"{name} must not be empty")


@dataclass(frozen=True)
class GenerateCall(_Message):
    """A whole request: decode reserves KV for it; aggregated runs it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: dict[str, Any]  # SamplingParams.from_dict input, max_tokens included
    channel: str = ""  # the router's token channel address (token_wire.parse_address)

    def __post_init__(self) -> None:
        _check_ids("prompt_ids", self.prompt_ids)
        if not isinstance(self.sampling, dict):
            raise ValueError("sampling must be a JSON object")


@dataclass(frozen=True)
class Accepted(_Message):
    """Answer to reserve/generate: tokens will come on the channel of ``incarnation``."""

    incarnation: str  # hex of the instance stub's ChannelHub.incarnation
    handle: str = ""  # reserve only: KVHandle.to_bytes() decoded as UTF-8


@dataclass(frozen=True)
class PrefillCall(_Message):
    """Prompt for a prefill instance and where its KV must land (KVHandle bytes)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: dict[str, Any]
    handle: str  # KVHandle.to_bytes() decoded as UTF-8 (it is JSON)

    def __post_init__(self) -> None:
        _check_ids("prompt_ids", self.prompt_ids)


@dataclass(frozen=True)
class PrefillResult(_Message):
    request_id: str
    first_token: int
    prefill_s: float  # forward pass
    transfer_s: float  # KV send, as seen by the prefill side
    finish_reason: str = ""  # set when the first token already ends the request
    text_len: int = -1  # as in TokenChunk
    rng_state: str = ""  # hex of the sampler's generator state after the first token
    # The decode already started the sequence: the KV's completion notice carried
    # the first token (CommitCall below), so the router sends no commit.
    started: bool = False

    def __post_init__(self) -> None:
        if type(self.started) is not bool:
            raise ValueError(f"started must be a bool, got {self.started!r}")

    def to_bytes(self) -> bytes:
        # ``started`` left out when False: a router of before it (contracts refuse
        # unknown fields) still reads every answer that needs its commit.
        d = asdict(self)
        if not self.started:
            del d["started"]
        return json.dumps(d, separators=(",", ":")).encode()


@dataclass(frozen=True)
class CommitCall(_Message):
    """The KV has landed: decode may start the sequence with ``first_token``.

    Sent by the router after the prefill answered, or (``decode_start:
    on_landing``) by the prefill itself as the KV transfer's completion notice.
    """

    request_id: str
    first_token: int
    # A seeded request's generator continues on decode where prefill left it,
    # so disaggregated sampling draws exactly what one engine would.
    rng_state: str = ""


@dataclass(frozen=True)
class AbortCall(_Message):
    request_id: str


@dataclass(frozen=True)
class TokenChunk(_Message):
    """One streamed response of a decode/aggregated instance.

    The first response of ``reserve`` carries only ``handle``. The last one has
    ``finish_reason``; ``text_len`` (when not -1) cuts the text at a stop string.
    """

    token_ids: tuple[int, ...] = ()
    finish_reason: str = ""
    handle: str = ""
    text_len: int = -1

    def __post_init__(self) -> None:
        _check_ids("token_ids", self.token_ids, allow_empty=True)
        if self.finish_reason not in ("", "stop", "length", "abort"):
            raise ValueError(f"finish_reason {self.finish_reason!r} is not stop/length/abort")


def parse_op(raw: str) -> Op:
    if raw not in OPS:
        raise InvalidArgument(f"op must be one of {OPS}, got {raw!r}")
    return raw
