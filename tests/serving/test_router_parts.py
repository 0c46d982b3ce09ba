"""The router's parts of one request, in-process: a restart after a lost
prefill, a resume after a lost decode, and the text a resumed answer ends with.

``RouterRole._resumable`` is driven with a stand-in for ``_disaggregated``
(each call is one part of the request), so the test sees the ids, prompts and
TTFT deadlines the parts get, without a Triton server.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pdserve.engine import load_tokenizer_and_config
from pdserve.errors import Unavailable
from tests.serving import fake_pb_utils

PROMPT = (72, 105, 33)


@pytest.fixture(scope="module")
def router() -> Iterator[Any]:
    """pdserve.roles.router imported against the fake Triton utils (dropped after)."""
    with fake_pb_utils.installed():
        from pdserve.roles import router as mod
        yield mod


def _request(router: Any, *, stream: bool = False, max_tokens: int = 8) -> Any:
    return router.ClientRequest(
        request_id="X", prompt_ids=PROMPT, prompt_text="Hi!", sampling={"max_tokens": max_tokens},
        max_tokens=max_tokens, stream=stream, scenario="default", exclude_input_in_output=True)


def _emitter(router: Any, req: Any) -> tuple[Any, list[tuple[dict[str, np.ndarray], bool]]]:
    tokenizer, _ = load_tokenizer_and_config("tiny")
    sent: list[tuple[dict[str, np.ndarray], bool]] = []
    return router.Emitter(req, tokenizer, lambda out, final: sent.append((out, final))), sent


class Parts:
    """Stands in for RouterRole: ``_disaggregated`` plays one scripted step per part."""

    def __init__(self, steps: list[Callable[[Any], None]]) -> None:
        self.steps = steps
        self.parts: list[tuple[str, tuple[int, ...], float]] = []
        self.cfg = SimpleNamespace(ttft_budget_s=5.0)
        self.num_resumes = 0
        counter = SimpleNamespace(increment=lambda n: None)
        self.scenario_metrics = defaultdict(lambda: SimpleNamespace(resumed=counter))
        self.view = SimpleNamespace(record_failure=lambda name, why: None)

    async def _disaggregated(self, part: Any, emitter: Any, state: dict[str, str],
                             deadline: float) -> None:
        self.parts.append((part.request_id, part.prompt_ids, deadline))
        await asyncio.sleep(0.01)  # time passes between parts
        self.steps.pop(0)(emitter)


def test_a_restart_after_a_lost_prefill_gets_a_new_id_and_keeps_the_budget(router: Any) -> None:
    """The aborted reservation's stragglers (an ABORT on the token channel, a
    write from the lost prefill) name the old id: the restart must not reuse it
    (it did: the stale ABORT ended the new stream)."""
    req = _request(router)
    emitter, _ = _emitter(router, req)

    def lose_prefill(_: Any) -> None:
        raise router.PrefillLost("prefill_0", Unavailable("is not healthy"))

    parts = Parts([lose_prefill, lose_prefill, lambda e: e.finish("length")])
    asyncio.run(router.RouterRole._resumable(parts, req, emitter, {}))
    ids = [p[0] for p in parts.parts]
    assert ids == ["X", "X~1", "X~2"]
    assert [p[1] for p in parts.parts] == [PROMPT] * 3
    assert len({p[2] for p in parts.parts}) == 1  # one TTFT deadline for all of them


def test_a_decode_lost_before_any_token_keeps_the_deadline(router: Any) -> None:
    """A decode that refused the reserve (no room after all) is not a new
    request: the TTFT budget was given once (it was given anew per resume)."""
    req = _request(router)
    emitter, _ = _emitter(router, req)

    def refuse(_: Any) -> None:
        raise router.DecodeLost("decode_0", Unavailable("no space in KV arena"))

    def first_token_then_lost(e: Any) -> None:
        e.tokens([104])
        raise router.DecodeLost("decode_1", Unavailable("is not healthy"))

    parts = Parts([refuse, first_token_then_lost, lambda e: e.finish("length")])
    asyncio.run(router.RouterRole._resumable(parts, req, emitter, {}))
    (id0, _, d0), (id1, _, d1), (id2, prompt2, d2) = parts.parts
    assert (id0, id1, id2) == ("X", "X~1", "X~2")
    assert d1 == d0  # nothing sent yet: the same budget
    assert d2 > d0 and prompt2 == (*PROMPT, 104)  # after a token: the rest's own budget


def test_a_resumed_answer_is_cut_at_the_stop_string_of_its_last_part(router: Any) -> None:
    """stream=false with a stop string: the decode of the last part reports
    where the stop string begins in ITS text; the client gets every part's
    text up to there (it got the last part's offset into the whole text)."""
    req = _request(router, max_tokens=32)
    emitter, sent = _emitter(router, req)
    emitter.tokens(list(b"Hello world, "))
    emitter.begin_part()  # the decode died; the rest resumes elsewhere
    emitter.tokens(list(b"fooEND"))
    emitter.finish("stop", text_len=3)  # "foo" before the stop string, in the part's text
    out, final = sent[-1]
    assert final and out["text_output"][0] == b"Hello world, foo"


def _prefill_phase(router: Any, prefills: list[Any], decode_model: str,
                   deadline_s: float) -> None:
    """RouterRole._prefill for decode_1 (serving ``decode_model``) with these prefills."""
    import time

    from pdserve.scheduler.forwarding import ForwardingPolicy

    routable = {p.model for p in prefills if p.is_routable}
    fake = SimpleNamespace(
        cfg=SimpleNamespace(admission="on_demand"),
        policy=ForwardingPolicy(min_backoff_s=0.01, max_backoff_s=0.01),
        view=SimpleNamespace(model=lambda name: decode_model, is_full_here=lambda name: False),
        slot_freed={"default": None},
        _prefills=lambda scenario, decode: [p for p in prefills if p.model == decode_model],
        _served_models=lambda scenario: routable,
    )
    asyncio.run(router.RouterRole._prefill(
        fake, _request(router), "handle", time.monotonic() + deadline_s, {}, "decode_1",
        lambda: False))


def test_a_decode_no_routable_prefill_can_feed_any_more_is_given_up_at_once(router: Any) -> None:
    """Mid-upgrade: decode_1 (v1) was chosen, then the upgrade drained the last v1
    prefill; a v2 prefill is routable. The request starts over on a decode a
    prefill can feed instead of waiting out its TTFT budget (3 of 976 requests
    of the rolling-upgrade test ended so: "0 attempts")."""
    from pdserve.scheduler.instance import InstanceLoad

    prefills = [InstanceLoad("prefill_0", "prefill", "default", 4, model="v2"),
                InstanceLoad("prefill_1", "prefill", "default", 4, model="v1", draining=True)]
    with pytest.raises(router.NoPrefillFeeds, match="no routable prefill serves decode_1"):
        _prefill_phase(router, prefills, "v1", deadline_s=30.0)
    # No routable prefill at all (all restarting): nothing better elsewhere, it waits.
    prefills[0] = InstanceLoad("prefill_0", "prefill", "default", 4, model="v2", healthy=False)
    with pytest.raises(Unavailable, match="TTFT budget"):
        _prefill_phase(router, prefills, "v1", deadline_s=0.1)


def test_heartbeats_end_once_the_launcher_marks_the_stop(
        router: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat still out when Triton unloads its instance never returns (2.51)
    and crashed tritonserver in the router's finalize at stop: the launcher marks
    the stop first (``server_stopping``) and the heartbeat loop ends."""
    from pdserve.server.config import RUNTIME_DIR_ENV, STOPPING_MARKER

    monkeypatch.setenv(RUNTIME_DIR_ENV, str(tmp_path))
    beats: list[str] = []

    async def beat(name: str) -> None:
        beats.append(name)
        if len(beats) == 4:  # the second round's last heartbeat
            (tmp_path / STOPPING_MARKER).touch()

    stand_in = SimpleNamespace(
        view=SimpleNamespace(refresh=lambda: None, names=lambda: ["prefill_0", "decode_0"]),
        _beat=beat)
    asyncio.run(asyncio.wait_for(router.RouterRole._heartbeats(stand_in), 10))
    assert beats == ["prefill_0", "decode_0"] * 2
