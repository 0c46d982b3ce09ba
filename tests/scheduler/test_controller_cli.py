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
    policy = cli.build(_args(tmp_path, "--ratio-recall-s", "600", "--ratio-remember-s", "60",
                             "--ratio-min-peak", "0.7")).ratio.policy
    assert (policy.recall_s, policy.remember_s, policy.min_peak) == (600.0, 60.0, 0.7)
    assert cli.build(_args(tmp_path)).ratio.policy.recall_s == 0.0  # off unless asked


def test_a_negative_recall_is_refused_with_a_message(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(_args(tmp_path, "--ratio-recall-s", "-1")) == 2
    assert "recall_s must be >= 0" in capsys.readouterr().err
