"""What the simulated cluster is asked to do: arrivals, lengths, failures.

Arrival gaps come from the load generator's own process
(``pdserve.bench.workload.iter_arrivals``: gamma gaps, burstiness 1 = Poisson,
< 1 bursty), lengths from its ``LengthDistribution``, traces from its readers,
so a simulated and a measured run can be driven by the same workload.

A day/night cycle modulates each scenario's rate (thinning of the peak-rate
process) and may switch its length mix at night: by day chat (short prompts,
long answers), by night batch summarisation (long prompts, short answers),
which moves the best P/D ratio.

    rate
    peak |‾‾‾‾‾‾‾‾‾‾‾‾|            |‾‾‾‾‾‾
         |   day      |   night    |
    low  |            |____________|
         0        day_s        period_s
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from pdserve.bench.records import RequestSpec
from pdserve.bench.workload import LengthDistribution, iter_arrivals


@dataclass(frozen=True)
class DayNight:
    period_s: float
    day_fraction: float = 0.5
    night_rate_scale: float = 0.3
    night_input: LengthDistribution | None = None  # None: the day's
    night_output: LengthDistribution | None = None

    def __post_init__(self) -> None:
        if not self.period_s > 0:
            raise ValueError(f"period_s must be > 0, got {self.period_s}")
        if not 0 < self.day_fraction < 1:
            raise ValueError(f"day_fraction must be in (0, 1), got {self.day_fraction}")
        if not self.night_rate_scale > 0:
            raise ValueError(f"night_rate_scale must be > 0, got {self.night_rate_scale}")

    def is_night(self, t: float) -> bool:
        return (t % self.period_s) >= self.day_fraction * self.period_s


@dataclass(frozen=True)
class ScenarioLoad:
    """Peak request rate of one scenario and its lengths."""

    rate: float
    input: LengthDistribution
    output: LengthDistribution
    burstiness: float = 1.0
    day_night: DayNight | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")

    def rate_at(self, t: float) -> float:
        dn = self.day_night
        return self.rate * (dn.night_rate_scale if dn and dn.is_night(t) else 1.0)


def scenario_arrivals(
    load: ScenarioLoad, duration_s: float, seed: int
) -> Iterator[tuple[float, int, int]]:
    """(time, input_len, output_len) of one scenario until ``duration_s``."""
    dn = load.day_night
    peak = load.rate * max(1.0, dn.night_rate_scale if dn else 1.0)
    thin = random.Random(seed ^ 0x5EED)
    lengths = random.Random(seed ^ 0x1E76)
    for t in iter_arrivals(peak, load.burstiness, seed):
        if t >= duration_s:
            return
        if dn is not None and thin.random() * peak >= load.rate_at(t):
            continue
        night = dn is not None and dn.is_night(t)
        inp = (dn.night_input if night and dn and dn.night_input else load.input)
        out = (dn.night_output if night and dn and dn.night_output else load.output)
        yield t, inp.sample(lengths), out.sample(lengths)


def spec_arrivals(specs: list[RequestSpec]) -> Iterator[tuple[float, int, int]]:
    """A trace (``pdserve.bench.traces.trace_requests``) as arrivals."""
    for s in specs:
        yield (s.arrival_s or 0.0), s.input_len, s.output_len


def failure_times(
    num_instances: int, per_hour_per_1000: float, duration_s: float, seed: int
) -> list[tuple[float, int]]:
    """(time, instance number) of injected failures: Poisson over the fleet."""
    if per_hour_per_1000 < 0:
        raise ValueError(f"failure rate must be >= 0, got {per_hour_per_1000}")
    rate = per_hour_per_1000 * num_instances / 1000.0 / 3600.0
    if rate == 0 or num_instances == 0:
        return []
    rng = random.Random(seed ^ 0xFA11)
    out, t = [], rng.expovariate(rate)
    while t < duration_s:
        out.append((t, rng.randrange(num_instances)))
        t += rng.expovariate(rate)
    return out
