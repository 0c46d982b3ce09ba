from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdserve.engine import LLMEngine


@pytest.fixture(scope="module")
def tiny() -> Iterator[LLMEngine]:
    """The tiny preset; every test using it must leave the arena empty."""
    engine = LLMEngine.load("tiny")
    yield engine
    assert engine.arena.bytes_in_use == 0
    engine.arena.check_integrity()


@pytest.fixture(autouse=True)
def _arena_released(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "tiny" in request.fixturenames:
        engine = request.getfixturevalue("tiny")
        assert engine.arena.bytes_in_use == 0, "test leaked KV extents"
        engine.arena.check_integrity()
