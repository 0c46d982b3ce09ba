"""Arrival times and synthetic request lengths.

Arrivals follow vLLM's benchmark: inter-arrival gaps are gamma distributed
with shape ``burstiness`` and mean ``1 / rate``. ``burstiness = 1`` is a
Poisson process; below 1 traffic is burstier, above 1 more regular.
Everything is seeded so a workload can be replayed exactly.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from pdserve.bench.records import RequestSpec


@dataclass(frozen=True)
class LengthDistribution:
    """Normal lengths, rounded and clamped to [min_len, max_len]; stddev 0 = fixed."""

    mean: float
    stddev: float = 0.0
    min_len: int = 1
    max_len: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and self.mean >= 1):
            raise ValueError(f"mean length must be >= 1, got {self.mean}")
        if not (math.isfinite(self.stddev) and self.stddev >= 0):
            raise ValueError(f"length stddev must be >= 0, got {self.stddev}")
        if self.min_len < 1:
            raise ValueError(f"min_len must be >= 1, got {self.min_len}")
        if self.max_len is not None and self.max_len < self.min_len:
            raise ValueError(f"max_len {self.max_len} is below min_len {self.min_len}")

    def sample(self, rng: random.Random) -> int:
        value = round(rng.gauss(self.mean, self.stddev)) if self.stddev > 0 else round(self.mean)
        value = max(self.min_len, value)
        if self.max_len is not None:
            value = min(self.max_len, value)
        return value


def iter_arrivals(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless send times (s from start); the first at t = 0.

    ``rate = inf`` sends everything at t = 0, like vLLM's ``--request-rate inf``.
    """
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    return _arrivals(rate, burstiness, seed)


def _arrivals(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    rng = random.Random(seed)
    # shape k, scale theta with k * theta = 1 / rate keeps the mean gap at 1 / rate.
    theta = 0.0 if math.isinf(rate) else 1.0 / (rate * burstiness)
    now = 0.0
    while True:
        yield now
        if theta > 0:
            now += rng.gammavariate(burstiness, theta)


def gamma_arrivals(
    num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """The first ``num_requests`` times of ``iter_arrivals``."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    return list(itertools.islice(iter_arrivals(rate, burstiness, seed), num_requests))


def iter_synthetic_requests(
    input_lengths: LengthDistribution,
    output_lengths: LengthDistribution,
    arrivals: Iterable[float] | None = None,
    seed: int = 0,
    first_index: int = 0,
) -> Iterator[RequestSpec]:
    """Requests with seeded lengths, endless unless ``arrivals`` ends.

    ``arrivals`` (if given) sets their send times; without it the requests are
    for closed-loop use (``arrival_s`` None).
    """
    # Lengths use their own stream so that changing the rate keeps the lengths.
    rng = random.Random(seed)
    times: Iterable[float | None] = itertools.repeat(None) if arrivals is None else arrivals
    for i, t in enumerate(times):
        yield RequestSpec(
            index=first_index + i,
            input_len=input_lengths.sample(rng),
            output_len=output_lengths.sample(rng),
            arrival_s=t,
        )


def synthetic_requests(
    num_requests: int,
    input_lengths: LengthDistribution,
    output_lengths: LengthDistribution,
    arrivals: Sequence[float] | None = None,
    seed: int = 0,
) -> list[RequestSpec]:
    """The first ``num_requests`` of ``iter_synthetic_requests``."""
    if arrivals is not None and len(arrivals) != num_requests:
        raise ValueError(f"{len(arrivals)} arrival times for {num_requests} requests")
    it = iter_synthetic_requests(input_lengths, output_lengths, arrivals, seed)
    return list(itertools.islice(it, num_requests))


@dataclass(frozen=True)
class PromptIds:
    """Random prompt token ids in [min_id, max_id), seeded per request.

    The default range holds ordinary tokens in byte-level and BPE vocabularies
    alike (no BOS/EOS/pad ids, which sit at the low end), so the prompt has
    exactly ``input_len`` tokens and cannot end the request early.
    """

    min_id: int = 32
    max_id: int = 127
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_id < 0 or self.max_id <= self.min_id:
            raise ValueError(f"token id range [{self.min_id}, {self.max_id}) is empty or negative")
        if self.max_id > 2**31:
            raise ValueError(f"max token id {self.max_id} does not fit INT32")

    def for_request(self, spec: RequestSpec) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + spec.index)
        return [rng.randrange(self.min_id, self.max_id) for _ in range(spec.input_len)]
