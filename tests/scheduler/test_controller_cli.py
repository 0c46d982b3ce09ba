"""``pdserve controller``'s ratio options reach the policy; bad values are refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.scheduler.controller import cli


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--repository", str(tmp_path), "--metrics-port", "0", *extra])


def test_ratio_options_reach_the_policy(tmp_path: Path) -> None:
    args = _args(tmp_path, "--ratio-recall-s", "600", "--ratio-remember-s", "60",
                 "--ratio-min-peak", "0.7", "--ratio-explore-gain", "0.05")
    policy = cli.build(args).ratio.policy
    assert (policy.recall_s, policy.remember_s, policy.min_peak, policy.explore_gain) == \
        (600.0, 60.0, 0.7, 0.05)
    default = cli.build(_args(tmp_path)).ratio.policy
    assert (default.recall_s, default.explore_gain) == (0.0, 0.0)  # off unless asked


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--ratio-recall-s", "-1", "recall_s must be >= 0"),
    ("--ratio-explore-gain", "0.5", "explore_gain must be in [0, tolerance=0.15]"),
])
def test_bad_ratio_options_are_refused_with_a_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str,
        message: str) -> None:
    assert cli.run(_args(tmp_path, flag, value)) == 2
    assert message in capsys.readouterr().err
