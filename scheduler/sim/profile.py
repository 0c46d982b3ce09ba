"""Latency models of one instance, fitted or hand-written.

Every figure is a plain number in a JSON/YAML file, so a profile for other
hardware (an H100 or an NPU node) is written by hand; ``source`` says where
the numbers came from (measured on this machine, or an estimate).

    prefill batch time  = fixed_s + per_token_s * T + per_token2_s * sum(t_i^2)
    decode step time    = fixed_s + stream_overhead_s + per_seq_s * B + per_ctx_token_s * C
    KV transfer time    = latency_s + bytes / bytes_per_s
                          (+ per_block_s per block of block_tokens: block-fixed)

T: prompt tokens in the batch, t_i: each prompt's length (attention is
quadratic), B: sequences in the decode batch, C: their context tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pdserve.errors import InvalidArgument

TransferMode = Literal["block_free", "block_fixed", "layerwise"]
TRANSFER_MODES: tuple[TransferMode, ...] = ("block_free", "block_fixed", "layerwise")


def _check_nonneg(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value >= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class PrefillModel:
    fixed_s: float
    per_token_s: float
    per_token2_s: float = 0.0
    max_batch_size: int = 4  # slots: prompts accepted (running + waiting for the next batch)
    max_batch_tokens: int = 16384

    def __post_init__(self) -> None:
        _check_nonneg(self, "fixed_s", "per_token_s", "per_token2_s")
        if self.max_batch_size < 1 or self.max_batch_tokens < 1:
            raise ValueError("prefill max_batch_size and max_batch_tokens must be >= 1")

    def batch_time(self, tokens: int, tokens_sq: float) -> float:
        return self.fixed_s + self.per_token_s * tokens + self.per_token2_s * tokens_sq

    def prompt_time(self, tokens: int) -> float:
        return self.batch_time(tokens, float(tokens) * tokens)


@dataclass(frozen=True)
class DecodeModel:
    fixed_s: float
    per_seq_s: float
    per_ctx_token_s: float
    max_batch_size: int = 64
    kv_capacity_tokens: int = 1 << 20
    # Serving path per step, beyond the engine's step (the instance streams one
    # response per sequence and step through Triton): fitted from a live run.
    stream_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        _check_nonneg(self, "fixed_s", "per_seq_s", "per_ctx_token_s", "stream_overhead_s")
        if self.fixed_s + self.per_seq_s <= 0:
            raise ValueError("a decode step must take some time (fixed_s + per_seq_s > 0)")
        if self.max_batch_size < 1 or self.kv_capacity_tokens < 1:
            raise ValueError("decode max_batch_size and kv_capacity_tokens must be >= 1")

    def step_time(self, batch: int, ctx_tokens: float) -> float:
        return (self.fixed_s + self.stream_overhead_s + self.per_seq_s * batch
                + self.per_ctx_token_s * ctx_tokens)


@dataclass(frozen=True)
class TransferModel:
    latency_s: float
    bytes_per_s: float
    per_block_s: float = 0.0  # block-fixed only: one message + confirmation per block
    block_tokens: int = 16

    def __post_init__(self) -> None:
        _check_nonneg(self, "latency_s", "per_block_s")
        if not self.bytes_per_s > 0 or self.block_tokens < 1:
            raise ValueError("bytes_per_s must be > 0 and block_tokens >= 1")

    def time(self, tokens: int, token_bytes: int) -> float:
        blocks = -(-tokens // self.block_tokens)
        return self.latency_s + tokens * token_bytes / self.bytes_per_s + blocks * self.per_block_s


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    kv_bytes_per_token: int
    prefill: PrefillModel
    decode: DecodeModel
    transfer: dict[str, TransferModel]
    num_layers: int = 32  # layerwise transfer hides all but one layer behind prefill
    chunk_tokens: int = 512  # aggregated role: prompt tokens fused with each decode step
    attempt_rtt_s: float = 0.0005  # router -> prefill try (accept or reject) round trip
    # Client -> router -> instances -> client path of a request beyond its prefill,
    # transfer and attempt (gRPC, Triton scheduling, the first response): added to TTFT.
    serving_overhead_s: float = 0.0
    # A prefill call's time on the router's side beyond the forward and the KV send:
    # the prompt's way to the prefill and the answer's way back through Triton. The
    # router counts the slot as taken, and the first token waits, until the answer
    # is back. On shared cores (ScenarioSpec.host) it is router work that waits its
    # turn on the router's core (cores.Host.hop_factor).
    prefill_call_s: float = 0.0
    # How much one prefill's time varies around the model's (coefficient of variation):
    # each batch's time is drawn lognormal with it, seeded per scenario. 0: exactly the
    # model's. Exact times line every slot's end up with the router's 50 ms back-off
    # timers, and the order waiting requests get slots in then follows that rhythm.
    prefill_cv: float = 0.0
    reload_s: float = 60.0  # replace a failed instance: load weights, warm up
    role_switch_s: float = 20.0  # switch prefill <-> decode through the repository
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 1 or self.num_layers < 1 or self.chunk_tokens < 1:
            raise ValueError("kv_bytes_per_token, num_layers and chunk_tokens must be >= 1")
        _check_nonneg(self, "attempt_rtt_s", "serving_overhead_s", "prefill_call_s",
                      "prefill_cv", "reload_s", "role_switch_s")
        missing = [m for m in ("block_free", "block_fixed") if m not in self.transfer]
        if missing:
            raise ValueError(f"profile {self.name!r} lacks transfer modes {missing}")

    def transfer_time(self, mode: TransferMode, tokens: int) -> float:
        if mode == "layerwise":
            return self.transfer["block_free"].time(tokens, self.kv_bytes_per_token)
        return self.transfer[mode].time(tokens, self.kv_bytes_per_token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Profile:
        try:
            body = dict(doc)
            body["prefill"] = PrefillModel(**body["prefill"])
            body["decode"] = DecodeModel(**body["decode"])
            body["transfer"] = {k: TransferModel(**v) for k, v in body["transfer"].items()}
            return cls(**body)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad simulator profile: {exc}") from exc


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"profile not found: {p}")
    text = p.read_text()
    try:
        doc = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"{p}: not valid JSON/YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{p}: a profile is a mapping, got {type(doc).__name__}")
    return Profile.from_dict(doc)


def save_profile(profile: Profile, path: str | Path) -> None:
    p = Path(path)
    doc = profile.to_dict()
    if p.suffix == ".json":
        p.write_text(json.dumps(doc, indent=2) + "\n")
    else:
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
