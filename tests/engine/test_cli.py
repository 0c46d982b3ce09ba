from __future__ import annotations

import pytest

from pdserve.cli import main


def test_generate_prints_a_completion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--preset", "tiny", "--prompt", "Hi", "--max-tokens", "8",
                 "--ignore-eos"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.strip()
    assert main(["generate", "--preset", "tiny", "--prompt", "Hi", "--max-tokens", "8",
                 "--ignore-eos"]) == 0
    assert capsys.readouterr().out == greedy
    assert main(["generate", "--preset", "tiny", "--prompt", "Hi", "--max-tokens", "8",
                 "--temperature", "1.0", "--top-p", "0.9", "--top-k", "20", "--seed", "3"]) == 0


def test_generate_reports_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "Hi", "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert main(["generate", "--prompt", "Hi", "--device", "npu:0"]) == 2
    assert "torch_npu" in capsys.readouterr().err
