"""``decode_start``: a decode starts a sequence when its KV lands, or on the router's commit.

One tritonserver with both behind one router (``specs/tiny_decode_start.yaml``):
scenario ``default`` (prefill_0 -> decode_0, on landing, the default) and
``commit`` (prefill_1 -> decode_1, on commit). Both must give the offline
engine's tokens, seeded sampling included (the sampler state travels with the
KV's completion notice), answers of 1 and 2 tokens included, and free all KV.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.server.launcher import TritonServer
from tests.serving.conftest import start_server
from tests.serving.helpers import _inputs, generate_many, scrape, scrape_until

pytestmark = pytest.mark.e2e

STARTED = "pdserve_decode_started_on_landing_total"
KV = ("prefill_0", "decode_0", "prefill_1", "decode_1")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with start_server("tiny_decode_start.yaml",
                      Path(tmp_path_factory.mktemp("decode_start"))) as s:
        yield s


def _sampling(i: int) -> dict[str, object]:
    max_tokens = (1, 2, 9)[i % 3]
    if i % 2 == 0:
        return {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    return {"temperature": 0.9, "top_k": 20, "seed": 500 + i, "max_tokens": max_tokens,
            "ignore_eos": True}


def test_both_starts_give_the_offline_tokens_and_only_on_landing_skips_commit(
        server: TritonServer) -> None:
    engine = LLMEngine.load("tiny")
    prompts = [[(7 * i + 3 * k) % 200 + 1 for k in range(5 + 4 * i)] for i in range(12)]
    params = [SamplingParams.from_dict(_sampling(i)) for i in range(12)]
    offline = generate(engine, prompts, params)
    url, metrics = server.options.grpc_url, server.options.metrics_url
    before = scrape(metrics)
    for scenario in ("default", "commit"):
        results = generate_many(url, [
            {"ids": p, "sampling": _sampling(i), "scenario": scenario}
            for i, p in enumerate(prompts)])
        for i, r in enumerate(results):
            assert r.error is None, (scenario, i, r.error)
            assert r.ids == offline[i], f"{scenario} request {i}: {r.ids} != {offline[i]}"
            assert r.finish_reason == "length"
    # Requests that go on after the first token (max_tokens 2 and 9: 8 of 12)
    # started on landing on decode_0; decode_1 waited for the router's commit.
    going_on = sum(1 for i in range(12) if (1, 2, 9)[i % 3] > 1)
    m = scrape_until(metrics, lambda m: m.get((STARTED, "decode_0"), 0)
                     - before.get((STARTED, "decode_0"), 0) >= going_on)
    assert m.get((STARTED, "decode_0"), 0) - before.get((STARTED, "decode_0"), 0) == going_on
    assert m.get((STARTED, "decode_1"), 0) == 0
    _assert_kv_free(metrics)


def test_cancelled_streams_started_on_landing_free_their_kv(server: TritonServer) -> None:
    """Cancelled right after the first tokens: the decode had started (on landing)
    before the router heard from the prefill, and the abort must still find it."""
    for _ in range(3):
        _send_and_cancel(server.options.grpc_url, 8)
    _assert_kv_free(server.options.metrics_url)


def _send_and_cancel(url: str, n: int) -> None:
    """``n`` streams of 200 tokens, cancelled once ``n`` responses came back."""
    client = grpcclient.InferenceServerClient(url)
    seen: list[int] = []
    client.start_stream(callback=lambda result, error: seen.append(1))
    for i in range(n):
        client.async_stream_infer(
            "pdserve", _inputs(None, [3 + i] * (20 + i), True,
                               {"max_tokens": 200, "ignore_eos": True}, "default"),
            request_id=str(i))
    deadline = time.monotonic() + 30
    while len(seen) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    client.stop_stream(cancel_requests=True)
    client.close()


def _assert_kv_free(metrics_url: str) -> None:
    m = scrape_until(metrics_url, lambda m: all(
        m.get(("pdserve_kv_arena_bytes_in_use", i), -1) == 0 for i in KV), timeout_s=20)
    assert {i: m.get(("pdserve_kv_arena_bytes_in_use", i)) for i in KV} == dict.fromkeys(KV, 0)
