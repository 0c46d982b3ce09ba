"""Per-request sampling parameters and the sampler.

Determinism: a seeded request draws from its own ``torch.Generator`` (one per
sequence, advanced once per token), so its tokens do not depend on which other
requests share the batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.errors import InvalidArgument

MAX_TOP_K = 1 << 20
MAX_STOP_STRINGS = 16
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, None)
        if not isinstance(self.temperature, (int, float)) or not (
            math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0
        ):
            raise InvalidArgument(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("top_k", self.top_k, 0, MAX_TOP_K)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, _INT64_MAX)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidArgument(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"stop must hold at most {MAX_STOP_STRINGS} strings")
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidArgument(f"stop_token_ids must be a tuple, got {self.stop_token_ids!r}")
        for tok in self.stop_token_ids:
            _check_int("stop_token_ids", tok, 0, None)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidArgument(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Parse a request's JSON ``sampling_parameters``; unknown keys are errors."""
        if not isinstance(d, Mapping):
            raise InvalidArgument(
                f"sampling_parameters must be a JSON object, got {type(d).__name__}"
            )
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise InvalidArgument(
                f"unknown sampling parameter(s) {unknown}; allowed: {sorted(_FIELDS)}"
            )
        kw: dict[str, Any] = {}
        for key in ("temperature", "top_p"):
            if key in d:
                kw[key] = _as_float(key, d[key])
        for key in ("top_k", "max_tokens", "seed"):
            if key in d and not (key == "seed" and d[key] is None):
                kw[key] = _as_int(key, d[key])
        if "stop" in d and d["stop"] is not None:
            stop = d["stop"]
            kw["stop"] = (stop,) if isinstance(stop, str) else _as_tuple("stop", stop)
        if "stop_token_ids" in d and d["stop_token_ids"] is not None:
            raw = _as_tuple("stop_token_ids", d["stop_token_ids"])
            kw["stop_token_ids"] = tuple(_as_int("stop_token_ids", t) for t in raw)
        if "ignore_eos" in d:
            if not isinstance(d["ignore_eos"], bool):
                raise InvalidArgument(f"ignore_eos must be true or false, got {d['ignore_eos']!r}")
            kw["ignore_eos"] = d["ignore_eos"]
        return cls(**kw)


_FIELDS = frozenset(
    ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")
)


def _check_int(name: str, value: Any, lo: int, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidArgument(f"{name} must be {bound}, got {value}")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    return value


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number, got {value!r}")
    return float(value)


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument(f"{name} must be a list, got {value!r}")
    return tuple(value)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The per-sequence generator; None for greedy requests (nothing to draw)."""
    if params.is_greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` [B, V]."""
    greedy = logits.argmax(dim=-1).tolist()  # [B]
    out: list[int] = []
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.is_greedy or gen is None:
            out.append(int(greedy[i]))
        else:
            out.append(_sample_one(logits[i], p, gen))
    return out


def _sample_one(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    logits = logits.float() / p.temperature  # [V]
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        drop = cum - sorted_logits.softmax(-1) >= p.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
