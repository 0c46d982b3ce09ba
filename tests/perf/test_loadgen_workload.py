"""Arrivals (Poisson / gamma), synthetic lengths and prompt ids."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from pdserve.bench.workload import (
    LengthDistribution,
    PromptIds,
    gamma_arrivals,
    iter_synthetic_requests,
    synthetic_requests,
)


@pytest.mark.parametrize("rate,burstiness", [(4.0, 1.0), (20.0, 0.25), (0.5, 4.0)])
def test_mean_rate_within_tolerance(rate: float, burstiness: float) -> None:
    n = 20_000
    times = gamma_arrivals(n, rate, burstiness, seed=7)
    assert times[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(times))
    observed = (n - 1) / times[-1]
    # The mean of n gamma gaps has relative sd sqrt(1 / (n * k)); allow ~5 sd.
    tolerance = 5 * math.sqrt(1 / (n * burstiness))
    assert observed == pytest.approx(rate, rel=tolerance)


def test_burstiness_sets_gap_variability() -> None:
    # Gamma gaps with shape k have a squared coefficient of variation of 1 / k.
    for k in (0.25, 1.0, 4.0):
        gaps = [b - a for a, b in itertools.pairwise(gamma_arrivals(20_000, 10.0, k, seed=3))]
        cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2
        assert cv2 == pytest.approx(1 / k, rel=0.15)


def test_arrivals_are_deterministic_per_seed() -> None:
    assert gamma_arrivals(100, 3.0, 0.5, seed=1) == gamma_arrivals(100, 3.0, 0.5, seed=1)
    assert gamma_arrivals(100, 3.0, 0.5, seed=1) != gamma_arrivals(100, 3.0, 0.5, seed=2)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert gamma_arrivals(5, math.inf) == [0.0] * 5


@pytest.mark.parametrize("rate,burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, math.nan)])
def test_bad_arrival_parameters(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError):
        gamma_arrivals(3, rate, burstiness)


def test_lengths_follow_mean_and_clamp() -> None:
    dist = LengthDistribution(mean=200, stddev=50, max_len=260)
    specs = synthetic_requests(5_000, dist, LengthDistribution(16), seed=11)
    lengths = [s.input_len for s in specs]
    assert min(lengths) >= 1 and max(lengths) == 260
    # The cap at +1.2 sd pulls the mean down a little; the median stays.
    assert statistics.median(lengths) == pytest.approx(200, abs=3)
    assert {s.output_len for s in specs} == {16}
    tiny = synthetic_requests(500, LengthDistribution(2, 10), LengthDistribution(1), seed=1)
    assert min(s.input_len for s in tiny) == 1


def test_lengths_do_not_depend_on_arrivals() -> None:
    d_in, d_out = LengthDistribution(100, 30), LengthDistribution(50, 10)
    closed = synthetic_requests(50, d_in, d_out, seed=5)
    opened = synthetic_requests(50, d_in, d_out, arrivals=[float(i) for i in range(50)], seed=5)
    assert [(s.input_len, s.output_len) for s in closed] == [
        (s.input_len, s.output_len) for s in opened
    ]
    assert all(s.arrival_s is None for s in closed)
    assert [s.arrival_s for s in opened] == [float(i) for i in range(50)]


def test_iterator_is_endless_without_arrivals() -> None:
    it = iter_synthetic_requests(LengthDistribution(4), LengthDistribution(4), first_index=10)
    specs = list(itertools.islice(it, 1000))
    assert [s.index for s in specs] == list(range(10, 1010))


def test_bad_length_distributions() -> None:
    with pytest.raises(ValueError, match="mean"):
        LengthDistribution(0)
    with pytest.raises(ValueError, match="stddev"):
        LengthDistribution(10, -1)
    with pytest.raises(ValueError, match="max_len"):
        LengthDistribution(10, max_len=0)


def test_prompt_ids_exact_length_range_and_seeded() -> None:
    spec = synthetic_requests(1, LengthDistribution(300), LengthDistribution(1))[0]
    ids = PromptIds(min_id=40, max_id=50, seed=3).for_request(spec)
    assert len(ids) == 300 and min(ids) >= 40 and max(ids) < 50
    assert ids == PromptIds(min_id=40, max_id=50, seed=3).for_request(spec)
    assert ids != PromptIds(min_id=40, max_id=50, seed=4).for_request(spec)
    with pytest.raises(ValueError):
        PromptIds(min_id=10, max_id=10)
