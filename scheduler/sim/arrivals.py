"""A scenario's arrivals, drawn as ``workload.scenario_arrivals`` draws them, natively.

``scenario_arrivals`` defines a scenario's requests with the load generator's own
code: ``iter_arrivals``' gamma gaps and ``LengthDistribution.sample``, on seeded
``random.Random`` streams. The scale run draws 31 M of them, and those
interpreted calls (a generator, a gamma variate, two normal variates) cost more
than a tenth of its time. ``scenario_arrivals_native`` yields exactly the same (time,
input length, output length) tuples: the same generators with the same seeds,
drawn in the same order, through the same arithmetic (``random.gammavariate``
for shape 1, ``random.gauss`` with its cached second variate,
``LengthDistribution.sample``'s rounding and clamping), written out here so
that the native build compiles it. ``tests/scheduler/test_sim_arrivals.py``
checks it against ``scenario_arrivals`` value for value (Poisson, bursty,
day/night loads), so a change of either side is caught.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from pdserve.bench.workload import LengthDistribution
from pdserve.scheduler.sim.workload import ScenarioLoad

_TWOPI = 2.0 * math.pi  # random.TWOPI


class _Lengths:
    """One ``LengthDistribution``'s fields, for ``_Sampler.sample``."""

    def __init__(self, dist: LengthDistribution) -> None:
        self.mean = float(dist.mean)  # exact: gauss' mu + z * sigma converts it anyway
        self.stddev = float(dist.stddev)
        self.fixed: int = round(dist.mean)  # the length when stddev is 0
        self.min_len = dist.min_len
        self.max_len = -1 if dist.max_len is None else dist.max_len  # -1: none


class _Sampler:
    """``LengthDistribution.sample`` on one generator (``random.gauss`` keeps its second
    variate in the generator: here, for a generator only this sampler draws from)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.gauss_next = 0.0
        self.has_gauss_next = False

    def sample(self, d: _Lengths) -> int:
        if d.stddev > 0:
            value: int = round(d.mean + self._gauss() * d.stddev)
        else:
            value = d.fixed
        if value < d.min_len:  # max(min_len, value)
            value = d.min_len
        if d.max_len >= 0 and value > d.max_len:  # min(max_len, value)
            value = d.max_len
        return value

    def _gauss(self) -> float:
        """``random.gauss``' standard normal variate z (Box-Muller: two variates a
        draw, the second kept for the next call)."""
        if self.has_gauss_next:
            self.has_gauss_next = False
            return self.gauss_next
        x2pi = self.rng.random() * _TWOPI
        g2rad = math.sqrt(-2.0 * math.log(1.0 - self.rng.random()))
        self.gauss_next = math.sin(x2pi) * g2rad
        self.has_gauss_next = True
        return math.cos(x2pi) * g2rad


def scenario_arrivals_native(load: ScenarioLoad, duration_s: float,
                             seed: int) -> Iterator[tuple[float, int, int]]:
    """``workload.scenario_arrivals(load, duration_s, seed)``: the same values."""
    dn = load.day_night
    peak = load.rate * max(1.0, dn.night_rate_scale if dn else 1.0)
    # iter_arrivals(peak, burstiness, seed): gaps gamma(shape, 1 / (peak * shape))
    shape = load.burstiness
    theta = 1.0 / (peak * shape)
    gaps = random.Random(seed)
    thin = random.Random(seed ^ 0x5EED)
    lengths = _Sampler(random.Random(seed ^ 0x1E76))
    day_in, day_out = _Lengths(load.input), _Lengths(load.output)
    night_in = _Lengths(dn.night_input if dn is not None and dn.night_input else load.input)
    night_out = _Lengths(dn.night_output if dn is not None and dn.night_output else load.output)
    t = 0.0  # the unthinned process's times, from 0
    while t < duration_s:
        now = t
        # the gap to the next time (iter_arrivals draws it when asked for that time)
        if shape == 1.0:  # random.gammavariate(1.0, theta)
            t = now + -math.log(1.0 - gaps.random()) * theta
        else:
            t = now + gaps.gammavariate(shape, theta)
        if dn is not None:
            if thin.random() * peak >= load.rate_at(now):
                continue
            if dn.is_night(now):
                yield now, lengths.sample(night_in), lengths.sample(night_out)
                continue
        yield now, lengths.sample(day_in), lengths.sample(day_out)
