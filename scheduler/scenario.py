"""Scenario classification: which P/D group serves a request.

A request names its scenario explicitly, or the deployment's rules pick one
(for example by prompt length: long prompts to a group with more prefills).
Each scenario routes only inside its own group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.errors import InvalidArgument


@dataclass(frozen=True)
class ScenarioRule:
    """Prompts of length in [min_prompt_tokens, max_prompt_tokens) go to ``scenario``."""

    scenario: str
    min_prompt_tokens: int = 0
    max_prompt_tokens: int | None = None  # None: no upper bound

    def __post_init__(self) -> None:
        if self.min_prompt_tokens < 0:
            raise ValueError(f"min_prompt_tokens must be >= 0, got {self.min_prompt_tokens}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= self.min_prompt_tokens:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must exceed "
                f"min_prompt_tokens ({self.min_prompt_tokens})"
            )

    def matches(self, prompt_tokens: int) -> bool:
        upper_ok = self.max_prompt_tokens is None or prompt_tokens < self.max_prompt_tokens
        return self.min_prompt_tokens <= prompt_tokens and upper_ok


class ScenarioClassifier:
    """Explicit scenario first, then the first matching rule, then the default."""

    def __init__(
        self, scenarios: Sequence[str], rules: Sequence[ScenarioRule] = (), default: str = "default"
    ) -> None:
        if not scenarios:
            raise ValueError("a deployment needs at least one scenario")
        self.scenarios = tuple(scenarios)
        unknown = [r.scenario for r in rules if r.scenario not in self.scenarios]
        if unknown:
            raise ValueError(f"rules name unknown scenarios: {unknown}")
        self.rules = tuple(rules)
        self.default = default if default in self.scenarios else self.scenarios[0]

    def classify(self, requested: str | None, prompt_tokens: int) -> str:
        if requested:
            if requested not in self.scenarios:
                raise InvalidArgument(
                    f"unknown scenario {requested!r}; this deployment serves {list(self.scenarios)}"
                )
            return requested
        for rule in self.rules:
            if rule.matches(prompt_tokens):
                return rule.scenario
        return self.default
