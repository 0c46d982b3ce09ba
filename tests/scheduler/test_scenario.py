from __future__ import annotations

import pytest

from pdserve.errors import InvalidArgument
from pdserve.scheduler.scenario import ScenarioClassifier, ScenarioRule


def test_explicit_then_rules_then_default() -> None:
    classifier = ScenarioClassifier(
        ["chat", "long"], [ScenarioRule("long", min_prompt_tokens=2048)], default="chat"
    )
    assert classifier.classify("long", 10) == "long"
    assert classifier.classify(None, 4096) == "long"
    assert classifier.classify("", 100) == "chat"


def test_unknown_scenario_is_invalid_argument_naming_the_choices() -> None:
    classifier = ScenarioClassifier(["default"])
    with pytest.raises(InvalidArgument, match=r"unknown scenario 'nope'.*default"):
        classifier.classify("nope", 1)


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenarios"):
        ScenarioClassifier(["a"], [ScenarioRule("b")])
    with pytest.raises(ValueError, match="must exceed"):
        ScenarioRule("a", min_prompt_tokens=10, max_prompt_tokens=10)
    with pytest.raises(ValueError, match="at least one scenario"):
        ScenarioClassifier([])
