"""``pdserve controller``'s ratio and health options reach their policies; bad values
are refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.scheduler.controller import cli
from pdserve.scheduler.controller.metrics import REASON_KINDS, reason_kind
from pdserve.scheduler.ratio import RatioController, RatioPolicy, RoleCapacity, ScenarioSignal


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--repository", str(tmp_path), "--metrics-port", "0", *extra])


def test_ratio_options_reach_the_policy(tmp_path: Path) -> None:
    args = _args(tmp_path, "--ratio-recall-s", "600", "--ratio-remember-s", "60",
                 "--ratio-min-peak", "0.7", "--ratio-explore-gain", "0.05",
                 "--ratio-max-step", "3", "--ratio-mix-window-s", "2")
    policy = cli.build(args).ratio.policy
    assert (policy.recall_s, policy.remember_s, policy.min_peak, policy.explore_gain,
            policy.max_step, policy.mix_window_s) == (600.0, 60.0, 0.7, 0.05, 3, 2.0)
    default = cli.build(_args(tmp_path)).ratio.policy
    # off unless asked; one instance per decision
    assert (default.recall_s, default.explore_gain, default.max_step,
            default.mix_window_s) == (0.0, 0.0, 1, 0.0)
    negative = cli.build(_args(tmp_path, "--ratio-explore-gain", "-0.1")).ratio.policy
    assert negative.explore_gain == -0.1  # a negative number, not a flag


def test_the_hang_timeout_reaches_the_health_policy(tmp_path: Path) -> None:
    assert cli.build(_args(tmp_path, "--hang-timeout-s", "45")).options.health.hang_timeout_s == 45
    assert cli.build(_args(tmp_path)).options.health.hang_timeout_s == 30.0


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--hang-timeout-s", "0", "hang_timeout_s must be positive"),
    ("--ratio-recall-s", "-1", "recall_s must be >= 0"),
    ("--ratio-explore-gain", "0.5", "explore_gain must be in [-tolerance, tolerance]"),
    ("--ratio-max-step", "0", "max_step must be >= 1"),
    ("--ratio-mix-window-s", "-1", "mix_window_s must be >= 0"),
])
def test_bad_ratio_options_are_refused_with_a_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str,
        message: str) -> None:
    assert cli.run(_args(tmp_path, flag, value)) == 2
    assert message in capsys.readouterr().err


def test_every_kind_of_ratio_decision_has_its_own_metric_label() -> None:
    """The decisions counter's reason label: bounded, and one per kind of rule (the
    memory's refusal quotes the balance rule it overruled, and must not count as it)."""
    def at(now: float, n_p: int, e2e: float, mix: float = 900.0) -> ScenarioSignal:
        return ScenarioSignal(now=now, n_prefill=n_p, n_decode=4 - n_p, arrival_rate=8.0,
                              prefill=RoleCapacity(4, 4 / 4.6), decode=RoleCapacity(4, 0.4),
                              e2e_s=e2e, prompt_tokens=mix, output_tokens=4.0)

    controller = RatioController(RatioPolicy(cooldown_s=5.0, e2e_rise=100.0, explore_gain=0.05,
                                             recall_s=600.0))
    reasons = [controller.decide(s).reason for s in (
        at(0.0, 2, 1.0), at(4.0, 2, 1.0), at(8.0, 3, 1.2), at(12.0, 3, 1.2), at(16.0, 3, 1.2),
        at(24.0, 2, 1.0), at(28.0, 2, 1.0, mix=16.0))]
    kinds = [reason_kind(r) for r in reasons]
    assert kinds == ["tolerance", "explore", "cooldown", "tolerance", "explore_back",
                     "tolerance", "mix_change"], reasons
    assert reason_kind("2P2D did no better with this mix lately (...; balance rule: ...)") \
        == "memory"
    assert reason_kind("recall: 3P1D did 2.31x better with this mix 250 s ago (...)") == "recall"
    assert set(kinds) <= set(REASON_KINDS) and len(set(REASON_KINDS)) == len(REASON_KINDS)
